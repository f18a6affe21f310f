"""Tests of `keras_fwdgrad.backend.forward_mode_fixes`.

The tests named `test_tensorflow_..._still_...` check TensorFlow's own
forward mode where it is wrong (TensorFlow 2.21.0): each fails once
TensorFlow is fixed, and then the fix it names can go. The others check
that each fix is exact: its JVP equals `sum(grad * tangent)` from
`tf.GradientTape` (run eagerly, where TensorFlow is exact), rtol 1e-5.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fwdgrad.backend import forward_mode_fixes
from tests.conftest import MODES

RTOL = 1e-5
ATOL = 1e-6


def _run(mode, fn):
    if mode == "eager":
        return fn()
    return tf.function(fn, jit_compile=mode == "xla")()


def _normal(*shape, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=shape).astype("float32"))


def _jvp(fn, primal, tangent):
    """The JVP of the scalar `sum(sin(fn(primal)))` along `tangent`, from
    `tf.autodiff.ForwardAccumulator`."""
    with tf.autodiff.ForwardAccumulator(primal, tangent) as acc:
        loss = tf.reduce_sum(tf.sin(fn()))
    return acc.jvp(loss, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def _tape(fn, primal, tangent):
    """`sum(grad * tangent)` for the same scalar, from an eager tape."""
    with tf.GradientTape() as tape:
        tape.watch(primal)
        loss = tf.reduce_sum(tf.sin(fn()))
    return float(tf.reduce_sum(tape.gradient(loss, primal) * tangent))


def _grouped_conv_case():
    x = _normal(4, 6, 6, 4)
    kernel = tf.Variable(_normal(3, 3, 2, 4, seed=1))
    tangent = _normal(3, 3, 2, 4, seed=2)
    fn = lambda: keras.ops.conv(x, kernel)  # noqa: E731
    return fn, kernel, tangent


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_tensorflow_grouped_convolution_jvp_is_still_wrong(mode):
    """TensorFlow loses the tangent of a kernel variable through the nested
    XLA function Keras runs a grouped convolution in, inside a
    `tf.function` (the JVP comes out zero). Fix:
    `forward_mode_fixes.exact_convolutions`."""
    fn, kernel, tangent = _grouped_conv_case()
    ref = _tape(fn, kernel, tangent)
    d = float(_run(mode, lambda: _jvp(fn, kernel, tangent)))
    assert abs(ref) > 1.0
    assert abs(d - ref) > 0.1 * abs(ref), (d, ref)


@pytest.mark.parametrize("mode", MODES)
def test_exact_convolutions_gives_the_grouped_convolution_jvp(mode):
    fn, kernel, tangent = _grouped_conv_case()
    ref = _tape(fn, kernel, tangent)

    def fixed():
        with forward_mode_fixes.exact_convolutions():
            return _jvp(fn, kernel, tangent)

    np.testing.assert_allclose(float(_run(mode, fixed)), ref, rtol=RTOL, atol=ATOL)


def test_tensorflow_overlapping_max_pool_jvp_is_still_wrong_under_xla():
    """TensorFlow's forward-mode derivative of max-pooling with overlapping
    windows is wrong under XLA (relative error 1.3e-2 here). Refused by
    `forward_mode_fixes.inexact_reason` and `check_traced_ops`."""
    x, tangent = _normal(4, 13, 3), _normal(4, 13, 3, seed=1)
    fn = lambda: tf.nn.max_pool1d(x, 3, 2, "SAME")  # noqa: E731
    ref = _tape(fn, x, tangent)
    d = float(_run("xla", lambda: _jvp(fn, x, tangent)))
    assert abs(ref) > 1.0
    assert abs(d - ref) > 1e-3 * abs(ref), (d, ref)


def test_tensorflow_cannot_differentiate_a_recurrent_loop_in_a_graph():
    """TensorFlow cannot build the forward-mode derivative of a recurrent
    layer's `while_loop` in a `tf.function`. Fix:
    `forward_mode_fixes.recurrences_unrolled`."""
    layer = keras.layers.SimpleRNN(4)
    x = _normal(2, 5, 3)
    layer(x)
    kernel = layer.cell.kernel.value
    with pytest.raises(ValueError, match="handle data"):
        _run("graph", lambda: _jvp(lambda: layer(x), kernel, tf.ones_like(kernel)))


@pytest.mark.parametrize("mode", MODES)
def test_recurrences_unrolled_gives_the_recurrent_jvp(mode):
    layer = keras.layers.SimpleRNN(4)
    x = _normal(2, 5, 3)
    layer(x)
    kernel = layer.cell.kernel.value
    tangent = _normal(*kernel.shape, seed=1)
    ref = _tape(lambda: layer(x), kernel, tangent)
    model = keras.Sequential([keras.Input((5, 3)), layer])

    def fixed():
        with forward_mode_fixes.recurrences_unrolled(model):
            return _jvp(lambda: layer(x), kernel, tangent)

    np.testing.assert_allclose(float(_run(mode, fixed)), ref, rtol=RTOL, atol=ATOL)
    assert not layer.unroll
