"""Which layers activity perturbation perturbs, and where `local_losses`
ends its blocks."""

import numbers

import keras

from keras_fwdgrad import _compat
from keras_fwdgrad.activity.heads import LocalHead
from keras_fwdgrad import graph

_PERTURBED = (
    keras.layers.Dense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)
_POOLING = (
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
)
# Layers whose training-mode output for one example depends on the others.
_MIXES_EXAMPLES = (keras.layers.BatchNormalization,)
# Layers whose output channel `c` depends only on their input channel `c`
# (channels last): a perturbed layer followed only by these up to the end
# of its block keeps `local_loss_groups` apart.
_PER_CHANNEL = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.PReLU,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.BatchNormalization,
) + _POOLING


# Variable-free activation layers: a block ends after those that alone
# follow its last layer (`_layer_end`); with `Softmax`, the layers an
# output layer's loss may be taken through (`groups._TAIL`).
_ACTIVATION_LAYERS = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
)


def check_model(base):
    """Raises unless activity perturbation can run `base`: a `Sequential`
    or functional model with one output tensor."""
    if not graph.is_container(base):
        raise ValueError(
            '`perturbation="activations"` needs a `keras.Sequential` or '
            "functional `keras.Model(inputs, outputs)`, so that it can reach "
            "the pre-activations of its layers. "
            f"Received: model={base.name!r} of type {type(base).__name__}. "
            "A model with its own `call` can be traced into one that shares "
            "its layers: `inputs = keras.Input(shape)`, then "
            "`keras.Model(inputs, model.call(inputs))`; or use "
            '`perturbation="weights"`, which runs any model.'
        )
    if len(keras.tree.flatten(base.outputs)) != 1:
        raise ValueError(
            '`perturbation="activations"` supports models with one output. '
            f"Received: model={base.name!r} with {len(keras.tree.flatten(base.outputs))} outputs"
        )
    for layer in graph.flat_layers(base):
        if getattr(layer, "activity_regularizer", None) is not None:
            raise ValueError(
                '`perturbation="activations"` does not support activity '
                f"regularizers. Received: layer {layer.name!r} with "
                f"activity_regularizer={layer.activity_regularizer!r}"
            )


def perturbed(layer):
    """Whether the pre-activations of `layer` are perturbed: a stock
    `Dense` or `Conv1D/2D/3D` layer (grouped and causal ones included),
    under any dtype policy (under mixed precision the pre-activations are
    in the compute dtype, and the estimates' products in the variables')."""
    if type(layer) is LocalHead:
        return True
    if type(layer) not in _PERTURBED or not layer.trainable_variables:
        return False
    if isinstance(layer, keras.layers.Dense) or keras.backend.backend() != "tensorflow":
        return graph.runs_stock(layer)
    # TensorFlow: a convolution the layer rules can form the products of.
    from keras_fwdgrad import layer_rules

    return graph.runs_stock(layer) and layer_rules.convolution(layer) is not None


def trainable_variables(layer):
    """The trainable variables a call of `layer` uses: its own and its
    sublayers'. A layer frozen as a whole can hold trainable ones (KerasHub's
    `enable_lora` leaves the LoRA factors of a transformer layer's attention
    trainable inside the frozen layer, whose own `trainable_variables` is
    then empty)."""
    if not isinstance(layer, keras.layers.Layer):
        return []
    return [v for v in layer.variables if v.trainable]


def frozen_variables(layer):
    """The variables of `layer` (and its sublayers) that are not trainable."""
    if not isinstance(layer, keras.layers.Layer):
        return []
    return [v for v in layer.variables if not v.trainable]


def mixes_examples(layer):
    """Whether `layer` mixes the examples of a batch in a training pass: a
    `BatchNormalization` that trains (Keras runs a frozen one in inference
    mode, each example alone)."""
    return isinstance(layer, _MIXES_EXAMPLES) and layer.trainable


def _dense_or_convolution(layer):
    return isinstance(layer, _PERTURBED) and has_variables(layer)


def has_variables(layer):
    """Whether activity perturbation perturbs `layer`'s output (or
    pre-activations): it has trainable variables."""
    return bool(trainable_variables(layer))


