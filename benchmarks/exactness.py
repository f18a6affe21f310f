"""Exactness of the forward gradient on models written outside this project.

For every architecture of `tests/model_zoo.py` (and the
`keras.applications` models, and with `--keras-hub` its KerasHub
backbones), the relative error of the directional
derivative `d` against the tape's `∇f·v`, in eager, graph and XLA modes,
on both paths (`layer_rules=True` and `False`). Writes a Markdown table and
JSON to `--out` and prints the table.

With `KERAS_BACKEND=jax` the reference is `jax.grad`, the modes are eager
and `jax.jit` and there is one path (`jax.jvp`); the applications run in
float32 there (JAX without `jax_enable_x64` has no float64).

    python benchmarks/exactness.py                 # about 4 minutes on 2 CPU cores
    python benchmarks/exactness.py --applications  # + EfficientNetB0, ResNet50V2, DenseNet121
    python benchmarks/exactness.py --keras-hub     # + GPT-2, Llama, Gemma, ViT, ResNet (KerasHub)
    python benchmarks/exactness.py --keras-hub --only keras_hub_ --out benchmarks/results/exactness_keras_hub
    KERAS_BACKEND=jax python benchmarks/exactness.py --out benchmarks/results/exactness_jax
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import keras  # noqa: E402

from keras_fwdgrad import testing  # noqa: E402
from tests import model_zoo  # noqa: E402

JAX = keras.backend.backend() == "jax"
# On JAX, "xla" means `jax.jit` (as "graph" would).
MODES = ("eager", "xla") if JAX else ("eager", "graph", "xla")
PATHS = {"jax.jvp": True} if JAX else {"rules": True, "accumulator": False}


def measure(build, data, loss, mode, rules):
    keras.utils.set_random_seed(7)
    model = build()
    x, y = data
    try:
        report = testing.check_exactness(model, x, y, loss, mode=mode, layer_rules=rules)
    except ValueError as e:
        return {"error": str(e).splitlines()[-1][:160]}
    return report


def _versions():
    versions = {"backend": keras.backend.backend(), "keras": keras.__version__}
    if JAX:
        import jax

        versions["jax"] = jax.__version__
    else:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    return versions


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/exactness")
    parser.add_argument(
        "--applications",
        action="store_true",
        help="also EfficientNetB0, ResNet50V2 and DenseNet121 (slow)",
    )
    parser.add_argument(
        "--keras-hub",
        action="store_true",
        help="also the KerasHub backbones of `model_zoo.KERAS_HUB_CASES` (float32)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="PREFIX",
        help="only the models whose names start with one of these (e.g. keras_hub_)",
    )
    args = parser.parse_args()
    # The architectures build in float32; `application()` builds (and
    # `application_data()` gives inputs) in `APPLICATION_DTYPE`.
    cases = [(name, *model_zoo.CASES[name], "float32") for name in sorted(model_zoo.CASES)]
    apps = ["MobileNetV2"] + (
        ["EfficientNetB0", "ResNet50V2", "DenseNet121"] if args.applications else []
    )
    for name in apps:
        cases.append(
            (
                name,
                model_zoo.application(name),
                model_zoo.application_data(),
                "sparse_categorical_crossentropy",
                model_zoo.APPLICATION_DTYPE,
            )
        )
    if args.keras_hub:
        for name, (build, data, loss) in model_zoo.KERAS_HUB_CASES.items():
            cases.append((f"keras_hub_{name}", build, data, loss, "float32"))
    if args.only:
        cases = [case for case in cases if case[0].startswith(tuple(args.only))]
        if not cases:
            parser.error(f"--only {args.only} matches no model")
    results = {}
    for name, build, data, loss, dtype in cases:
        start = time.perf_counter()
        row = {}
        for path, rules in PATHS.items():
            for mode in MODES:
                row[f"{path}/{mode}"] = measure(build, data, loss, mode, rules)
        row["dtype"] = dtype
        results[name] = row
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    lines = [
        "| model | dtype | " + " | ".join(f"{p} {m}" for p in PATHS for m in MODES) + " |",
        "|---|---|" + "---|" * (len(PATHS) * len(MODES)),
    ]
    for name, row in results.items():
        cells = []
        for path in PATHS:
            for mode in MODES:
                r = row[f"{path}/{mode}"]
                cells.append("refused" if "error" in r else f"{r['relative_error']:.1e}")
        lines.append(f"| {name} | {row['dtype']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "exactness.json"), "w") as f:
        json.dump(
            {
                "versions": _versions(),
                "results": results,
            },
            f,
            indent=1,
        )
    with open(os.path.join(args.out, "exactness.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
