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


# Max-pooling layers, whose forward-mode derivative TensorFlow gets wrong
# under XLA when their windows overlap.
_MAX_POOLS = (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D)


def inexact_reason(layer, graph):
    """Why TensorFlow's own forward-mode derivative of `layer` is wrong, or
    `None` when it is exact.

    TensorFlow computes the forward-mode derivative of max-pooling with
    overlapping windows wrongly under XLA, without any error. (Its wrong
    derivative of the nested XLA function through which Keras runs grouped
    convolutions is avoided for every path by `exact_convolutions`.)

    Found on TensorFlow 2.21.0. Shown fixed by
    `tests/forward_mode_fixes_test.py::test_tensorflow_overlapping_max_pool_jvp_is_still_wrong_under_xla`
    failing.

    Args:
        layer: A Keras layer.
        graph: Whether the step runs as a graph (`tf.function`).

    Returns:
        A string saying what is wrong, or `None`.
    """
    if not graph:
        return None
    if isinstance(layer, _MAX_POOLS) and _compat.in_xla_context():
        if any(s < p for s, p in zip(layer.strides, layer.pool_size)):
            return (
                "TensorFlow's forward-mode derivative of max-pooling with "
                "overlapping windows is wrong under XLA"
            )
    return None


# The ops TensorFlow's forward mode builds for max-pooling (the gradient of
# its gradient), which XLA computes wrongly for overlapping windows. The
# layer rules never build them.
_MAX_POOL_JVP_OPS = ("MaxPoolGradGrad", "MaxPoolGradGradV2", "MaxPool3DGradGrad")


def check_traced_ops():
    """Raises if the XLA graph being traced holds TensorFlow's forward-mode
    derivative of max-pooling with overlapping windows (for example from
    `tf.nn.max_pool2d` in your own layer), which XLA gets wrong.

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
                "under XLA. Use a `keras.layers.MaxPooling1D`/`MaxPooling2D` "
                "layer in a model the layer rules run, or compile with "
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
    """
    if tf.executing_eagerly():
        yield
        return
    rolled = [
        layer
        for layer in _compat.all_layers(model)
        if isinstance(layer, keras.layers.RNN) and not layer.unroll
    ]
    for layer in rolled:
        layer.unroll = True
    try:
        yield
    finally:
        for layer in rolled:
            layer.unroll = False
