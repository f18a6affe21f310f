"""Local-loss groups and patches (`local_loss_groups`,
`local_loss_patches`), in `keras.ops` and NumPy: which units share a
loss, and each group's directional derivative (Ren et al., 2023).

A block's output `h` is split into groups: channel `c` of `C` is in
channel group `c·G // C`, and with `local_loss_patches` each spatial axis
is split into patches as well, each (patch, channel group) a group. The
loss of group `g` is the head's loss with every other group's units held
constant, so its directional derivative takes only that group's tangents:
`d_g = Σ_{i in g} ∂L/∂h_i · ṫh_i`. A perturbed layer whose channels reach
the block's output through per-channel layers only (`ALIGNED`) takes, for
each of its units, the derivative of the group that unit reaches.

The backends' passes track which layer reaches a block's output that way
(`aligned_output`, `spatial_strides`) and give the block output's tangent
and the head loss's derivative at its pre-activations; the rest is here.
"""

import keras
import numpy as np

from keras_fwdgrad.activity.blocks import _ACTIVATION_LAYERS
from keras_fwdgrad.activity.blocks import _PER_CHANNEL
from keras_fwdgrad.activity.blocks import _POOLING


# Variable-free layers that map a tensor to one of the same shape, example
# by example and deterministically: an output layer's loss may be taken
# through them (`Alignment.output_of`).
_TAIL = _ACTIVATION_LAYERS + (keras.layers.Softmax,)
# Variable-free layers that map `[batch, 1, ..., 1, units]` to `[batch,
# units]` unit by unit (a 1×1 convolution classifier's `Flatten`).
_UNIT_FLATTEN = (keras.layers.Flatten, keras.layers.Reshape)


def _flattens_units(layer, x, y):
    """Whether `y = layer(x)` only drops spatial axes of size 1 before the
    last axis of `x`, so that unit `i` of `y` is unit `i` of `x`."""
    if not isinstance(layer, _UNIT_FLATTEN):
        return False
    shape = tuple(x.shape)
    return len(shape) > 2 and _units_only(shape) and tuple(y.shape[1:]) == (shape[-1],)


def _units_only(shape):
    """Whether every axis of `shape` between the batch axis and the last
    (the units) has size 1."""
    return all(size == 1 for size in shape[1:-1])


def output_units(z, function):
    """`(z, function)` on `[batch, units]`: the pre-activations `z` of the
    model's output layer and `function` (`Alignment.output_of`) that gives
    the model's output from them, with `z` of shape `[batch, 1, ..., 1,
    units]` (a 1×1 convolution over a 1×1 map) reshaped and `function`
    reshaping back; `None` when `z` has other spatial axes."""
    shape = tuple(z.shape)
    if len(shape) < 2 or not _units_only(shape):
        return None
    if len(shape) == 2:
        return z, function
    return keras.ops.reshape(z, (-1, shape[-1])), lambda v: function(
        keras.ops.reshape(v, (-1,) + shape[1:])
    )


def elementwise(activation):
    """Whether `activation` (or `None`) acts on each unit alone."""
    return activation not in (keras.activations.softmax, keras.activations.log_softmax)


def channels_last(layer, rank):
    """Whether `layer`, called on a tensor of rank `rank`, keeps channels
    on the last axis (its input's rank, not `layer.input`: a shared layer
    has several inputs)."""
    if isinstance(layer, keras.layers.BatchNormalization):
        return layer.axis in (-1, rank - 1)
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def keeps_channels(layer, args):
    """Whether `layer` called on `args` maps channel `c` of its one input
    to channel `c` of its output, unit by unit."""
    return (
        len(args) == 1
        and isinstance(layer, _PER_CHANNEL)
        and elementwise(getattr(layer, "activation", None))
        and channels_last(layer, len(args[0].shape))
    )


def spatial_strides(layer, strides, rank):
    """How positions of `layer`'s output map to those of a perturbed
    layer's pre-activations, given the map `strides` of its input.

    A map `(s_1, ..., s_n)` means that position `i` (per spatial axis) of
    the pre-activations reaches only position `i // s` of the output (`0`:
    position 0 only);
    `()` that the output has no spatial axes left; `None` that a
    position may reach several (overlapping pooling windows), so the
    output's positions cannot be told apart.
    """
    if strides is None or rank == 2:
        return None if strides is None else ()
    if not isinstance(layer, _POOLING):
        return strides
    if not hasattr(layer, "pool_size"):
        # Global pooling that keeps its axes: every position reaches 0.
        return (0,) * len(strides)
    pool = tuple(layer.pool_size)
    step = tuple(layer.strides) if layer.strides is not None else pool
    if pool != step:
        return None
    return tuple(s * p for s, p in zip(strides, step))


