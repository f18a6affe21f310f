"""The forward-gradient diagnostics over a training run, for the docs.

Trains the papers' MLP (784-1024-1024-10) on MNIST (the bundled
10,000-image subset unless `--data-dir` is given), batch 64, with the
papers' forward gradient (Gaussian directions, `jvp_clip=1`, Adam 5e-4,
β1 0.99, no clipping) and with K=16 directions, and logs what a user sees
in the history, `CSVLogger` or TensorBoard: `loss`, `mean_abs_d`,
`clipped_fraction` and, from `keras_fwdgrad.GradientCosine` on a held
batch of 256 images, `gradient_cosine`. "Epochs" are windows of
`--window` steps so the curves have points. Writes
`docs/results/diagnostics/diagnostics.{json,png}`.

Usage:
    python benchmarks/diagnostics.py [--data-dir ../shared/data] [--windows 30]
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_fwdgrad  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402
from keras_fwdgrad.research import datasets  # noqa: E402
from keras_fwdgrad.research import learning  # noqa: E402

CONFIGS = {
    "K=1 (the papers')": dict(num_directions=1),
    "K=16": dict(num_directions=16),
}
KEYS = ("loss", "mean_abs_d", "clipped_fraction", "gradient_cosine")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--windows", type=int, default=30)
    p.add_argument("--window", type=int, default=25, help="steps per logged window")
    p.add_argument("--out", default="docs/results/diagnostics")
    args = p.parse_args()
    # The code this process runs, read at its start.
    commit = learning.code_version()
    source = "local" if args.data_dir else "bundled"
    data = datasets.load("mnist", data_dir=args.data_dir, source=source)
    x = np.asarray(data["x_train"], "float32") / 255.0
    y = np.asarray(data["y_train"], "int64")
    held = (x[-256:], y[-256:])
    train = (
        tf.data.Dataset.from_tensor_slices((x[:-256], y[:-256]))
        .shuffle(10_000, seed=0)
        .repeat()
        .batch(64, drop_remainder=True)
    )
    runs = {}
    for label, kwargs in CONFIGS.items():
        keras.utils.set_random_seed(0)
        model = keras_fwdgrad.ForwardGradientModel(
            architectures.mlp(), jvp_clip=1.0, seed=0, **kwargs
        )
        model.compile(
            optimizer=keras.optimizers.Adam(5e-4, beta_1=0.99),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True,
        )
        history = model.fit(
            train,
            epochs=args.windows,
            steps_per_epoch=args.window,
            callbacks=[keras_fwdgrad.GradientCosine(*held, every=5)],
            verbose=0,
        )
        runs[label] = {k: [float(v) for v in history.history[k]] for k in KEYS}
        print(label, {k: round(v[-1], 4) for k, v in runs[label].items()}, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "diagnostics.json"), "w") as f:
        json.dump(
            {
                "commit": commit,
                "data": f"mnist ({source})",
                "window_steps": args.window,
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "runs": runs,
            },
            f,
            indent=1,
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for label, run in runs.items():
        steps = args.window * np.arange(1, len(run["loss"]) + 1)
        for ax, key in zip(axes, KEYS):
            ax.plot(steps, run[key], marker=".", label=label)
    titles = (
        "loss (training, per window)",
        "mean_abs_d: mean |d|",
        "clipped_fraction (jvp_clip=1)",
        "gradient_cosine (held batch)",
    )
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "diagnostics.png"), dpi=100)
    print(f"wrote {args.out}/diagnostics.png", flush=True)


if __name__ == "__main__":
    main()
