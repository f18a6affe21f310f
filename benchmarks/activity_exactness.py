"""Activity perturbation on `keras.applications` models: one draw against
each block's reverse-mode gradient.

With one loss per unit and position and random-sign tangents
(`local_losses="layers"`, `local_loss_groups="channels"`,
`local_loss_patches="positions"`, `direction="rademacher"`), each
unit's estimate `∂L/∂y_i · u_i²` is its block loss's derivative, so one
draw of every variable's estimate equals the reverse-mode gradient of the
loss of the block it belongs to. This script builds each model with random
weights (no download), forms one estimate and compares every variable
with the tape's gradient of its block's loss (the head of the first block
end whose loss depends on it, or the model's loss). Errors are relative
to the variable's largest reference entry, floored at `FLOOR` times the
largest over the model (a convolution's bias before a training-mode batch
normalization has a zero gradient, which its rounding error stands for;
the pass keeps its derivatives in float32, also in a float64 model). TensorFlow runs in float64; JAX in
float32, or in float64 with `JAX_ENABLE_X64=1`. The local heads
are built in the same dtype. Block ends are read from the model's own
graph, so models that nest their layers in inner models (ConvNeXt's
`Sequential` stems) are not measured here. Writes JSON and a Markdown
table to `--out` and prints the table.

    python benchmarks/activity_exactness.py --out benchmarks/results/activity_exactness_tensorflow
    KERAS_BACKEND=jax python benchmarks/activity_exactness.py --out benchmarks/results/activity_exactness_jax
    JAX_ENABLE_X64=1 KERAS_BACKEND=jax python benchmarks/activity_exactness.py \
        --out benchmarks/results/activity_exactness_jax_x64
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
import numpy as np  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad import activity  # noqa: E402
from keras_fwdgrad import graph  # noqa: E402
from keras_fwdgrad import testing  # noqa: E402
from keras_fwdgrad.research.methods import LAYER_LOCAL_OPTIONS  # noqa: E402
from keras_fwdgrad.research.provenance import code_version  # noqa: E402

JAX = keras.backend.backend() == "jax"
# JAX has float64 only with `JAX_ENABLE_X64=1`.
DTYPE = "float32" if JAX and os.environ.get("JAX_ENABLE_X64", "0") in ("0", "") else "float64"
# Derivatives are float32 in the pass (also in a float64 model).
FLOOR = 1e-5
MODELS = "ResNet50,InceptionV3,DenseNet121,Xception,MobileNetV2,MobileNetV3Small,ResNet50V2"
# The smallest input each model takes (32 pixels where it allows).
SIZES = {"Xception": 71, "InceptionV3": 75}
LOSS = "sparse_categorical_crossentropy"


def build(name, size):
    options = {}
    if name == "MobileNetV2":
        options["alpha"] = 0.35
    if name.startswith("MobileNetV3"):
        # No dropout: the estimate and the reference would draw different masks.
        options.update(alpha=0.75, dropout_rate=0.0, include_preprocessing=False)
    if name.startswith("ConvNeXt"):
        options["include_preprocessing"] = False
    return getattr(keras.applications, name)(
        input_shape=(size, size, 3), weights=None, classes=4, **options
    )


def measure(name, dtype):
    # The model, its local heads and the references all in `dtype`.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        return _measure(name, dtype)
    finally:
        keras.config.set_dtype_policy(previous)


def _measure(name, dtype):
    start = time.time()
    keras.utils.set_random_seed(0)
    size = SIZES.get(name, 32)
    base = build(name, size)
    model = ForwardGradientModel(base, seed=2, **LAYER_LOCAL_OPTIONS)
    model.compile(optimizer="sgd", loss=LOSS)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, size, size, 3)).astype(dtype)
    y = rng.integers(0, 4, size=(4,))
    _, grads = model.forward_gradient(x, y)
    estimate = {id(v): np.asarray(g) for v, g in zip(model.trainable_variables, grads)}
    ends = activity.block_end_layers(base, "layers")
    # A block end's output in this model's graph (`end.output` is that of
    # its first call in any model).
    heads = zip(ends, model.local_heads)
    outputs = [head(graph.output_of(base, end)) for end, head in heads] + [base.output]
    reference, last = {}, set()
    for i, output in enumerate(outputs):
        local = ForwardGradientModel(keras.Model(base.input, output))
        local.compile(optimizer="sgd", loss=LOSS)
        _, local_grads = testing.tape_gradients(local, x, y)
        for v, g in zip(local.model.trainable_variables, local_grads):
            g = np.asarray(g)
            if id(v) not in reference and np.any(g != 0):
                reference[id(v)] = g
                if i == len(outputs) - 1:
                    last.add(id(v))
    missing = [v.path for v in base.trainable_variables if id(v) not in reference]
    scale = max(np.max(np.abs(g)) for g in reference.values())
    # Worst error and where, over the blocks with heads and over the last
    # block (the model's own loss).
    worst = {"hidden": (0.0, None), "last": (0.0, None)}
    for v in base.trainable_variables:
        if id(v) in reference:
            r = reference[id(v)]
            error = float(
                np.max(np.abs(estimate[id(v)] - r)) / (np.max(np.abs(r)) + FLOOR * scale)
            )
            key = "last" if id(v) in last else "hidden"
            if error > worst[key][0]:
                worst[key] = (error, v.path)
    return {
        "model": name,
        "input": size,
        "blocks": len(outputs),
        "variables": len(base.trainable_variables),
        "max_relative_error": worst["hidden"][0],
        "at": worst["hidden"][1],
        "last_block_max_relative_error": worst["last"][0],
        "last_block_at": worst["last"][1],
        "without_block_gradient": missing,
        "seconds": round(time.time() - start, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default=MODELS, help="comma-separated keras.applications names"
    )
    parser.add_argument("--out", default=None, help="path prefix for .json and .md")
    args = parser.parse_args()
    dtype = DTYPE
    commit = code_version(os.path.dirname(os.path.abspath(__file__)))  # the code this run measures
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, dtype))
        print(json.dumps(rows[-1]), flush=True)
    table = [
        f"{keras.backend.backend()} ({dtype}, floor {FLOOR:g}), keras {keras.__version__}, "
        f"commit {commit}",
        "",
        "| model | input | blocks | variables | largest relative error, blocks with heads | at "
        "| last block (the model's loss) | at | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['model']} | {r['input']} | {r['blocks']} | {r['variables']} | "
            f"{r['max_relative_error']:.1e} | `{r['at']}` | "
            f"{r['last_block_max_relative_error']:.1e} | `{r['last_block_at']}` | {r['seconds']} |"
        )
    print("\n".join(table))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(
                {"commit": commit, "backend": keras.backend.backend(), "rows": rows}, f, indent=1
            )
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
