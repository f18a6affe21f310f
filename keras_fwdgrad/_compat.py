"""Every private Keras or TensorFlow attribute this package reads.

Each function names the versions it was checked on. A missing attribute
raises `RuntimeError` saying which one, so an upgrade that renames it
fails loudly instead of silently changing a gradient.

Checked on TensorFlow 2.21.0 and Keras 3.15.1.
"""

import tensorflow as tf

# Op types whose output Keras' TensorFlow cross-entropies replace by the
# op's input (`keras/src/backend/tensorflow/nn.py::_get_logits`).
_LOGITS_OP_TYPES = ("Softmax", "Sigmoid")


def _missing(what, error):
    return RuntimeError(
        f"keras-fwdgrad relies on {what}, which this version of Keras or "
        "TensorFlow does not have (checked on TensorFlow 2.21 and Keras "
        "3.15). Please report this with your versions. "
        f"Original error: {error}"
    )


def keras_logits(output):
    """The tensor a Keras cross-entropy reads instead of `output`, if any.

    Keras (3.15.1, TensorFlow backend) keeps the logits of a softmax or
    sigmoid on its output tensor as `_keras_logits`, and in a graph also
    recognizes the `Softmax`/`Sigmoid` op that made it; its cross-entropies
    with `from_logits=False` then compute the loss from those logits. This
    mirrors `keras.src.backend.tensorflow.nn._get_logits`.

    Args:
        output: A tensor, typically a model's prediction.

    Returns:
        The logits tensor, or `None` when Keras would read `output` itself.
    """
    logits = getattr(output, "_keras_logits", None)
    if logits is not None:
        return logits
    if not tf.is_tensor(output) or isinstance(output, tf.Variable):
        return None
    if tf.executing_eagerly() or not hasattr(output, "op"):
        return None
    try:
        op = output.op
    except AttributeError:
        return None
    if op.type in _LOGITS_OP_TYPES and len(op.inputs) == 1:
        return op.inputs[0]
    return None


def in_xla_context():
    """Whether ops created now are compiled by XLA (an enclosing
    `tf.function(jit_compile=True)`).

    Uses `tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext`
    (TensorFlow 2.21.0).
    """
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError as e:  # pragma: no cover - depends on TF version
        raise _missing("tensorflow.python.ops.control_flow_util", e) from e
    try:
        check = control_flow_util.GraphOrParentsInXlaContext
    except AttributeError as e:  # pragma: no cover
        raise _missing("control_flow_util.GraphOrParentsInXlaContext", e) from e
    return bool(check(tf.compat.v1.get_default_graph()))


def gradient_registered(op_type):
    """Whether TensorFlow has a gradient function (possibly `None`, for
    ops registered as not differentiable) for `op_type`.

    Uses `tensorflow.python.framework.ops._gradient_registry`
    (TensorFlow 2.21.0).

    Returns:
        `(registered, function)`: `function` is `None` for ops registered
        with `tf.no_gradient`.
    """
    try:
        from tensorflow.python.framework import ops
        registry = ops._gradient_registry
    except (ImportError, AttributeError) as e:  # pragma: no cover
        raise _missing("tensorflow.python.framework.ops._gradient_registry", e) from e
    try:
        return True, registry.lookup(op_type)
    except LookupError:
        return False, None


def all_layers(model):
    """Every layer inside `model`, nested ones included, not `model` itself.

    Uses `Layer._flatten_layers` (Keras 3.15.1).
    """
    try:
        flatten = model._flatten_layers
    except AttributeError as e:  # pragma: no cover
        raise _missing("keras.layers.Layer._flatten_layers", e) from e
    return list(flatten(include_self=False))