class Alignment:
    """Which perturbed layer's channels reach each block's output unit by
    unit, tracked during one pass (by the identity of the layers'
    outputs).

    A pass reports each closed-form layer's activation output
    (`closed_form_output`), each general-rule layer's perturbed output
    (`perturbed_output`), every other layer's output (`layer_output`)
    and each block's end (`block_end`); `grouped` then maps a block to the
    `(record, strides)` of the layer whose channels reach its end, and
    `output_of(y)` names the record whose perturbed units give `y` through
    variable-free activations alone. A record is whatever the pass uses
    to find a perturbed layer again.
    """

    def __init__(self):
        # id(output) -> (output, record, its block, strides): outputs that
        # still have the channels of a closed-form layer's pre-activations,
        # and how their positions map to the pre-activations'
        # (`spatial_strides`).
        self._aligned = {}
        # id(output) -> (output, record, functions): outputs computed from a
        # record's perturbed values by `functions` alone (its activation,
        # then `_TAIL` layers such as a float32 softmax).
        self._tails = {}
        # id(output) -> output: outputs that carry a perturbed layer's
        # tangent (block ends are cut, so what follows one does not).
        self._carrying = {}
        self.grouped = {}

    def _carries(self, x):
        found = self._carrying.get(id(x))
        return found is not None and found is x

    def _source(self, x):
        found = self._aligned.get(id(x))
        return found if found is not None and found[0] is x else None

    def closed_form_output(self, y, record, block, layer, activation, rank):
        """`y = activation(z)` of a closed-form layer's pre-activations of
        rank `rank`."""
        self._tails[id(y)] = (y, record, (activation,))
        self._carrying[id(y)] = y
        if channels_last(layer, rank) and elementwise(activation):
            self._aligned[id(y)] = (y, record, block, (1,) * (rank - 2))

    def perturbed_output(self, y, record, block, rank):
        """`y`, the perturbed output of a layer of the general rule (channels
        last): its units are the perturbed units themselves."""
        self._tails[id(y)] = (y, record, ())
        self._carrying[id(y)] = y
        if rank >= 2:
            self._aligned[id(y)] = (y, record, block, (1,) * (rank - 2))

    def layer_output(self, layer, args, y, kwargs=None):
        """`y = layer(*args, **kwargs)` of any other layer or operation.

        An `Add` of one aligned input and inputs that carry no tangent
        (a residual merge with the skip from an earlier block) is aligned
        as that input is: the tangent of its sum is that input's."""
        inputs = keras.tree.flatten((args, kwargs or {}))
        carried = [x for x in inputs if self._carries(x)]
        if carried:
            for out in keras.tree.flatten(y):
                self._carrying[id(out)] = out
        tail = self._tail(args[0]) if len(args) == 1 else None
        if (
            tail is not None
            and all(v is None for k, v in (kwargs or {}).items() if k != "training")
            and (
                (isinstance(layer, _TAIL) and tuple(y.shape) == tuple(args[0].shape))
                or _flattens_units(layer, args[0], y)
            )
        ):
            self._tails[id(y)] = (y, tail[1], tail[2] + (layer,))
        source = self._source(args[0]) if args else None
        if source is not None and keeps_channels(layer, args):
            strides = spatial_strides(layer, source[3], len(y.shape))
            self._aligned[id(y)] = (y, source[1], source[2], strides)
        elif isinstance(layer, keras.layers.Add) and len(carried) == 1:
            source = self._source(carried[0])
            same = all(
                tuple(getattr(x, "shape", ())) == tuple(y.shape) for x in keras.tree.flatten(args)
            )
            if source is not None and same:
                self._aligned[id(y)] = (y,) + tuple(source[1:])

    def inputs_standardized(self, given, inputs):
        """A functional model (nested ones included) runs on `inputs`, the
        flattened `given` after Keras standardized them: a cast to an
        input's dtype (mixed precision) makes a new tensor with the same
        units, which carries and is aligned as its source was."""
        for source, x in zip(given, inputs):
            if x is source:
                continue
            if self._carries(source):
                self._carrying[id(x)] = x
            found = self._source(source)
            if found is not None:
                self._aligned[id(x)] = (x,) + tuple(found[1:])

    def block_end(self, y, block):
        """`y` ends block `block`."""
        source = self._aligned.get(id(y))
        if source is not None and source[0] is y and source[2] == block:
            self.grouped[block] = (source[1], source[3])

    def _tail(self, x):
        found = self._tails.get(id(x))
        return found if found is not None and found[0] is x else None

    def output_of(self, y):
        """`(record, function)` when `y = function(v)` for the perturbed
        values `v` of `record` (a closed-form layer's pre-activations, or a
        general-rule layer's output) with `function` the closed-form
        layer's activation followed by variable-free activation layers
        (`Activation`, `Softmax`, ...; for example the float32 softmax of
        a mixed-precision model) and by layers that drop spatial axes of
        size 1 (`Flatten` after a 1×1 convolution classifier), else
        `None`."""
        found = self._tail(y)
        if found is None:
            return None
        functions = found[2]

        def function(v):
            for f in functions:
                v = f(v)
            return v

        return found[1], function


