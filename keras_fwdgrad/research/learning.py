"""Learning curves against epochs and wall-clock seconds, and the time to
fixed test accuracies.

Used by `benchmarks/learning.py` (full MNIST) and `examples/mnist_learning.py`
(the bundled subset).
"""

import json
import os
import platform
import time

import keras
import numpy as np
import tensorflow as tf

from keras_fwdgrad.research import datasets
from keras_fwdgrad.research.provenance import code_version  # noqa: F401

TARGETS = (0.90, 0.95, 0.97)


def normalized_arrays(name="mnist", data_dir=None, source="auto", train_size=None, test_size=None):
    """A normalized dataset as NumPy arrays: the first `train_size`
    training images (all by default) and `test_size` test images drawn at
    random with a fixed seed (all by default; CIFAR-10's test set is
    sorted by class)."""
    arrays = datasets.load(name, data_dir=data_dir, source=source)
    n = train_size or len(arrays["x_train"])
    test = np.arange(len(arrays["x_test"]))
    if test_size:
        test = np.sort(np.random.default_rng(0).permutation(test)[:test_size])
    return {
        "x_train": datasets.normalize(name, arrays["x_train"][:n]).numpy(),
        "y_train": arrays["y_train"][:n],
        "x_test": datasets.normalize(name, arrays["x_test"][test]).numpy(),
        "y_test": arrays["y_test"][test],
    }


def evaluation_model(base, trained, loss, jit_compile=True):
    """`base` compiled to evaluate test loss and accuracy while `trained`
    (a `ForwardGradientModel` of it, or `base` itself for backprop) trains.

    When `trained` is `base` it is returned as it is, and must already be
    compiled with an `"accuracy"` metric: compiling it again would replace
    its optimizer (`keras.Model.compile` defaults to RMSprop).

    Args:
        base: The wrapped Keras model.
        trained: The model `fit` trains.
        loss: The compiled loss.
        jit_compile: Passed to `compile`.
    """
    if trained is base:
        if not base.compiled or base.optimizer is None:
            raise ValueError(
                "Compile `trained` (with its optimizer) before asking to evaluate it."
            )
        return base
    base.compile(loss=loss, metrics=["accuracy"], jit_compile=jit_compile)
    return base


class TestCurve(keras.callbacks.Callback):
    """Records test accuracy and loss after every epoch, against the
    training seconds so far (evaluation time excluded) and the median
    seconds per training step.

    Args:
        x_test, y_test: Test data.
        evaluate_with: The compiled Keras model to evaluate (for a
            `ForwardGradientModel`, its wrapped model compiled with the
            same loss and an `"accuracy"` metric).
        verbose: Whether to print each point.
    """

    def __init__(self, x_test, y_test, evaluate_with, verbose=True):
        super().__init__()
        self.x_test, self.y_test = x_test, y_test
        self.evaluate_with = evaluate_with
        self.verbose = verbose
        self.seconds = 0.0
        self.points = []
        self.step_seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step_seconds.append(time.perf_counter() - self._step_start)

    def on_epoch_end(self, epoch, logs=None):
        self.seconds += time.perf_counter() - self._start
        loss, accuracy = self.evaluate_with.evaluate(
            self.x_test, self.y_test, batch_size=1000, verbose=0
        )
        self.points.append(
            {
                "epoch": epoch + 1,
                "seconds": round(self.seconds, 2),
                "test_accuracy": float(accuracy),
                "test_loss": float(loss),
                "skipped_steps": float((logs or {}).get("skipped_steps", 0)),
            }
        )
        if self.verbose:
            print(f"    {self.points[-1]}", flush=True)

    def median_step_seconds(self):
        """Median seconds of a training step, the first epoch's (tracing
        and compilation) left out when there are later ones."""
        steps = sorted(self.step_seconds[len(self.step_seconds) // max(1, len(self.points)) :])
        steps = steps or sorted(self.step_seconds)
        return steps[len(steps) // 2]


def summarize(points, targets=TARGETS):
    """Best and final test accuracy, and the training seconds to each
    target accuracy (`None`, with the shortfall, where it was not reached).

    Args:
        points: `TestCurve.points`.
        targets: Accuracies in `[0, 1]`. Defaults to 90 %, 95 % and 97 %.
    """
    best = max(p["test_accuracy"] for p in points)
    out = {"best_test_accuracy": best, "final_test_accuracy": points[-1]["test_accuracy"]}
    for target in targets:
        reached = [p for p in points if p["test_accuracy"] >= target]
        key = f"seconds_to_{round(target * 100)}"
        out[key] = reached[0]["seconds"] if reached else None
        if not reached:
            out[f"missed_{round(target * 100)}_by"] = round(target - best, 4)
    return out


def load_runs(path):
    """The runs already recorded in a results file (`{}` if there is none),
    so that a benchmark adds to them."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("runs", {})


def save_runs(path, runs):
    """Writes `runs` (a dict of run name to record) with the machine and
    the TensorFlow and Keras versions."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            {
                "machine": f"{platform.machine()} {os.cpu_count()} cores",
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "runs": runs,
            },
            f,
            indent=1,
        )
