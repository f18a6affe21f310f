"""The per-layer forward-mode rules: primal and tangent in one pass.

Each rule `rule(layer, x, x_dot, tangent_of, training, num_tangents)`
returns `(y, y_dot)` for one Keras layer, or `None` for a configuration it
does not implement (the layer then takes the generic per-layer path of
`keras_fwdgrad.layer_rules.dual`). `RULES` maps layer classes to rules;
`LINEAR` lists the linear layers without weights, whose tangent is the
layer applied to the input's tangent.
"""

import keras
import tensorflow as tf

from keras_fwdgrad import _compat
from keras_fwdgrad.graph import runs_plain
from keras_fwdgrad import tangents as tangents_module
from keras_fwdgrad.backend.tensorflow.forward_mode_fixes import grouped_convolution
from keras_fwdgrad.layer_rules.logits import keep_logits_tangent
from keras_fwdgrad.tangents import to_dense


L = keras.layers


RULES = {}


# Linear layers without weights: their tangent is the layer applied to the
# input's tangent.
LINEAR = (
    L.Flatten,
    L.Reshape,
    L.Permute,
    L.AveragePooling1D,
    L.AveragePooling2D,
    L.AveragePooling3D,
    L.GlobalAveragePooling1D,
    L.GlobalAveragePooling2D,
    L.GlobalAveragePooling3D,
    L.ZeroPadding1D,
    L.ZeroPadding2D,
    L.ZeroPadding3D,
    L.Cropping1D,
    L.Cropping2D,
    L.Cropping3D,
    L.Identity,
)


def _rule(*classes):
    def decorator(fn):
        for cls in classes:
            RULES[cls] = fn
        return fn

    return decorator


def linear(layer, x, x_dot):
    y = layer(x)
    return y, None if x_dot is None else layer(x_dot)


def add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _plain(layer, x):
    """`runs_plain(layer)`, on an input already in its compute dtype."""
    return runs_plain(layer) and x.dtype == layer.compute_dtype


def _stacked(fn, x, x_dot):
    """`fn(x)` and `fn(x_dot)` for a linear `fn`, as one call on the
    batch-stacked `[x; x_dot]`."""
    if x_dot is None:
        return fn(x), None
    both = fn(tf.concat([x, x_dot], axis=0))
    batch = tf.shape(x)[0]
    return both[:batch], both[batch:]


def tile(t, num_tangents):
    """Repeats a per-example tensor for K tangents stacked on the batch."""
    if num_tangents == 1:
        return t
    return tf.tile(t, [num_tangents] + [1] * (len(t.shape) - 1))


