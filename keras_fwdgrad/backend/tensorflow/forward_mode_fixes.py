"""Workarounds for the places where TensorFlow's forward mode is wrong.

TensorFlow only: `tf.autodiff.ForwardAccumulator` derives each op's
forward-mode derivative from its registered gradient, and for a few ops,
in some execution modes, that derivative is wrong (without any error) or
cannot be built. Every workaround keras-fwdgrad needs for that lives here,
each with the TensorFlow version it was found on and the test in
`tests/forward_mode_fixes_test.py` that reproduces TensorFlow's own
behaviour: when TensorFlow fixes it, that test fails, and the fix (or, once
all of them fail, this module) can go.

Found on TensorFlow 2.21.0 with Keras 3.15.1. The private Keras and
TensorFlow attributes the fixes use are read through `keras_fwdgrad._compat`.
"""

import contextlib
import itertools

import keras
import tensorflow as tf

from keras_fwdgrad import _compat

L = keras.layers

_DATA_FORMATS = {3: "NWC", 4: "NHWC", 5: "NDHWC"}


def grouped_convolution(x, kernel, strides, padding, dilations):
    """A channels-last (grouped) convolution, computed group by group.

    Keras runs grouped convolutions through a nested XLA-compiled function,
    whose forward-mode derivative TensorFlow gets wrong in a `tf.function`;
    `tf.nn.convolution` on each group is exact.

    Found on TensorFlow 2.21.0. Shown fixed by
    `tests/forward_mode_fixes_test.py::test_tensorflow_grouped_convolution_jvp_is_still_wrong`
    failing.

    Args:
        x: Channels-last input, `[batch, *spatial, groups * c]`.
        kernel: `[*window, c, filters]`, `filters` divisible by the groups.
        strides, dilations: Ints or lists, as for `tf.nn.convolution`.
        padding: `"valid"` or `"same"` (any case).

    Returns:
        The convolution, channels last.
    """
    groups = x.shape[-1] // kernel.shape[-2]
    outputs = [
        tf.nn.convolution(
            a,
            k,
            strides=strides,
            padding=padding.upper(),
            data_format=_DATA_FORMATS[len(x.shape)],
            dilations=dilations,
        )
        for a, k in zip(tf.split(x, groups, axis=-1), tf.split(kernel, groups, axis=-1))
    ]
    return outputs[0] if groups == 1 else tf.concat(outputs, axis=-1)


def _group_by_group_conv(original):
    """Keras' TensorFlow `conv`, with grouped and channels-first 3-D
    convolutions computed group by group in channels-last layout."""

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        data_format = data_format or keras.config.image_data_format()
        channels_last = data_format == "channels_last"
        channels = inputs.shape[-1] if channels_last else inputs.shape[1]
        rank = len(inputs.shape)
        if channels == kernel.shape[-2] and (channels_last or rank != 5):
            return original(inputs, kernel, strides, padding, data_format, dilation_rate)
        x = inputs
        if not channels_last:
            x = tf.transpose(x, [0, *range(2, rank), 1])
        y = grouped_convolution(x, kernel, strides, padding, dilation_rate)
        if not channels_last:
            y = tf.transpose(y, [0, rank - 1, *range(1, rank - 1)])
        return y

    return conv


@contextlib.contextmanager
def exact_convolutions():
    """While a forward-mode pass is traced, runs `keras.ops.conv` (and so
    every Keras `Conv` layer) without a nested XLA-compiled function.

    Keras' TensorFlow backend runs grouped convolutions, and channels-first
    3-D ones, through a `tf.function(jit_compile=True)` nested in the step;
    TensorFlow's forward-mode derivative through it is wrong in a
    `tf.function`, without any error. This computes them group by group
    with `tf.nn.convolution` (the same values) instead, for Keras layers
    and your own layers calling `keras.ops.conv` alike.

    Found on TensorFlow 2.21.0 (Keras 3.15.1). Shown fixed by
    `tests/forward_mode_fixes_test.py::test_tensorflow_grouped_convolution_jvp_is_still_wrong`
    failing.
    """
    with _compat.keras_tensorflow_nn_replaced("conv", _group_by_group_conv):
        yield


def _as_tuple(value, rank):
    return (value,) * rank if isinstance(value, int) else tuple(value)


def _size(t, axis):
    """The static size of `t` along `axis`, or its dynamic one."""
    size = t.shape[axis]
    return tf.shape(t)[axis] if size is None else size


