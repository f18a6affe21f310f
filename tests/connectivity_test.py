"""Tests of the connectivity check: a trainable variable that the loss
reaches only through an op without a derivative is an error naming the
variable, the op and the layer; one the loss does not use at all gets a
zero gradient, as with backprop."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fwdgrad import ForwardGradientModel
from tests.conftest import MODES
from tests.helpers import SCCE
from tests.model_zoo import random_inputs
from tests.model_zoo import random_labels

L = keras.layers


class _Round(L.Layer):
    def call(self, x):
        return tf.round(x)


class _NumpyFunction(L.Layer):
    def call(self, x):
        y = tf.numpy_function(lambda a: 2 * a, [x], tf.float32)
        y.set_shape(x.shape)
        return y


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "layer, op", [(_Round, "Round"), (_NumpyFunction, "PyFunc")], ids=["round", "numpy_function"]
)
def test_op_without_derivative_is_an_error_naming_op_and_layer(layer, op, mode):
    base = keras.Sequential([keras.Input((6,)), L.Dense(8), layer(name="cut"), L.Dense(10)])
    model = ForwardGradientModel(base, seed=0)
    model.compile(
        optimizer="sgd", loss=SCCE, run_eagerly=mode == "eager", jit_compile=mode == "xla"
    )
    with pytest.raises(ValueError, match=rf"dense/kernel.*`{op}`.*layer 'cut'"):
        model.fit(random_inputs(6), random_labels(), verbose=0)


def test_unused_head_gets_zero_and_stop_gradient_is_allowed():
    """A variable the loss does not use (an unused head, or one behind
    `tf.stop_gradient`) gets a zero gradient, as with backprop, and
    training runs."""
    inputs = keras.Input((6,))
    h = L.Dense(8)(inputs)
    unused = L.Dense(3, name="unused")(h)
    stopped = L.Dense(8, name="stopped")(inputs)
    h = L.Add()([h, L.Lambda(tf.stop_gradient)(stopped)])
    base = keras.Model(inputs, L.Dense(10)(h))
    del unused
    model = ForwardGradientModel(base, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=SCCE)
    _, grads = model.forward_gradient(random_inputs(6), random_labels())
    for var, g in zip(base.trainable_variables, grads):
        zero = "unused" in var.path or "stopped" in var.path
        assert np.all(np.array(g) == 0) == zero, var.path
