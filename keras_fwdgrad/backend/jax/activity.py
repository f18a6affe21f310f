"""Activity perturbation's pass and estimate on the JAX backend.

The same estimator as on TensorFlow (`keras_fwdgrad.activity` says what is
estimated; docs/activity.md, "The general rule"), written functionally:

1. The model (and its local heads) runs statelessly, layer by layer
   (`keras_fwdgrad.graph`). The output of every layer with trainable
   variables gets an additive perturbation `eps_i` (for a stock
   `Dense`/`Conv` layer, its pre-activations: the layer runs with a linear
   activation, then its activation is applied). Block ends are
   `stop_gradient`.
2. `jax.jvp` of that pass at `eps = 0`, with a tangent `u_i` per example
   and unit (`direction.tangent`: the quantized normal by default), gives each block's per-example
   directional derivatives `d_n` in the forward pass.
3. Each layer's variables get the reverse pass through that one layer's
   call alone (`jax.vjp` of the layer as a function of its own trainable
   values, on the inputs and state it was called with), with cotangent
   `d_n u_n`. Under `jax.jit` XLA shares the layer's forward computation
   with the pass's. Closed-form `Dense` layers form their products
   directly, and so do stride-1 `Conv2D` kernels on the CPU
   (`kernel_products`: XLA:CPU's own filter gradient is several times
   slower than the forward convolution).

With `local_loss_groups` or `local_loss_patches`, the pass also tracks
which perturbed layer's channels reach a block's output unit by unit
(`keras_fwdgrad.activity.groups`); the block output's tangent comes out of
the same `jax.jvp`, and each head loss's derivative at its
pre-activations from one `jax.jvp` per unit (`jax.vmap`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import keras

from keras_fwdgrad import _compat
from keras_fwdgrad import backend
from keras_fwdgrad import graph
from keras_fwdgrad.activity import estimates
from keras_fwdgrad.activity import groups
from keras_fwdgrad.activity import losses
from keras_fwdgrad.activity import masks
from keras_fwdgrad.activity import orthogonal
from keras_fwdgrad.backend.jax import kernel_products
from keras_fwdgrad.activity.blocks import mixes_examples
from keras_fwdgrad.activity.blocks import CallOrder
from keras_fwdgrad.activity.blocks import check_no_added_losses
from keras_fwdgrad.activity.blocks import frozen_variables
from keras_fwdgrad.activity.blocks import has_variables
from keras_fwdgrad.activity.blocks import trainable_variables
from keras_fwdgrad.activity.blocks import not_one_tensor
from keras_fwdgrad.activity.blocks import perturbed
from keras_fwdgrad.activity.heads import LocalHead
from keras_fwdgrad.ops import clip_directional_derivative


def _is_array(leaf):
    return isinstance(leaf, (jax.Array, jax.core.Tracer))


@dataclasses.dataclass
class _Record:
    """One perturbed layer call: what its reverse pass needs."""

    layer: object  # The layer whose call is replayed (a head's `Dense`).
    treedef: object  # Of `(args, kwargs)`.
    static: list  # The non-array leaves, `None` where an array goes.
    block: int
    closed_form: bool  # Pre-activations perturbed (activation after).
    relu: bool
    head: bool = False  # A local head's output `Dense`.
    head_hidden: bool = False  # A local head's hidden `Dense`.
    # For a normalization whose input a `normalized_layers` layer made:
    # that layer's index in `_Pass.normalized_records`.
    normalized: int = None


def _linear_call(layer, args, kwargs, closed_form):
    """`layer(*args, **kwargs)`; for a closed-form layer its
    pre-activations (the call with a linear activation)."""
    if not closed_form:
        return layer(*args, **kwargs)
    activation = layer.activation
    layer.activation = keras.activations.linear
    try:
        return layer(*args, **kwargs)
    finally:
        layer.activation = activation


class _Pass:
    """One pass of the model and its heads, perturbing the output (or
    pre-activations) of every layer with trainable variables by
    `eps[i]`; `eps=None` perturbs nothing (to find the shapes)."""

    def __init__(self, model, eps):
        self.model = model
        self.eps = eps
        self.block = 0
        self.records = []
        self.inputs = []  # Per record: the array leaves of its call.
        self.input_masks = []  # Per record: their Keras masks then.
        self.states = []  # Per record: its non-trainable values then.
        self.perturbed_values = []  # Per record: what was perturbed.
        # Each block's output, by block (`call_order` gives each call of
        # the model's graph its block).
        self.block_outputs = [None] * len(model._local_loss_end_ids)
        self.call_order = CallOrder(model._local_loss_call_blocks)
        # Records whose tangents reach a layer that mixes examples: those
        # recorded in its block before it is called (call order is a
        # topological order, so none recorded later is upstream of it).
        self.mixing_records = set()
        self.ends = model._local_loss_end_ids
        # For local-loss groups (records are indices into `records`), and
        # `(record, function)` of the model's output (`Alignment.output_of`).
        self.alignment = groups.Alignment()
        self.output_record = None
        # `{id(layer): id(normalization)}` (`activity.normalized_pairs`).
        self.normalized_layers = model._normalized_layers()
        # The calls of those layers (not perturbed), with their array
        # leaves and states, and `{id(normalization): (index, output)}` of
        # the last one before each normalization.
        self.normalized_records = []
        self.normalized_inputs = []
        self.normalized_states = []
        self.pending = {}

    def perturb(self, layer, args, kwargs, closed_form, head=False, head_hidden=False):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        index = len(self.records)
        self.records.append(
            _Record(
                layer,
                treedef,
                [None if _is_array(leaf) else leaf for leaf in leaves],
                self.block,
                closed_form,
                closed_form and layer.activation is keras.activations.relu,
                head,
                head_hidden,
            )
        )
        self.inputs.append([leaf for leaf in leaves if _is_array(leaf)])
        # Read before the call, which may remove them.
        self.input_masks.append(masks.of_leaves(self.inputs[-1]))
        self.states.append([v.value for v in frozen_variables(layer)])
        normalized = self.pending.pop(id(layer), None)
        if normalized is not None:
            if leaves[0] is not normalized[1]:
                raise RuntimeError(
                    f"Layer {layer.name!r} was not called on the output of "
                    f"{self.normalized_records[normalized[0]].layer.name!r}, the "
                    "one layer that feeds it."
                )
            self.records[-1].normalized = normalized[0]
        z = _linear_call(layer, args, kwargs, closed_form)
        if not _is_array(z) or not jnp.issubdtype(z.dtype, jnp.floating):
            raise not_one_tensor(layer, str(z.dtype) if _is_array(z) else type(z).__name__)
        self.perturbed_values.append(z)
        if self.eps is not None:
            z = masks.carry(z, z + self.eps[index].astype(z.dtype))
        if not closed_form:
            self.alignment.perturbed_output(z, index, self.block, len(z.shape))
            return z
        y = masks.carry(z, layer.activation(z))
        self.alignment.closed_form_output(
            y, index, self.block, layer, layer.activation, len(z.shape)
        )
        return y

    def call_layer(self, layer, args, kwargs):
        if self.call_order.pending():
            # A call of the model's graph (the heads follow it).
            self.block = self.call_order.block(layer)
        if mixes_examples(layer):
            self.mixing_records.update(
                i for i, r in enumerate(self.records) if r.block == self.block
            )
        is_layer = isinstance(layer, keras.layers.Layer)
        if is_layer and "training" in _compat.call_context_args(layer):
            kwargs = {**kwargs, "training": True}
        closed_form = False
        if not is_layer:
            # An operation of a functional graph (`GetItem`, a `keras.ops`
            # call): no variables.
            y = layer(*args, **kwargs)
            self.alignment.layer_output(layer, args, y, kwargs)
        elif isinstance(layer, LocalHead):
            closed_form = True
            h = args[0]
            if layer.hidden is not None:
                h = self.perturb(layer.hidden, (h,), {}, True, head_hidden=True)
            y = self.perturb(layer.dense, (layer.pool(h),), {}, True, head=True)
        elif id(layer) in self.normalized_layers:
            # Not perturbed: the normalization after it is, and its
            # reverse pass gives this layer's cotangent.
            leaves, treedef = jax.tree_util.tree_flatten((args, {}))
            self.normalized_records.append(
                _Record(layer, treedef, [None] * len(leaves), self.block, True, False)
            )
            self.normalized_inputs.append(list(leaves))
            self.normalized_states.append([v.value for v in frozen_variables(layer)])
            y = _linear_call(layer, args, {}, True)
            self.pending[self.normalized_layers[id(layer)]] = (
                len(self.normalized_records) - 1,
                y,
            )
        elif has_variables(layer):
            closed_form = perturbed(layer) and len(args) == 1 and not set(kwargs) - {"training"}
            if closed_form:
                kwargs = {}
            y = self.perturb(layer, args, kwargs, closed_form)
        else:
            y = layer(*args, **kwargs)
            self.alignment.layer_output(layer, args, y, kwargs)
        if id(layer) in self.ends and self.block < len(self.ends):
            self.alignment.block_end(y, self.block)
            self.block_outputs[self.block] = y
            y = masks.carry(y, jax.lax.stop_gradient(y))
        return y

    def head_outputs(self, heads):
        outputs = []
        for block, (head, h) in enumerate(zip(heads, self.block_outputs)):
            self.block = block
            outputs.append(self.call_layer(head, (h,), {}))
        self.block = len(heads)
        return outputs


def _tangent(model, seed, shape, dtype, k):
    """One layer's tangent (`seed` is that layer's) for direction `k` of
    the step: independent draws of `direction.tangent` (the quantized
    normal, or random signs), or with `orthogonal_directions` row `k` of
    each example's K orthogonal tangents (`activity.orthogonal`; the K
    passes form the same ones, which XLA computes once)."""
    num = model.num_directions
    if not model.orthogonal_directions or num == 1:
        return model.direction.tangent(shape, backend.fold_in(seed, k), dtype)
    rows = orthogonal.tangents(model.direction, tuple(shape), num, seed)
    return rows[:, k].reshape(shape).astype(dtype)


def estimate(model, state, x, y, sample_weight, k):
    """One pass of activity perturbation for direction `k` of the step.

    Args:
        model: A built `ForwardGradientModel` on JAX.
        state: `(trainable, non_trainable)` values of its variables.
        x, y, sample_weight: One batch.
        k: The direction's index.

    Returns:
        `(loss, y_pred, d, grads, local_losses, non_trainable)`: as the
        TensorFlow backend's `estimate`, with the non-trainable values
        after the pass.
    """
    trainable, non_trainable = state
    variables = model.trainable_variables
    mapping = list(zip(variables, trainable)) + list(
        zip(model.non_trainable_variables, non_trainable)
    )
    # As Keras converts them: floating inputs of a `Sequential` model to its
    # `Input`'s dtype; a functional model's run casts each to its own.
    dtype = graph.floating_input_dtype(model.model)
    x = jax.tree.map(
        lambda t: (
            t.astype(dtype)
            if dtype is not None and jnp.issubdtype(jnp.asarray(t).dtype, jnp.floating)
            else t
        ),
        x,
    )
    holder = {}

    def run(eps):
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True) as scope:
            p = _Pass(model, eps)
            y_pred = graph.run(model.model, x, p.call_layer, p.alignment.inputs_standardized)
            check_no_added_losses(model.model)
            head_preds = p.head_outputs(model.local_heads)
            block_losses = [
                losses.per_example_losses(model, y, h, sample_weight)
                for h in head_preds + [y_pred]
            ]
            loss = model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            new_state = []
            for v, value in zip(model.non_trainable_variables, non_trainable):
                current = scope.get_current_value(v)
                new_state.append(value if current is None else current)
        found = p.alignment.output_of(y_pred)
        if found is not None and len(y_pred.shape) == 2:
            p.output_record = found
        holder["pass"] = p
        return block_losses, (
            loss,
            y_pred,
            new_state,
            p.inputs,
            p.input_masks,
            p.states,
            p.perturbed_values,
            (p.normalized_inputs, p.normalized_states),
            p.block_outputs,
        )

    shapes = jax.eval_shape(lambda: run(None)[1][6])
    step = non_trainable[model._state_index(model.direction_step)]
    seed = backend.fold_in(backend.step_seed(model.seed, step), 1_000_003)
    us = [
        _tangent(model, backend.fold_in(seed, i), s.shape, s.dtype, k)
        for i, s in enumerate(shapes)
    ]
    zeros = [jnp.zeros(s.shape, s.dtype) for s in shapes]
    (block_losses, aux), (d, aux_tangents) = jax.jvp(run, (zeros,), (us,))
    loss, y_pred, new_state, inputs, input_masks, states, values, normalized, block_outputs = aux
    p = holder["pass"]
    d = clip_directional_derivative(jnp.stack(d).astype("float32"), model.jvp_clip)
    batch_d = jnp.sum(d, axis=1)
    by_id = {id(v): value for v, value in zip(variables, trainable)}
    group_d = {}
    if model.local_loss_groups != 1 or model.local_loss_patches != 1:
        group_d = _group_derivatives(
            model, p, values, us, block_outputs, aux_tangents[-1], by_id, y, sample_weight
        )
    grads = {}
    # Closed-form `Dense` products whose finiteness follows from that of
    # their factors (`estimates.factors_bound_product`).
    bounded = {}
    for index, (record, arrays, leaf_masks, layer_state, u, z) in enumerate(
        zip(p.records, inputs, input_masks, states, us, values)
    ):
        mixing = index in p.mixing_records
        if index in group_d:
            dg, unit_groups = group_d[index]
            dn = groups.per_unit(dg, u, unit_groups, mixing)
        else:
            dn = batch_d[record.block] if mixing else d[record.block]
            dn = jnp.broadcast_to(dn, d.shape[1:2]).reshape((-1,) + (1,) * (u.ndim - 1))
        # At least float32 (under mixed precision `u` is float16).
        dtype = jnp.promote_types(u.dtype, dn.dtype)
        cotangent = dn.astype(dtype) * u.astype(dtype)
        if record.relu and model.active_units_only:
            # Units with zero derivative have zero gradient: their share
            # of the estimate is pure noise.
            cotangent = cotangent * (z > 0).astype(dtype)
        layer = record.layer
        estimate = _layer_vjp(
            record,
            arrays,
            layer_state,
            by_id,
            cotangent,
            record.normalized is not None,
            leaf_masks,
        )
        if record.normalized is not None:
            # The layer before the normalization: its reverse pass with
            # the cotangent of the normalization's input.
            *estimate, g_x = estimate
            before = p.normalized_records[record.normalized]
            estimates.add(
                grads,
                trainable_variables(before.layer),
                _layer_vjp(
                    before,
                    normalized[0][record.normalized],
                    normalized[1][record.normalized],
                    by_id,
                    g_x,
                ),
            )
        estimates.add(grads, trainable_variables(layer), estimate)
        if record.closed_form and isinstance(layer, keras.layers.Dense):
            bounded.setdefault(id(layer), (layer, []))[1].append(
                estimates.factors_bound_product(
                    _arguments(record, arrays)[0][0], cotangent.astype(layer.kernel.dtype)
                )
            )
    grads = estimates.in_variable_order(grads, variables)
    grads = _with_regularizers(variables, trainable, grads)
    local = tuple(jnp.sum(values) for values in block_losses[:-1])
    general = {id(r.layer) for r in p.records if not r.closed_form}
    checked = estimates.finite_from_factors(variables, bounded, general)
    return loss, y_pred, d, grads, local, new_state, checked


def _group_derivatives(
    model, p, values, us, block_outputs, block_tangents, by_id, y, sample_weight
):
    """`{record index: (dg, groups of its units)}` for the layers that take
    their groups' derivatives (`keras_fwdgrad.activity.groups`): the
    closed-form layer whose channels reach each block's output, each
    local head, and the model's output layer."""
    heads = {r.block: i for i, r in enumerate(p.records) if r.head}
    hiddens = {r.block: i for i, r in enumerate(p.records) if r.head_hidden}
    jacobians = {
        i: _loss_jacobian(model, p.records[i].layer.activation, values[i], y, sample_weight)
        for i in heads.values()
    }
    # `∂L/∂h` of each head at its block's output (and at its hidden
    # pre-activations).
    head_grads = {}
    for block, i in heads.items():
        head = model.local_heads[block]
        hidden = {}
        if block in hiddens:
            hidden = dict(
                hidden_kernel=by_id[id(head.hidden.kernel)], hidden_z=values[hiddens[block]]
            )
        head_grads[block] = groups.head_gradients(
            by_id[id(head.dense.kernel)], jacobians[i], block_outputs[block], **hidden
        )
    out = {}
    for block, (index, strides) in p.alignment.grouped.items():
        h, th = block_outputs[block], block_tangents[block]
        index_h, index_z, count = groups.group_indices(model, h.shape, us[index].shape, strides)
        dg = groups.group_derivatives(head_grads[block][0], th, index_h, count)
        out[index] = (clip_directional_derivative(dg, model.jvp_clip), index_z)
    for block, index in hiddens.items():
        # A head's hidden layer: one loss per group of its own units, the
        # other tangents held constant (as for the head's output layer).
        shape = us[index].shape
        unit, index_z, count = groups.group_indices(model, shape, shape, (1,) * (len(shape) - 2))
        dg = groups.group_derivatives(head_grads[block][1], us[index], unit, count)
        out[index] = (clip_directional_derivative(dg, model.jvp_clip), index_z)
    outputs = dict(jacobians)
    if p.output_record is not None:
        # The model's output comes from this layer's perturbed values
        # through its activation, activation layers and layers that drop
        # spatial axes of size 1 alone (`Alignment.output_of`).
        index, function = p.output_record
        units = groups.output_units(values[index], function)
        if units is not None:
            z, function = units
            outputs[index] = _loss_jacobian(model, function, z, y, sample_weight)
    for index, jacobian in outputs.items():
        dg, unit_groups = groups.output_unit_derivatives(model, values[index], us[index], jacobian)
        out[index] = (clip_directional_derivative(dg, model.jvp_clip), unit_groups)
    return out