def activation_jvp(activation, x, x_dot, num_tangents=1):
    """Applies an activation function to `x` and its JVP to `x_dot`.

    Args:
        activation: An element-wise activation function, or `None`.
        x: Pre-activation tensor.
        x_dot: Its tangent (K of them stacked on the batch axis), or `None`.
        num_tangents: K. Defaults to 1.

    Returns:
        `(y, y_dot)`.
    """
    if activation is None or activation is keras.activations.linear:
        return x, x_dot
    if x_dot is None:
        return activation(x), None
    if activation is keras.activations.relu:
        y = tf.nn.relu(x)
        return y, tf.where(tile(x > 0, num_tangents), x_dot, tf.zeros_like(x_dot))
    if num_tangents == 1:
        with tf.autodiff.ForwardAccumulator(x, x_dot) as acc:
            y = activation(x)
        y_dot = acc.jvp(y, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    else:
        # Element-wise (softmax: along the last axis), so its JVP at the
        # tiled primal is the JVP of each copy.
        tiled_x = tile(x, num_tangents)
        with tf.autodiff.ForwardAccumulator(tiled_x, x_dot) as acc:
            tiled_y = activation(tiled_x)
        y_dot = acc.jvp(tiled_y, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        y = activation(x)
    logits = _compat.keras_logits(y)
    if logits is not None:
        if logits is not x:  # pragma: no cover - Keras keeps its input
            raise ValueError(f"Activation {activation!r} keeps logits other than its input.")
        keep_logits_tangent(y, x, x_dot)
    return y, y_dot


def _kernel_tangent(layer, x, tangent, product, after=None):
    """`product(x, Ẇ)`, from the factors when `Ẇ = u ⊗ w` (see
    `tangents.kernel_product`)."""
    return tangents_module.kernel_product(
        tangent,
        x,
        product,
        lambda w: _channels(layer, w),
        after,
        factored=getattr(layer, "groups", 1) == 1,
    )


def _channels(layer, vector):
    """Reshapes a per-channel vector to broadcast against the output."""
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        spatial = len(layer.kernel.shape) - 2
        return tf.reshape(vector, (1, -1) + (1,) * spatial)
    return vector


def _bias(layer, y, y_dot, tangent_of, channels_first=False):
    if not getattr(layer, "use_bias", True) or layer.bias is None:
        return y, y_dot
    bias, bias_dot = layer.bias.value, tangent_of(layer.bias)
    if tangents_module.is_several(bias_dot):
        bias_dots = tuple(None if t is None else to_dense(t) for t in bias_dot)
        return _bias_many(layer, y, y_dot, bias_dots, channels_first)
    if bias_dot is not None:
        bias_dot = to_dense(bias_dot)
    if channels_first:
        shape = (1, -1) + (1,) * (len(y.shape) - 2)
        bias = tf.reshape(bias, shape)
        if bias_dot is not None:
            bias_dot = tf.reshape(bias_dot, shape)
    y = y + bias
    if bias_dot is not None:
        y_dot = bias_dot + tf.zeros_like(y) if y_dot is None else y_dot + bias_dot
    return y, y_dot


def _bias_many(layer, y, y_dot, bias_dots, channels_first):
    """Adds the bias to `y` and each of K bias tangents to its block of
    `y_dot`."""
    k = len(bias_dots)
    y = y + (
        tf.reshape(layer.bias.value, (1, -1) + (1,) * (len(y.shape) - 2))
        if channels_first
        else layer.bias.value
    )
    if all(b is None for b in bias_dots):
        return y, y_dot
    b = tf.stack([tf.zeros_like(layer.bias.value) if t is None else t for t in bias_dots])
    rank = len(y.shape)
    if channels_first:
        b = tf.reshape(b, (k, 1, -1) + (1,) * (rank - 2))
    else:
        b = tf.reshape(b, (k,) + (1,) * (rank - 1) + (-1,))
    if y_dot is None:
        y_dot = tf.zeros(tf.concat([[k * tf.shape(y)[0]], tf.shape(y)[1:]], 0), y.dtype)
    blocks = tf.reshape(y_dot, tf.concat([[k, -1], tf.shape(y)[1:]], 0))
    return y, tf.reshape(blocks + b, tf.shape(y_dot))


@_rule(L.Dense)
def _dense(layer, x, x_dot, tangent_of, training, num_tangents=1):
    if not _plain(layer, x):
        return None
    kernel = layer.kernel
    y, y_dot = _stacked(lambda t: keras.ops.matmul(t, kernel.value), x, x_dot)
    y_dot = add(
        y_dot,
        _kernel_tangent(
            layer,
            x,
            tangent_of(kernel),
            keras.ops.matmul,
            after=y if y_dot is None else y_dot,
        ),
    )
    y, y_dot = _bias(layer, y, y_dot, tangent_of)
    return activation_jvp(layer.activation, y, y_dot, num_tangents)


_CONVS = (L.Conv1D, L.Conv2D, L.Conv3D)


def convolution(layer):
    """The linear map `(x, kernel) -> conv` that `layer.call` applies before
    the bias, or `None` for a configuration this rule does not implement.

    Grouped convolutions are computed group by group with
    `tf.nn.convolution`: Keras runs them through a nested XLA-compiled
    function whose forward-mode derivative TensorFlow gets wrong in a
    `tf.function`. `Conv1D(padding="causal")` pads the input first, as
    `Conv1D.call` does.
    """
    channels_last = layer.data_format == "channels_last"
    causal = layer.padding == "causal"
    if layer.groups != 1 or causal:
        if not channels_last:
            return None
    elif not channels_last and layer.rank == 3:
        # Keras runs it through a nested XLA function too.
        return None
    else:
        return layer.convolution_op
    padding = "valid" if causal else layer.padding
    strides = list(layer.strides)
    dilations = list(layer.dilation_rate)

    def convolution(x, kernel):
        if causal:
            left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            x = tf.pad(x, [[0, 0], [left, 0], [0, 0]])
        return grouped_convolution(x, kernel, strides, padding, dilations)

    return convolution


@_rule(*_CONVS)
def _conv(layer, x, x_dot, tangent_of, training, num_tangents=1):
    conv = convolution(layer)
    if not _plain(layer, x) or conv is None:
        return None
    kernel = layer.kernel
    y, y_dot = _stacked(lambda t: conv(t, kernel.value), x, x_dot)
    y_dot = add(
        y_dot,
        _kernel_tangent(
            layer,
            x,
            tangent_of(kernel),
            conv,
            after=y if y_dot is None else y_dot,
        ),
    )
    y, y_dot = _bias(
        layer,
        y,
        y_dot,
        tangent_of,
        channels_first=layer.data_format == "channels_first",
    )
    return activation_jvp(layer.activation, y, y_dot, num_tangents)


@_rule(L.Activation)
def _activation_layer(layer, x, x_dot, tangent_of, training, num_tangents=1):
    return activation_jvp(layer.activation, x, x_dot, num_tangents)


@_rule(L.ReLU)
def _relu_layer(layer, x, x_dot, tangent_of, training, num_tangents=1):
    if layer.max_value is None and not layer.negative_slope and not layer.threshold:
        return activation_jvp(keras.activations.relu, x, x_dot, num_tangents)
    return None


@_rule(L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D)
def _max_pool(layer, x, x_dot, tangent_of, training, num_tangents=1):
    """The tangent of each output is the tangent of its window's maximum
    (the first one on ties, as TensorFlow's gradient picks).

    TensorFlow's own forward-mode derivative of max-pooling is wrong under
    XLA when windows overlap (TF 2.21), so this rule covers every 1-D and
    2-D channels-last pooling; 3-D and channels-first pooling use the
    generic path, where `keras_fwdgrad.backend.tensorflow.forward_mode_fixes` makes
    it exact.
    """
    if x_dot is None or layer.data_format != "channels_last":
        return None
    pool = tuple(layer.pool_size)
    if len(x.shape) != len(pool) + 2:
        return None
    if tuple(layer.strides) == pool and all(
        d is not None and d % p == 0 for d, p in zip(x.shape[1:-1], pool)
    ):
        return layer(x), _tiled_max_pool_tangent(x, x_dot, pool, num_tangents)
    if len(pool) > 2 or any(d is None for d in x.shape[1:]):
        return None
    return layer(x), _max_pool_tangent(layer, x, x_dot, num_tangents)


def _tiled_max_pool_tangent(x, x_dot, pool, num_tangents=1):
    """Windows that tile the input: reshaped, not gathered."""
    rank = len(pool)
    # [N, D1/p1, p1, D2/p2, p2, ..., C] -> windows on the last axis.
    shape = [-1]
    for d, p in zip(x.shape[1:-1], pool):
        shape += [d // p, p]
    shape.append(x.shape[-1])
    outer = list(range(1, 2 * rank + 1, 2))
    inner = list(range(2, 2 * rank + 2, 2))
    perm = [0] + outer + [2 * rank + 1] + inner
    window = 1
    for p in pool:
        window *= p

    def windows(t):
        t = tf.transpose(tf.reshape(t, shape), perm)
        return tf.reshape(t, tf.concat([tf.shape(t)[: rank + 2], [window]], 0))

    which = tf.argmax(windows(x), axis=-1, output_type=tf.int32)
    pick = tile(tf.one_hot(which, window, dtype=x_dot.dtype), num_tangents)
    return tf.reduce_sum(windows(x_dot) * pick, axis=-1)


def _max_pool_tangent(layer, x, x_dot, num_tangents=1):
    """Any 1-D or 2-D window, stride and padding, from image patches."""
    pool = list(layer.pool_size)
    strides = list(layer.strides)
    if len(pool) == 1:
        x, x_dot = x[:, tf.newaxis], x_dot[:, tf.newaxis]
        pool, strides = [1] + pool, [1] + strides
    if layer.padding == "same":
        pads = [[0, 0]]
        for size, k, s in zip(x.shape[1:3], pool, strides):
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            pads.append([total // 2, total - total // 2])
        pads.append([0, 0])
        # Padding never wins the maximum, as in max-pooling itself. It
        # must be finite: XLA extracts patches with a convolution, where
        # -inf · 0 would give NaN.
        low = tf.reduce_min(x)
        x = tf.pad(x, pads, constant_values=low - tf.abs(low) - 1.0)
        x_dot = tf.pad(x_dot, pads)

    def patches(t):
        p = tf.image.extract_patches(
            t,
            sizes=[1, *pool, 1],
            strides=[1, *strides, 1],
            rates=[1, 1, 1, 1],
            padding="VALID",
        )
        # [N, H', W', kh·kw·C] -> [N, H', W', kh·kw, C]
        return tf.reshape(p, tf.concat([tf.shape(p)[:3], [pool[0] * pool[1], -1]], 0))

    which = tf.argmax(patches(x), axis=3, output_type=tf.int32)
    pick = tile(tf.one_hot(which, pool[0] * pool[1], axis=3, dtype=x_dot.dtype), num_tangents)
    y_dot = tf.reduce_sum(patches(x_dot) * pick, axis=3)
    if len(layer.pool_size) == 1:
        y_dot = y_dot[:, 0]
    return y_dot