def exact_max_pool(x, pool_size, strides, padding):
    """Max-pooling whose forward-mode derivative is exact under XLA.

    Computes channels-last max-pooling (1-D, 2-D or 3-D, any window,
    stride and padding) as a gather: each window's maximum is located with
    `tf.argmax` over its elements (the first one on ties, as TensorFlow's
    gradient picks) and then read from the input. The values are those of
    `tf.nn.max_pool`; the forward-mode derivative is the tangent read at
    the same positions, which TensorFlow computes exactly in every mode.
    TensorFlow's own forward-mode derivative of max-pooling with
    overlapping windows is wrong under XLA, without any error.

    Found on TensorFlow 2.21.0. Shown fixed by
    `tests/forward_mode_fixes_test.py::test_tensorflow_overlapping_max_pool_jvp_is_still_wrong_under_xla`
    failing.

    Args:
        x: Floating channels-last input, `[batch, *spatial, channels]`.
        pool_size: Int or tuple, the window size along each spatial axis.
        strides: Int or tuple, the stride along each spatial axis.
        padding: `"valid"` or `"same"` (any case).

    Returns:
        The pooled tensor, `[batch, *pooled spatial, channels]`.
    """
    rank = len(x.shape) - 2
    pool = _as_tuple(pool_size, rank)
    strides = _as_tuple(strides, rank)
    pads, outs = [(0, 0)], []
    for axis, (k, s) in enumerate(zip(pool, strides)):
        n = _size(x, 1 + axis)
        if padding.upper() == "SAME":
            out = -(-n // s)
            total = (
                tf.maximum((out - 1) * s + k - n, 0)
                if tf.is_tensor(n)
                else max((out - 1) * s + k - n, 0)
            )
            pads.append((total // 2, total - total // 2))
        else:
            out = (n - k) // s + 1
            pads.append((0, 0))
        outs.append(out)
    pads.append((0, 0))
    # Padding never wins the maximum, as in max-pooling itself.
    padded = tf.pad(x, pads, constant_values=float("-inf"))
    shape = tf.shape(padded)
    primal = tf.stop_gradient(padded)
    windows = []
    for offset in itertools.product(*(range(k) for k in pool)):
        index = tuple(slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, outs, strides))
        windows.append(primal[(slice(None),) + index])
    # [batch, *out, channels]: the position of each window's maximum in
    # the window, row-major.
    which = tf.argmax(tf.stack(windows, axis=-1), axis=-1, output_type=tf.int32)
    # Its index in the flattened padded input.
    index = tf.zeros_like(which) + tf.reshape(tf.range(shape[0]), [-1] + [1] * (rank + 1))
    inner = len(windows)
    for axis in range(rank):
        inner //= pool[axis]
        start = tf.range(outs[axis]) * strides[axis]
        start = tf.reshape(start, [1] * (axis + 1) + [-1] + [1] * (rank - axis))
        index = index * shape[1 + axis] + start + (which // inner) % pool[axis]
    index = index * shape[-1] + tf.range(shape[-1])
    return tf.gather(tf.reshape(padded, [-1]), index)


def _exact_max_pool_under_xla(original):
    """Keras' TensorFlow `max_pool`, computed by `exact_max_pool` under
    XLA when its input carries a tangent (without one, TensorFlow's own
    max-pooling is exact and faster: the papers' CNN's activity
    perturbation step, whose pools read no tangent, took 0.97 of the time)."""

    def max_pool(inputs, pool_size, strides=None, padding="valid", data_format=None):
        rank = len(inputs.shape) - 2
        pool = _as_tuple(pool_size, rank)
        step = pool if strides is None else _as_tuple(strides, rank)
        if not (
            inputs.dtype.is_floating
            and _compat.in_xla_context()
            and _compat.carries_tangent(inputs)
        ):
            return original(inputs, pool_size, strides, padding, data_format)
        data_format = data_format or keras.config.image_data_format()
        x = inputs
        if data_format == "channels_first":
            x = tf.transpose(x, [0, *range(2, rank + 2), 1])
        y = exact_max_pool(x, pool, step, padding)
        if data_format == "channels_first":
            y = tf.transpose(y, [0, rank + 1, *range(1, rank + 1)])
        return y

    return max_pool


@contextlib.contextmanager
def exact_max_pooling():
    """While a forward-mode pass is traced, runs `keras.ops.max_pool` (and
    so every Keras `MaxPooling` layer) through `exact_max_pool` under XLA,
    on inputs that carry a tangent.

    TensorFlow's forward-mode derivative of max-pooling with overlapping
    windows is wrong under XLA, without any error; for any window, XLA
    cannot compile it in float64 (no `MaxPoolGradGrad` kernel). Outside
    XLA, Keras' own `max_pool` runs.

    Found on TensorFlow 2.21.0 (Keras 3.15.1). Shown fixed by
    `tests/forward_mode_fixes_test.py::test_tensorflow_overlapping_max_pool_jvp_is_still_wrong_under_xla`
    failing.
    """
    with _compat.keras_tensorflow_nn_replaced("max_pool", _exact_max_pool_under_xla):
        yield


@contextlib.contextmanager
def exact_keras_ops():
    """`exact_convolutions` and `exact_max_pooling` together: while a
    forward-mode pass is traced, every Keras op whose forward-mode
    derivative TensorFlow gets wrong runs through an exact equivalent."""
    with exact_convolutions(), exact_max_pooling():
        yield


# The ops TensorFlow's forward mode builds for max-pooling (the gradient of
# its gradient), which XLA computes wrongly for overlapping windows. Neither
# the layer rules nor `exact_max_pool` build them.
_MAX_POOL_JVP_OPS = ("MaxPoolGradGrad", "MaxPoolGradGradV2", "MaxPool3DGradGrad")


def check_traced_ops():
    """Raises if the XLA graph being traced holds TensorFlow's forward-mode
    derivative of max-pooling with overlapping windows, which XLA gets
    wrong: from `tf.nn.max_pool2d` or another raw TensorFlow op in your own
    layer, which `exact_max_pooling` does not reach.

    Found on TensorFlow 2.21.0. Shown fixed by
    `tests/forward_mode_fixes_test.py::test_tensorflow_overlapping_max_pool_jvp_is_still_wrong_under_xla`
    failing.
    """
    if not _compat.in_xla_context():
        return
    graph_def = tf.compat.v1.get_default_graph().as_graph_def()
    # TensorFlow builds forward-mode derivatives in nested functions.
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    for node in nodes:
        if node.op not in _MAX_POOL_JVP_OPS:
            continue
        ksize = list(node.attr["ksize"].list.i)
        strides = list(node.attr["strides"].list.i)
        # `MaxPoolGradGradV2` takes them as inputs: assume they overlap.
        if not ksize or any(s < k for k, s in zip(ksize, strides)):
            raise ValueError(
                f"Cannot compute an exact forward-mode derivative of op "
                f"`{node.name}` ({node.op}): TensorFlow's forward-mode "
                "derivative of max-pooling with overlapping windows is wrong "
                "under XLA. Use `keras.ops.max_pool` or a "
                "`keras.layers.MaxPooling1D`/`2D`/`3D` layer, whose "
                "derivative is computed exactly, or compile with "
                "`jit_compile=False`."
            )


@contextlib.contextmanager
def recurrences_unrolled(model):
    """Unrolls `model`'s recurrent layers while a graph is traced.

    TensorFlow cannot differentiate the `while_loop` of a recurrent layer
    in forward mode inside a `tf.function` (its loop state is a `variant`
    tensor); an unrolled loop is a chain of ordinary ops. Eagerly the loop
    runs step by step and needs no unrolling.

    Found on TensorFlow 2.21.0. Shown fixed by
    `tests/forward_mode_fixes_test.py::test_tensorflow_cannot_differentiate_a_recurrent_loop_in_a_graph`
    failing.

    Keras' unrolled loop (Keras 3.15.1, `keras/src/backend/tensorflow/rnn.py`)
    has a defect of its own: a layer with `go_backwards=True`,
    `zero_output_for_mask=True` and `return_sequences=True` (the backward
    half of every `Bidirectional` layer) zeroes its masked outputs with the
    mask in forward order, while the outputs are in reverse order, so on
    padded sequences it computes another function than its loop.
    `_zeroed_in_reverse` zeroes them with the mask reversed, as the loop
    does. Shown fixed by
    `tests/forward_mode_fixes_test.py::test_keras_unrolled_backward_layer_zeroes_the_wrong_steps`
    failing.
    """
    if tf.executing_eagerly():
        yield
        return
    rolled = [
        layer
        for layer in _compat.all_layers(model)
        if isinstance(layer, keras.layers.RNN) and not layer.unroll
    ]
    reversed_zeroing = [
        layer
        for layer in rolled
        if layer.go_backwards and layer.zero_output_for_mask and layer.return_sequences
    ]
    for layer in rolled:
        layer.unroll = True
    for layer in reversed_zeroing:
        layer.inner_loop = _zeroed_in_reverse(layer, layer.inner_loop)
    try:
        yield
    finally:
        for layer in rolled:
            layer.unroll = False
        for layer in reversed_zeroing:
            del layer.inner_loop


def _zeroed_in_reverse(layer, inner_loop):
    """`layer.inner_loop` that zeroes the outputs of masked steps after
    Keras' unrolled loop, with the mask in the outputs' (reverse) order:
    the loop runs with `zero_output_for_mask=False` (masked steps repeat
    the previous output), then the steps the reversed mask drops, and the
    last output if the first step is masked, become zeros, as in Keras'
    `while_loop`."""

    def zeroed(sequences, initial_state, mask, training=False):
        if mask is None:
            return inner_loop(sequences, initial_state, mask, training=training)
        layer.zero_output_for_mask = False
        try:
            last, outputs, states = inner_loop(sequences, initial_state, mask, training=training)
        finally:
            layer.zero_output_for_mask = True
        mask = tf.cast(mask, tf.bool)
        if len(mask.shape) == 3:
            mask = mask[..., 0]
        kept = tf.reverse(mask, [1])

        def where(m, t):
            m = m[(...,) + (tf.newaxis,) * (len(t.shape) - len(m.shape))]
            return tf.where(m, t, tf.zeros_like(t))

        return where(mask[:, 0], last), where(kept, outputs), states

    return zeroed
