"""Forward-mode rules for Keras layers: primal and tangent in one pass.

`tf.autodiff.ForwardAccumulator` derives most forward-mode derivatives by
transposing each op's gradient twice. That is exact for any model, but it
cannot see the structure of a direction: a rank-one kernel direction
`u ⊗ w` (see `keras_fwdgrad.directions.LowRankGaussian`) is expanded to a
full matrix and multiplied like one. The rules here run a `keras.Sequential`
model (or a functional one) layer by layer, carrying each activation `x`
with its tangent `ẋ`:

- `Dense` and `Conv1D/2D/3D`: the input and its tangent go through the
  layer's kernel in one stacked matrix product or convolution
  (`[x; ẋ] @ W`, the first paper's suggestion), and the kernel's tangent
  adds `x @ Ẇ`, computed as `(x @ u) ⊗ w` when `Ẇ = u ⊗ w`; grouped
  convolutions run group by group and causal ones pad first, as the
  layers do (a configuration a rule does not implement falls back to the
  per-layer path below);
- ReLU and linear activations: `ẏ = ẋ · [x > 0]`;
- reshaping and average pooling layers (linear, without weights): the
  layer applied to the tangent;
- `MaxPooling` with non-overlapping windows: the tangent of the selected
  element;
- any other layer (dropout, normalization, your own layers): its exact
  derivative from `tf.autodiff.ForwardAccumulator`, for that layer only.

Functional models (`keras.Model(inputs, outputs)`) run node by node the
same way, with rules for `Add`, `Subtract`, `Average` and `Concatenate`
(when no input is broadcast). A tensor used twice (`Multiply()([h, h])`,
self-attention) carries its tangent to every use.

A softmax or sigmoid output keeps the tangent of its logits
(`logits_tangent`), since Keras' cross-entropies read those logits. Where
TensorFlow's own forward mode is wrong for a layer that falls back to the
per-layer path, `keras_fwdgrad.backend.tensorflow.forward_mode_fixes` makes it exact.

`ForwardGradientModel` uses these rules when `supports(model)` holds and
`layer_rules=True` (the default), and `tf.autodiff.ForwardAccumulator` over
the whole model otherwise. Both give the same directional derivative to
float rounding; the tests check each rule against `tf.GradientTape`.
"""

import keras
import tensorflow as tf

from keras_fwdgrad import _compat
from keras_fwdgrad import tangents as tangents_module
from keras_fwdgrad.backend.tensorflow.forward_mode_fixes import grouped_convolution
from keras_fwdgrad.tangents import to_dense
from keras_fwdgrad.ops import jvp

L = keras.layers

_RULES = {}

