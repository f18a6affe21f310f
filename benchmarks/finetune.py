"""Memory of one LoRA fine-tuning step: backprop, checkpointed backprop and
forward gradients, as depth, sequence length and batch grow.

The model is `architectures.vit` (width 64, 4 heads, feed-forward 128) with
LoRA of rank 4 on the query and value projections of every attention layer
and a trainable head (`finetuning.enable_lora`); only the LoRA factors,
their biases and the head train. Methods, all with Adam:

- `backprop`: the plain Keras step;
- `remat_layers`: the model built under `keras.RematScope(mode="full")`,
  each layer's activations recomputed in the backward pass;
- `remat_blocks`: the same with each transformer block one layer
  (`architectures.EncoderBlock`): backprop stores only the blocks' inputs
  (checkpointed backprop as the literature uses it);
- `forward_k1`, `forward_k8`: `ForwardGradientModel` (weight perturbation,
  Gaussian directions), K = 1 and K = 8;
- `activity`: `ForwardGradientModel(perturbation="activations")`, one
  loss;
- `activity_layers`: activity perturbation as `examples/finetune_lora.py`
  runs it, the setting that learns (`local_losses="layers"`,
  `local_loss_groups="channels"`, `local_loss_patches="positions"`,
  `direction="rademacher"`).

The figure is `finetuning.step_memory`: what the step needs beyond the
variables, optimizer slots and batch it is given. On JAX it is the
temporary buffer of XLA's buffer assignment for the jitted step (nothing
runs; deterministic). On TensorFlow it is the allocator's peak during a
step; Keras rematerializes with `tf.recompute_grad`, which takes keyword
arguments only eagerly, so the `remat_*` rows run eagerly there
(`run_eagerly=True`) and the others as `tf.function` graphs, or with
`--jit-compile` XLA-compiled (`jit_compile=True`, what Keras picks by
default on TensorFlow where a GPU is present; on a CPU-only machine its
default is no XLA); the `mode` column says which.

Sweeps (each from the same base: depth 8, 64 tokens, batch 32): depth 2,
4, 8, 16; tokens 16, 64, 256 (patches of 8, 4, 2 pixels); batch 8, 32,
128. Writes `benchmarks/results/finetune_memory_<backend>.json` (with
`--jit-compile`, `finetune_memory_tensorflow_xla.json`) with the
commit, versions and device, and with `--figure` the figure
`docs/results/finetune_memory.png` from whichever backends' results
exist. `--xla-remat-check` measures, with plain JAX, whether the XLA
backend at hand turns `jax.checkpoint` into a smaller step at all (on
XLA:CPU it does not), into `benchmarks/results/xla_remat_check.json`.

Usage:
    python benchmarks/finetune.py [--smoke] [--methods backprop,...] [--resume] [--figure]
        [--jit-compile] [--sweeps depth,tokens,batch]
    KERAS_BACKEND=jax python benchmarks/finetune.py [--xla-remat-check]
"""

