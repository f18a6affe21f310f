"""Finds trainable variables cut off from the loss by an op without a
derivative.

TensorFlow gives an op that has no usable derivative (`tf.round`,
`tf.numpy_function`, ...) a zero tangent in forward mode, without any
error. A variable that reaches the loss only through such an op would then
get a zero forward gradient silently. `check_connected` traces the loss
once into a graph (never executed), and raises for every variable that the
loss depends on through floating-point values but whose derivative is
cut, naming the op and its layer. A variable that the loss does not depend
on at all (an unused head), or only through `tf.stop_gradient`, integer
values or shapes, is left alone: its gradient is zero, as with backprop.
"""

import tensorflow as tf

# Ops whose output does not depend on the values of their inputs, or that
# cut the gradient on purpose.
_VALUE_INDEPENDENT = frozenset(
    {"StopGradient", "PreventGradient", "ZerosLike", "OnesLike", "Shape", "ShapeN", "Size", "Rank"}
)


def _float_inputs(op):
    return [
        t for t in op.inputs if t.dtype.is_floating or t.dtype.is_complex or t.dtype == tf.resource
    ]


def _layer_of(op_name, layer_names):
    """The innermost layer whose name scope holds the op (a graph traced
    again uniquifies scopes: `dense` becomes `dense_1`)."""
    for part in reversed(op_name.split("/")[:-1]):
        if part in layer_names:
            return part
        base, _, suffix = part.rpartition("_")
        if suffix.isdigit() and base in layer_names:
            return base
    return None


def check_connected(loss_fn, variables, args, layer_names=()):
    """Raises if an op without a derivative cuts a variable from the loss.

    Args:
        loss_fn: Callable taking `*args` and returning the scalar loss. It
            is traced once into a graph, not run.
        variables: The trainable variables (Keras or TensorFlow).
        args: Tensors (nested structures allowed) passed to `loss_fn`.
        layer_names: Names of the model's layers, to name the op's layer.

    Returns:
        A list of bools, one per variable: whether the loss does not depend
        on it at all (its gradient is zero, as with backprop).

    Raises:
        ValueError: naming the variable, the op and the op's layer.
    """
    specs = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.dtype) if tf.is_tensor(t) else t, args
    )
    handles = [getattr(v, "value", v).handle for v in variables]
    problems = []
    disconnected = [False] * len(handles)

    def trace(*traced_args):
        loss = loss_fn(*traced_args)
        graph = tf.compat.v1.get_default_graph()
        internal = {}
        for external, placeholder in graph.captures:
            internal[id(external)] = placeholder
        # Every op the loss depends on through floating-point values.
        ancestors, stack = {}, [loss.op]
        while stack:
            op = stack.pop()
            if op.name in ancestors:
                continue
            ancestors[op.name] = op
            if op.type in _VALUE_INDEPENDENT:
                continue
            stack.extend(t.op for t in _float_inputs(op))
        placeholders = [internal.get(id(h)) for h in handles]
        tensors = [p for p in placeholders if p is not None]
        grads = dict(
            zip(
                [id(p) for p in tensors],
                tf.gradients(loss, tensors, unconnected_gradients="none"),
            )
        )
        for i, (variable, placeholder) in enumerate(zip(variables, placeholders)):
            if placeholder is None:
                disconnected[i] = True  # Not read by the loss's graph.
                continue
            if grads[id(placeholder)] is not None:
                continue
            if placeholder.op.name not in ancestors:
                disconnected[i] = True  # Not used by the loss at all.
                continue
            problems.append((variable, _blocking_op(loss, placeholder, ancestors)))
        return loss

    tf.function(trace, autograph=False).get_concrete_function(*specs)
    if problems:
        lines = []
        for variable, op in problems:
            where = (
                f"op `{op.name}` (type `{op.type}`) in layer "
                f"{_layer_of(op.name, set(layer_names))!r}"
                if op is not None
                else "an op"
            )
            lines.append(f"variable {variable.path!r}: {where}")
        raise ValueError(
            "The loss depends on these trainable variables only through an op "
            "that has no derivative, so their forward gradient would be zero "
            "without any error (backprop would give them no gradient either): "
            + "; ".join(lines)
            + ". Replace the op by a differentiable one (for rounding, a "
            "straight-through estimator such as `x + tf.stop_gradient("
            "tf.round(x) - x)`), wrap it in `tf.custom_gradient`, or make the "
            "variables non-trainable."
        )
    return disconnected


def _blocking_op(loss, placeholder, ancestors):
    """The op on a path from `placeholder` to `loss` whose output has a
    gradient while an input on the path has none."""
    # Ops on a path: descendants of the variable that the loss depends on.
    on_path, stack = {}, [placeholder.op]
    while stack:
        op = stack.pop()
        if op.name in on_path or op.name not in ancestors:
            continue
        on_path[op.name] = op
        for out in op.outputs:
            stack.extend(c for c in out.consumers())
    inputs, outputs = [], []
    for op in on_path.values():
        for t in _float_inputs(op):
            if t.op.name in on_path and t.dtype != tf.resource:
                inputs.append((op, t))
        outputs.extend((op, t) for t in op.outputs if t.dtype.is_floating)
    if not outputs:
        return None
    tensors = [t for _, t in inputs] + [t for _, t in outputs]
    grads = tf.gradients(loss, tensors, unconnected_gradients="none")
    in_grads = grads[: len(inputs)]
    out_grads = grads[len(inputs) :]
    has_out_grad = {op.name for (op, _), g in zip(outputs, out_grads) if g is not None}
    for (op, _), g in zip(inputs, in_grads):
        if g is None and op.name in has_out_grad and op.type not in _VALUE_INDEPENDENT:
            return op
    return None
