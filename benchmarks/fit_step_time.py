"""Step time under `fit()`: forward gradient (per direction) vs backprop.

Measures, in one process and interleaved (forward-gaussian, forward-
rademacher, backprop, then again, for `--repeats` rounds), the median wall
time of a training step of the papers' MLP (784-1024-1024-10, batch 64,
SGD) under `model.fit(..., jit_compile=...)`. The first steps of each model
(tracing and XLA compilation) are reported apart. Prints a table and writes
JSON.

Usage:
    python benchmarks/fit_step_time.py [--repeats 5] [--steps 50] [--no-jit]
"""

import argparse
import json
import os
import platform

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402
from keras_fwdgrad.research.measures import StepTimer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--jit", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default="out/benchmarks/fit_step_time.json")
    args = p.parse_args()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64 * args.steps, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=(64 * args.steps,))
    variants = {
        "forward-gaussian": "gaussian",
        "forward-rademacher": "rademacher",
        "backprop": None,
    }
    models, compile_s, medians = {}, {}, {k: [] for k in variants}
    for name, direction in variants.items():
        keras.utils.set_random_seed(0)
        base = architectures.mlp()
        model = (
            base if direction is None else ForwardGradientModel(base, direction=direction, seed=0)
        )
        model.compile(
            optimizer=keras.optimizers.SGD(1e-4),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=args.jit,
        )
        timer = StepTimer(warmup_steps=2)
        model.fit(x[:128], y[:128], batch_size=64, epochs=1, verbose=0, callbacks=[timer])
        compile_s[name] = float(sum(timer.warmup_times))
        models[name] = model
    for _ in range(args.repeats):
        for name, model in models.items():
            timer = StepTimer(warmup_steps=0)
            model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
            medians[name].append(timer.median_ms())
    backprop = float(np.median(medians["backprop"]))
    rows = []
    for name in variants:
        ms = float(np.median(medians[name]))
        rows.append(
            {
                "method": name,
                "ms_per_step": ms,
                "Rf/Rb": ms / backprop,
                "first_steps_s": compile_s[name],
                "round_medians_ms": medians[name],
            }
        )
    report = {
        "model": "mlp 784-1024-1024-10",
        "batch_size": 64,
        "jit_compile": args.jit,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "gpus": len(tf.config.list_physical_devices("GPU")),
        },
        "results": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(
        f"MLP 784-1024-1024-10, batch 64, SGD, fit(jit_compile={args.jit}), "
        f"{args.repeats} interleaved rounds x {args.steps} steps, medians"
    )
    print(f"{'method':<20} {'ms/step':>8} {'vs backprop':>11} {'first 2 steps (s)':>18}")
    for r in rows:
        print(
            f"{r['method']:<20} {r['ms_per_step']:>8.2f} {r['Rf/Rb']:>11.2f} {r['first_steps_s']:>18.2f}"
        )


if __name__ == "__main__":
    main()
