"""Step cost and memory of forward gradient against backprop, per model,
direction family and `jit_compile` setting, and the noise of each family.

For each model (logistic regression, the MLP, the MNIST CNN, the CIFAR-10
VGG, and the depth sweep's bias-free MLPs) and each `jit_compile` setting,
`keras_fwdgrad.research.profiling.profile_step_costs` times in one process, round
robin, the base step (forward pass and loss), a backprop training step and
one forward-gradient training step per method:

- `baseline`: the first build of this project, `tf.random.stateless_normal`
  directions differentiated by `tf.autodiff.ForwardAccumulator` over the
  whole model;
- `gaussian`, `rademacher`, `lowrank_gaussian`, `lowrank_rademacher`: the
  shipped families with the layer rules (`layer_rules=True`, the default);
- `fixed`: one dense `rademacher` direction drawn before timing and read
  from variables at every step. It never changes, so it is no way to
  train; its time is that of a full-rank forward step with sampling free,
  the floor of `gaussian` and `rademacher` (its memory leaves out the held
  direction).

Every figure is a median over interleaved rounds; compile time is reported
apart. Peak memory is read from TensorFlow's allocator (the smallest peak
over several allocator states, see `profile_step_costs`). Batch 64, SGD, the
papers' architectures, random data of the right shape (the cost of a step
does not depend on the values).

The noise table gives, for each family, the cosine similarity between the
forward gradient and the true gradient (from `tf.GradientTape`) on the MLP
at initialization, over many directions: `cos = |∇f·v| / (‖∇f‖ ‖v‖)`.

Budgets:
- `--smoke`: logistic regression and the MLP, 2 rounds of 2 steps (seconds).
- default: all models, depths 1, 4, 16; 5 rounds of 10 steps (VGG 3 of 3);
  about 6 minutes on a 2-core CPU.
- `--full`: depths 1, 2, 4, 8, 16, 32; 10 rounds of 20 steps (VGG 5 of 5).

Usage:
    python benchmarks/step_costs.py [--smoke | --full] [--models mlp cnn]
        [--jit on off] [--out benchmarks/results/step_costs]
"""

import argparse
import json
import math
import os
import platform
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow keeps allocator statistics on the CPU (the step memory measured
# here) only with its BFC allocator, its default only where oneDNN is on (not
# on every processor).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402
from keras_fwdgrad import directions  # noqa: E402
from keras_fwdgrad.research import profiling  # noqa: E402
from keras_fwdgrad import tangents  # noqa: E402

FAMILIES = ["gaussian", "rademacher", "lowrank_gaussian", "lowrank_rademacher"]
MODELS = {
    "logreg": ("logistic regression", architectures.logistic_regression, (28, 28, 1)),
    "mlp": ("MLP 784-1024-1024-10", architectures.mlp, (28, 28, 1)),
    "cnn": ("MNIST CNN", architectures.mnist_cnn, (28, 28, 1)),
    "vgg": ("CIFAR-10 VGG", architectures.cifar10_vgg, (32, 32, 3)),
}
BUDGETS = {
    "smoke": dict(
        models=["logreg", "mlp"],
        depths=[],
        rounds=2,
        steps=2,
        slow_rounds=1,
        slow_steps=1,
        cosine_draws=20,
    ),
    "default": dict(
        models=["logreg", "mlp", "cnn", "vgg", "depth"],
        depths=[1, 4, 16],
        rounds=5,
        steps=10,
        slow_rounds=3,
        slow_steps=3,
        cosine_draws=200,
    ),
    "full": dict(
        models=["logreg", "mlp", "cnn", "vgg", "depth"],
        depths=[1, 2, 4, 8, 16, 32],
        rounds=10,
        steps=20,
        slow_rounds=5,
        slow_steps=5,
        cosine_draws=1000,
    ),
}
SLOW = ("vgg",)


class StatelessNormal(directions.Direction):
    """`N(0, I)` from `tf.random.stateless_normal`: the sampler of the
    first build, kept as the benchmark's baseline."""

    def sample(self, shapes, seed, dtype="float32"):
        n = sum(math.prod(s) for s in shapes)
        flat = tf.random.stateless_normal([n], seed=seed, dtype=dtype, alg="philox")
        return directions.split_flat(flat, shapes)


class Fixed(directions.Direction):
    """One dense `rademacher` direction, drawn once and held in variables:
    every step reads the same direction, so a step costs what a full-rank
    step would if sampling were free. Not a direction to train with."""

    def __init__(self, shapes):
        drawn = directions.Rademacher().sample(
            [tuple(s) for s in shapes], tf.constant([0, 0], tf.int64)
        )
        self.held = [tf.Variable(v, trainable=False) for v in drawn]

    def sample(self, shapes, seed, dtype="float32"):
        return [tf.cast(v, dtype) for v in self.held]


def methods(shapes):
    return (
        [{"direction": StatelessNormal(), "layer_rules": False, "label": "baseline"}]
        + [{"direction": name, "label": name} for name in FAMILIES]
        + [{"direction": Fixed(shapes), "label": "fixed"}]
    )


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "gpus": [
            tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus
        ],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


def batch(input_shape, size=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size,) + input_shape).astype("float32")
    y = rng.integers(0, 10, size=(size,))
    return x, y