# Linear layers without weights: their tangent is the layer applied to the
# input's tangent.
_LINEAR = (
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
            _RULES[cls] = fn
        return fn

    return decorator


def _is_sequential(layer):
    return isinstance(layer, keras.Sequential)


def _is_functional(layer):
    return _compat.is_functional(layer)


def supports(model):
    """Whether the layer rules can run `model`.

    They can for a `keras.Sequential` model, or a functional
    `keras.Model(inputs, outputs)` with one output tensor (nested ones
    included), made of layers that come with Keras, none of which produces
    a mask (`Masking`, `Embedding(mask_zero=True)`) or has an activity
    regularizer. Layers without a dedicated rule are differentiated one by
    one with `tf.autodiff.ForwardAccumulator`; your own layers make the
    whole model use `tf.autodiff.ForwardAccumulator` instead, since they
    may add losses in `call`.

    Args:
        model: A Keras layer or model.

    Returns:
        A bool.
    """
    if _is_functional(model):
        if len(model.outputs) != 1:
            return False
    elif not _is_sequential(model):
        return False
    for layer in _compat.all_layers(model):
        module = type(layer).__module__
        if not module.startswith("keras."):
            return False
        if getattr(layer, "activity_regularizer", None) is not None:
            return False
        if isinstance(layer, L.Masking) or getattr(layer, "mask_zero", False):
            return False
        if isinstance(layer, keras.Model) and not (_is_sequential(layer) or _is_functional(layer)):
            return False
    return True


class NeedsSeparatePasses(Exception):
    """Raised by `dual_call` with several tangents when a layer has no rule
    for them; the caller then runs one pass per tangent."""


def dual_call(layer, x, x_dot, tangent_of, training=None, num_tangents=1):
    """Runs `layer` on `x` and pushes the tangent `x_dot` through it.

    With `num_tangents = K > 1`, K tangents travel in one pass, stacked on
    the batch axis (`x_dot` has K times the batch of `x`): the primal is
    computed once, and each product with a kernel takes `[x; ẋ_1; ...; ẋ_K]`
    at once.

    Args:
        layer: A built Keras layer or `keras.Sequential` model.
        x: Input tensor.
        x_dot: Tangent of `x` (K tangents stacked on the batch axis), or
            `None` for zero.
        tangent_of: Callable mapping a variable to its tangent: a tensor,
            a `keras_fwdgrad.directions.Factored` or
            `keras_fwdgrad.directions.PackedSigns`, or `None` for zero;
            with K > 1, a tuple of K of those.
        training: Passed to the layers.
        num_tangents: K, the number of tangents. Defaults to 1.

    Returns:
        `(y, y_dot)`: the output and its tangent (`None` when zero).

    Raises:
        NeedsSeparatePasses: if `num_tangents > 1` and a layer has no rule
            (it would need one `tf.autodiff.ForwardAccumulator` pass per
            tangent).
    """
    if _is_sequential(layer):
        for sub in layer.layers:
            x, x_dot = dual_call(sub, x, x_dot, tangent_of, training, num_tangents)
        return x, x_dot
    if _is_functional(layer):
        return _dual_functional(layer, x, x_dot, tangent_of, training, num_tangents)
    rule = _RULES.get(type(layer))
    if rule is not None:
        out = rule(layer, x, x_dot, tangent_of, training, num_tangents)
        if out is not None:
            return out
    if isinstance(layer, _LINEAR):
        return _linear(layer, x, x_dot)
    if num_tangents > 1:
        raise NeedsSeparatePasses(type(layer).__name__)
    return _generic(layer, x, x_dot, tangent_of, training)


def supports_batched_tangents(model):
    """Whether `dual_call` can carry several tangents through `model` in
    one pass: every layer has a rule (dense, convolution, activation,
    pooling and reshaping layers)."""
    if not supports(model):
        return False
    for layer in _compat.all_layers(model):
        if not (
            _is_sequential(layer)
            or _is_functional(layer)
            or type(layer) in _RULES
            or isinstance(layer, (_LINEAR, _MERGES, L.InputLayer))
        ):
            return False
    return True


def _dual_functional(model, x, x_dot, tangent_of, training, num_tangents):
    """Runs a functional model's graph node by node, carrying tangents
    (keyed by the primal tensor they belong to)."""
    inputs = _compat.standardize_inputs(model, x)
    tangents = {}
    if x_dot is not None:
        for t, t_dot in zip(inputs, tf.nest.flatten(x_dot)):
            if t_dot is not None:
                tangents[id(t)] = t_dot

    def operation_fn(op):
        def call(*args, **kwargs):
            if (
                len(args) == 1
                # `training` recorded at graph construction is overridden,
                # as in the functional model's own call.
                and set(kwargs) <= {"training"}
                and tf.is_tensor(args[0])
                and isinstance(op, keras.layers.Layer)
            ):
                y, y_dot = dual_call(
                    op,
                    args[0],
                    tangents.get(id(args[0])),
                    tangent_of,
                    training,
                    num_tangents,
                )
            else:
                y, y_dot = _dual_node(
                    op, args, kwargs, tangents, tangent_of, training, num_tangents
                )
            if y_dot is not None:
                tangents[id(y)] = y_dot
            return y

        return call

    outputs = _compat.run_through_graph(model, inputs, operation_fn)
    y = tf.nest.flatten(outputs)[0]
    return y, tangents.get(id(y))


_MERGES = (L.Add, L.Subtract, L.Average, L.Concatenate)


def _same_shapes(op, xs):
    """Whether the merge rule applies: every input has the output's static
    shape (the concatenation axis aside), so no input is broadcast."""
    xs = list(xs)
    shapes = [tuple(t.shape) for t in xs]
    if any(None in s[1:] for s in shapes) or len(set(len(s) for s in shapes)) != 1:
        return False
    if isinstance(op, L.Concatenate):
        axis = op.axis % len(shapes[0])
        shapes = [s[:axis] + s[axis + 1 :] for s in shapes]
    return len(set(s[1:] for s in shapes)) == 1


def _dual_node(op, args, kwargs, tangents, tangent_of, training, num_tangents):
    """A graph node with several inputs or keyword arguments."""
    if isinstance(op, _MERGES) and len(args) == 1 and not kwargs and _same_shapes(op, args[0]):
        xs = list(args[0])
        dots = [tangents.get(id(t)) for t in xs]
        y = op(xs)
        if all(d is None for d in dots):
            return y, None
        if isinstance(op, L.Concatenate):
            dots = [
                tf.zeros_like(_tile(t, num_tangents)) if d is None else d for t, d in zip(xs, dots)
            ]
            return y, tf.concat(dots, axis=op.axis)
        if isinstance(op, L.Subtract):
            first, second = dots
            if second is None:
                return y, first
            return y, -second if first is None else first - second
        total = None
        for d in dots:
            total = _add(total, d)
        return y, total / len(xs) if isinstance(op, L.Average) else total
    if num_tangents > 1:
        raise NeedsSeparatePasses(type(op).__name__)
    if (
        isinstance(op, keras.layers.Layer)
        and "training" in _compat.call_context_args(op)
        and training is not None
    ):
        # As the functional model's own call passes `training` on (it
        # overrides the value recorded when the graph was built).
        kwargs = {**kwargs, "training": training}
    primals, duals, seen = [], [], set()
    for t in tf.nest.flatten((args, kwargs)):
        # A tensor used twice (`Multiply()([h, h])`, self-attention) is
        # watched once: its tangent reaches every use.
        if tf.is_tensor(t) and tangents.get(id(t)) is not None and id(t) not in seen:
            seen.add(id(t))
            primals.append(t)
            duals.append(tangents[id(t)])
    for v in getattr(op, "trainable_variables", []):
        t = tangent_of(v)
        if t is not None:
            primals.append(v.value)
            duals.append(to_dense(t))
    if not primals:
        return op(*args, **kwargs), None
    return _jvp_keeping_logits(lambda: op(*args, **kwargs), primals, duals)


def _generic(layer, x, x_dot, tangent_of, training):
    """Exact JVP of one layer with `tf.autodiff.ForwardAccumulator`."""
    primals, tangents = [], []
    for v in layer.trainable_variables:
        t = tangent_of(v)
        if t is not None:
            primals.append(v.value)
            tangents.append(to_dense(t))
    if x_dot is not None:
        primals.append(x)
        tangents.append(x_dot)
    if not primals:
        return layer(x, training=training), None
    return _jvp_keeping_logits(lambda: layer(x, training=training), primals, tangents)


# The attribute of an output tensor that holds `(logits, tangent)` when
# Keras would compute a cross-entropy from that output's logits.
_LOGITS_TANGENT = "_keras_fwdgrad_logits_tangent"


def _keep_logits_tangent(y, logits, logits_dot):
    """Remembers the tangent of the logits Keras keeps on `y` (see
    `logits_tangent`)."""
    try:
        setattr(y, _LOGITS_TANGENT, (logits, logits_dot))
    except AttributeError as e:  # pragma: no cover - every TF tensor takes it
        raise TypeError(
            f"Cannot keep the tangent of the logits of {y!r}, so the "
            "directional derivative of a cross-entropy computed from them "
            "would be wrong."
        ) from e


def logits_tangent(y):
    """The logits a Keras cross-entropy reads from `y`, and their tangent.

    Keras keeps the logits of a softmax or sigmoid output on the output
    tensor, and its cross-entropies (`from_logits=False`) compute the loss
    from those logits, not from `y`. The loss's directional derivative
    then needs the logits' tangent, which the rules keep on `y`.

    Args:
        y: A tensor returned by `dual_call`.

    Returns:
        `None` if Keras reads `y` itself; otherwise `(logits, tangent)`,
        with `tangent` `None` when the logits do not depend on the
        variables.

    Raises:
        ValueError: if Keras reads logits whose tangent is unknown (which
            would otherwise give a zero derivative).
    """
    logits = _compat.keras_logits(y)
    if logits is None:
        return None
    kept = getattr(y, _LOGITS_TANGENT, None)
    if kept is None or kept[0] is not logits:
        raise ValueError(
            "The model's output comes from a softmax or sigmoid whose logits "
            "Keras' cross-entropy reads, but their tangent was not tracked, "
            "so the forward gradient would be wrong. Use "
            "`ForwardGradientModel(..., layer_rules=False)`, or give the last "
            "layer no activation and compile the loss with `from_logits=True`."
        )
    return kept


def _jvp_keeping_logits(fn, primals, duals):
    """`jvp(fn, primals, duals)` for a function returning one tensor, also
    keeping the tangent of the logits Keras may read from it."""

    def both():
        y = fn()
        logits = _compat.keras_logits(y) if tf.is_tensor(y) else None
        return y, (y if logits is None else logits)

    # `jvp` names the op TensorFlow cannot differentiate, if any.
    (y, logits), (y_dot, logits_dot) = jvp(both, primals, duals)
    if logits is not y:
        _keep_logits_tangent(y, logits, logits_dot)
    return y, y_dot


def _linear(layer, x, x_dot):
    y = layer(x)
    return y, None if x_dot is None else layer(x_dot)


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def runs_plain(layer):
    """Whether the layer's `call` is the stock one (no LoRA, no
    quantization) and computes in its variables' dtype."""
    return (
        not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
        and layer.compute_dtype == layer.variable_dtype
    )


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


def _tile(t, num_tangents):
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
        return y, tf.where(_tile(x > 0, num_tangents), x_dot, tf.zeros_like(x_dot))
    if num_tangents == 1:
        with tf.autodiff.ForwardAccumulator(x, x_dot) as acc:
            y = activation(x)
        y_dot = acc.jvp(y, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    else:
        # Element-wise (softmax: along the last axis), so its JVP at the
        # tiled primal is the JVP of each copy.
        tiled_x = _tile(x, num_tangents)
        with tf.autodiff.ForwardAccumulator(tiled_x, x_dot) as acc:
            tiled_y = activation(tiled_x)
        y_dot = acc.jvp(tiled_y, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        y = activation(x)
    logits = _compat.keras_logits(y)
    if logits is not None:
        if logits is not x:  # pragma: no cover - Keras keeps its input
            raise ValueError(f"Activation {activation!r} keeps logits other than its input.")
        _keep_logits_tangent(y, x, x_dot)
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
    y_dot = _add(
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
    y_dot = _add(
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
    pick = _tile(tf.one_hot(which, window, dtype=x_dot.dtype), num_tangents)
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
    pick = _tile(tf.one_hot(which, pool[0] * pool[1], axis=3, dtype=x_dot.dtype), num_tangents)
    y_dot = tf.reduce_sum(patches(x_dot) * pick, axis=3)
    if len(layer.pool_size) == 1:
        y_dot = y_dot[:, 0]
    return y_dot
