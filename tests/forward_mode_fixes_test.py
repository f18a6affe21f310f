"""Tests of `keras_fwdgrad.backend.tensorflow.forward_mode_fixes`.

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

from keras_fwdgrad import backend
from keras_fwdgrad.backend.tensorflow import forward_mode_fixes
from tests.conftest import MODES

RTOL = 1e-5
ATOL = 1e-6


def _run(mode, fn):
    return backend.run(fn, mode)


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
    windows is wrong under XLA (relative error 1.3e-2 here). Fix:
    `forward_mode_fixes.exact_max_pooling` (and `check_traced_ops`, which
    refuses raw `tf.nn.max_pool*` ops it does not reach)."""
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


def _padded_bidirectional():
    """Padded tokens (0 is padding) through `Embedding(mask_zero=True)`
    and a `Bidirectional` LSTM returning sequences: `(model, layer, x)`."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(8, 3, mask_zero=True)(tokens)
    layer = keras.layers.Bidirectional(keras.layers.LSTM(2, return_sequences=True))
    model = keras.Model(tokens, layer(h))
    x = tf.constant([[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], tf.int32)
    return model, layer, x


def test_keras_unrolled_backward_layer_zeroes_the_wrong_steps():
    """Keras' unrolled loop zeroes a backward layer's masked outputs with
    the mask in forward order (Keras 3.15.1): the backward half of a
    `Bidirectional` layer then differs from its `while_loop` on padded
    sequences (its outputs at real tokens become zeros). Fix:
    `forward_mode_fixes.recurrences_unrolled` (`_zeroed_in_reverse`)."""
    model, layer, x = _padded_bidirectional()
    rolled = model(x).numpy()
    layer.backward_layer.unroll = True
    unrolled = model(x).numpy()
    # The second sequence's two tokens: backward half (last two units).
    assert np.all(rolled[1, :2, 2:] != 0)
    assert np.all(unrolled[1, :2, 2:] == 0)


@pytest.mark.parametrize("mode", MODES)
def test_recurrences_unrolled_keeps_a_bidirectional_layer_on_padded_sequences(mode):
    """Unrolled for forward mode, a `Bidirectional` LSTM on padded
    sequences computes what its `while_loop` computes (rtol 1e-5), and
    its JVP is the tape's."""
    model, layer, x = _padded_bidirectional()
    expected = model(x).numpy()
    kernel = layer.backward_layer.cell.kernel.value
    tangent = _normal(*kernel.shape, seed=1)
    ref = _tape(lambda: model(x), kernel, tangent)

    def fixed():
        with forward_mode_fixes.recurrences_unrolled(model):
            return model(x), _jvp(lambda: model(x), kernel, tangent)

    outputs, jvp = _run(mode, fixed)
    np.testing.assert_allclose(np.asarray(outputs), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(jvp), ref, rtol=RTOL, atol=ATOL)
    assert not layer.forward_layer.unroll and not layer.backward_layer.unroll
    assert "inner_loop" not in vars(layer.backward_layer)


