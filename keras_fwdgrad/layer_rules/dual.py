"""One forward-mode pass through a model with the layer rules.

`dual_call(layer, x, x_dot, ...)` runs a layer or a model (`keras.Sequential`
or functional, nested ones included, walked by
`keras_fwdgrad.graph`) and carries the tangent of every
activation beside it: a layer's rule where it has one
(`keras_fwdgrad.layer_rules.rules`), rules for the merges `Add`,
`Subtract`, `Average` and `Concatenate`, and otherwise the layer's exact
derivative from `tf.autodiff.ForwardAccumulator`, for that layer only.
"""

import keras
import tensorflow as tf

from keras_fwdgrad import _compat
from keras_fwdgrad import graph
from keras_fwdgrad.layer_rules import rules
from keras_fwdgrad.layer_rules.logits import jvp_keeping_logits
from keras_fwdgrad.tangents import to_dense

L = keras.layers


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
    if graph.is_functional(model):
        if len(model.outputs) != 1:
            return False
    elif not graph.is_sequential(model):
        return False
    for layer in _compat.all_layers(model):
        module = type(layer).__module__
        if not module.startswith("keras."):
            return False
        if getattr(layer, "activity_regularizer", None) is not None:
            return False
        if isinstance(layer, L.Masking) or getattr(layer, "mask_zero", False):
            return False
        if isinstance(layer, keras.Model) and not (
            graph.is_sequential(layer) or graph.is_functional(layer)
        ):
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
    if graph.is_container(layer):
        return _dual_model(layer, x, x_dot, tangent_of, training, num_tangents)
    rule = rules.RULES.get(type(layer))
    if rule is not None:
        out = rule(layer, x, x_dot, tangent_of, training, num_tangents)
        if out is not None:
            return out
    if isinstance(layer, rules.LINEAR):
        return rules.linear(layer, x, x_dot)
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
            graph.is_sequential(layer)
            or graph.is_functional(layer)
            or type(layer) in rules.RULES
            or isinstance(layer, (rules.LINEAR, MERGES, L.InputLayer))
        ):
            return False
    return True


def _dual_model(model, x, x_dot, tangent_of, training, num_tangents):
    """Runs a `Sequential` or functional model node by node
    (`graph.run`), carrying tangents keyed by the primal tensor they
    belong to."""
    tangents = {}
    if x_dot is not None:
        for t, t_dot in zip(tf.nest.flatten(x), tf.nest.flatten(x_dot)):
            if t_dot is not None:
                tangents[id(t)] = t_dot

    def on_inputs(given, inputs):
        # Keras may cast a functional model's inputs: new tensors, the
        # same tangents.
        for t, s in zip(given, inputs):
            if id(t) in tangents:
                tangents[id(s)] = tangents[id(t)]

    def call(op, args, kwargs):
        if (
            len(args) == 1
            # `training` recorded at graph construction is overridden, as
            # in the functional model's own call.
            and set(kwargs) <= {"training"}
            and tf.is_tensor(args[0])
            and isinstance(op, keras.layers.Layer)
        ):
            y, y_dot = dual_call(
                op, args[0], tangents.get(id(args[0])), tangent_of, training, num_tangents
            )
        else:
            y, y_dot = _dual_node(op, args, kwargs, tangents, tangent_of, training, num_tangents)
        if y_dot is not None:
            tangents[id(y)] = y_dot
        return y

    y = graph.run(model, x, call, on_inputs)
    return y, tangents.get(id(y))


MERGES = (L.Add, L.Subtract, L.Average, L.Concatenate)


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
    if isinstance(op, MERGES) and len(args) == 1 and not kwargs and _same_shapes(op, args[0]):
        xs = list(args[0])
        dots = [tangents.get(id(t)) for t in xs]
        y = op(xs)
        if all(d is None for d in dots):
            return y, None
        if isinstance(op, L.Concatenate):
            dots = [
                tf.zeros_like(rules.tile(t, num_tangents)) if d is None else d
                for t, d in zip(xs, dots)
            ]
            return y, tf.concat(dots, axis=op.axis)
        if isinstance(op, L.Subtract):
            first, second = dots
            if second is None:
                return y, first
            return y, -second if first is None else first - second
        total = None
        for d in dots:
            total = rules.add(total, d)
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
    return jvp_keeping_logits(lambda: op(*args, **kwargs), primals, duals)


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
    return jvp_keeping_logits(lambda: layer(x, training=training), primals, tangents)
