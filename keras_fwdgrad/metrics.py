"""Measures that compare forward gradient with backpropagation.

The first paper's measures: the base runtime (forward pass and loss, no
derivatives), `Rf` and `Rb` (time of a training step relative to the base
runtime, updates included), their ratio `Rf/Rb`, and `Tf/Tb`, where `Tb`
is the time at which backpropagation reaches its lowest validation loss and
`Tf` the time at which forward gradient first reaches that loss.
"""

import time

import keras
import numpy as np


class StepTimer(keras.callbacks.Callback):
    """Records the wall time of every training step of `fit()`.

    The first `warmup_steps` steps (tracing and XLA compilation) are kept
    apart in `warmup_times` so they do not distort the medians.

    Args:
        warmup_steps: Integer, number of initial steps to set apart.
            Defaults to `3`.

    Example:

    ```python
    timer = StepTimer()
    model.fit(x, y, callbacks=[timer])
    print(timer.median_ms())
    ```
    """

    def __init__(self, warmup_steps=3):
        super().__init__()
        self.warmup_steps = warmup_steps
        self.times = []
        self.warmup_times = []
        self._start = None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        elapsed = time.perf_counter() - self._start
        if len(self.warmup_times) < self.warmup_steps:
            self.warmup_times.append(elapsed)
        else:
            self.times.append(elapsed)

    def median_ms(self):
        """Median step time in milliseconds, warm-up excluded."""
        if not self.times:
            return float("nan")
        return 1000.0 * float(np.median(self.times))


def runtime_ratios(base_s, forward_s, backprop_s):
    """Returns `Rf`, `Rb` and `Rf/Rb` from median times in seconds.

    Args:
        base_s: Time of a forward pass with the loss, no derivatives.
        forward_s: Time of a forward-gradient training step.
        backprop_s: Time of a backpropagation training step.

    Returns:
        A dict with keys `"Rf"`, `"Rb"` and `"Rf/Rb"`.
    """
    return {
        "Rf": forward_s / base_s,
        "Rb": backprop_s / base_s,
        "Rf/Rb": forward_s / backprop_s,
    }


def time_to_loss(times, losses, target):
    """First time at which `losses` is at or below `target`, or `None`.

    Args:
        times: Increasing wall-clock times (seconds), one per loss.
        losses: Validation losses measured at those times.
        target: Loss to reach.
    """
    for t, value in zip(times, losses):
        if value <= target:
            return float(t)
    return None


def tf_over_tb(forward_times, forward_losses, backprop_times, backprop_losses):
    """The first paper's `Tf/Tb`.

    `Tb` is the time of backpropagation's lowest validation loss, `Tf` the
    time forward gradient first reaches that loss.

    Returns:
        A dict with `"Tb"`, `"Tf"` (`None` if not reached) and `"Tf/Tb"`
        (`None` if not reached).
    """
    best = int(np.argmin(backprop_losses))
    tb = float(backprop_times[best])
    tf_ = time_to_loss(forward_times, forward_losses, backprop_losses[best])
    return {"Tb": tb, "Tf": tf_, "Tf/Tb": None if tf_ is None else tf_ / tb}