def channel_groups(model, channels):
    """`(index, G)`: channel `c` of `channels` is in group `c·G // C`, with
    `G` the model's `local_loss_groups` (at most `channels`)."""
    groups = model.local_loss_groups
    groups = channels if groups == "channels" else min(groups, channels)
    return np.arange(channels) * groups // channels, groups


def group_indices(model, h_shape, z_shape, strides):
    """The local-loss group of each unit of a block's output `h` and of
    the pre-activations `z` of the perturbed layer that reaches it.

    Channel `c` of `C` is in channel group `c·G // C`. With
    `local_loss_patches`, the positions of `h` are split into patches too
    (patch `i·n // size` on each spatial axis), and each (patch, channel
    group) is a group; a unit of `z` at position `i` reaches position
    `i // s` of `h` (`strides`). Without patches (or when `h` has no
    spatial axes, or its positions cannot be told apart), the indices run
    over channels only.

    Returns:
        `(index_h, index_z, groups)`: integer arrays of the shape of one
        example of `h` and of `z` (or `[C]` for channels only), and the
        number of groups.
    """
    channel_group, per_channel = channel_groups(model, h_shape[-1])
    spatial = tuple(h_shape[1:-1])
    patches = model.local_loss_patches
    if patches == 1 or not spatial or strides is None:
        return channel_group, channel_group, per_channel
    z_spatial = tuple(z_shape[1:-1])
    if None in spatial or None in z_spatial:
        raise ValueError(
            "`local_loss_patches` needs feature maps of known spatial size. "
            f"Received: a block output of shape {tuple(h_shape)}"
        )
    counts = [size if patches == "positions" else patches for size in spatial]

    def patch_index(positions):
        # positions: per axis, the position of `h` each index reaches.
        parts = [p * n // size for p, n, size in zip(positions, counts, spatial)]
        grids = np.meshgrid(*parts, indexing="ij")
        return np.ravel_multi_index(grids, counts)

    h_patch = patch_index([np.arange(size) for size in spatial])
    z_patch = patch_index(
        [
            np.zeros(n, dtype=int) if s == 0 else np.minimum(np.arange(n) // s, size - 1)
            for n, s, size in zip(z_spatial, strides, spatial)
        ]
    )

    def index(patch):
        return patch[..., None] * per_channel + channel_group

    return index(h_patch), index(z_patch), int(np.prod(counts)) * per_channel


def _run_length(index, groups):
    """`k` when the groups of `index` are `groups` consecutive runs of `k`
    units each (`k = 1`: one unit per group, in order), else `None`: then
    a group sum is a reshape and a sum, not a scatter (which XLA runs
    element by element on a CPU)."""
    flat = index.ravel()
    if groups < 1 or flat.size % groups:
        return None
    k = flat.size // groups
    return k if np.array_equal(flat, np.repeat(np.arange(groups), k)) else None


def _segment_sum(per_unit, index, groups):
    """`[batch, units]` → `[G, batch]`: the sum over each group's units."""
    k = _run_length(index, groups)
    if k is not None:
        summed = keras.ops.sum(keras.ops.reshape(per_unit, (-1, groups, k)), axis=-1)
        return keras.ops.transpose(summed)
    ids = keras.ops.convert_to_tensor(index.ravel().astype("int32"))
    return keras.ops.segment_sum(keras.ops.transpose(per_unit), ids, num_segments=groups)


def head_gradients(kernel, jacobian, h, hidden_kernel=None, hidden_z=None):
    """`∂L/∂h` of a block's local loss at the block's output `h`, from
    the loss's derivative at the head's pre-activations, for every
    example at once (the reverse products of the head alone).

    The head averages over positions, then applies `Dense` with `kernel`;
    with a hidden layer (`LocalHead(hidden_units=...)`) it first applies
    `relu(h @ hidden_kernel + b)` at every position.

    Args:
        kernel: The value of the head's output `Dense` kernel.
        jacobian: The head loss's derivative at its pre-activations
            (`[batch, units]`).
        h: The block's output (channels last).
        hidden_kernel, hidden_z: With a hidden layer, its kernel and its
            pre-activations (`[batch, ..., hidden_units]`), or its ReLU
            outputs, which are positive where those are.

    Returns:
        `(grad_h, grad_hidden)`: float32 `∂L/∂h`, broadcastable against
        `h`, and `∂L/∂hidden_z` (`None` without a hidden layer).
    """
    ops = keras.ops
    # ∂L/∂(pooled input of the output Dense): [batch, width].
    grad = ops.matmul(ops.cast(jacobian, "float32"), ops.transpose(ops.cast(kernel, "float32")))
    rank = len(h.shape)
    if rank > 2:
        # The mean over positions spreads it.
        positions = ops.cast(ops.size(h), "float32") / ops.cast(
            ops.shape(h)[0] * h.shape[-1], "float32"
        )
        grad = ops.reshape(grad / positions, (-1,) + (1,) * (rank - 2) + (grad.shape[-1],))
    if hidden_kernel is None:
        return grad, None
    active = ops.cast(ops.greater(hidden_z, 0), "float32")
    grad_hidden = grad * active
    grad_h = ops.matmul(grad_hidden, ops.transpose(ops.cast(hidden_kernel, "float32")))
    return grad_h, grad_hidden


def group_derivatives(grad, th, index, groups):
    """Each group's directional derivative of a block's local loss:
    `d_g = Σ_{i in g} ∂L/∂h_i · ṫh_i`.

    Args:
        grad: `∂L/∂h` (`head_gradients`), broadcastable against `th`.
        th: The tangent of the block's output `h` (or of a head's hidden
            pre-activations, with `grad` the loss's derivative there).
        index, groups: The group of each unit of `h` (`group_indices`)
            and their number.

    Returns:
        A float32 `[G, batch]` tensor.
    """
    ops = keras.ops
    th = ops.cast(th, "float32")
    channels = th.shape[-1]
    rank = len(th.shape)
    per_unit = th * grad
    if index.ndim == 1:
        if rank > 2:
            per_unit = ops.sum(per_unit, axis=tuple(range(1, rank - 1)))
        units = channels
    else:
        units = int(np.prod(th.shape[1:]))
    return _segment_sum(ops.reshape(per_unit, (-1, units)), index, groups)


def output_unit_derivatives(model, z, u, jacobian):
    """Each output-unit group's directional derivative of the loss of a
    layer whose output is a loss's input (a local head, or the model's
    output layer): `d_g = Σ_{i in g} ∂L/∂z_i · u_i` with the layer's own
    tangents `u` (the tangents of the layers before it are held
    constant, which keeps the estimate unbiased and drops their noise).

    Args:
        model: The `ForwardGradientModel`.
        z, u: The layer's pre-activations (`[batch, units]`, or `[batch,
            1, ..., 1, units]`) and tangents.
        jacobian: `∂L_n/∂z_n` at its pre-activations (`[batch, units]`).

    Returns:
        `(dg, index)`: a float32 `[G, batch]` tensor and the group of each
        unit.
    """
    index, groups = channel_groups(model, z.shape[-1])
    ops = keras.ops
    u = ops.reshape(u, (-1, z.shape[-1]))
    per_unit = ops.cast(jacobian, "float32") * ops.cast(u, "float32")
    return _segment_sum(per_unit, index, groups), index


def per_unit(dg, u, index, mixing):
    """`[G, batch]` group derivatives spread over the units of `u`
    (`index`: their groups, `group_indices`); summed over the batch when
    the block mixes examples. Float32, broadcastable against `u`."""
    ops = keras.ops
    if mixing:
        dg = ops.broadcast_to(ops.sum(dg, axis=1, keepdims=True), ops.shape(dg))
    groups = dg.shape[0]
    k = _run_length(index, groups) if groups is not None else None
    if k is not None:
        # Each group's derivative repeated over its run of units.
        dn = ops.transpose(dg)
        if k > 1:
            dn = ops.repeat(dn, k, axis=1)
    else:
        ids = ops.convert_to_tensor(index.ravel().astype("int32"))
        dn = ops.take(ops.transpose(dg), ids, axis=1)
    if index.ndim == 1:
        return ops.reshape(dn, (-1,) + (1,) * (len(u.shape) - 2) + (u.shape[-1],))
    return ops.reshape(dn, (-1,) + tuple(u.shape[1:]))