def measure(name, build, input_shape, jit, rounds, steps):
    x, y = batch(input_shape)
    shapes = [tuple(v.shape) for v in build().trainable_variables]
    costs = profiling.profile_step_costs(
        build,
        x,
        y,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        directions=methods(shapes),
        jit_compile=jit,
        steps=steps,
        repeats=rounds,
        warmup=2,
    )
    rows = []
    m = costs["methods"]
    for method, r in m.items():
        if method == "base":
            continue
        label = method.removeprefix("forward-")
        ratio = costs["ratios"].get(method, {})
        rows.append(
            {
                "model": name,
                "jit_compile": jit,
                "method": label,
                "ms": r["ms"],
                "R": r["R"],
                "Rf/Rb": ratio.get("Rf/Rb", 1.0 if method == "backprop" else None),
                "peak_MB": None if r["peak_bytes"] is None else r["peak_bytes"] / 1e6,
                "peak_vs_backprop": None
                if r["peak_bytes"] is None
                else r["peak_bytes"] / m["backprop"]["peak_bytes"],
                "compile_s": r["compile_s"],
                "base_ms": m["base"]["ms"],
            }
        )
    return rows, costs


def cosine_table(draws, seed=0):
    """Cosine between forward gradient and true gradient on the MLP at
    initialization, for each family, over `draws` directions."""
    keras.utils.set_random_seed(seed)
    base = architectures.mlp()
    x, y = batch((28, 28, 1))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = base.trainable_variables
    with tf.GradientTape() as tape:
        value = loss(y, base(x, training=True))
    true = tape.gradient(value, variables)
    true_norm = tf.sqrt(tf.add_n([tf.reduce_sum(g * g) for g in true]))
    rows = []
    for family in FAMILIES:
        model = ForwardGradientModel(base, direction=family, seed=seed)
        model.compile(optimizer="sgd", loss=loss)

        @tf.function(jit_compile=True)
        def cosines(model=model):
            def one(i):
                model.direction_step.assign(tf.cast(i, "int64"))
                _, grads = model.forward_gradient(x, y)
                dot = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(grads, true)])
                norm = tf.sqrt(tf.add_n([tf.reduce_sum(g * g) for g in grads]))
                return dot / (norm * true_norm)

            return tf.map_fn(one, tf.range(draws), fn_output_signature=tf.float32)

        c = cosines().numpy()
        rows.append(
            {
                "direction": family,
                "draws": draws,
                "cos_mean": float(c.mean()),
                "cos_std": float(c.std()),
                "cos_median": float(np.median(c)),
            }
        )
    return rows


def sampling_table(rounds, calls=20):
    """Time to draw one direction for the MLP's variables, XLA-compiled:
    dense (as `tf.autodiff.ForwardAccumulator` needs it) and structured
    (as the layer rules use it), each summed so that every number is
    drawn (a sum of 1.86 M floats costs about 0.5 ms here)."""
    keras.utils.set_random_seed(0)
    shapes = [tuple(v.shape) for v in architectures.mlp().trainable_variables]
    seed = tf.constant([1, 2], tf.int64)
    rows = []
    for label, family in [("baseline", StatelessNormal())] + [
        (f, directions.get(f)) for f in FAMILIES
    ]:
        row = {"direction": label}
        for kind in ("dense", "structured"):
            sample = family.sample if kind == "dense" else family.sample_structured

            @tf.function(jit_compile=True)
            def draw(sample=sample):
                # One scalar out that reads every drawn number, so the
                # timing excludes copying to NumPy.
                parts = []
                for t in sample(shapes, seed):
                    parts += [tf.cast(p, tf.float32) for p in tangents.parts(t)]
                return tf.add_n([tf.reduce_sum(t) for t in parts])

            draw()
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(calls):
                    draw().numpy()
                times.append(1000 * (time.perf_counter() - t0) / calls)
            row[f"{kind}_ms"] = float(np.median(times))
        rows.append(row)
    return rows


