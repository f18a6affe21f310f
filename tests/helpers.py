"""The small data, model and loss that the tests of `ForwardGradientModel`,
its trainer, its arguments, its callbacks and its direction stream share."""

import keras
import numpy as np

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
