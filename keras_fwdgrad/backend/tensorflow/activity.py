"""Activity perturbation's pass and estimate on the TensorFlow backend:
`tf.autodiff.ForwardAccumulator` carries the tangents, and each layer's
recorded call gives its variables' reverse pass (`keras_fwdgrad.activity`
says what is estimated)."""

import dataclasses

import keras
import tensorflow as tf

from keras_fwdgrad import _compat
from keras_fwdgrad import backend
from keras_fwdgrad import layer_rules
from keras_fwdgrad.activity.blocks import mixes_examples
from keras_fwdgrad.activity.blocks import CallOrder
from keras_fwdgrad.activity.blocks import check_no_added_losses
from keras_fwdgrad.activity.blocks import has_variables
from keras_fwdgrad.activity.blocks import trainable_variables
from keras_fwdgrad.activity.blocks import not_one_tensor
from keras_fwdgrad.activity.blocks import perturbed
from keras_fwdgrad.activity.heads import LocalHead
from keras_fwdgrad.activity import estimates
from keras_fwdgrad.activity import groups
from keras_fwdgrad.activity import losses
from keras_fwdgrad.activity import masks
from keras_fwdgrad.activity import orthogonal
from keras_fwdgrad.backend.tensorflow import distribute
from keras_fwdgrad import graph
from keras_fwdgrad.ops import clip_directional_derivative


def _cast_to(value, x, layer):
    """A variable's `value` for a product with `x`: cast to `x`'s dtype, as
    Keras casts variables to a layer's compute dtype under mixed precision.
    A local head's stay in their dtype (the product is then formed in it,
    float32 under mixed precision)."""
    if isinstance(layer, LocalHead) or value.dtype == x.dtype:
        return value
    return tf.cast(value, x.dtype)


def _pre_activation(layer, x):
    """`z` such that `layer(x) == layer.activation(z)`."""
    dense = layer.dense if isinstance(layer, LocalHead) else layer
    kernel = _cast_to(dense.kernel.value, x, layer)
    if isinstance(dense, keras.layers.Dense):
        z = keras.ops.matmul(x, kernel)
    else:
        z = layer_rules.convolution(dense)(x, kernel)
    if getattr(dense, "use_bias", True) and dense.bias is not None:
        bias = _cast_to(dense.bias.value, z, layer)
        if getattr(dense, "data_format", "channels_last") == "channels_first":
            bias = tf.reshape(bias, (1, -1) + (1,) * (len(z.shape) - 2))
        z = z + bias
    return z


@dataclasses.dataclass
class _Record:
    layer: object
    x: object
    z: object
    u: object
    block: int
    # The general rule: `vjp(cotangent)` is the reverse pass through the
    # layer's recorded call, one gradient per trainable variable.
    vjp: object = None
    head_hidden: bool = False  # A local head's hidden `Dense`.
    # `relu(z)` when the only tangent of `z` is `u`: its tangent is then
    # `u` on the active units and 0 elsewhere, computed in the pass.
    relu_output: object = None
    # For a normalization whose input a `normalized_layers` layer made:
    # that layer's record (`u` is `None`; its cotangent comes from this
    # record's `vjp`, which then also returns its input's).
    normalized: object = None
    # For a closed-form ReLU layer whose output (rank >= 3) a local head
    # pools: its active tangent pooled as the head pools, times the number
    # of pooled units; for a channels-last layer, the sums over positions
    # of its active tangent, `[batch, channels]`, which its bias's product
    # takes (`_add_closed_form`).
    pooled_tangent: object = None