def normalized_pairs(base, ends=(), counts=None):
    """`[(layer, normalization)]` for each `Dense`/convolution layer the
    pass does not perturb itself because a normalization that mixes
    examples alone reads its output.

    Such a layer (perturbed in closed form, no activation of its own,
    called once) feeds only a `BatchNormalization` with trainable
    variables, called once, as in `Conv2D(use_bias=False)` then
    `BatchNormalization`. Perturbing its pre-activations would send their
    tangents through the normalization's batch statistics, so that its
    whole block takes the batch's derivative; instead the normalization's
    output is perturbed, and the layer's estimate is its closed-form
    product with the cotangent that the normalization's one-layer reverse
    pass gives its input. The two layers then form one block with
    `local_losses="layers"`. A layer in `ends` (the layers that end a
    block, `block_end_layers`) is perturbed itself. `counts` is
    `graph.call_counts(base)` where the caller has it already.
    """
    consumers = _Consumers(graph.flat_operations(base))
    if counts is None:
        counts = graph.call_counts(base)
    end_ids = {id(layer) for layer in ends}
    out = []
    for layer in graph.flat_layers(base):
        if (
            not perturbed(layer)
            or type(layer) is LocalHead
            or layer.activation is not keras.activations.linear
            or counts[id(layer)] != 1
            or id(layer) in end_ids
        ):
            continue
        after = consumers(layer)
        if (
            len(after) == 1
            and isinstance(after[0], _MIXES_EXAMPLES)
            and has_variables(after[0])
            and counts[id(after[0])] == 1
        ):
            out.append((layer, after[0]))
    return out


def call_blocks(base, ends):
    """The block of each call that a pass over `base` makes, in call order
    (`graph.calls`): `[(op, block), ...]`, `block` an index into `ends`
    (the layers after which a block ends, `block_end_layers`), or
    `len(ends)` for the last block, which ends at the model's output.

    A call's block is that of the first block end its output reaches: its
    own index for a block end, else the lowest index of the ends that the
    calls taking its outputs reach (block ends cut tangents, so what
    follows one is not walked), else the last block. In a chain this is
    the next block end in call order; in a graph of parallel branches (an
    Inception module, a ResNet shortcut with a convolution) call order
    interleaves the branches, and each call still belongs to the block
    its tangent reaches."""
    index = {id(layer): i for i, layer in enumerate(ends)}
    trace = graph.calls(base)
    consumers = {}
    for position, (_, inputs, _) in enumerate(trace):
        for value in inputs:
            consumers.setdefault(value, []).append(position)
    blocks = [len(ends)] * len(trace)
    for position in reversed(range(len(trace))):
        op, _, outputs = trace[position]
        if id(op) in index:
            blocks[position] = index[id(op)]
            continue
        reached = [blocks[c] for value in outputs for c in consumers.get(value, ())]
        blocks[position] = min(reached, default=len(ends))
    return [(op, block) for (op, _, _), block in zip(trace, blocks)]


class CallOrder:
    """Follows a pass through `call_blocks`: `block(layer)` is the block
    of the pass's next call, which must be of `layer`, until every call
    of the model's graph has been made (`pending`)."""

    def __init__(self, blocks):
        self._blocks = blocks
        self._next = 0

    def pending(self):
        return self._next < len(self._blocks)

    def block(self, layer):
        op, block = self._blocks[self._next]
        if op is not layer:
            raise RuntimeError(
                "The pass over the model called "
                f"{getattr(layer, 'name', layer)!r} where its graph has "
                f"{getattr(op, 'name', op)!r} (call {self._next}). Was the "
                "model changed after `ForwardGradientModel` wrapped it?"
            )
        self._next += 1
        return block


def normalized_layers(base, ends=()):
    """`{layer name: normalization name}` of `normalized_pairs`."""
    pairs = normalized_pairs(base, ends)
    return {layer.name: normalization.name for layer, normalization in pairs}


def block_ends(base, local_losses):
    """The names of the layers after which a block ends (the last block
    ends at the model's output): those of `block_end_layers`."""
    return [layer.name for layer in block_end_layers(base, local_losses)]


