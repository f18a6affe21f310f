"""Collecting activity perturbation's per-layer estimates into one per
trainable variable, and telling from their factors that closed-form
`Dense` estimates are finite, on either backend."""

import keras
import numpy as np


def add(grads, variables, estimates):
    """Adds each layer call's estimates to `grads` (keyed by variable id):
    a layer called several times adds up its calls' estimates."""
    for v, g in zip(variables, estimates):
        grads[id(v)] = g if id(v) not in grads else grads[id(v)] + g


def in_variable_order(grads, variables):
    """The estimates of `variables`, in their order, each in its
    variable's dtype.

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
    # Each in its variable's dtype: under mixed precision a layer's
    # products come in its compute dtype (float16), and an optimizer that
    # scales the loss multiplies what it receives by its scale.
    out = []
    for v in variables:
        g = grads[id(v)]
        if keras.backend.standardize_dtype(g.dtype) != v.dtype:
            g = keras.ops.cast(g, v.dtype)
        out.append(g)
    return out


def factors_bound_product(x, g_z):
    """Whether the kernel estimate `xᵀ g_z` of a `Dense` layer (summed over
    all but the last axis) and its bias estimate (the sum of `g_z`) are
    finite, decided from the factors alone: when `x` and `g_z` are finite
    and `n · max|x| · max|g_z|` (`n` terms per entry) is at most 2⁻¹⁰ of
    the dtype's largest number, no entry or partial sum can overflow, nor
    a sum of up to 1,024 such estimates (a shared layer's calls).

    The NaN guard tests this instead of the estimates themselves: a guard
    that reads an estimate keeps it out of the update's branch, which
    costs an MLP's step under XLA about a fifth of its time.

    Returns:
        A boolean scalar, `False` only for non-finite or astronomically
        large factors (beyond about 3e35 in float32).
    """
    ops = keras.ops
    dtype = keras.backend.standardize_dtype(g_z.dtype)
    largest = ops.convert_to_tensor(float(np.finfo(dtype).max) / 1024, dtype)
    terms = ops.cast(ops.size(g_z), dtype) / g_z.shape[-1]
    ax = ops.max(ops.abs(ops.cast(x, dtype)))
    ag = ops.max(ops.abs(g_z))
    # `<=` is false for NaN; an infinite factor makes a product infinite.
    return ops.all(ops.stack([terms * ag <= largest, terms * ax * ag <= largest, ax <= largest]))


def finite_from_factors(variables, bounded, general):
    """`(ok, indices)` for `Estimate.finite_from_factors`.

    Args:
        variables: The model's trainable variables, in order.
        bounded: `{id(layer): (layer, [factors_bound_product, ...])}` for
            the `Dense` layers called in closed form.
        general: The ids of the layers called by the general rule (whose
            estimates include a reverse pass's share).

    Returns:
        The indices of the variables whose estimates are finite when `ok`
        holds (float32 `Dense` layers called in closed form only, without
        weight regularizers), or `(None, ())`.
    """
    oks, indices = [], []
    position = {id(v): i for i, v in enumerate(variables)}
    for key, (layer, checks) in bounded.items():
        params = layer.trainable_variables
        if (
            key in general
            or len(checks) > 1024
            or any(
                v.dtype != "float32" or getattr(v, "regularizer", None) is not None for v in params
            )
        ):
            continue
        oks.extend(checks)
        indices.extend(position[id(v)] for v in params if id(v) in position)
    if not oks:
        return None, ()
    return keras.ops.all(keras.ops.stack(oks)), tuple(sorted(indices))


def combined(checks):
    """One `finite_from_factors` for K passes of the same layers."""
    oks = [ok for ok, _ in checks if ok is not None]
    if not oks:
        return None, ()
    return keras.ops.all(keras.ops.stack(oks)), checks[0][1]
