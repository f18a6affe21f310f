"""Tests of the argument checks: `ForwardGradientModel` refuses a bad
argument or a model it cannot train with an error that names the argument
and echoes what it received."""

import keras
import pytest
import tensorflow as tf

from keras_fwdgrad import ForwardGradientModel
from tests.helpers import mlp

L = keras.layers


def test_rejects_non_keras_model():
    with pytest.raises(TypeError, match="`model` must be a Keras model or layer"):
        ForwardGradientModel(lambda x: x)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_rejects_bad_num_directions(value):
    with pytest.raises(ValueError, match="`num_directions` must be a positive integer"):
        ForwardGradientModel(mlp(), num_directions=value)


@pytest.mark.parametrize("value", [0, -1.0, float("inf")])
def test_rejects_non_positive_jvp_clip(value):
    with pytest.raises(ValueError, match="`jvp_clip` must be a positive"):
        ForwardGradientModel(mlp(), jvp_clip=value)


def test_rejects_non_numeric_jvp_clip_and_seed():
    with pytest.raises(TypeError, match="`jvp_clip`"):
        ForwardGradientModel(mlp(), jvp_clip="1")
    with pytest.raises(TypeError, match="`seed`"):
        ForwardGradientModel(mlp(), seed=1.5)


@pytest.mark.parametrize("seed", [2**70, 2**63, -(2**63) - 1])
def test_rejects_seed_outside_int64(seed):
    with pytest.raises(ValueError, match="`seed` must fit in a signed 64-bit integer"):
        ForwardGradientModel(mlp(), seed=seed)
    # The largest allowed seed is accepted.
    ForwardGradientModel(mlp(), seed=2**63 - 1)


def test_rejects_unknown_direction():
    with pytest.raises(ValueError, match="`direction` must be one of"):
        ForwardGradientModel(mlp(), direction="sobol")


def test_rejects_unsupported_backend(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(ValueError, match=r"supports the Keras backends \('tensorflow', 'jax'\)"):
        ForwardGradientModel(mlp())


def test_rejects_model_without_trainable_variables():
    base = keras.Sequential([keras.Input((3,)), L.Flatten()])
    with pytest.raises(ValueError, match="no trainable variables"):
        ForwardGradientModel(base)
    frozen = mlp()
    frozen.trainable = False
    with pytest.raises(ValueError, match="no trainable variables"):
        ForwardGradientModel(frozen)


def test_rejects_non_floating_trainable_variable():
    class IntLayer(L.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(), dtype="int32", initializer="ones")

        def call(self, x):
            return x * tf.cast(self.w, x.dtype)

    base = keras.Sequential([keras.Input((3,)), IntLayer(), L.Dense(2)])
    with pytest.raises(TypeError, match="floating dtype"):
        ForwardGradientModel(base)
