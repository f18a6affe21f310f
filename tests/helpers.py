"""The small data, models and loss that several test files share: a
classification set and MLP (the tests of `ForwardGradientModel`, its
trainer, arguments, callbacks and direction stream) and a linear
regression (the tuning and search tests)."""

import keras
import numpy as np
import tensorflow as tf

from keras_fwdgrad import directions

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(n=256, features=10, classes=3, seed=0):
    """A linearly separable classification set: `n` float32 samples and
    their integer labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    w = rng.normal(size=(features, classes))
    y = np.argmax(x @ w, axis=1)
    return x, y


def mlp(features=10, hidden=8, classes=3, batch_norm=False):
    """A built two-layer MLP, with a BatchNormalization after the hidden
    layer if `batch_norm`."""
    layers = [keras.Input((features,)), keras.layers.Dense(hidden, activation="tanh")]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(classes))
    return keras.Sequential(layers)


def weights_of(model):
    """The trainable weights of `model` as NumPy arrays."""
    return [np.array(v) for v in model.trainable_variables]


# Features of the linear regression.
FEATURES = 100


def linear():
    """A linear model of `FEATURES` inputs, unbuilt weights drawn fresh."""
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1)])


def regression(n, seed):
    """Noise-free linear targets as a `tf.data.Dataset` of batches of 32;
    one true weight vector for all splits."""
    w = np.random.default_rng(99).normal(size=(FEATURES, 1)) / np.sqrt(FEATURES)
    x = np.random.default_rng(seed).normal(size=(n, FEATURES)).astype("float32")
    y = (x @ w).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(32)


# The direction stream worked by hand, on TensorFlow.


def seed_of_step(seed, step, k=None):
    """The TensorFlow seed of direction `k` of step `step`, as the model
    folds it."""
    key = tf.constant([seed, step], tf.int64)
    if k is not None:
        key = tf.random.experimental.stateless_fold_in(key, k)
    return key


def sample_direction(direction, shapes, key, mode):
    """Draws a direction as the model does in `mode` (the shipped families
    give the same bits in every mode, a custom one need not)."""
    fn = lambda: directions.get(direction).sample(shapes, key)  # noqa: E731
    return fn() if mode != "xla" else tf.function(fn, jit_compile=True, autograph=False)()


def tape_directional_derivative(model, x, y, v):
    """`∇f·v` of the mean sparse cross-entropy by `tf.GradientTape`, and
    the gradient."""
    with tf.GradientTape() as tape:
        loss = SCCE(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    return float(sum(tf.reduce_sum(g * t) for g, t in zip(grads, v))), grads
