"""The papers' MLP on MNIST at the second paper's budget, on any backend.

Trains the papers' MLP (784-1024-1024-10) on the full MNIST training set,
batch 64, for `--epochs` epochs (the paper's 50 by default), with backprop
and with forward gradients, and records test loss and accuracy after every
epoch with the seconds spent training. It reads MNIST from an `.npz` file
with NumPy (no TensorFlow, no network), so it runs on the Keras JAX backend
on a machine with JAX alone (see `benchmarks/gpu.sh`).

Methods (Table I's settings where the paper has them):
- `backprop`: SGD 0.1, no clipping;
- `forward_adam`: Table I's forward-gradient Adam row: Adam 5e-4 with
  Table I's β's, Gaussian directions, `jvp_clip=1`, `global_clipnorm=1`;
- `forward_lowrank`: the same with `lowrank_rademacher` directions;
- `activations`: activity perturbation with one local loss per unit and
  random-sign tangents (`perturbation="activations"`,
  `local_losses="auto"`, `local_loss_groups="channels"`,
  `direction="rademacher"`), Adam 1e-3 (the setting of
  `benchmarks/learning.py`'s `activations_channel_groups_signs`), no
  clipping.

Usage:
    KERAS_BACKEND=jax python benchmarks/mnist_mlp_budget.py \\
        --mnist ../shared/data/mnist.npz [--epochs 50] [--out results.json]
"""

import argparse
import json
import os
import platform
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_fwdgrad  # noqa: E402
from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402

METHODS = ("backprop", "forward_adam", "forward_lowrank", "activations")


def load(path):
    """MNIST from an `.npz` with `x_train`, `y_train`, `x_test`, `y_test`
    (uint8 images), scaled to [0, 1] and standardized with the training
    set's mean and standard deviation."""
    with np.load(path) as d:
        x_train, y_train, x_test, y_test = (
            d[k] for k in ("x_train", "y_train", "x_test", "y_test")
        )
    x_train = x_train.astype("float32")[..., None] / 255.0
    x_test = x_test.astype("float32")[..., None] / 255.0
    mean, std = x_train.mean(), x_train.std()
    return (
        (x_train - mean) / std,
        y_train.astype("int32"),
        (x_test - mean) / std,
        y_test.astype("int32"),
    )


def build(method, seed):
    keras.utils.set_random_seed(seed)
    base = architectures.mlp()
    if method == "backprop":
        model, optimizer = base, keras.optimizers.SGD(0.1)
    elif method == "activations":
        model = ForwardGradientModel(
            base,
            perturbation="activations",
            local_losses="auto",
            local_loss_groups="channels",
            direction="rademacher",
            seed=seed,
        )
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        direction = "gaussian" if method == "forward_adam" else "lowrank_rademacher"
        model = ForwardGradientModel(base, direction=direction, jvp_clip=1.0, seed=seed)
        optimizer = keras.optimizers.Adam(5e-4, beta_1=0.9, beta_2=0.999, global_clipnorm=1.0)
    model.compile(
        optimizer=optimizer,
        # The papers' MLP outputs logits.
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=True,
    )
    return model


class _Clock(keras.callbacks.Callback):
    """Seconds spent in each epoch's training (evaluation left out)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self._start


def run(method, data, epochs, seed, batch_size=64):
    x_train, y_train, x_test, y_test = data
    model = build(method, seed)
    clock = _Clock()
    curve, total = [], 0.0
    for epoch in range(1, epochs + 1):
        model.fit(x_train, y_train, batch_size=batch_size, epochs=1, verbose=0, callbacks=[clock])
        total += clock.seconds
        loss, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
        curve.append(
            {
                "epoch": epoch,
                "seconds": round(total, 2),
                "test_loss": loss,
                "test_accuracy": accuracy,
            }
        )
        print(f"{method} epoch {epoch}: {curve[-1]}", flush=True)
    return curve


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mnist", required=True, help="path of mnist.npz")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=None, help="first N training images")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: {m!r} is not one of {METHODS}")
    data = load(args.mnist)
    if args.train_size:
        data = (data[0][: args.train_size], data[1][: args.train_size]) + data[2:]
    results = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "keras_fwdgrad": keras_fwdgrad.__version__,
        "python": platform.python_version(),
        "epochs": args.epochs,
        "train_images": len(data[0]),
        "batch_size": 64,
        "seed": args.seed,
        "runs": {},
    }
    if keras.backend.backend() == "jax":
        import jax

        results["device"] = jax.devices()[0].device_kind
        results["jax"] = jax.__version__
    for m in methods:
        results["runs"][m] = run(m, data, args.epochs, args.seed)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
