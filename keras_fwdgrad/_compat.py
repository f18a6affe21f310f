"""Every private Keras or TensorFlow attribute this package reads.

Each function names the versions it was checked on. A missing attribute
raises `RuntimeError` saying which one, so an upgrade that renames it
fails loudly instead of silently changing a gradient.

Checked on TensorFlow 2.21.0 and Keras 3.15.1.
"""

import contextlib
import threading

import keras

if keras.backend.backend() == "tensorflow":
    # The TensorFlow-only helpers below are called on that backend only.
    import tensorflow as tf

# Op types whose output Keras' TensorFlow cross-entropies replace by the
# op's input (`keras/src/backend/tensorflow/nn.py::_get_logits`).
_LOGITS_OP_TYPES = ("Softmax", "Sigmoid")


def _missing(what, error):
    return RuntimeError(
        f"keras-fwdgrad relies on {what}, which this version of Keras or "
        "TensorFlow does not have (checked on TensorFlow 2.21 and Keras "
        "3.15). Please report this with your versions. "
        f"Original error: {error}"
    )


def keras_logits(output):
    """The tensor a Keras cross-entropy reads instead of `output`, if any.

    Keras (3.15.1, TensorFlow backend) keeps the logits of a softmax or
    sigmoid on its output tensor as `_keras_logits`, and in a graph also
    recognizes the `Softmax`/`Sigmoid` op that made it; its cross-entropies
    with `from_logits=False` then compute the loss from those logits. This
    mirrors `keras.src.backend.tensorflow.nn._get_logits`.

    Args:
        output: A tensor, typically a model's prediction.

    Returns:
        The logits tensor, or `None` when Keras would read `output` itself.
    """
    logits = getattr(output, "_keras_logits", None)
    if logits is not None:
        return logits
    if not tf.is_tensor(output) or isinstance(output, tf.Variable):
        return None
    if tf.executing_eagerly() or not hasattr(output, "op"):
        return None
    try:
        op = output.op
    except AttributeError:
        return None
    if op.type in _LOGITS_OP_TYPES and len(op.inputs) == 1:
        return op.inputs[0]
    return None


def in_xla_context():
    """Whether ops created now are compiled by XLA (an enclosing
    `tf.function(jit_compile=True)`).

    Uses `tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext`
    (TensorFlow 2.21.0).
    """
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError as e:  # pragma: no cover - depends on TF version
        raise _missing("tensorflow.python.ops.control_flow_util", e) from e
    try:
        check = control_flow_util.GraphOrParentsInXlaContext
    except AttributeError as e:  # pragma: no cover
        raise _missing("control_flow_util.GraphOrParentsInXlaContext", e) from e
    return bool(check(tf.compat.v1.get_default_graph()))


def gradient_registered(op_type):
    """Whether TensorFlow has a gradient function (possibly `None`, for
    ops registered as not differentiable) for `op_type`.

    Uses `tensorflow.python.framework.ops._gradient_registry`
    (TensorFlow 2.21.0).

    Returns:
        `(registered, function)`: `function` is `None` for ops registered
        with `tf.no_gradient`.
    """
    try:
        from tensorflow.python.framework import ops

        registry = ops._gradient_registry
    except (ImportError, AttributeError) as e:  # pragma: no cover
        raise _missing("tensorflow.python.framework.ops._gradient_registry", e) from e
    try:
        return True, registry.lookup(op_type)
    except LookupError:
        return False, None


def all_layers(model):
    """Every layer inside `model`, nested ones included, not `model` itself.

    Uses `Layer._flatten_layers` (Keras 3.15.1).
    """
    try:
        flatten = model._flatten_layers
    except AttributeError as e:  # pragma: no cover
        raise _missing("keras.layers.Layer._flatten_layers", e) from e
    return list(flatten(include_self=False))


def node_tensors(layer):
    """`(inputs, outputs)`: the symbolic tensors of every call of `layer`
    in a functional graph, flattened: `Layer._inbound_nodes` and
    `Node.input_tensors`/`output_tensors` (Keras 3.15.1)."""
    inputs, outputs = [], []
    for node in inbound_nodes(layer):
        inputs += node_inputs(node)
        outputs += node_outputs(node)
    return inputs, outputs


def _nodes_by_depth(model):
    """`Function._nodes_by_depth` (Keras 3.15.1): `{depth: [node, ...]}`,
    the deepest nodes (the inputs) first when sorted in reverse."""
    return _attribute(model, "_nodes_by_depth", "Function._nodes_by_depth")


def run_order_nodes(model):
    """The nodes of a functional `model`'s graph that run an operation
    (input nodes left out), in the order `Functional._run_through_graph`
    runs them: `Function._nodes_by_depth`, deepest first, `Node.operation`
    and `Node.is_input` (Keras 3.15.1)."""
    by_depth = _nodes_by_depth(model)
    out = []
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            if node_operation(node) is not None and not _attribute(
                node, "is_input", "Node.is_input"
            ):
                out.append(node)
    return out


