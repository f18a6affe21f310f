"""Each example's compiled loss, the per-example losses whose
directional derivatives activity perturbation takes, in `keras.ops`."""

import keras

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


def per_example_losses(model, y, y_pred, sample_weight, copies=1, replicas=1):
    """The compiled loss of each example, weighted and scaled so that they
    sum to the compiled (reduced) loss.

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
    if isinstance(loss, keras.losses.Loss):
        values = loss.call(y, y_pred)
        reduction = loss.reduction
    elif callable(loss):
        values = loss(y, y_pred)
        reduction = "sum_over_batch_size"
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
    values = ops.cast(values, "float32")
    denominator = ops.cast(ops.size(values), "float32")
    if sample_weight is not None:
        weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
        while len(weight.shape) < len(values.shape):
            weight = weight[..., None]
        weight = ops.broadcast_to(weight, ops.shape(values))
        values = values * weight
        if reduction == "mean_with_sample_weight":
            denominator = ops.sum(weight)
    if len(values.shape) > 1:
        values = ops.sum(ops.reshape(values, (ops.shape(values)[0], -1)), axis=1)
    if reduction in ("sum_over_batch_size", "mean", "mean_with_sample_weight"):
        values = values / (denominator / copies)
    return values / replicas
