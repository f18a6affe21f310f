"""A small model, an option set and a reference the activity-perturbation
test files share."""

import keras

from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import testing
from keras_fwdgrad.research.methods import LAYER_LOCAL_OPTIONS

# Activity perturbation in which every unit's estimate is its exact local
# gradient (a block after every layer with trainable variables, one loss
# per channel and position, random-sign tangents), as the benchmarks use
# it.
PER_UNIT_SIGNS = LAYER_LOCAL_OPTIONS


def cnn():
    """Two convolutions (max-pooling between them, `BatchNormalization`
    after the second), a hidden `Dense` with dropout and an L2-regularized
    softmax output, for 8×8×1 inputs and 3 classes."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(4, 3, activation="relu", padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(3, activation="softmax", kernel_regularizer="l2"),
        ]
    )


def reference_gradients(base, x, y, loss="sparse_categorical_crossentropy"):
    """`{id(variable): gradient}` of `base`'s loss, by reverse mode."""
    wrapper = ForwardGradientModel(base)
    wrapper.compile(optimizer="sgd", loss=loss)
    _, grads = testing.tape_gradients(wrapper, x, y)
    return {id(v): g for v, g in zip(base.trainable_variables, grads)}