POOLS = {
    "1d_same": ((4, 13, 3), 3, 2, "same"),
    "2d_same": ((2, 12, 12, 3), 3, 2, "same"),
    "2d_valid_rectangular": ((2, 9, 8, 2), (3, 2), (2, 1), "valid"),
    "3d_valid": ((2, 7, 7, 7, 2), 3, 2, "valid"),
    "3d_same_mixed": ((2, 7, 8, 6, 2), (3, 2, 3), (2, 1, 2), "same"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(POOLS))
def test_exact_max_pool_is_max_pooling_with_an_exact_jvp(case, mode):
    """The values of `tf.nn.max_pool` bit for bit, and a JVP equal to the
    tape's, with overlapping windows in every mode."""
    shape, pool, strides, padding = POOLS[case]
    x, tangent = _normal(*shape), _normal(*shape, seed=1)
    fn = lambda: forward_mode_fixes.exact_max_pool(x, pool, strides, padding)  # noqa: E731
    data_format = {3: "NWC", 4: "NHWC", 5: "NDHWC"}[len(shape)]
    native = lambda: tf.nn.max_pool(x, pool, strides, padding.upper(), data_format)  # noqa: E731
    y, expected = _run(mode, lambda: (fn(), native()))
    np.testing.assert_array_equal(y, expected)
    ref = _tape(native, x, tangent)
    d = float(_run(mode, lambda: _jvp(fn, x, tangent)))
    assert abs(ref) > 1.0
    np.testing.assert_allclose(d, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", MODES)
def test_exact_max_pool_on_ties_follows_the_gradient(mode):
    """With tied maxima (and all-negative windows next to padding), the
    tangent is the Jacobian that TensorFlow's gradient defines (it routes
    to the first maximal element) times the input tangent."""
    x = tf.constant([[[3.0], [3.0], [-1.0], [-5.0], [-1.0], [-1.0]]])
    x_dot = tf.constant([[[10.0], [20.0], [30.0], [40.0], [50.0], [60.0]]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.nn.max_pool1d(x, 3, 2, "SAME")
    ref = tf.einsum("aobcid,cid->abo", tape.jacobian(y, x), x_dot)

    def fixed():
        with tf.autodiff.ForwardAccumulator(x, x_dot) as acc:
            y = forward_mode_fixes.exact_max_pool(x, 3, 2, "same")
        return acc.jvp(y)

    np.testing.assert_array_equal(_run(mode, fixed).numpy().ravel(), ref.numpy().ravel())


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize(
    "layer",
    [
        lambda f: keras.layers.MaxPooling1D(3, 2, padding="same", data_format=f),
        lambda f: keras.layers.MaxPooling2D(3, 2, padding="same", data_format=f),
        lambda f: keras.layers.MaxPooling3D(3, 2, data_format=f),
    ],
    ids=["1d", "2d", "3d"],
)
def test_exact_max_pooling_fixes_keras_layers_under_xla(layer, data_format):
    layer = layer(data_format)
    shape = {1: (4, 9, 3), 2: (2, 9, 9, 3), 3: (2, 5, 7, 7, 7)}[len(layer.pool_size)]
    x, tangent = _normal(*shape), _normal(*shape, seed=1)
    ref = _tape(lambda: layer(x), x, tangent)

    def fixed():
        with forward_mode_fixes.exact_max_pooling():
            return _jvp(lambda: layer(x), x, tangent)

    np.testing.assert_allclose(float(_run("xla", fixed)), ref, rtol=RTOL, atol=ATOL)


def test_exact_max_pooling_leaves_inputs_without_a_tangent_to_tensorflow():
    """Under XLA, `exact_max_pooling` gathers where the pooled input
    carries a tangent, and leaves an input without one (a block's input in
    activity perturbation) to TensorFlow's own, faster max-pooling."""
    layer = keras.layers.MaxPooling2D(2)
    x, tangent = _normal(2, 6, 6, 3), _normal(2, 6, 6, 3, seed=1)

    def op_types(with_tangent):
        @tf.function(jit_compile=True)
        def step(x):
            with forward_mode_fixes.exact_max_pooling():
                with tf.autodiff.ForwardAccumulator(
                    x if with_tangent else [], tangent if with_tangent else []
                ):
                    return layer(x)

        graph = step.get_concrete_function(x).graph
        return {op.type for op in graph.get_operations()}

    assert "ArgMax" in op_types(True) and "MaxPool" not in op_types(True)
    assert "MaxPool" in op_types(False) and "ArgMax" not in op_types(False)


def test_exact_max_pooling_compiles_float64_under_xla():
    """TensorFlow cannot compile its forward-mode derivative of
    max-pooling in float64 under XLA, for any window; `exact_max_pooling`
    can."""
    layer = keras.layers.MaxPooling2D(2, dtype="float64")
    x = tf.cast(_normal(2, 6, 6, 3), "float64")
    tangent = tf.cast(_normal(2, 6, 6, 3, seed=1), "float64")
    ref = _tape(lambda: layer(x), x, tangent)
    with pytest.raises(tf.errors.InvalidArgumentError, match="MaxPoolGradGrad"):
        _run("xla", lambda: _jvp(lambda: layer(x), x, tangent))

    def fixed():
        with forward_mode_fixes.exact_max_pooling():
            return _jvp(lambda: layer(x), x, tangent)

    np.testing.assert_allclose(float(_run("xla", fixed)), ref, rtol=1e-12)
