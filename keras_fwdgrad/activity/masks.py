"""Keras masks through activity perturbation's pass.

Keras 3 carries a mask (`Embedding(mask_zero=True)`, `Masking`) as an
attribute of a tensor, and a layer such as `MultiHeadAttention` reads the
masks of its inputs when it is called. The pass replaces some layers'
outputs by new tensors (a perturbed output, a `Dense` layer's output
computed in closed form, a block's output without its gradient), so these
functions give each new tensor the mask Keras would have given it, and
let a layer's call be replayed with the masks its inputs had.
"""

import keras

from keras_fwdgrad import _compat


def carry(source, target):
    """Attaches `source`'s Keras mask, if any, to `target`; returns
    `target`."""
    if target is not source:
        mask = _compat.keras_mask(source)
        if mask is not None:
            _compat.set_keras_mask(target, mask)
    return target


def of_uncalled(layer, args, kwargs, output):
    """Attaches to `output`, computed from `layer`'s inputs without calling
    the layer, the mask `layer(*args, **kwargs)` would attach: as
    `Layer.__call__` does (Keras 3.15.1), a layer that supports masking
    passes on `compute_mask(first input, mask)`, where the mask is the
    call's `mask` argument or else the first input's. Returns `output`."""
    if not layer.supports_masking or _compat.keras_mask(output) is not None:
        return output
    first = args[0] if args else None
    previous = kwargs.get("mask")
    if previous is None:
        previous = keras.tree.map_structure(_compat.keras_mask, first)
    if all(m is None for m in keras.tree.flatten(previous)):
        return output
    mask = layer.compute_mask(first, previous)
    if mask is not None:
        _compat.set_keras_mask(output, mask)
    return output


def of_leaves(leaves):
    """The Keras masks of `leaves` (`None` where a leaf has none), read
    before a call that may remove them (`MultiHeadAttention` does)."""
    return [_compat.keras_mask(leaf) for leaf in leaves]


def attach(leaves, leaf_masks):
    """Attaches `leaf_masks` (from `of_leaves`) to `leaves` again, so that
    a replayed call sees the masks the recorded one saw."""
    for leaf, mask in zip(leaves, leaf_masks):
        if mask is not None:
            _compat.set_keras_mask(leaf, mask)