def block_end_layers(base, local_losses):
    """The layers after which a block ends, in call order (the last block
    ends at the model's output).

    A block ends at a layer the model calls once: a head reads one output.
    With `"auto"` and `"layers"` a layer called more than once (a shared
    layer, or a layer of a nested model called more than once) ends no
    block, and each of its calls belongs to the block it falls in; a list
    naming one is refused. Layers are told apart as objects, not by name:
    nested models may hold layers of one name (a loaded backbone and a
    new head), and a list naming such a name is refused."""
    if local_losses is None:
        return []
    layers, seen = [], set()
    for layer in graph.flat_layers(base):
        if id(layer) not in seen:
            seen.add(id(layer))
            layers.append(layer)
    names = [layer.name for layer in layers]
    counts = graph.call_counts(base)
    if local_losses in ("auto", "layers"):
        # "layers": every layer with trainable variables ends a block (its
        # tangent then reaches its own head only); "auto" ends blocks after
        # the `Dense` layers before the last `Dense`/convolution with
        # trainable variables, whether or not it runs in closed form (a
        # LoRA-enabled or quantized one does not).
        counted = has_variables if local_losses == "layers" else _dense_or_convolution
        last_dense = max(
            (i for i, layer in enumerate(layers) if counted(layer)),
            default=len(layers),
        )

        residual = local_losses == "auto" and any(
            isinstance(layer, keras.layers.Add) for layer in layers
        )
        merge_ends = _residual_ends(layers, counts) if residual else set()

        def ends_here(layer):
            if is_block_layer(base, layer):
                return True
            if residual:
                return id(layer) in merge_ends or isinstance(layer, _POOLING)
            return isinstance(layer, (keras.layers.Dense,) + _POOLING)

        if local_losses == "layers":
            consumers = _Consumers(graph.flat_operations(base))
            index = {id(layer): i for i, layer in enumerate(layers)}
            normalized = {id(layer) for layer, _ in normalized_pairs(base, counts=counts)}
            ends = [
                _layer_end(layers, index, consumers, counts, i)
                for i, layer in enumerate(layers)
                if i < last_dense
                and has_variables(layer)
                and id(layer) not in normalized
                and counts[id(layer)] == 1
            ]
        else:
            ends = [
                layer
                for i, layer in enumerate(layers)
                if i < last_dense and ends_here(layer) and counts[id(layer)] == 1
            ]
    else:
        listed = list(local_losses)
        unknown = [n for n in listed if n not in names]
        if unknown:
            raise ValueError(
                "`local_losses` names layers the model does not have: "
                f"{unknown}. Its layers: {names}"
            )
        ambiguous = sorted({n for n in listed if names.count(n) > 1})
        if ambiguous:
            raise ValueError(
                "`local_losses` names layers that several layers of the model "
                f"(in nested models) carry: {ambiguous}. Name layers with "
                'unique names, or use `local_losses="auto"` or `"layers"`, '
                "which tell the layers apart."
            )
        ends = [layer for layer in layers if layer.name in listed]
        if names[-1] in listed:
            raise ValueError(
                "`local_losses` lists the model's last layer "
                f"{names[-1]!r}; the last block always ends there and uses "
                "the model's own loss."
            )
        last_trained = max(
            (i for i, layer in enumerate(layers) if has_variables(layer)), default=-1
        )
        listed_ids = {id(layer) for layer in ends}
        late = [
            layer.name
            for i, layer in enumerate(layers)
            if i >= last_trained and id(layer) in listed_ids
        ]
        if last_trained >= 0 and late:
            raise ValueError(
                f"`local_losses` lists {late}, after which the model calls no "
                "layer with trainable variables: the last block, which "
                "learns from the model's own loss, would train nothing (a "
                "`Softmax` or `Activation` layer after the output layer "
                "belongs to the output layer's block). Name earlier layers."
            )
        shared = {layer.name: counts[id(layer)] for layer in ends if counts[id(layer)] != 1}
        if shared:
            raise ValueError(
                "`local_losses` names layers that the model calls more than "
                f"once (name: calls): {shared}. A block ends at a layer "
                "called once, whose one output its head reads; name a layer "
                "before or after the shared one, or use "
                '`local_losses="auto"` or `"layers"`, which leave shared '
                "layers inside a block."
            )
    end_ids = {id(layer) for layer in ends}
    for layer in ends:
        # A head reads the block's output: one tensor.
        output = graph.output_of(base, layer)
        if not hasattr(output, "shape"):
            raise not_one_tensor(layer, type(output).__name__)
    # In call order, once each.
    return [layer for layer in layers if id(layer) in end_ids]


# Layers that end a residual block in place of the merge they follow
# (post-normalization transformers, ResNet's activation after the add).