import argparse
import gc
import json
import os
import platform
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow keeps allocator statistics on the CPU (the step memory measured
# here) only with its BFC allocator, its default only where oneDNN is on (not
# on every processor).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402
from keras_fwdgrad.research import finetuning  # noqa: E402
from keras_fwdgrad.research.methods import LAYER_LOCAL_OPTIONS  # noqa: E402
from keras_fwdgrad.research.provenance import code_version  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
METHODS = (
    "backprop",
    "remat_layers",
    "remat_blocks",
    "forward_k1",
    "forward_k8",
    "activity",
    "activity_layers",
)
BASE = dict(depth=8, tokens=64, batch=32)
SWEEPS = {"depth": (2, 4, 8, 16), "tokens": (16, 64, 256), "batch": (8, 32, 128)}
SMOKE_SWEEPS = {"depth": (1,), "tokens": (16,), "batch": (4,)}
PATCH_FOR_TOKENS = {16: 8, 64: 4, 256: 2}


def configs(sweeps, base):
    """`(sweep, config)` pairs, each config measured once even when several
    sweeps hold it."""
    seen, out = {}, []
    for sweep, values in sweeps.items():
        for value in values:
            config = {**base, sweep: value}
            key = tuple(sorted(config.items()))
            out.append((sweep, config, key not in seen))
            seen[key] = True
    return out


def measure(method, config, rank=4, jit_compile=False):
    """`finetuning.step_memory` of one method at one configuration
    (`jit_compile`: XLA for the TensorFlow rows that are not eager)."""
    keras.utils.set_random_seed(0)
    remat = method.startswith("remat")
    scope = keras.RematScope(mode="full") if remat else keras.RematScope(mode=None)
    with scope:
        base = architectures.vit(
            depth=config["depth"],
            patch_size=PATCH_FOR_TOKENS[config["tokens"]],
            num_classes=5,
            block_layers=method == "remat_blocks",
        )
    finetuning.enable_lora(base, rank)
    if method.startswith("forward"):
        model = ForwardGradientModel(base, num_directions=int(method[len("forward_k") :]))
    elif method == "activity":
        model = ForwardGradientModel(base, perturbation="activations")
    elif method == "activity_layers":
        model = ForwardGradientModel(base, **LAYER_LOCAL_OPTIONS)
    else:
        model = base
    tensorflow = keras.backend.backend() == "tensorflow"
    eager = remat and tensorflow
    jit = "auto" if not tensorflow else (jit_compile and not eager)
    model.compile(optimizer="adam", loss=LOSS, run_eagerly=eager, jit_compile=jit)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(config["batch"], 32, 32, 3)).astype("float32")
    y = rng.integers(0, 5, config["batch"]).astype("int32")
    memory = finetuning.step_memory(model, x, y)
    mode = "eager" if eager else "compiled"
    if tensorflow and not eager:
        mode = "xla" if jit else "graph"
    return {
        "step_mib": round(memory["step_bytes"] / 2**20, 2),
        "arguments_mib": round(memory["argument_bytes"] / 2**20, 2),
        "mode": mode,
    }


def xla_remat_check(depths=(4, 8, 16)):
    """The temporary memory XLA assigns to `jax.grad` of a chain of blocks
    (six `tanh(x @ w)` each, a 2048×256 batch), plain and with each block
    under `jax.checkpoint`: whether this XLA backend turns
    rematerialization into a smaller step at all, with no Keras involved."""
    import jax
    import jax.numpy as jnp

    def block(w, x):
        for _ in range(6):
            x = jnp.tanh(x @ w)
        return x

    def loss(ws, x, remat):
        f = jax.checkpoint(block) if remat else block
        for w in ws:
            x = f(w, x)
        return jnp.sum(x)

    x = jnp.ones((2048, 256))
    out = {"platform": jax.devices()[0].platform, "rows": []}
    for depth in depths:
        ws = [jnp.full((256, 256), 0.01) for _ in range(depth)]
        row = {"depth": depth}
        for remat in (False, True):
            step = jax.jit(jax.grad(lambda ws, remat=remat: loss(ws, x, remat)))
            stats = step.lower(ws).compile().memory_analysis()
            row["checkpointed_mib" if remat else "plain_mib"] = stats.temp_size_in_bytes / 2**20
        out["rows"].append(row)
        print(f"XLA check, depth {depth}: {row}", flush=True)
    return out


def versions():
    out = {"keras": keras.__version__, "backend": keras.backend.backend()}
    if keras.backend.backend() == "jax":
        import jax

        out["jax"] = jax.__version__
        out["device"] = str(jax.devices()[0].device_kind)
    else:
        import tensorflow as tf

        out["tensorflow"] = tf.__version__
        out["device"] = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    return out