def node_operation(node):
    """`Node.operation` (Keras 3.15.1)."""
    return _attribute(node, "operation", "Node.operation")


def graph_nodes(model):
    """The nodes of a functional `model`'s graph, or of the functional
    graph a `keras.Sequential` built from its `Input` (`None` for a
    `Sequential` without one): `Function._nodes_by_depth` and
    `Sequential._functional` (Keras 3.15.1)."""
    if isinstance(model, keras.Sequential):
        model = _attribute(model, "_functional", "Sequential._functional")
        if model is None:
            return None
    by_depth = _nodes_by_depth(model)
    return [node for depth in by_depth for node in by_depth[depth]]


def inbound_nodes(layer):
    """`Layer._inbound_nodes`: a node per symbolic call of `layer`, in any
    graph (Keras 3.15.1)."""
    return list(_attribute(layer, "_inbound_nodes", "Layer._inbound_nodes"))


def node_outputs(node):
    """`Node.output_tensors` (Keras 3.15.1)."""
    return list(_attribute(node, "output_tensors", "Node.output_tensors"))


def node_inputs(node):
    """`Node.input_tensors`, flattened (Keras 3.15.1)."""
    return list(_attribute(node, "input_tensors", "Node.input_tensors"))


def _attribute(obj, name, where):
    try:
        return getattr(obj, name)
    except AttributeError as e:
        raise _missing(where, e) from e


# Keras keeps its own layers in modules under this package (Keras 3.15.1:
# `keras.layers.Dense` is defined in `keras.src.layers.core.dense`).
_KERAS_SOURCE_PACKAGE = "keras.src."


def is_keras_layer(layer):
    """Whether `layer`'s class is one of Keras' own (`Dense`,
    `MultiHeadAttention`, `Bidirectional`), not one of another package's or
    the user's: its class is defined in a module of `keras.src` (Keras
    3.15.1). Fails loudly if Keras no longer keeps its layers there, since
    every layer would then look like a user's."""
    if not keras.layers.Dense.__module__.startswith(_KERAS_SOURCE_PACKAGE):
        raise _missing(
            f"Keras' layers being defined under `{_KERAS_SOURCE_PACKAGE[:-1]}`",
            f"keras.layers.Dense is defined in {keras.layers.Dense.__module__}",
        )
    return type(layer).__module__.startswith(_KERAS_SOURCE_PACKAGE)


def is_functional(model):
    """Whether `model` is a graph of layers (`keras.Model(inputs, outputs)`,
    or a subclass built that way that keeps `Functional.call`, as KerasHub's
    backbones), not a model with its own `call`. Checks for
    `Functional._run_through_graph` and `_nodes_by_depth`, and that the
    `call` it runs is the one defined in `keras.src.models.functional`
    (Keras 3.15.1)."""
    if not isinstance(model, keras.Model) or isinstance(model, keras.Sequential):
        return False
    if not (hasattr(model, "_run_through_graph") and hasattr(model, "_nodes_by_depth")):
        return False
    owner = next(c for c in type(model).__mro__ if "call" in c.__dict__)
    return owner.__module__ == "keras.src.models.functional" and owner.__name__ == "Functional"


def standardize_inputs(model, x):
    """`Functional._standardize_inputs` (Keras 3.15.1): the flat list of a
    functional model's input tensors."""
    return _attribute(model, "_standardize_inputs", "Functional._standardize_inputs")(x)


def run_through_graph(model, inputs, operation_fn):
    """`Functional._run_through_graph` (Keras 3.15.1): runs the graph node
    by node, calling `operation_fn(op)` for each node's operation."""
    run = _attribute(model, "_run_through_graph", "Functional._run_through_graph")
    return run(inputs, operation_fn=operation_fn)


def _masking():
    try:
        from keras.src.backend.common import masking
    except ImportError as e:  # pragma: no cover - depends on Keras version
        raise _missing("keras.src.backend.common.masking", e) from e
    return masking


def keras_mask(tensor):
    """The mask Keras attaches to `tensor` (`Embedding(mask_zero=True)`,
    `Masking`, and every layer that passes its input's mask on), or
    `None`: `keras.src.backend.common.masking.get_keras_mask` (Keras
    3.15.1). Layers that take several inputs, such as
    `MultiHeadAttention`, read their masks from their input tensors at
    call time, not from the functional graph."""
    get = _attribute(
        _masking(), "get_keras_mask", "keras.src.backend.common.masking.get_keras_mask"
    )
    return get(tensor)