_AFTER_MERGE = (
    keras.layers.LayerNormalization,
    keras.layers.BatchNormalization,
    keras.layers.Activation,
    keras.layers.ReLU,
)


def is_block_layer(base, layer):
    """Whether `layer` is a block written as one layer, which
    `local_losses="auto"` ends a block after: a layer that is not one of
    Keras' own, holds layers with trainable variables, and maps its first
    input to an output of the same shape in `base`'s graph, as a residual
    or transformer block does (KerasHub's `TransformerEncoder` and
    `TransformerDecoder`, its language models' decoder blocks, your own).
    Keras' own layers (`MultiHeadAttention`, `Bidirectional`) are not:
    `auto` finds the blocks around them in the graph."""
    if _compat.is_keras_layer(layer) or not has_variables(layer):
        return False
    if not any(has_variables(sub) for sub in _compat.all_layers(layer)):
        return False
    node = graph.node_of(base, layer)
    if node is None:
        return False
    inputs, outputs = _compat.node_inputs(node), _compat.node_outputs(node)
    if not inputs or len(outputs) != 1:
        return False
    first, out = inputs[0], outputs[0]
    return (
        hasattr(first, "shape")
        and hasattr(out, "shape")
        and tuple(first.shape) == tuple(out.shape)
        and len(out.shape) >= 2
    )


class _Consumers:
    """`consumers(layer)`: the layers of `layers` that take an output of
    `layer`, each once, in the order of `layers`. The graph is read once,
    here, so that asking for every layer's consumers stays linear in its
    size."""

    def __init__(self, layers):
        self._layers = list(layers)
        self._readers = {}
        for position, other in enumerate(self._layers):
            for tensor in _compat.node_tensors(other)[0]:
                self._readers.setdefault(id(tensor), []).append(position)

    def __call__(self, layer):
        positions = {
            position
            for output in _compat.node_tensors(layer)[1]
            for position in self._readers.get(id(output), ())
        }
        return [self._layers[position] for position in sorted(positions)]


def _residual_ends(layers, counts):
    """The ids of the layers that end a residual block: each `Add`, or
    the normalization or activation layers that follow it alone (its
    output's only consumer, one after the other, each called once: a
    shared `ReLU` after several merges leaves each block's end at its
    merge)."""
    consumers = _Consumers(layers)
    ends = set()
    for layer in layers:
        if not isinstance(layer, keras.layers.Add):
            continue
        end = layer
        while True:
            after = consumers(end)
            if (
                len(after) != 1
                or not isinstance(after[0], _AFTER_MERGE)
                or counts[id(after[0])] != 1
            ):
                break
            end = after[0]
        ends.add(id(end))
    return ends


def _passes_channels(layer):
    """Whether `layer` has no trainable variables and maps unit `i` of its
    one input to unit `i` of its output, for every example alone (an
    activation, dropout; not pooling, which would merge the positions
    that `local_loss_patches` tells apart)."""
    return (
        isinstance(layer, _PER_CHANNEL)
        and not isinstance(layer, _MIXES_EXAMPLES + _POOLING)
        and not has_variables(layer)
        and getattr(layer, "activation", None)
        not in (keras.activations.softmax, keras.activations.log_softmax)
    )


def _layer_end(layers, index, consumers, counts, i):
    """Where `local_losses="layers"` ends the block of `layers[i]`, a
    layer with trainable variables: after it and the activation layers
    (`Activation`, `ReLU`, `LeakyReLU`, `ELU`) that alone follow it, so
    that its head reads what the next layer reads (a convolution's and
    its normalization's block ends after the `ReLU` layer that follows);
    or, when its output reaches a residual `Add` through per-channel
    layers alone (dropout, an activation) and nothing with trainable
    variables is called in between, after that `Add` and the per-channel
    layers that alone follow it. The head then reads the residual stream
    (a transformer's attention and feed-forward outputs, a ResNet branch)
    rather than the branch by itself; the branch's derivative is the same
    through the merge. `index` maps each layer's id to its position in
    `layers`; `consumers` is a `_Consumers` of the model's operations."""
    layer = layers[i]
    end, merged = layer, False
    # The end without a merge: after the activation layers alone.
    activated, activations_only = layer, True
    while True:
        # Every consumer, graph operations included: a branch that also
        # feeds one must keep its tangent inside its own block.
        after = consumers(end)
        if len(after) != 1 or id(after[0]) not in index:
            break
        (nxt,) = after
        if counts[id(nxt)] != 1:
            # A shared layer ends no block (`block_ends`).
            break
        j = index[id(nxt)]
        if any(has_variables(other) for other in layers[index[id(end)] + 1 : j]):
            break
        if isinstance(nxt, keras.layers.Add) and not merged:
            end, merged = nxt, True
        elif _passes_channels(nxt):
            end = nxt
            if not merged and activations_only and isinstance(nxt, _ACTIVATION_LAYERS):
                activated = nxt
            elif not merged:
                activations_only = False
        else:
            break
    if not merged:
        return activated
    # Per-channel layers after the last merge, not those before it alone.
    return end


