"""Runs in its own process for `jax_distribution_test.py`: JAX's virtual CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=4`) must be set
before JAX starts.

Trains a small MLP (8-16-4, global batch 32, 3 steps) on one device, under
`keras.distribution.DataParallel` on 4 devices and under `ModelParallel` on
a 2 × 2 mesh whose `LayoutMap` shards both kernels over the "model" axis,
and writes the weights of every configuration, the collectives of the
compiled steps and the errors to a JSON file.

Usage:
    python jax_distribution_script.py OUT.json
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
# Added to the flags the tests pass down (conftest.py).
flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_fwdgrad  # noqa: E402
from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.backend.jax import distribution as jax_distribution  # noqa: E402

OUT = sys.argv[1]
BATCH, STEPS = 32, 3
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(nan_batch=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS, 8)).astype("float32")
    y = (np.arange(BATCH * STEPS) % 4).astype("int64")
    if nan_batch is not None:
        x[nan_batch * BATCH + 5] = np.nan
    return x, y


def distributions():
    devices = jax.devices()
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
    layouts = keras.distribution.LayoutMap(mesh)
    layouts[".*hidden/kernel"] = (None, "model")
    layouts[".*out/kernel"] = ("model", None)
    return {
        "single": None,
        "data": keras.distribution.DataParallel(devices=devices),
        "model": keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch"),
    }


def use(dist):
    """A fresh Keras session under `dist` (`clear_session` also clears
    the distribution, so it comes first)."""
    keras.backend.clear_session()
    keras.distribution.set_distribution(dist)


def build(method="forward", optimizer="sgd", widths=(8, 16, 4), **kwargs):
    keras.utils.set_random_seed(0)
    hidden = [
        keras.layers.Dense(w, activation="tanh", name="hidden" + (f"_{i}" if i else ""))
        for i, w in enumerate(widths[1:-1])
    ]
    base = keras.Sequential(
        [keras.Input((widths[0],)), *hidden, keras.layers.Dense(widths[-1], name="out")]
    )
    if method == "backprop":
        model = base
    else:
        kwargs = {"num_directions": 2, "seed": 7, **kwargs}
        if method == "activations":
            kwargs.update(perturbation="activations", local_losses="auto")
        model = ForwardGradientModel(base, **kwargs)
    opt = (
        keras.optimizers.SGD(0.05, momentum=0.9)
        if optimizer == "sgd"
        else keras.optimizers.Adam(1e-2)
    )
    model.compile(optimizer=opt, loss=LOSS)
    return model


def weights(model):
    values = [np.asarray(v.value).tolist() for v in model.trainable_variables]
    state = {"weights": values}
    if isinstance(model, ForwardGradientModel):
        state["direction_step"] = int(model.direction_step.value)
        state["skipped"] = int(model.skipped_steps.value)
    return state


def shardings(model):
    """Each variable's partition spec, as a list (one mesh axis name or
    `None` per dimension); `None` for a variable on one device."""
    specs = [getattr(v.value.sharding, "spec", None) for v in model.trainable_variables]
    return [None if spec is None else list(spec) for spec in specs]


def train(dist, method="forward", nan_batch=None, **kwargs):
    use(dist)
    try:
        model = build(method, **kwargs)
        x, y = data(nan_batch)
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
        return model, {**weights(model), "shardings": shardings(model)}
    finally:
        keras.distribution.set_distribution(None)


def error_of(fn):
    try:
        fn()
    except ValueError as e:
        return {"type": type(e).__name__, "message": str(e)}
    return None


results = {"devices": len(jax.devices()), "configurations": {}}
configs = {
    f"{family}/k2{'/clip' if i % 2 else ''}": dict(
        direction=family, jvp_clip=0.05 if i % 2 else None
    )
    for i, family in enumerate(keras_fwdgrad.directions.available())
}
configs["gaussian/k2/adam"] = dict(direction="gaussian", optimizer="adam")
configs["nan_guard"] = dict(nan_batch=1)
configs["activations"] = dict(method="activations")
configs["backprop"] = dict(method="backprop")
dists = distributions()
for key, kwargs in configs.items():
    runs = {}
    for name, dist in dists.items():
        if name == "model" and key.startswith(("activations", "backprop")):
            continue
        runs[name] = train(dist, **kwargs)[1]
    results["configurations"][key] = runs

# Save under each distribution after 2 steps, load under it and train 1
# more: the weights of 3 steps in one run.
x, y = data()
results["resumed"] = {}
for name in ("data", "model"):
    use(dists[name])
    path = os.path.join(os.path.dirname(OUT), f"resumed_{name}.keras")
    model = build()
    model.fit(x[: 2 * BATCH], y[: 2 * BATCH], batch_size=BATCH, verbose=0, shuffle=False)
    model.save(path)
    use(dists[name])
    restored = keras.saving.load_model(path, custom_objects={"loss": LOSS})
    restored.fit(x[2 * BATCH :], y[2 * BATCH :], batch_size=BATCH, verbose=0, shuffle=False)
    results["resumed"][name] = {**weights(restored), "shardings": shardings(restored)}

# What crosses devices: the papers' MLP (784-1024-1024-10), batch 64.
mlp = {}
for method in ("forward", "backprop", "activations"):
    use(dists["data"])
    # K = 2 for the papers' estimator; activity perturbation with K = 1
    # (each of its passes' estimates is all-reduced).
    k = 1 if method == "activations" else 2
    model = build(method, widths=(784, 1024, 1024, 10), num_directions=k)
    rng = np.random.default_rng(1)
    xb = rng.normal(size=(64, 784)).astype("float32")
    yb = np.arange(64) % 10
    model.fit(xb, yb, batch_size=64, verbose=0)
    batch = (xb, yb, None)
    mlp[method] = {"collectives": jax_distribution.collectives(model, batch)}
    if method != "backprop":
        mlp[method]["all_reduce_bytes_per_step"] = model.all_reduce_bytes_per_step()
        mlp[method]["parameters"] = int(sum(np.prod(v.shape) for v in model.trainable_variables))
results["papers_mlp"] = mlp

use(dists["data"])
model = build()
results["errors"] = {
    "indivisible_batch": error_of(
        lambda: model.fit(x, y, batch_size=30, verbose=0, shuffle=False)
    ),
    "indivisible_last_batch": error_of(
        lambda: model.fit(x[:66], y[:66], batch_size=32, verbose=0, shuffle=False)
    ),
    "num_replicas": error_of(lambda: model.all_reduce_bytes_per_step(num_replicas=2)),
}
use(None)
outside = build()
results["single_device_bytes"] = outside.all_reduce_bytes_per_step()
# A model built before the distribution was set.
keras.distribution.set_distribution(dists["data"])
results["errors"]["built_outside"] = error_of(
    lambda: outside.fit(x, y, batch_size=BATCH, verbose=0, shuffle=False)
)

with open(OUT, "w") as f:
    json.dump(results, f)