def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def markdown(rows, cos_rows, sampling_rows=()):
    lines = [
        "| model | jit | method | ms/step | R | Rf/Rb | peak MB | peak / backprop | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'on' if r['jit_compile'] else 'off'} | {r['method']} | "
            f"{r['ms']:.2f} | {r['R']:.2f} | {fmt(r['Rf/Rb'], '.3f')} | "
            f"{fmt(r['peak_MB'], '.2f')} | {fmt(r['peak_vs_backprop'], '.2f')} | "
            f"{r['compile_s']:.1f} |"
        )
    if cos_rows:
        lines += [
            "",
            "| direction | cosine to true gradient (mean ± std) | median | draws |",
            "|---|---|---|---|",
        ]
        for r in cos_rows:
            lines.append(
                f"| {r['direction']} | {r['cos_mean']:.2e} ± {r['cos_std']:.2e} | "
                f"{r['cos_median']:.2e} | {r['draws']} |"
            )
    if sampling_rows:
        lines += [
            "",
            "| direction | draw for the MLP, dense (ms) | structured (ms) |",
            "|---|---|---|",
        ]
        for r in sampling_rows:
            lines.append(f"| {r['direction']} | {r['dense_ms']:.2f} | {r['structured_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--smoke", action="store_true", help="seconds; checks the script runs")
    g.add_argument("--full", action="store_true", help="more depths, rounds and steps")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS) + ["depth"], default=None)
    p.add_argument("--jit", nargs="+", choices=["on", "off"], default=["on", "off"])
    p.add_argument("--out", default="benchmarks/results/step_costs")
    args = p.parse_args()
    budget_name = "smoke" if args.smoke else "full" if args.full else "default"
    budget = BUDGETS[budget_name]
    models = args.models or budget["models"]

    cases = []
    for key in models:
        if key == "depth":
            for depth in budget["depths"]:
                cases.append(
                    (
                        f"depth {depth}",
                        lambda d=depth: architectures.deep_mlp(d),
                        (28, 28, 1),
                        False,
                    )
                )
        else:
            title, build, shape = MODELS[key]
            cases.append((title, build, shape, key in SLOW))

    start = time.time()
    rows, raw = [], []
    os.makedirs(args.out, exist_ok=True)

    def write(cos_rows=(), sampling_rows=()):
        # Written after every model, so an interrupted run keeps its rows.
        report = {
            "budget": budget_name,
            "batch_size": 64,
            "optimizer": "SGD",
            "machine": machine(),
            "seconds": time.time() - start,
            "rows": rows,
            "cosine": list(cos_rows),
            "sampling": list(sampling_rows),
            "raw": raw,
        }
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(report, f, indent=2, default=str)
        table = markdown(rows, cos_rows, sampling_rows)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(table)
        return report, table

    for jit in [s == "on" for s in args.jit]:
        for title, build, shape, slow in cases:
            rounds = budget["slow_rounds"] if slow else budget["rounds"]
            steps = budget["slow_steps"] if slow else budget["steps"]
            print(f"[{title}, jit_compile={jit}: {rounds} rounds x {steps} steps]", flush=True)
            r, costs = measure(title, build, shape, jit, rounds, steps)
            rows += r
            raw.append({"model": title, "jit_compile": jit, "costs": costs})
            write()
            for row in r:
                print(
                    f"  {row['method']:<20} {row['ms']:9.2f} ms  R {row['R']:6.2f}  "
                    f"Rf/Rb {fmt(row['Rf/Rb'], '6.3f')}  peak {fmt(row['peak_MB'], '7.1f')} MB",
                    flush=True,
                )
    cos_rows, sampling_rows = [], []
    if "mlp" in models:
        print("[time to draw one direction for the MLP, jit_compile=True]")
        sampling_rows = sampling_table(budget["rounds"])
        for r in sampling_rows:
            print(
                f"  {r['direction']:<20} dense {r['dense_ms']:.2f} ms, "
                f"structured {r['structured_ms']:.2f} ms"
            )
        print(f"[cosine to the true gradient, MLP at init, {budget['cosine_draws']} draws]")
        cos_rows = cosine_table(budget["cosine_draws"])
        for r in cos_rows:
            print(f"  {r['direction']:<20} {r['cos_mean']:.2e} ± {r['cos_std']:.2e}")

    report, table = write(cos_rows, sampling_rows)
    print()
    print(table)
    print(
        f"Machine: {report['machine']['cpu']}, {report['machine']['cpus']} CPUs, "
        f"GPUs {report['machine']['gpus'] or 'none'}, TF {tf.__version__}. "
        f"{report['seconds']:.0f} s. Written to {args.out}/results.json and results.md"
    )


if __name__ == "__main__":
    main()