def set_keras_mask(tensor, mask):
    """Attaches `mask` to `tensor` (`None` removes it):
    `keras.src.backend.common.masking.set_keras_mask` (Keras 3.15.1)."""
    put = _attribute(
        _masking(), "set_keras_mask", "keras.src.backend.common.masking.set_keras_mask"
    )
    put(tensor, mask)


def call_context_args(layer):
    """The call arguments (such as `training`) that Keras passes down to a
    layer from its caller: `Layer._call_context_args` (Keras 3.15.1)."""
    return _attribute(layer, "_call_context_args", "Layer._call_context_args")


def clear_losses(layer):
    """`Layer._clear_losses` (Keras 3.15.1): drops the `add_loss` losses of
    the previous call."""
    _attribute(layer, "_clear_losses", "Layer._clear_losses")()


def added_losses(layer):
    """`[(layer name, loss)]`: the losses `add_loss()` added in the current
    call of `layer` and every layer inside it (in a `StatelessScope`, those
    the scope collected), without weight regularizers' losses:
    `Layer._flatten_layers` and `Layer._get_own_losses` (Keras 3.15.1)."""
    flatten = _attribute(layer, "_flatten_layers", "Layer._flatten_layers")
    return [
        (inner.name, loss)
        for inner in flatten(include_self=True)
        for loss in _attribute(inner, "_get_own_losses", "Layer._get_own_losses")()
    ]


def probability_op_activation(op):
    """`keras.activations.softmax` or `sigmoid` when `op` is the operation
    `keras.ops.softmax` or `keras.ops.sigmoid` adds to a functional graph
    (`keras.src.ops.nn.Softmax`/`Sigmoid`, Keras 3.15.1), else `None`."""
    try:
        from keras.src.ops import nn
    except ImportError as e:  # pragma: no cover - depends on Keras version
        raise _missing("keras.src.ops.nn", e) from e
    softmax = _attribute(nn, "Softmax", "keras.src.ops.nn.Softmax")
    sigmoid = _attribute(nn, "Sigmoid", "keras.src.ops.nn.Sigmoid")
    if type(op) is softmax:
        return keras.activations.softmax
    if type(op) is sigmoid:
        return keras.activations.sigmoid
    return None


def compiled_loss_weights(model):
    """The `loss_weights` a compiled model was compiled with (`None` when
    none were given): `Trainer._compile_config`, a `SerializableDict`
    holding `compile()`'s arguments as `config` (Keras 3.15.1).
    `get_compile_config()` would serialize the optimizer, which cannot run
    while a step is traced."""
    config = _attribute(model, "_compile_config", "Trainer._compile_config")
    arguments = _attribute(config, "config", "SerializableDict.config")
    return arguments.get("loss_weights")


def loss_tracker(model):
    """The `Mean` metric behind the `loss` log: `Trainer._loss_tracker`
    (Keras 3.15.1)."""
    return _attribute(model, "_loss_tracker", "Trainer._loss_tracker")


_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = {}


@contextlib.contextmanager
def gradients_used_as_given(optimizer):
    """While the update is traced, makes `optimizer.apply` use gradients
    without summing them over replicas (they are identical on every
    replica already).

    Shadows `_all_reduce_sum_gradients` of the TensorFlow backend's
    optimizer (Keras 3.15.1), and of a `LossScaleOptimizer`'s inner
    optimizer, with an instance attribute, and removes it afterwards, so
    the optimizer is left as it was made. Replica threads trace the update
    concurrently, so the attribute stays until the last of them is done.
    """
    optimizers = [
        opt for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)) if opt is not None
    ]
    for opt in optimizers:
        _attribute(opt, "_all_reduce_sum_gradients", "optimizer._all_reduce_sum_gradients")
    with _PATCH_LOCK:
        for opt in optimizers:
            depth = _PATCH_DEPTH.get(id(opt), 0)
            if depth == 0:
                if "_all_reduce_sum_gradients" in vars(opt):
                    raise RuntimeError(
                        "The optimizer's `_all_reduce_sum_gradients` is already "
                        "overridden on the instance; keras-fwdgrad cannot "
                        "bypass it safely."
                    )
                opt._all_reduce_sum_gradients = list
            _PATCH_DEPTH[id(opt)] = depth + 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            for opt in optimizers:
                _PATCH_DEPTH[id(opt)] -= 1
                if _PATCH_DEPTH[id(opt)] == 0:
                    del _PATCH_DEPTH[id(opt)]
                    del opt._all_reduce_sum_gradients


def strategy_supports_no_merge_call():
    """`tf.__internal__.distribute.strategy_supports_no_merge_call`
    (TensorFlow 2.21.0)."""
    internal = _attribute(tf, "__internal__", "tf.__internal__")
    distribute = _attribute(internal, "distribute", "tf.__internal__.distribute")
    return _attribute(
        distribute,
        "strategy_supports_no_merge_call",
        "tf.__internal__.distribute.strategy_supports_no_merge_call",
    )()


