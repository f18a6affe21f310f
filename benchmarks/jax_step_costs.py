"""Step cost of forward gradient against backprop on the Keras JAX backend.

For each model (the papers' MLP, MNIST CNN and CIFAR-10 VGG), batch size and
direction family, times in one process, round robin (medians over rounds):

- `scan`: the model's own stateless `train_step` (Keras' for backprop,
  `ForwardGradientModel`'s for forward gradient), `steps` of them in one
  `jax.lax.scan` per jitted call, as a plain-JAX reference would time it;
- `fit`: `model.fit` over `steps` batches of in-memory data, Keras' Python
  loop included (per step, after a warm-up epoch).

The ratio is forward-gradient time over backprop time, in the same column.
SGD, random data of the right shape (a step's cost does not depend on the
values), compile time reported apart.

Usage (the backend must be JAX):
    KERAS_BACKEND=jax python benchmarks/jax_step_costs.py [--smoke]
        [--models mlp cnn vgg] [--batch 64] [--steps 100] [--rounds 7]
        [--out benchmarks/results/jax_step_costs.json]
"""

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_fwdgrad  # noqa: E402
from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402

MODELS = {
    "mlp": (architectures.mlp, (28, 28, 1), (64, 1024)),
    "cnn": (architectures.mnist_cnn, (28, 28, 1), (64, 1024)),
    "vgg": (architectures.cifar10_vgg, (32, 32, 3), (64, 256)),
}
FAMILIES = ("gaussian", "rademacher", "lowrank_gaussian", "lowrank_rademacher")


def _model(method, make, input_shape):
    keras.utils.set_random_seed(0)
    base = make(input_shape=input_shape)
    if method == "backprop":
        model = base
    else:
        model = ForwardGradientModel(base, direction=method, seed=0)
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss="sparse_categorical_crossentropy",
        jit_compile=True,
    )
    return model


class _Timed:
    """One method's model, its scanned step and its fit data."""

    def __init__(self, method, make, input_shape, batch, steps, scan=True):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(batch,) + input_shape).astype("float32")
        self.y = rng.integers(0, 10, size=(batch,)).astype("int32")
        self.model = _model(method, make, input_shape)
        self.steps = steps
        self.x_fit = np.tile(self.x, (steps,) + (1,) * len(input_shape))
        self.y_fit = np.tile(self.y, steps)
        start = time.perf_counter()
        self.fit()
        self.compile_seconds = time.perf_counter() - start
        if scan:
            self._build_scan(self.model, steps)

    def _build_scan(self, model, steps):
        start = time.perf_counter()
        self.state = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables],
            [v.value for v in model.metrics_variables],
        )
        data = (jax.numpy.asarray(self.x), jax.numpy.asarray(self.y))

        def body(state, _):
            return model.train_step(state, data)[1], None

        self._scan = jax.jit(lambda state: jax.lax.scan(body, state, None, length=steps)[0])
        self.state = jax.block_until_ready(self._scan(self.state))
        self.compile_seconds += time.perf_counter() - start

    def fit(self):
        self.model.fit(
            self.x_fit, self.y_fit, batch_size=len(self.x), epochs=1, verbose=0, shuffle=False
        )

    def time_scan(self):
        start = time.perf_counter()
        self.state = jax.block_until_ready(self._scan(self.state))
        return (time.perf_counter() - start) / self.steps

    def time_fit(self):
        start = time.perf_counter()
        self.fit()
        return (time.perf_counter() - start) / self.steps


def measure(name, batch, methods, steps, rounds, timings=("scan", "fit")):
    make, input_shape, _ = MODELS[name]
    timed = {
        m: _Timed(m, make, input_shape, batch, steps, scan="scan" in timings) for m in methods
    }
    samples = {m: {how: [] for how in timings} for m in methods}
    for _ in range(rounds):
        for how in timings:
            for m in methods:
                samples[m][how].append(getattr(timed[m], f"time_{how}")())
    rows = {}
    for m in methods:
        rows[m] = {how: statistics.median(samples[m][how]) * 1e3 for how in timings}
        rows[m]["compile_seconds"] = timed[m].compile_seconds
    for m in methods:
        for how in timings:
            rows[m][f"{how}_ratio"] = rows[m][how] / rows["backprop"][how]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="MLP, batch 64, 2 rounds of 5 steps")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "cnn", "vgg"])
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--steps", type=int, default=100, help="steps per timed call")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=None, help="only this batch size")
    p.add_argument(
        "--timings",
        nargs="+",
        choices=["scan", "fit"],
        default=["scan", "fit"],
        help="fit only on CPUs, where XLA runs a scanned convolution's backward pass slowly",
    )
    p.add_argument("--out", default="benchmarks/results/jax_step_costs.json")
    args = p.parse_args()
    if keras.backend.backend() != "jax":
        raise SystemExit("Run with KERAS_BACKEND=jax.")
    models = ["mlp"] if args.smoke else args.models
    steps, rounds = (5, 2) if args.smoke else (args.steps, args.rounds)
    methods = ["backprop"] + args.families
    results = {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "keras": keras.__version__,
        "keras_fwdgrad": keras_fwdgrad.__version__,
        "python": platform.python_version(),
        "steps_per_call": steps,
        "rounds": rounds,
        "ms_per_step": {},
    }
    for name in models:
        batches = MODELS[name][2][:1] if args.smoke else MODELS[name][2]
        if args.batch:
            batches = (args.batch,)
        for batch in batches:
            rows = measure(name, batch, methods, steps, rounds, args.timings)
            results["ms_per_step"][f"{name}/{batch}"] = rows
            print(f"{name} batch {batch} ({results['device']})")
            header = "".join(f"{h + ' ms':>10}{'ratio':>8}" for h in args.timings)
            print(f"  {'method':<20}{header}")
            for m, r in rows.items():
                cells = "".join(f"{r[h]:>10.3f}{r[h + '_ratio']:>8.2f}" for h in args.timings)
                print(f"  {m:<20}{cells}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
