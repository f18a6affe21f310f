"""What a training step sends between devices under `keras.distribution`.

On JAX, `fit` under a `keras.distribution.Distribution` (`DataParallel`,
`ModelParallel`) jits the training step once for the whole mesh and XLA's
SPMD partitioner inserts the collectives. This module reads them back from
the compiled step:

- `train_state(model)`: the state tuple Keras' JAX `train_step` takes;
- `collectives(model, batch)`: each collective of the compiled
  `train_step` (its op, the shapes it carries, bytes per device), for one
  batch signature under the current distribution, compiled as `fit`
  compiles it (the state's shardings in and out);
- `all_reduce_bytes(model)`: the bytes one device all-reduces per step,
  for the batch signature of the model's last traced step;
- `check_batches(num_examples, batch_size)` and `check_variables(model)`:
  clear errors, before `fit` starts, for a batch that does not divide among
  the replicas and for variables that live outside the distribution's
  devices.

Under `DataParallel` the forward gradient's step all-reduces the loss and
the K directional derivatives (one tuple all-reduce of `1 + K` floats)
and one finiteness flag; each device then forms `d·v` itself, from
directions drawn from the same seed. Backprop all-reduces the whole
gradient. Activity perturbation all-reduces each layer's estimate, as
backprop does.
"""

import re

import jax
import keras
import numpy as np

_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\([^()]*\)|[a-z0-9]+\[[0-9,]*\](?:\{[0-9,]*\})?)\s+"
    r"(?P<op>all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
    r"(?:-start)?\("
)
_ARRAY = re.compile(r"\b(?P<dtype>pred|bf16|[sufc]\d+)\[(?P<dims>[0-9,]*)\]")
_ITEMSIZE = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}


def parse_collectives(hlo_text):
    """The collectives of an HLO module's text, in order.

    Returns:
        A list of dicts: `op` (`"all-reduce"`, `"all-gather"`,
        `"reduce-scatter"`, `"collective-permute"` or `"all-to-all"`),
        `shapes` (each array it produces, as `"f32[2]"`) and `bytes` (their
        total size on one device).
    """
    found = []
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if match is None:
            continue
        shapes, size = [], 0
        for array in _ARRAY.finditer(match["shape"]):
            dims = [int(d) for d in array["dims"].split(",") if d]
            shapes.append(f"{array['dtype']}[{','.join(map(str, dims))}]")
            size += _ITEMSIZE[array["dtype"]] * int(np.prod(dims, dtype=np.int64))
        found.append({"op": match["op"], "shapes": shapes, "bytes": size})
    return found


def train_state(model):
    """The state Keras' JAX `train_step` takes, as the model holds it now:
    `(trainable, non_trainable, optimizer, metrics)` variable values (no
    optimizer values before the optimizer is built)."""
    return (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables] if model.optimizer else [],
        [v.value for v in model.metrics_variables],
    )


def data_replicas(distribution=None):
    """How many ways `distribution` (default: the current one) splits a
    batch: the size of its mesh's batch axis; 1 without a distribution."""
    distribution = distribution or keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    axis = mesh.axis_names.index(distribution.batch_dim_name)
    return int(mesh.shape[axis])


def collectives(model, batch):
    """The collectives of `model`'s compiled training step for one batch.

    Args:
        model: A compiled `ForwardGradientModel` (or any Keras model on
            JAX), built, with its optimizer built (after one `fit` step).
        batch: `(x, y, sample_weight)`: arrays, or `jax.ShapeDtypeStruct`s
            giving the global batch's shapes (`None` for no sample weight).

    Returns:
        `parse_collectives` of the compiled step.

    Raises:
        ValueError: if no `keras.distribution` is set.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        raise ValueError(
            "No `keras.distribution` is set: the step runs on one device and "
            "holds no collectives. Set one with `keras.distribution.set_distribution`."
        )

    def spec(value):
        layout = distribution.get_data_layout(value.shape).backend_layout
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=layout)

    state = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), train_state(model)
    )
    data = tuple(None if value is None else jax.tree.map(spec, value) for value in batch)
    out_shardings = (None, jax.tree.map(lambda s: s.sharding, state))
    step = jax.jit(model.train_step, out_shardings=out_shardings)
    return parse_collectives(step.lower(state, data).compile().as_text())


def all_reduce_bytes(model, num_replicas=None):
    """See `ForwardGradientModel.all_reduce_bytes_per_step`."""
    replicas = data_replicas()
    if num_replicas is not None and num_replicas != replicas:
        raise ValueError(
            "On the JAX backend the replicas are those of the current "
            f"`keras.distribution` ({replicas}). Received: num_replicas={num_replicas!r}"
        )
    if keras.distribution.distribution() is None:
        return 0
    batch = model.__dict__.get("_step_batch_spec")
    if batch is None:
        raise ValueError(
            "On the JAX backend the bytes are read from the compiled training "
            "step, which needs the batch's shapes: train the model for one step "
            "(`fit`) under the distribution first."
        )
    return sum(c["bytes"] for c in collectives(model, batch) if c["op"] == "all-reduce")


def check_batches(num_examples, batch_size):
    """Raises a `ValueError` if a batch of `fit` (the last one included)
    does not divide among the current distribution's replicas (those of
    this process, with several processes)."""
    replicas = data_replicas()
    if replicas % jax.process_count() == 0:
        # Each process feeds its own share of the global batch.
        replicas //= jax.process_count()
    if replicas == 1 or num_examples is None:
        return
    batch_size = 32 if batch_size is None else batch_size
    last = num_examples % batch_size
    if batch_size % replicas or last % replicas:
        raise ValueError(
            f"Under {type(keras.distribution.distribution()).__name__} every batch is "
            f"split among {replicas} replicas, so `batch_size` and the size of the "
            f"last batch must be multiples of {replicas}. Received: "
            f"batch_size={batch_size} for {num_examples} examples (last batch: "
            f"{last or batch_size})."
        )


def check_variables(model):
    """Raises a `ValueError` if a variable of `model` lives on devices other
    than the current distribution's: a model built before
    `keras.distribution.set_distribution` (or under another one), whose
    step JAX cannot compile with the distributed batch."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return
    mesh = {d.id for d in np.asarray(distribution.device_mesh.devices).ravel()}
    for variable in model.variables:
        sharding = getattr(variable.value, "sharding", None)
        if sharding is None:
            continue
        devices = {d.id for d in sharding.device_set}
        if devices != mesh:
            raise ValueError(
                f"The variable {variable.path!r} lives on devices {sorted(devices)}, but "
                f"the current {type(distribution).__name__} runs on devices "
                f"{sorted(mesh)}. Build the model (and create its variables) after "
                "`keras.distribution.set_distribution(...)`, under the distribution "
                "it is trained with."
            )