class _Pass:
    """One forward-mode pass with per-example tangents on pre-activations."""

    def __init__(self, model, seed, k, ends, heads, bases):
        self.model = model
        self.seed = seed
        self.k = k
        # `{layer index: [batch, K, units] orthogonal tangents}`
        # (`orthogonal.tangents`), shared by the step's K passes.
        self.bases = bases
        self.ends = ends
        self.heads = heads
        self.block = 0
        self.records = []
        # Each block's output, by block (`call_order` gives each call of
        # the model's graph its block).
        self.block_outputs = [None] * len(model._local_loss_end_ids)
        self.call_order = CallOrder(model._local_loss_call_blocks)
        # Records whose tangents reach a layer that mixes examples: those
        # recorded in its block before it is called (call order is a
        # topological order, so none recorded later is upstream of it).
        self.mixing_records = set()
        self.acc = None
        self.alignment = groups.Alignment()
        # `{id(layer): id(normalization)}` (`activity.normalized_pairs`),
        # and `{id(normalization): record}` of the last call of each such
        # layer, for the normalization after it.
        self.normalized_layers = model._normalized_layers()
        self.normalized = {}
        # `{id(relu output): record}` of the closed-form ReLU layers whose
        # output takes its tangent directly (`call_closed_form`).
        self.relu_outputs = {}

    def tangent(self, z, index):
        seed = backend.fold_in(self.seed, index)
        num = self.model.num_directions
        if not self.model.orthogonal_directions or num == 1:
            seed = backend.fold_in(seed, self.k)
            return self.model.direction.tangent(tf.shape(z), seed, z.dtype)
        # All K tangents of this layer, orthogonal per example, formed in
        # the step's first pass and read in the others: outside XLA nothing
        # merges the passes' identical ones.
        rows = self.bases.get(index)
        if rows is None:
            rows = orthogonal.tangents(self.model.direction, tf.shape(z), num, seed)
            self.bases[index] = rows
        return tf.cast(tf.reshape(rows[:, self.k], tf.shape(z)), z.dtype)

    def call_layer(self, layer, args, kwargs):
        if self.call_order.pending():
            # A call of the model's graph (the heads follow it).
            self.block = self.call_order.block(layer)
        if mixes_examples(layer):
            self.mixing_records.update(
                i for i, r in enumerate(self.records) if r.block == self.block
            )
        if not isinstance(layer, keras.layers.Layer):
            # An operation of a functional graph (`GetItem`, a `keras.ops`
            # call): no variables.
            y = layer(*args, **kwargs)
            self.alignment.layer_output(layer, args, y, kwargs)
        elif id(layer) in self.normalized_layers:
            y = masks.of_uncalled(layer, args, kwargs, self.call_normalized(layer, args[0]))
        elif has_variables(layer):
            y = self.call_perturbed(layer, args, kwargs)
        else:
            if "training" in _compat.call_context_args(layer):
                kwargs = {**kwargs, "training": True}
            y = layer(*args, **kwargs)
            self.alignment.layer_output(layer, args, y, kwargs)
        if id(layer) in self.ends and self.block < len(self.ends):
            self.alignment.block_end(y, self.block)
            self.block_outputs[self.block] = y
            y = masks.carry(y, tf.stop_gradient(y))
        return y

    def call_perturbed(self, layer, args, kwargs, head_hidden=False):
        """A layer with trainable variables: in closed form when it is a
        stock `Dense`/convolution layer (or a local head) called on one
        floating tensor, which Keras casts to its compute dtype (or which
        is in it), else by the general rule."""
        x = args[0] if args else None
        closed_form = (
            perturbed(layer)
            and len(args) == 1
            and not set(kwargs) - {"training"}
            and tf.is_tensor(x)
            and x.dtype.is_floating
            and (x.dtype == layer.compute_dtype or layer.autocast)
        )
        if closed_form:
            if x.dtype != layer.compute_dtype:
                # Under mixed precision, a float32 output layer after
                # float16 ones (Keras' advice), or a layer on the model's
                # inputs: Keras casts the input.
                x = tf.cast(x, layer.compute_dtype)
            y = self.call_closed_form(layer, x, head_hidden)
            return masks.of_uncalled(layer, args, kwargs, y)
        return self.call_general(layer, args, kwargs, head_hidden)

    def pre_activations(self, layer, x):
        """`(x, z, tx)`: a closed-form layer's input and pre-activations
        `z`, and when its input carries a tangent, that tangent's product
        with the kernel, which `z` does not carry (else `None`).
        TensorFlow's own forward mode of a product also multiplies the
        input by the kernel's tangent, zeros here, which XLA computes (for
        a `Dense` layer, a product as large as its forward one); of a
        convolution (the transpose of its input gradient), it is many
        times slower under XLA."""
        tx = self.acc.jvp(x)
        x = tf.stop_gradient(x)
        if tx is not None:
            dense = layer.dense if isinstance(layer, LocalHead) else layer
            kernel = _cast_to(dense.kernel.value, tx, layer)
            if isinstance(dense, keras.layers.Dense):
                tx = keras.ops.matmul(tx, kernel)
            else:
                tx = layer_rules.convolution(layer)(tx, kernel)
        return x, _pre_activation(layer, x), tx

    def call_closed_form(self, layer, x, head_hidden=False):
        """A perturbed `Dense`/convolution layer (or local head): its
        pre-activations get this pass's tangent, then its activation."""
        x, z, tx = self.pre_activations(layer, x)
        u = self.tangent(z, len(self.records))
        record = _Record(layer, x, z, u, self.block, head_hidden=head_hidden)
        self.records.append(record)
        activation = layer.dense.activation if isinstance(layer, LocalHead) else layer.activation
        if tx is None and activation is keras.activations.relu:
            # The ReLU's output takes its tangent, `u` on the active units,
            # directly: `z` then has no consumer but the ReLU, which
            # TensorFlow fuses into the layer's product (one
            # `_MklNativeFusedConv2D` for convolution, bias and ReLU
            # outside XLA), and the tangent is one pass (`ReluGrad` of `u`
            # at the output, where the forward mode of `relu(z)` reads `z`).
            y = activation(z)
            _compat.watch(self.acc, y, tf.raw_ops.ReluGrad(gradients=u, features=y))
            record.relu_output = y
            self.relu_outputs[id(y)] = record
        else:
            # `z` carries no tangent (its input's is `tx`): it takes
            # `u + tx` itself, without a sum with a watched zero (outside
            # XLA a fill and an add over the layer's output).
            _compat.watch(self.acc, z, u if tx is None else u + tx)
            y = activation(z)
        self.alignment.closed_form_output(y, record, self.block, layer, activation, len(z.shape))
        return y

    def pool(self, head, h):
        """`head.pool(h)`. For the output of a closed-form ReLU layer (rank
        >= 3), whose tangent is known (`call_closed_form`), the pooled
        tangent is that tangent pooled, watched directly: TensorFlow's
        forward mode of a sum runs as a function call, here about twice
        the plain sum's time outside XLA. That layer's bias takes it too
        (times the number of positions: the sums of its active tangent)."""
        record = self.relu_outputs.get(id(h))
        if record is None or head.hidden is not None or len(h.shape) < 3:
            return head.pool(h)
        pooled = _pool(head, tf.stop_gradient(h))
        tangent = _pool(head, self.acc.jvp(h))
        _compat.watch(self.acc, pooled, tangent)
        count = tf.reduce_prod(tf.shape(h)[1:-1])
        record.pooled_tangent = tangent * tf.cast(count, tangent.dtype)
        return pooled

    def call_normalized(self, layer, x):
        """A `normalized_layers` layer: its pre-activations, not
        perturbed (the normalization after it is), carrying its input's
        tangent if any."""
        if x.dtype != layer.compute_dtype:
            x = tf.cast(x, layer.compute_dtype)
        x, z, tx = self.pre_activations(layer, x)
        if tx is not None:
            _compat.watch(self.acc, z, tx)
        record = _Record(layer, x, z, None, self.block)
        self.normalized[self.normalized_layers[id(layer)]] = record
        return z

    def call_general(self, layer, args, kwargs, head_hidden=False):
        """The general rule: `layer`'s call is recorded on a tape of its
        own trainable variables (its inputs, and the tangents they carry,
        are constants for it), and its output gets this pass's tangent."""
        if "training" in _compat.call_context_args(layer):
            kwargs = {**kwargs, "training": True}
        values = [v.value for v in trainable_variables(layer)]
        normalized = self.normalized.pop(id(layer), None)
        if normalized is not None and args[0] is not normalized.z:
            raise RuntimeError(
                f"Layer {layer.name!r} was not called on the output of "
                f"{normalized.layer.name!r}, the one layer that feeds it."
            )
        sources = values if normalized is None else values + [normalized.z]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(sources)
            y = layer(*args, **kwargs)
        if not tf.is_tensor(y) or not y.dtype.is_floating:
            raise not_one_tensor(layer, y.dtype.name if tf.is_tensor(y) else type(y).__name__)

        def vjp(cotangent):
            grads = tape.gradient(
                y,
                sources,
                output_gradients=tf.cast(cotangent, y.dtype),
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            # An embedding's gradient comes as `tf.IndexedSlices`.
            return [tf.convert_to_tensor(g) for g in grads]

        u = self.tangent(y, len(self.records))
        zero = tf.zeros_like(y)
        _compat.watch(self.acc, zero, u)
        out = masks.carry(y, y + zero)
        self.records.append(
            _Record(
                layer,
                None,
                out,
                u,
                self.block,
                vjp=vjp,
                head_hidden=head_hidden,
                normalized=normalized,
            )
        )
        self.alignment.perturbed_output(out, self.records[-1], self.block, len(out.shape))
        return out

    def run(self, base, x):
        return graph.run(base, x, self.call_layer, self.alignment.inputs_standardized)

    def head_outputs(self):
        outputs = []
        for block, (head, h) in enumerate(zip(self.heads, self.block_outputs)):
            self.block = block
            if head.hidden is not None:
                # A `Dense` layer of the block, in closed form (also under
                # mixed precision): `groups.head_gradients` reads its
                # pre-activations.
                h = self.call_perturbed(head.hidden, (h,), {}, head_hidden=True)
            outputs.append(self.call_layer(head, (self.pool(head, h),), {}))
        self.block = len(self.heads)
        return outputs


def estimate(model, x, y, sample_weight, k, bases=None):
    """One pass of activity perturbation, for direction `k` of the step.

    `bases`, a `dict` that the step's K passes share, holds each layer's
    orthogonal tangents under `orthogonal_directions` (formed in the first
    pass, read in the others).

    Returns:
        `(loss, y_pred, d, grads, local_losses)`: the model's compiled loss,
        the predictions, the per-example directional derivatives
        `[blocks, batch]` (after `jvp_clip`), one gradient estimate per
        trainable variable of `model` (the base model's, then the heads'),
        and the mean local loss of each block with a head.
    """
    variables = model.trainable_variables
    step_seed = tf.stack(
        [
            tf.constant(model.seed, dtype="int64"),
            tf.convert_to_tensor(model.direction_step),
        ]
    )
    seed = backend.fold_in(step_seed, 1_000_003)
    context = tf.distribute.get_replica_context()
    if context is not None and distribute.num_replicas() > 1:
        # Each replica's examples get tangents of their own.
        replica = tf.cast(context.replica_id_in_sync_group, "int64")
        seed = backend.fold_in(seed, replica)
    ends = model._local_loss_end_ids
    heads = model.local_heads
    p = _Pass(model, seed, k, ends, heads, {} if bases is None else bases)
    _compat.clear_losses(model.model)
    # As Keras converts them: floating inputs of a `Sequential` model to its
    # `Input`'s dtype; a functional model's run casts each to its own.
    input_dtype = graph.floating_input_dtype(model.model)
    x = tf.nest.map_structure(
        lambda t: (
            tf.cast(t, input_dtype)
            if input_dtype is not None and tf.convert_to_tensor(t).dtype.is_floating
            else tf.convert_to_tensor(t)
        ),
        x,
    )
    with tf.autodiff.ForwardAccumulator([], []) as acc:
        p.acc = acc
        y_pred = p.run(model.model, x)
        check_no_added_losses(model.model)
        head_preds = p.head_outputs()
        block_losses = [per_example_losses(model, y, h, sample_weight) for h in head_preds]
        block_losses.append(per_example_losses(model, y, y_pred, sample_weight))
    loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
    d = tf.stack(
        [
            acc.jvp(values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            for values in block_losses
        ]
    )
    d = clip_directional_derivative(d, model.jvp_clip)
    batch_d = tf.reduce_sum(d, axis=1)
    group_d = {}
    if model.local_loss_groups != 1 or model.local_loss_patches != 1:
        # Each head's loss derivative at its pre-activations, and `∂L/∂h`
        # at its block's output (and hidden pre-activations), once per
        # block: its block's groups and its own units use them.
        head_records = {r.block: r for r in p.records if isinstance(r.layer, LocalHead)}
        hidden_records = {r.block: r for r in p.records if r.head_hidden}
        head_jacobians, head_grads = {}, {}
        for block, r in head_records.items():
            head = heads[block]
            z = tf.stop_gradient(r.z)
            head_jacobians[block] = _loss_jacobian(
                model, head.dense.activation, z, y, sample_weight
            )
            hidden = {}
            if block in hidden_records:
                hidden = dict(
                    hidden_kernel=head.hidden.kernel.value,
                    hidden_z=tf.stop_gradient(hidden_records[block].z),
                )
            head_grads[block] = groups.head_gradients(
                head.dense.kernel.value, head_jacobians[block], p.block_outputs[block], **hidden
            )
        for block, (record, strides) in p.alignment.grouped.items():
            h = p.block_outputs[block]
            th = acc.jvp(h, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            index_h, index_z, count = groups.group_indices(model, h.shape, record.u.shape, strides)
            dg = groups.group_derivatives(head_grads[block][0], th, index_h, count)
            group_d[id(record)] = (clip_directional_derivative(dg, model.jvp_clip), index_z)
        for block, record in hidden_records.items():
            # A head's hidden layer: one loss per group of its own units,
            # the other tangents held constant (as for the head's output
            # layer).
            shape = record.u.shape
            unit, index_z, count = groups.group_indices(
                model, shape, shape, (1,) * (len(shape) - 2)
            )
            dg = groups.group_derivatives(head_grads[block][1], record.u, unit, count)
            group_d[id(record)] = (clip_directional_derivative(dg, model.jvp_clip), index_z)
        # The heads, and the model's output layer when the model's output
        # is its activation's (or its perturbed output, by the general
        # rule), through activation layers and layers that drop spatial
        # axes of size 1 alone (`Alignment.output_of`): one loss per
        # output-unit group.
        outputs = [
            (r, head_jacobians[r.block]) for r in p.records if isinstance(r.layer, LocalHead)
        ]
        found = p.alignment.output_of(y_pred)
        units = None
        if found is not None and len(y_pred.shape) == 2:
            units = groups.output_units(tf.stop_gradient(found[0].z), found[1])
        if units is not None:
            z, function = units
            outputs.append((found[0], _loss_jacobian(model, function, z, y, sample_weight)))
        for record, jacobian in outputs:
            dg, index = groups.output_unit_derivatives(model, record.z, record.u, jacobian)
            group_d[id(record)] = (clip_directional_derivative(dg, model.jvp_clip), index)
    grads = {}
    # Closed-form `Dense` products whose finiteness follows from that of
    # their factors (`estimates.factors_bound_product`).
    bounded = {}
    for i, r in enumerate(p.records):
        mixing = i in p.mixing_records
        if id(r) in group_d:
            dg, index = group_d[id(r)]
            dn = groups.per_unit(dg, r.u, index, mixing)
        elif mixing:
            dn = tf.fill([tf.shape(d)[1]], batch_d[r.block])
        else:
            dn = d[r.block]
        u = r.u
        per_example = len(dn.shape) == 1
        if per_example:
            dn_examples = dn
            dn = tf.reshape(dn, (-1,) + (1,) * (len(u.shape) - 1))
        if r.vjp is not None:
            estimate = r.vjp(tf.cast(dn, u.dtype) * u)
            if r.normalized is not None:
                # The layer before the normalization: its product with the
                # cotangent of the normalization's input.
                *estimate, g_z = estimate
                _add_closed_form(grads, r.normalized, g_z)
            estimates.add(grads, trainable_variables(r.layer), estimate)
            continue
        activation = (
            r.layer.dense.activation if isinstance(r.layer, LocalHead) else r.layer.activation
        )
        bias_sums = None
        if model.active_units_only and activation is keras.activations.relu:
            # Units with zero derivative have zero gradient: their share
            # of the estimate is pure noise.
            if r.relu_output is not None:
                u = acc.jvp(r.relu_output, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                bias_sums = r.pooled_tangent
            else:
                u = tf.where(r.z > 0, u, tf.zeros((), u.dtype))
        layer = r.layer.dense if isinstance(r.layer, LocalHead) else r.layer
        # The products in the variables' dtype: under mixed precision a
        # float16 product overflows where the float32 update does not.
        u = tf.cast(u, layer.variable_dtype)
        dn = tf.cast(dn, u.dtype)
        if isinstance(layer, keras.layers.Dense):
            g_z = dn * u
            bounded.setdefault(id(layer), (layer, []))[1].append(
                estimates.factors_bound_product(tf.stop_gradient(r.x), g_z)
            )
            _add_closed_form(grads, r, g_z, layer)
        elif per_example:
            # A factor per example: on the kernel's product it may scale
            # either factor, and the bias's product is that of the sums.
            _add_closed_form(grads, r, u, layer, tf.cast(dn_examples, u.dtype), bias_sums)
        else:
            _add_closed_form(grads, r, dn * u, layer)
    grads = estimates.in_variable_order(grads, variables)
    grads = _with_regularizers(variables, grads)
    local = [tf.reduce_sum(values) for values in block_losses[:-1]]
    general = {id(r.layer) for r in p.records if r.vjp is not None}
    checked = estimates.finite_from_factors(variables, bounded, general)
    return loss, y_pred, d, grads, local, checked


def _pool(head, t):
    """`head.pool(t)` (means over every axis but the first and last).
    Outside XLA, in float32, the sums are a batched product with ones:
    TensorFlow's sum over the positions of a `[64, 28, 28, 64]` map took
    0.63 ms against 0.47 ms as a product (2 cores, TensorFlow 2.21)."""
    if backend.compiled_by_xla() or t.dtype != tf.float32:
        return head.pool(t)
    batch = tf.shape(t)[0]
    flat = tf.reshape(t, [batch, -1, t.shape[-1]])
    count = tf.shape(flat)[1]
    sums = tf.matmul(tf.ones([batch, 1, count], t.dtype), flat)
    return tf.reshape(sums, [batch, t.shape[-1]]) / tf.cast(count, t.dtype)


def _add_closed_form(grads, r, g_z, layer=None, dn=None, bias_sums=None):
    """Adds the estimates of a closed-form record's variables: the reverse
    pass of its pre-activations' product alone with cotangent `g_z`, or,
    given `dn` (`[batch]`), with cotangent `dn * g_z`.

    The kernel's product is bilinear in each example's input and
    cotangent, so `dn` scales whichever of the two is smaller (on the
    first convolution of an image model, its input, by the number of
    channels); the bias's product is `bias_sums` (`[batch, channels]`, the
    sums of `g_z` over positions, the local head's) times `dn` when given.
    """
    layer = r.layer if layer is None else layer
    # In the variables' dtype (under mixed precision the record's input is
    # in the compute dtype).
    dtype = (r.layer.dense if isinstance(r.layer, LocalHead) else r.layer).variable_dtype
    x = tf.cast(tf.stop_gradient(r.x), dtype)
    g_z = tf.cast(g_z, dtype)
    dn = None if dn is None else tf.cast(dn, dtype)
    bias_sums = None if bias_sums is None else tf.cast(bias_sums, dtype)
    variables = list(layer.trainable_variables)
    bias = getattr(layer, "bias", None)
    channels_last = getattr(layer, "data_format", "channels_last") == "channels_last"
    # A channels-last bias's product is formed apart (below); any other
    # bias's comes from the tape with the kernel's cotangent.
    bias_apart = bias is not None and channels_last and any(v is bias for v in variables)
    bias_on_tape = bias is not None and not bias_apart and any(v is bias for v in variables)
    if dn is not None:

        def scaled(t):
            return tf.reshape(dn, (-1,) + (1,) * (len(t.shape) - 1)) * t

        smaller_input = (
            not bias_on_tape
            and x.shape[1:].is_fully_defined()
            and g_z.shape[1:].is_fully_defined()
            and x.shape[1:].num_elements() < g_z.shape[1:].num_elements()
        )
        if smaller_input:
            x, g_z, g_all = scaled(x), g_z, None
        else:
            g_z = g_all = scaled(g_z)
    else:
        g_all = g_z
    if bias_apart:
        variables = [v for v in variables if v is not bias]
        if dn is not None and bias_sums is not None:
            g_bias = tf.linalg.matvec(bias_sums, dn, transpose_a=True)
        else:
            if g_all is None:
                g_all = scaled(g_z)
            # The bias's product is the sum of `g_z` over every axis but
            # the last, formed as a matrix product with ones: XLA:CPU
            # lowers that sum of a large channels-last tensor to a strided
            # reduce-window many times slower (on a [64, 28, 28, 64]
            # tensor 12.8 ms against 2.0 ms; TensorFlow 2.21), and the
            # tape's gradient of the bias is that sum.
            flat = tf.reshape(g_all, [-1, g_all.shape[-1]])
            ones = tf.ones(tf.shape(flat)[:1], flat.dtype)
            g_bias = tf.linalg.matvec(flat, ones, transpose_a=True)
        estimates.add(grads, [bias], [tf.cast(g_bias, bias.dtype)])
    params = [v.value for v in variables]
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(params)
        z = _pre_activation(r.layer, x)
    estimates.add(grads, variables, tape.gradient(z, params, output_gradients=g_z))


def _loss_jacobian(model, activation, z, y, sample_weight):
    """`∂L_n/∂z_n` of each example's loss of `activation(z)` at the
    pre-activations `z` (`[batch, units]`), by forward mode: one copy of
    the batch per unit, each with that unit's basis tangent."""
    units = z.shape[-1]

    def tiled(t):
        t = tf.convert_to_tensor(t)
        return tf.tile(t, [units] + [1] * (len(t.shape) - 1))

    y = tiled(tf.nest.flatten(y)[0])
    sample_weight = None if sample_weight is None else tiled(sample_weight)
    batch = tf.shape(z)[0]
    zt = tiled(z)
    basis = tf.repeat(tf.eye(units, dtype=z.dtype), batch, axis=0)
    with tf.autodiff.ForwardAccumulator(zt, basis) as acc:
        values = per_example_losses(model, y, activation(zt), sample_weight, copies=units)
    jacobian = acc.jvp(values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return tf.transpose(tf.reshape(jacobian, [units, -1]))


def _with_regularizers(variables, grads):
    """Adds the exact gradient of each weight regularizer (a function of
    that variable alone) to its estimate; on each of R replicas 1/R of it,
    as Keras divides the regularization losses (the replicas' gradients
    are summed)."""
    replicas = distribute.num_replicas()
    out = []
    for v, g in zip(variables, grads):
        regularizer = getattr(v, "regularizer", None)
        if regularizer is not None:
            with tf.GradientTape() as tape:
                tape.watch(v.value)
                penalty = regularizer(v.value)
            gradient = tf.cast(tape.gradient(penalty, v.value), g.dtype)
            if replicas > 1:
                gradient = gradient / tf.cast(replicas, g.dtype)
            g = g + gradient
        out.append(g)
    return out


def per_example_losses(model, y, y_pred, sample_weight, copies=1):
    """`keras_fwdgrad.activity.losses.per_example_losses` on this replica
    (as Keras, each replica's loss is divided by the number of replicas)."""
    return losses.per_example_losses(
        model, y, y_pred, sample_weight, copies, tf.cast(distribute.num_replicas(), "float32")
    )
