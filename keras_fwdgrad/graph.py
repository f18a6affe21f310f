"""The walk through a Keras model's graph, node by node.

The layer rules (`keras_fwdgrad.layer_rules.dual`) and activity
perturbation (`keras_fwdgrad.activity`) both run a `keras.Sequential` or
functional model one node at a time, to carry a tangent beside each
activation or to perturb a layer's pre-activations. `run` is that walk,
written once: it calls `call(op, args, kwargs)` for every node in call
order, with nested `Sequential` and functional models walked the same way.
"""

import keras

from keras_fwdgrad import _compat


def runs_stock(layer):
    """Whether the layer's `call` is the stock one (no LoRA, no
    quantization), in whatever dtype policy."""
    return (
        not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
    )


def runs_plain(layer):
    """Whether the layer's `call` is the stock one (no LoRA, no
    quantization) and computes in its variables' dtype."""
    return runs_stock(layer) and layer.compute_dtype == layer.variable_dtype


def is_sequential(layer):
    return isinstance(layer, keras.Sequential)


def is_functional(layer):
    return _compat.is_functional(layer)


def is_container(layer):
    """Whether `run` walks into `layer` (a `Sequential` or functional
    model) rather than calling it as one node."""
    return is_sequential(layer) or is_functional(layer)


def floating_input_dtype(model):
    """The dtype Keras gives floating inputs of `model` before its layers
    see them: for a `Sequential` model its `Input`'s dtype (the compute
    dtype without an `Input`; its first layer casts them there); `None`
    for a functional model, whose run casts each input to its `Input`'s
    dtype itself (`run`)."""
    if not is_sequential(model):
        return None
    inputs = keras.tree.flatten(getattr(model, "inputs", None) or [])
    if len(inputs) == 1:
        return keras.backend.standardize_dtype(inputs[0].dtype)
    return model.compute_dtype


def flat_layers(model):
    """The layers of `model` in call order, nested `Sequential` and
    functional models expanded, input layers left out."""
    return [op for op in flat_operations(model) if isinstance(op, keras.layers.Layer)]


def flat_operations(model):
    """Every layer and graph operation (`GetItem`, a `keras.ops` call) of
    `model` in call order, nested `Sequential` and functional models
    expanded, input layers left out."""
    if is_sequential(model):
        operations = model.layers
    elif is_functional(model):
        operations = model.operations
    else:
        return [model]
    out = []
    for op in operations:
        if isinstance(op, keras.layers.InputLayer):
            continue
        out.extend(flat_operations(op) if is_container(op) else [op])
    return out


def call_counts(model):
    """`{id(op): n}`: how many times `run` calls each layer and graph
    operation of `model` in one pass (a count of `calls(model)`). A layer
    called twice in a functional graph counts 2, and so does every layer of
    a nested model that the graph calls twice (a siamese tower)."""
    if not is_container(model):
        return {id(model): 1}
    counts = {}
    for op, _, _ in calls(model):
        counts[id(op)] = counts.get(id(op), 0) + 1
    return counts


def calls(model):
    """Every call that `run` makes, in its order, without running the
    model: `[(op, inputs, outputs), ...]`, with `inputs` and `outputs`
    lists of keys that stand for the values flowing between calls (the
    model's own inputs are `("input", i)`). `run` calls a layer of a
    nested model once per call of that model, and so does this list.
    """
    out = []
    counter = [0]

    def fresh():
        counter[0] += 1
        return ("value", counter[0])

    def walk(container, given):
        if is_sequential(container):
            values = given
            for layer in container.layers:
                if isinstance(layer, keras.layers.InputLayer):
                    continue
                if is_container(layer):
                    values = walk(layer, values)
                else:
                    made = [fresh()]
                    out.append((layer, values, made))
                    values = made
            return values
        inputs = keras.tree.flatten(container.inputs)
        if len(given) == len(inputs):
            env = {id(t): [v] for t, v in zip(inputs, given)}
        else:
            env = {id(t): list(given) for t in inputs}
        for node in _compat.run_order_nodes(container):
            args = _compat.node_inputs(node)
            if any(id(t) not in env for t in args):
                continue
            values = [v for t in args for v in env[id(t)]]
            op = _compat.node_operation(node)
            outputs = _compat.node_outputs(node)
            if is_container(op):
                made = walk(op, values)
                if len(made) == len(outputs):
                    for t, v in zip(outputs, made):
                        env[id(t)] = [v]
                else:
                    for t in outputs:
                        env[id(t)] = list(made)
            else:
                made = [fresh() for _ in outputs]
                out.append((op, values, made))
                for t, v in zip(outputs, made):
                    env[id(t)] = [v]
        return [v for t in keras.tree.flatten(container.outputs) for v in env.get(id(t), [])]

    if is_container(model):
        walk(model, [("input", i) for i in range(len(keras.tree.flatten(model.inputs)))])
    return out