def _loss_jacobian(model, activation, z, y, sample_weight):
    """`∂L_n/∂z_n` (`[batch, units]`) of each example's loss of
    `activation(z)` at the pre-activations `z`, by forward mode: one
    `jax.jvp` per unit, each with that unit's basis tangent for every
    example (`L_n` depends on `z_n` alone)."""

    def losses_of(t):
        return losses.per_example_losses(model, y, activation(t), sample_weight)

    def column(e):
        return jax.jvp(losses_of, (z,), (jnp.broadcast_to(e, z.shape),))[1]

    return jax.vmap(column)(jnp.eye(z.shape[-1], dtype=z.dtype)).T


def _arguments(record, arrays):
    """`(args, kwargs)` of `record`'s layer call, from its array leaves."""
    leaves = iter(arrays)
    return jax.tree_util.tree_unflatten(
        record.treedef, [next(leaves) if leaf is None else leaf for leaf in record.static]
    )


def _layer_vjp(record, arrays, layer_state, by_id, cotangent, with_input=False, leaf_masks=()):
    """The reverse pass through `record`'s layer call alone: the gradient
    of `<call output, cotangent>` with respect to the layer's trainable
    values, its inputs, their Keras masks (`leaf_masks`) and its
    non-trainable state as they were; with `with_input`, followed by the
    gradient with respect to its first input."""
    layer = record.layer
    args, kwargs = _arguments(record, arrays)

    def call(values, *first):
        # `first`: the layer's first input, when it is differentiated too.
        mapping = list(zip(trainable_variables(layer), values)) + list(
            zip(frozen_variables(layer), layer_state)
        )
        call_args = tuple(first) + tuple(args[len(first) :])
        leaves = jax.tree_util.tree_leaves((call_args, kwargs))
        masks.attach([leaf for leaf in leaves if _is_array(leaf)], leaf_masks)
        with keras.StatelessScope(state_mapping=mapping):
            return _linear_call(layer, call_args, kwargs, record.closed_form)

    if with_input:
        out, vjp = jax.vjp(call, [by_id[id(v)] for v in trainable_variables(layer)], args[0])
        grads, g_x = vjp(cotangent.astype(out.dtype))
        return list(grads) + [g_x]
    if record.closed_form and isinstance(layer, keras.layers.Dense):
        # `z = x W + b`: the products in closed form, without running the
        # layer again, in the variables' dtype (under mixed precision a
        # float16 product of a head's factors overflows where the float32
        # one the update takes does not).
        dtype = layer.kernel.dtype
        x = args[0].astype(dtype)
        axes = tuple(range(x.ndim - 1))
        cotangent = cotangent.astype(dtype)
        grads = [jnp.tensordot(x, cotangent, axes=(axes, axes))]
        if layer.use_bias:
            grads.append(jnp.sum(cotangent, axis=axes))
        return grads
    if record.closed_form and kernel_products.applies(layer, args[0]):
        # In the variables' dtype, as a `Dense` layer's.
        x = args[0].astype(layer.kernel.dtype)
        cotangent = cotangent.astype(x.dtype)
        grads = [kernel_products.kernel_product(layer, x, cotangent)]
        if layer.use_bias:
            grads.append(jnp.sum(cotangent, axis=(0, 1, 2)))
        return grads

    values = [by_id[id(v)] for v in trainable_variables(layer)]
    policy = layer.dtype_policy
    if (
        record.closed_form
        and type(policy) is keras.DTypePolicy
        and policy.name != layer.variable_dtype
    ):
        # Under mixed precision, a convolution's products in the variables'
        # dtype too: the layer is traced under that policy (it casts its
        # input to it), and the reverse pass is that trace's.
        layer.dtype_policy = layer.variable_dtype
        try:
            out, vjp = jax.vjp(call, values)
        finally:
            layer.dtype_policy = policy
    else:
        out, vjp = jax.vjp(call, values)
    return vjp(cotangent.astype(out.dtype))[0]


def _with_regularizers(variables, values, grads):
    """Adds the exact gradient of each weight regularizer (a function of
    that variable alone) to its estimate."""
    out = []
    for v, value, g in zip(variables, values, grads):
        regularizer = getattr(v, "regularizer", None)
        if regularizer is not None:
            g = g + jax.grad(lambda w: regularizer(w))(value).astype(g.dtype)
        out.append(g)
    return out