def check_num_directions(model):
    """With `orthogonal_directions`, raises unless every perturbed output
    (a `Dense`/convolution layer's pre-activations, any other layer's
    output, a head's hidden layer at every position) has at least
    `num_directions` units: K orthogonal tangents need K dimensions."""
    if not model.orthogonal_directions:
        return
    base = model.model
    sizes = [
        (repr(layer.name), _units(base, layer))
        for layer in graph.flat_layers(base)
        if has_variables(layer)
    ]
    if model.local_head_units is not None:
        for layer in graph.flat_layers(base):
            if id(layer) in model._local_loss_end_ids:
                shape = graph.output_of(base, layer).shape
                channels = shape[-1] if isinstance(shape[-1], numbers.Integral) else None
                units = _units(base, layer)
                if channels:
                    units = units // channels * model.local_head_units
                sizes.append((f"the hidden layer of the head after {layer.name!r}", units))
    for name, units in sizes:
        if model.num_directions > units:
            raise ValueError(
                "`orthogonal_directions=True` needs `num_directions` at most "
                "the number of units each perturbed layer outputs (for a "
                "`Dense` or convolution layer, its pre-activations). "
                f"Received: num_directions={model.num_directions} and "
                f"{name} with {units}"
            )


def check_local_loss_groups(model):
    groups = model.local_loss_groups
    patches = model.local_loss_patches
    ends = [
        layer for layer in graph.flat_layers(model.model) if id(layer) in model._local_loss_end_ids
    ]
    for layer in ends:
        name, shape = layer.name, graph.output_of(model.model, layer).shape
        if patches not in (1, "positions"):
            small = [s for s in shape[1:-1] if s is not None and s < patches]
            if small:
                raise ValueError(
                    "`local_loss_patches` must be at most the size of every "
                    "spatial axis of a block's feature-map output. Received: "
                    f"local_loss_patches={patches} and block output {name!r} "
                    f"of shape {tuple(shape)}"
                )
        channels = shape[-1]
        if groups != "channels" and channels is not None and groups > channels:
            raise ValueError(
                "`local_loss_groups` must be at most the number of channels "
                f"of every block's output. Received: local_loss_groups={groups} "
                f"and block output {name!r} with {channels} channels"
            )


def _units(base, layer):
    shape = graph.output_of(base, layer).shape[1:]
    n = 1
    for s in shape:
        if not isinstance(s, numbers.Integral):
            return float("inf")
        n *= s
    return n


def check_no_added_losses(base):
    """Raises if a layer of `base` added a loss with `add_loss()` in the
    pass just run: activity perturbation takes each example's compiled
    loss (and the weights' regularizers), not a batch's added terms, and
    must not leave them out silently."""
    added = _compat.added_losses(base)
    if added:
        raise ValueError(
            '`perturbation="activations"` estimates the gradient of each '
            "example's compiled loss (and of weight regularizers); it cannot "
            "take losses that layers add with `add_loss()`. Received: layer "
            f"{added[0][0]!r} added a loss in its call. Use "
            '`perturbation="weights"` for this model, or make the term part '
            "of the compiled loss."
        )


def not_one_tensor(layer, received):
    """The error for a layer with trainable variables whose output is not
    one floating tensor (`received` says what it was)."""
    return ValueError(
        '`perturbation="activations"` perturbs the output of every '
        "layer with trainable variables, which must be one floating "
        f"tensor. Received: layer {layer.name!r} of type "
        f"{type(layer).__name__} returned {received}. "
        'Use `perturbation="weights"` for this model, or make the '
        "layer's trainable variables non-trainable (`layer.trainable "
        "= False`)."
    )