def node_of(model, layer):
    """The node of `layer`'s call in `model`'s graph (nested models
    walked), or `None` for a layer the graph calls more than once (or a
    `Sequential` built without an `Input`). A layer also called in another
    model has nodes there too; `layer.output` is that of its first call
    anywhere."""
    nodes = set()

    def walk(container):
        own = _compat.graph_nodes(container)
        if own is not None:
            nodes.update(id(node) for node in own)
        children = container.layers if is_sequential(container) else container.operations
        for op in children:
            if is_container(op):
                walk(op)

    walk(model)
    mine = [node for node in _compat.inbound_nodes(layer) if id(node) in nodes]
    return mine[0] if len(mine) == 1 else None


def output_of(model, layer):
    """The symbolic output of `layer`'s call in `model`'s graph: the
    tensor whose shape a head reads (see `node_of`; for a layer the graph
    calls more than once, its first call's output)."""
    node = node_of(model, layer)
    if node is None:
        return layer.output
    out = _compat.node_outputs(node)
    return out[0] if len(out) == 1 else out


def _in_input_order(model, x):
    """The flattened `x` in the order of `model`'s inputs: a dict given
    to a model whose inputs are a list (or one tensor) is keyed by their
    names, and Keras takes the inputs in the list's order."""
    struct = model.input
    if isinstance(x, dict) and not isinstance(struct, dict):
        names = [t.name for t in keras.tree.flatten(struct)]
        if set(names) <= set(x):
            return [x[name] for name in names]
    return keras.tree.flatten(x)


def run(model, x, call, on_inputs=None, nested=False):
    """Runs `model` on `x` node by node.

    Args:
        model: A `keras.Sequential` or functional model with one output
            tensor.
        x: Its input (a tensor, or the structure a functional model takes).
        call: `call(op, args, kwargs)` computes one node: a layer (or
            another operation of a functional graph) that is not itself a
            `Sequential` or functional model, with the arguments the graph
            passes it (a `Sequential` model's layer gets `args=(x,)`).
            It returns the node's output.
        on_inputs: Optional `on_inputs(given, inputs)`, called with the
            flattened `x` (in the order of the model's inputs) and the
            flattened inputs a functional model runs on after Keras
            standardizes them (a cast to the input's dtype makes new
            tensors), so that a caller keyed on tensors can follow them.
        nested: Whether `model` is a node of an enclosing model's graph:
            then its whole output structure is returned (a KerasHub
            backbone returns a dict).

    Returns:
        The model's output tensor (with `nested`, its output structure).
    """
    if is_sequential(model):
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if is_container(layer):
                x = run(layer, x, call, on_inputs, nested=True)
            else:
                x = call(layer, (x,), {})
        return x
    inputs = _compat.standardize_inputs(model, x)
    if on_inputs is not None:
        on_inputs(_in_input_order(model, x), keras.tree.flatten(inputs))

    def operation_fn(op):
        def node(*args, **kwargs):
            if is_container(op):
                return run(op, args[0], call, on_inputs, nested=True)
            return call(op, args, kwargs)

        return node

    outputs = _compat.run_through_graph(model, inputs, operation_fn)
    return outputs if nested else keras.tree.flatten(outputs)[0]
