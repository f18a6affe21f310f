"""Which forward gradient learns: backprop, the papers' forward gradient,
and activity perturbation with local losses, on the papers' MNIST MLP.

Trains the MLP 784-1024-1024-10 (batch 64, Adam with cosine decay, no
clipping) three ways, one after the other in one process, and prints test
accuracy against training seconds, the time to 90 % and 95 % test
accuracy, and each method's step cost relative to backprop:

- `backprop`: Adam 1e-3.
- `papers' forward gradient`: weight perturbation, one Gaussian direction,
  directional derivative capped at 1, Adam 5e-4 with beta_1 0.99.
- `activations + local losses`: `perturbation="activations"`,
  `local_losses="auto"`, `local_loss_groups="channels"` (one local loss
  per hidden unit), one direction per step, Adam 1e-3
  (Ren et al., ICLR 2023).

Prints a line per epoch and method while it trains. Offline on the MNIST
subset shipped with the package (10,000 training and 2,000 test digits) by
default, in about 90 seconds on 2 CPU cores; the full 60,000/10,000 with
`--data-dir` (see `benchmarks/learning.py` for the full measurement).

    python examples/mnist_learning.py [--epochs 10] [--data-dir DIR]
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up lines.

import keras  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402
from keras_fwdgrad.research import learning  # noqa: E402

METHODS = {
    "backprop": (None, dict(learning_rate=1e-3)),
    "papers' forward gradient": (dict(jvp_clip=1.0), dict(learning_rate=5e-4, beta_1=0.99)),
    "activations + local losses": (
        dict(perturbation="activations", local_losses="auto", local_loss_groups="channels"),
        dict(learning_rate=1e-3),
    ),
}


class PrintEpoch(keras.callbacks.Callback):
    """Prints one line per epoch while a method trains: its training loss,
    test accuracy and training seconds so far (read from `curve`, which
    must come before this callback in the list)."""

    def __init__(self, name, curve):
        super().__init__()
        self.name = name
        self.curve = curve

    def on_epoch_end(self, epoch, logs=None):
        point = self.curve.points[-1]
        print(
            f"  {self.name:<28} epoch {point['epoch']:>3}  loss {logs['loss']:.4f}  "
            f"test accuracy {point['test_accuracy']:.3f}  {point['seconds']:6.1f} s",
            flush=True,
        )


def train(name, wrapper_args, adam, data, epochs, seed):
    keras.utils.set_random_seed(seed)
    base = architectures.mlp()
    adam = dict(adam)
    steps = len(data["x_train"]) // 64
    schedule = keras.optimizers.schedules.CosineDecay(
        adam.pop("learning_rate"), decay_steps=epochs * steps
    )
    model = base if wrapper_args is None else ForwardGradientModel(base, seed=seed, **wrapper_args)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule, **adam),
        loss=loss,
        metrics=["accuracy"],
        jit_compile=True,
    )
    evaluate_with = learning.evaluation_model(base, model, loss)
    curve = learning.TestCurve(data["x_test"], data["y_test"], evaluate_with, verbose=False)
    model.fit(
        data["x_train"],
        data["y_train"],
        batch_size=64,
        epochs=epochs,
        verbose=0,
        callbacks=[curve, PrintEpoch(name, curve)],
    )
    return curve


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--out", default="out/mnist_learning.json")
    args = parser.parse_args(argv)
    source = "local" if args.data_dir else "bundled"
    data = learning.normalized_arrays("mnist", args.data_dir, source, args.train_size)
    n = len(data["x_train"])
    print(f"MNIST ({source}): {n} training, {len(data['x_test'])} test images")
    report = {}
    for name, (wrapper_args, adam) in METHODS.items():
        curve = train(name, wrapper_args, adam, data, args.epochs, args.seed)
        report[name] = {
            "curve": curve.points,
            "median_step_seconds": curve.median_step_seconds(),
            "summary": learning.summarize(curve.points, targets=(0.90, 0.95)),
        }
    step_bp = report["backprop"]["median_step_seconds"]

    print("\nTest accuracy against training seconds (after each epoch):")
    for name, r in report.items():
        points = ", ".join(f"{p['seconds']:.0f}s {p['test_accuracy']:.3f}" for p in r["curve"])
        print(f"  {name}: {points}")
    print(f"\n{'method':<28}{'best acc':>9}{'s to 90%':>10}{'s to 95%':>10}{'step/backprop':>15}")
    for name, r in report.items():
        s = r["summary"]
        cells = [
            "-" if s[k] is None else f"{s[k]:.0f}" for k in ("seconds_to_90", "seconds_to_95")
        ]
        ratio = r["median_step_seconds"] / step_bp
        print(
            f"{name:<28}{s['best_test_accuracy']:>9.3f}{cells[0]:>10}{cells[1]:>10}{ratio:>15.2f}"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
