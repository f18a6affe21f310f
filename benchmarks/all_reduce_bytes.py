"""Bytes each replica all-reduces per training step, and the step's time,
measured on 1, 2 and 4 virtual CPU devices, forward gradient against
backprop, for the papers' MLP and MNIST CNN (batch 64).

- TensorFlow (default): the CPU is split into 4 logical devices; each
  model trains under `tf.distribute.MirroredStrategy` on the first 1, 2 or
  4 (values reduced through one device, `ReductionToOneDevice`: the
  default collective ops cannot hold groups of 2 and 4 devices in one
  process), and every `ReplicaContext.all_reduce` the traced step makes is
  recorded.
- JAX (`KERAS_BACKEND=jax`): 4 virtual devices
  (`--xla_force_host_platform_device_count=4`); each model trains under
  `keras.distribution.DataParallel` on the first 1, 2 or 4, and the
  all-reduces are read from the compiled step's HLO
  (`keras_fwdgrad.backend.jax.distribution.collectives`).

Each row gives the measured bytes next to
`ForwardGradientModel.all_reduce_bytes_per_step()` and the median time of
a step (`train_on_batch`, rounds interleaved over the configurations, in
one process). On this 2-core CPU the virtual devices share the cores: the
times show the overhead of splitting a step, not a speed-up.

Usage:
    python benchmarks/all_reduce_bytes.py [--rounds N] [--models mlp,cnn] [--out FILE]
    KERAS_BACKEND=jax python benchmarks/all_reduce_bytes.py
"""

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
DEVICES = (1, 2, 4)
BACKEND = os.environ["KERAS_BACKEND"]
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(DEVICES)}"
    )
    import jax
else:
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration()] * max(DEVICES)
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402
from keras_fwdgrad.research.provenance import code_version  # noqa: E402

MODELS = {"mlp": architectures.mlp, "cnn": architectures.mnist_cnn}
recorded = []


def _build(name, method):
    keras.utils.set_random_seed(0)
    base = MODELS[name]()
    model = ForwardGradientModel(base, seed=0) if method == "forward" else base
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _tensorflow_setups(x, y, models):
    """`(key, model, step, measured bytes, all_reduce_bytes_per_step())`
    for each configuration."""
    all_reduce = tf.distribute.ReplicaContext.all_reduce

    def recording(self, reduce_op, value, options=None):
        recorded.append(sum(int(np.prod(t.shape)) * t.dtype.size for t in tf.nest.flatten(value)))
        return all_reduce(self, reduce_op, value, options)

    tf.distribute.ReplicaContext.all_reduce = recording
    setups = []
    for name in models:
        for method in ("forward", "backprop"):
            for n in DEVICES:
                # Reduced to one device: TensorFlow's collective ops cannot
                # hold groups of 2 and 4 devices in one process.
                strategy = tf.distribute.MirroredStrategy(
                    [f"/cpu:{i}" for i in range(n)],
                    cross_device_ops=tf.distribute.ReductionToOneDevice(),
                )
                with strategy.scope():
                    model = _build(name, method)
                recorded.clear()
                model.train_on_batch(x, y)
                # Each replica traces the step once. On one replica the
                # optimizer's all-reduce call sends nothing.
                measured = sum(recorded) // n if n > 1 else 0
                expected = model.all_reduce_bytes_per_step() if method == "forward" else None
                setups.append(((name, method, n), model, measured, expected))
    return setups


def _jax_setups(x, y, models):
    from keras_fwdgrad.backend.jax import distribution as jax_distribution

    setups = []
    for name in models:
        for method in ("forward", "backprop"):
            for n in DEVICES:
                dist = keras.distribution.DataParallel(devices=jax.devices()[:n])
                keras.distribution.set_distribution(dist)
                model = _build(name, method)
                model.train_on_batch(x, y)
                found = jax_distribution.collectives(model, (x, y, None))
                measured = sum(c["bytes"] for c in found if c["op"] == "all-reduce")
                expected = model.all_reduce_bytes_per_step() if method == "forward" else None
                setups.append(((name, method, n), model, measured, expected, dist, found))
    keras.distribution.set_distribution(None)
    return setups


def _backend_version():
    return jax.__version__ if BACKEND == "jax" else tf.__version__


def _time_step(setup, x, y):
    model = setup[1]
    if BACKEND == "jax":
        keras.distribution.set_distribution(setup[4])
    start = time.perf_counter()
    model.train_on_batch(x, y)
    elapsed = time.perf_counter() - start
    if BACKEND == "jax":
        keras.distribution.set_distribution(None)
    return elapsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (default: %(default)s)")
    p.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)),
            "results",
            f"all_reduce_bytes_{BACKEND}.json",
        ),
    )
    p.add_argument(
        "--models", default="mlp,cnn", help="comma-separated, of mlp,cnn (default: %(default)s)"
    )
    args = p.parse_args(argv)
    models = args.models.split(",")
    if not models or set(models) - set(MODELS):
        p.error(f"--models takes names from {sorted(MODELS)}; received {args.models!r}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 64)
    setups = (_jax_setups if BACKEND == "jax" else _tensorflow_setups)(x, y, models)
    times = {s[0]: [] for s in setups}
    for _ in range(2):  # warm-up
        for s in setups:
            _time_step(s, x, y)
    for _ in range(args.rounds):
        for s in setups:
            times[s[0]].append(_time_step(s, x, y))
    rows = []
    print(
        f"{BACKEND}: {'model':<5} {'method':<9} {'devices':>7} {'bytes/step':>12} "
        f"{'all_reduce_bytes_per_step()':>28} {'ms/step':>8}"
    )
    for s in setups:
        (name, method, n), measured, expected = s[0], s[2], s[3]
        ms = 1e3 * float(np.median(times[s[0]]))
        rows.append(
            dict(
                model=name,
                method=method,
                devices=n,
                bytes_per_step=measured,
                all_reduce_bytes_per_step=expected,
                ms_per_step=round(ms, 2),
            )
        )
        print(
            f"{BACKEND}: {name:<5} {method:<9} {n:>7} {measured:>12,} {expected!s:>28} {ms:>8.2f}"
        )
        if BACKEND == "jax":
            # The collectives of the compiled step, as XLA placed them.
            rows[-1]["collectives"] = s[5]
            for c in s[5]:
                print(f"{BACKEND}:{'':>33} {c['op']} {' '.join(c['shapes'])[:60]}")
    report = {
        "commit": code_version(os.path.dirname(os.path.abspath(__file__))),
        "versions": {"keras": keras.__version__, BACKEND: _backend_version()},
        "device": "CPU, 2 cores, virtual devices",
        "backend": BACKEND,
        "batch": 64,
        "rounds": args.rounds,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"Wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
