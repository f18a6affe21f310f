"""Collecting activity perturbation's per-layer estimates into one per
trainable variable, on either backend."""


def add(grads, variables, estimates):
    """Adds each layer call's estimates to `grads` (keyed by variable id):
    a layer called several times adds up its calls' estimates."""
    for v, g in zip(variables, estimates):
        grads[id(v)] = g if id(v) not in grads else grads[id(v)] + g


def in_variable_order(grads, variables):
    """The estimates of `variables`, in their order.

    Raises:
        ValueError: naming the trainable variables no layer call of the
            pass reads, which have no estimate (never a silent zero).
    """
    missing = [v.path for v in variables if id(v) not in grads]
    if missing:
        raise ValueError(
            '`perturbation="activations"` found no layer call that uses '
            f"the trainable variables {missing}: every trainable variable "
            "must belong to a layer the model calls. Make the others "
            "non-trainable."
        )
    return [grads[id(v)] for v in variables]