def table(results, methods):
    lines = []
    for sweep in results["sweeps"]:
        rows = [r for r in results["rows"] if r["sweep"] == sweep]
        lines.append(f"\n{sweep} (others: {results['base']}), MiB per step:")
        header = f"| {sweep} | " + " | ".join(methods) + " |"
        lines += [header, "|" + " --- |" * (len(methods) + 1)]
        for value in sorted({r[sweep] for r in rows}):
            cells = []
            for m in methods:
                found = [r for r in rows if r[sweep] == value and r["method"] == m]
                cells.append(f"{found[0]['step_mib']:.1f}" if found else "-")
            lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {}
    for backend in ("jax", "tensorflow"):
        p = os.path.join(HERE, "results", f"finetune_memory_{backend}.json")
        if os.path.exists(p):
            with open(p) as f:
                found[backend] = json.load(f)
    if not found:
        raise SystemExit("No results to plot: run the benchmark first.")
    fig, axes = plt.subplots(len(found), 3, figsize=(13, 3.6 * len(found)), squeeze=False)
    for row, (backend, results) in enumerate(found.items()):
        for col, sweep in enumerate(SWEEPS):
            ax = axes[row][col]
            rows = [r for r in results["rows"] if r["sweep"] == sweep]
            for m in results["methods"]:
                points = sorted((r[sweep], r["step_mib"]) for r in rows if r["method"] == m)
                if points:
                    ax.plot(*zip(*points), marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(sweep)
            ax.set_ylabel("MiB per step")
            ax.set_title(f"{backend}: {sweep}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"Wrote {path}")


def _save(out, results, measured, sweeps, methods, base):
    """Writes every measurement so far, one row per sweep that holds it."""
    rows = []
    for sweep, config, _ in configs(sweeps, base):
        for method in methods:
            key = (method, tuple(sorted(config.items())))
            if key in measured:
                rows.append({"sweep": sweep, **config, "method": method, **measured[key]})
    results = {**results, "rows": rows}
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="one tiny configuration")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=None, help="results file (default: benchmarks/results/)")
    p.add_argument("--figure", action="store_true", help="only draw the figure from results")
    p.add_argument(
        "--resume", action="store_true", help="keep the measurements already in the results file"
    )
    p.add_argument(
        "--jit-compile",
        action="store_true",
        help="TensorFlow: XLA-compile the rows that are not eager",
    )
    p.add_argument(
        "--sweeps",
        default=",".join(SWEEPS),
        help="comma-separated, from depth, tokens, batch (default: all)",
    )
    p.add_argument(
        "--xla-remat-check",
        action="store_true",
        help="only measure whether XLA keeps jax.checkpoint's saving (JAX)",
    )
    args = p.parse_args(argv)
    if args.xla_remat_check:
        if keras.backend.backend() != "jax":
            p.error("--xla-remat-check runs on KERAS_BACKEND=jax")
        out = args.out or os.path.join(HERE, "results", "xla_remat_check.json")
        result = {"commit": code_version(HERE), "versions": versions(), **xla_remat_check()}
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"Wrote {out}")
        return result
    if args.figure:
        figure(os.path.join(HERE, "..", "docs", "results", "finetune_memory.png"))
        return None
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods takes names from {METHODS}; received {unknown}")
    if args.jit_compile and keras.backend.backend() != "tensorflow":
        p.error("--jit-compile is for TensorFlow (on JAX every step is jitted)")
    chosen = args.sweeps.split(",")
    if [s for s in chosen if s not in SWEEPS]:
        p.error(f"--sweeps takes names from {tuple(SWEEPS)}; received {chosen}")
    sweeps = SMOKE_SWEEPS if args.smoke else SWEEPS
    sweeps = {k: v for k, v in sweeps.items() if k in chosen}
    base = dict(depth=1, tokens=16, batch=4) if args.smoke else BASE
    results = {
        "commit": code_version(HERE),
        "versions": versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "base": base,
        "methods": methods,
        "sweeps": list(sweeps),
        "jit_compile": args.jit_compile,
        "rows": [],
    }
    suffix = "_xla" if args.jit_compile else ""
    out = args.out or os.path.join(
        HERE, "results", f"finetune_memory_{keras.backend.backend()}{suffix}.json"
    )
    measured = {}
    if args.resume and os.path.exists(out):
        # A run cut short (TensorFlow's process grows with every model it
        # builds): keep what it measured.
        with open(out) as f:
            for row in json.load(f)["rows"]:
                config = {k: row[k] for k in base}
                key = (row["method"], tuple(sorted(config.items())))
                measured[key] = {k: row[k] for k in ("step_mib", "arguments_mib", "mode")}
        results["resumed"] = True
    for sweep, config, _ in configs(sweeps, base):
        for method in methods:
            key = (method, tuple(sorted(config.items())))
            if key not in measured:
                start = time.perf_counter()
                keras.backend.clear_session()
                gc.collect()
                measured[key] = measure(method, config, jit_compile=args.jit_compile)
                print(
                    f"{method:13s} {config}: {measured[key]['step_mib']:8.1f} MiB "
                    f"({measured[key]['mode']}, {time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
                _save(out, results, measured, sweeps, methods, base)
    results = _save(out, results, measured, sweeps, methods, base)
    print(table(results, methods))
    print(f"Wrote {out}")
    return results


if __name__ == "__main__":
    main()
