"""The tangent of the logits a Keras cross-entropy reads.

Keras keeps the logits of a softmax or sigmoid output on the output tensor,
and its cross-entropies (`from_logits=False`) compute the loss from those
logits, not from the output. The loss's directional derivative then needs
the logits' tangent: the layer rules keep it on the output tensor
(`keep_logits_tangent`) and the estimate reads it (`logits_tangent`).
"""

import tensorflow as tf

from keras_fwdgrad import _compat
from keras_fwdgrad.ops import jvp


# The attribute of an output tensor that holds `(logits, tangent)` when
# Keras would compute a cross-entropy from that output's logits.
_LOGITS_TANGENT = "_keras_fwdgrad_logits_tangent"


def keep_logits_tangent(y, logits, logits_dot):
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


def jvp_keeping_logits(fn, primals, duals):
    """`jvp(fn, primals, duals)` for a function returning one tensor, also
    keeping the tangent of the logits Keras may read from it."""

    def both():
        y = fn()
        logits = _compat.keras_logits(y) if tf.is_tensor(y) else None
        return y, (y if logits is None else logits)

    # `jvp` names the op TensorFlow cannot differentiate, if any.
    (y, logits), (y_dot, logits_dot) = jvp(both, primals, duals)
    if logits is not y:
        keep_logits_tangent(y, logits, logits_dot)
    return y, y_dot
