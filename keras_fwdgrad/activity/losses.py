"""Each example's compiled loss, the per-example losses whose
directional derivatives activity perturbation takes, in `keras.ops`."""

import keras

from keras_fwdgrad import _compat

_HALF = ("float16", "bfloat16")
_REDUCTIONS = ("sum_over_batch_size", "mean", "sum", "mean_with_sample_weight", None, "none")


def _loss_object(model):
    loss = model.loss
    if isinstance(loss, (list, tuple, dict)):
        flat = keras.tree.flatten(loss)
        if len(flat) != 1:
            raise ValueError(
                f'`perturbation="activations"` needs one compiled loss. Received: loss={loss!r}'
            )
        loss = flat[0]
    if loss is None:
        raise ValueError("You must call `compile(loss=...)` before training.")
    return keras.losses.get(loss) if isinstance(loss, str) else loss


def _loss_weight(model):
    """The compiled `loss_weights` of the one output, or `None`."""
    weights = _compat.compiled_loss_weights(model)
    if weights is None:
        return None
    flat = keras.tree.flatten(weights)
    if len(flat) != 1:
        raise ValueError(
            '`perturbation="activations"` needs one loss weight for its one '
            f"output. Received: loss_weights={weights!r}"
        )
    return float(flat[0])


def _same_rank(values, weight):
    """`weight` squeezed or expanded to `values`' rank where they differ
    by a last axis of size 1, as Keras' losses do."""
    if len(weight.shape) == len(values.shape) + 1 and weight.shape[-1] == 1:
        return keras.ops.squeeze(weight, axis=-1)
    while len(weight.shape) < len(values.shape):
        weight = weight[..., None]
    return weight


def per_example_losses(model, y, y_pred, sample_weight, copies=1, replicas=1):
    """The compiled loss of each example, weighted and scaled so that they
    sum to the compiled (reduced) loss.

    As `keras.losses.Loss.__call__` (Keras 3.15.1): float16 or bfloat16
    predictions are converted to the loss's dtype (float32 under mixed
    precision), and a Keras mask on the predictions or the loss values weighs each value
    (for a mean, by the batch's count over its valid entries); then
    `sample_weight`, the compiled `loss_weights` and the reduction.

    Args:
        model: A compiled `ForwardGradientModel`.
        y, y_pred: Targets and predictions.
        sample_weight: Optional per-example weights.
        copies: The batch is this many copies of one batch, each scaled
            as that one batch alone.
        replicas: The number of replicas the step runs on: Keras divides
            each replica's loss by it.

    Returns:
        A float32 tensor `[batch]`.
    """
    ops = keras.ops
    loss = _loss_object(model)
    y = keras.tree.flatten(y)[0]
    in_mask = _compat.keras_mask(y_pred)
    if isinstance(loss, keras.losses.Loss):
        dtype, reduction, call = loss.dtype, loss.reduction, loss.call
    elif callable(loss):
        # Keras wraps a loss function in a `LossFunctionWrapper` of floatx.
        dtype, reduction, call = keras.backend.floatx(), "sum_over_batch_size", loss
    else:
        raise TypeError(
            '`perturbation="activations"` needs a loss that is a name, a '
            f"function or a `keras.losses.Loss`. Received: loss={loss!r}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(
            '`perturbation="activations"` supports the loss reductions '
            f"{_REDUCTIONS}. Received: reduction={reduction!r}"
        )
    if keras.backend.standardize_dtype(y_pred.dtype) in _HALF:
        # Under mixed precision Keras computes the loss in its own dtype.
        y_pred = ops.cast(y_pred, dtype)
    values = call(y, y_pred)
    out_mask = _compat.keras_mask(values)
    masks = [m for m in (in_mask, out_mask) if m is not None]
    values = ops.cast(values, "float32")
    denominator = ops.cast(ops.size(values), "float32")
    weight = None
    if sample_weight is not None:
        weight = _same_rank(values, ops.cast(ops.convert_to_tensor(sample_weight), "float32"))
    if masks:
        mask = masks[0] if len(masks) == 1 else ops.logical_and(masks[0], masks[1])
        mask = _same_rank(values, ops.cast(mask, "float32"))
        if reduction in ("sum_over_batch_size", "mean"):
            # Valid entries weigh total / valid, as in Keras.
            total = ops.cast(ops.size(mask), "float32")
            mask = mask * ops.divide_no_nan(total, ops.sum(mask))
        weight = mask if weight is None else weight * mask
    if weight is not None:
        weight = ops.broadcast_to(weight, ops.shape(values))
        values = values * weight
        if reduction == "mean_with_sample_weight":
            denominator = ops.sum(weight)
    if len(values.shape) > 1:
        values = ops.sum(ops.reshape(values, (ops.shape(values)[0], -1)), axis=1)
    if reduction in ("sum_over_batch_size", "mean", "mean_with_sample_weight"):
        values = values / (denominator / copies)
    loss_weight = _loss_weight(model)
    if loss_weight is not None:
        values = values * loss_weight
    return values / replicas