def is_multi_worker(strategy):
    """Whether `strategy` is a `MultiWorkerMirroredStrategy` running on
    several workers: `extended._in_multi_worker_mode` (TensorFlow 2.21.0)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    return _attribute(
        strategy.extended, "_in_multi_worker_mode", "extended._in_multi_worker_mode"
    )()


class BuildsFromOneReplica:
    """Mixin for a `keras.Model` that builds from one replica's batch.

    Under a strategy, Keras (3.15.1) builds the model from the first input
    batch, which it first averages over replicas with
    `strategy.reduce("MEAN", ...)`; under `MultiWorkerMirroredStrategy`
    that reduce fails on the distributed batch. The build needs only the
    batch's shapes and dtypes, which one replica's batch has. Overrides
    `Trainer._maybe_symbolic_build` and calls `_symbolic_build`.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or iterator is None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            data_batch = next(it)
            break
        data_batch = tf.nest.map_structure(
            lambda v: (
                strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues)
                else v
            ),
            data_batch,
        )
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)


_NN_LOCK = threading.Lock()
_NN_SWAPS = {}


@contextlib.contextmanager
def keras_tensorflow_nn_replaced(name, make_replacement):
    """While the context is active, makes `keras.ops.<name>` (and so every
    Keras layer that calls it) run `make_replacement(original)`.

    Swaps the function `name` of Keras' TensorFlow backend module
    `keras.src.backend.tensorflow.nn` (Keras 3.15.1), which `keras.ops`
    looks up at each call, and restores it afterwards; replica threads
    tracing at once share one swap.
    """
    try:
        from keras.src.backend.tensorflow import nn as tf_nn
    except ImportError as e:  # pragma: no cover
        raise _missing("keras.src.backend.tensorflow.nn", e) from e
    _attribute(tf_nn, name, f"keras.src.backend.tensorflow.nn.{name}")
    with _NN_LOCK:
        swap = _NN_SWAPS.setdefault(name, [0, None])
        if swap[0] == 0:
            swap[1] = getattr(tf_nn, name)
            setattr(tf_nn, name, make_replacement(swap[1]))
        swap[0] += 1
    try:
        yield
    finally:
        with _NN_LOCK:
            swap[0] -= 1
            if swap[0] == 0:
                setattr(tf_nn, name, swap[1])
                del _NN_SWAPS[name]


def carries_tangent(tensor):
    """Whether `tensor` carries a tangent in an active
    `tf.autodiff.ForwardAccumulator`:
    `tensorflow.python.eager.forwardprop_util.pack_tangents`
    (TensorFlow 2.21.0)."""
    try:
        from tensorflow.python.eager import forwardprop_util
    except ImportError as e:  # pragma: no cover - depends on TF version
        raise _missing("tensorflow.python.eager.forwardprop_util", e) from e
    pack = _attribute(
        forwardprop_util, "pack_tangents", "tensorflow.python.eager.forwardprop_util.pack_tangents"
    )
    return bool(pack([tensor]).tangents)


def watch(accumulator, tensor, tangent):
    """Starts carrying `tangent` for `tensor`, a tensor made inside the
    `tf.autodiff.ForwardAccumulator` context: `ForwardAccumulator._watch`
    (TensorFlow 2.21.0)."""
    _attribute(accumulator, "_watch", "tf.autodiff.ForwardAccumulator._watch")(tensor, tangent)


# The fixed Philox key under which TensorFlow scrambles a stateless seed
# (`tensorflow/python/ops/random_ops_util.py::_philox_scramble_seed`,
# TensorFlow 2.21.0).
_PHILOX_SCRAMBLE_KEY = 0x02461E293EC8F720


def philox_key_counter(seed):
    """The Philox key and counter that `tf.random.stateless_uniform(...,
    alg="philox")` derives from the `[2]` integer `seed`.

    TensorFlow (2.21.0, `random_ops_util._philox_scramble_seed`) draws
    four 32-bit Philox words under a fixed key with the seed as counter,
    joins them (low word first) into the 64-bit key and the counter's
    second word, and builds this from about thirty small graph ops. Here
    the same two 64-bit words are drawn as such, then sliced and masked
    (four ops besides constants), so a step that folds seeds per variable
    or per layer traces, compiles and runs smaller graphs. `tests/directions_test.py` checks that the words
    equal TensorFlow's for many seeds, in eager, graph and XLA modes.
    """
    mix = tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=[2],
        key=tf.constant([_PHILOX_SCRAMBLE_KEY], tf.uint64),
        counter=tf.cast(seed, tf.uint64),
        alg=tf.random.Algorithm.PHILOX.value,
        dtype=tf.uint64,
    )
    return mix[:1], mix * tf.constant([0, 1], tf.uint64)
