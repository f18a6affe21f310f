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


class TrainingTrace(keras.callbacks.Callback):
    """Records loss against iterations and against training time in `fit()`.

    Every `eval_every` steps (and once before the first) it evaluates the
    loss on `validation_data`. The clock counts only the training steps:
    the evaluations, and the XLA compilation of the first `warmup_steps`
    steps, are left out (each warm-up step is counted at the median time of
    the other steps; the compile time is kept in `compile_s`).

    Args:
        validation_data: A `tf.data.Dataset` (or iterable) of `(x, y)`
            batches. Keep it small: it is evaluated often.
        loss: The loss to evaluate, a `keras.losses.Loss` or its name.
            Defaults to the loss the model was compiled with.
        eval_every: Integer, steps between evaluations. Defaults to `50`.
        warmup_steps: Integer, initial steps whose time is set apart.
            Defaults to `2`.

    Example:

    ```python
    trace = TrainingTrace(val, eval_every=20)
    model.fit(train, epochs=2, callbacks=[trace])
    trace.eval_steps, trace.eval_times(), trace.val_losses
    ```
    """

    def __init__(self, validation_data, loss=None, eval_every=50, warmup_steps=2):
        super().__init__()
        if not isinstance(eval_every, int) or eval_every < 1:
            raise ValueError(
                f"`eval_every` must be a positive integer. Received: eval_every={eval_every!r}"
            )
        self.validation_data = validation_data
        self.loss = loss
        self.eval_every = eval_every
        self.warmup_steps = warmup_steps
        self.step_times = []
        self.eval_steps = []
        self.val_losses = []
        self._start = None
        self._eval_fn = None

    def _make_eval_fn(self):
        loss = self.loss if self.loss is not None else self.model.loss
        loss = keras.losses.get(loss) if isinstance(loss, str) else loss
        if loss is None:
            raise ValueError(
                "`TrainingTrace` needs a `loss`: pass one or compile the model with one."
            )
        model = self.model
        import tensorflow as tf

        @tf.function(reduce_retracing=True)
        def batch_sum(x, y):
            n = tf.cast(tf.shape(y)[0], tf.float32)
            return tf.cast(loss(y, model(x, training=False)), tf.float32) * n, n

        return batch_sum

    def evaluate(self):
        """Mean loss over `validation_data` with the current weights."""
        if self._eval_fn is None:
            self._eval_fn = self._make_eval_fn()
        total, count = 0.0, 0.0
        for x, y in self.validation_data:
            s, n = self._eval_fn(x, y)
            total += float(s)
            count += float(n)
        return total / count

    def on_train_begin(self, logs=None):
        self.eval_steps.append(0)
        self.val_losses.append(self.evaluate())

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if logs and "loss" in logs:
            float(logs["loss"])  # Waits for the step to finish.
        self.step_times.append(time.perf_counter() - self._start)
        step = len(self.step_times)
        if step % self.eval_every == 0:
            self.eval_steps.append(step)
            self.val_losses.append(self.evaluate())

    def on_train_end(self, logs=None):
        step = len(self.step_times)
        if self.eval_steps[-1] != step:
            self.eval_steps.append(step)
            self.val_losses.append(self.evaluate())

    @property
    def compile_excluded(self):
        """Whether `elapsed()` leaves compile time out: only when the run
        had steps after the warm-up to measure a compiled step by. A run of
        `warmup_steps` steps or fewer has its warm-up (compile) times in
        `elapsed()`."""
        return len(self.step_times) > self.warmup_steps

    @property
    def compile_s(self):
        """Wall time of the warm-up steps (tracing and compilation)."""
        return float(sum(self.step_times[: self.warmup_steps]))

    def median_step_s(self):
        """Median step time in seconds, warm-up excluded (included when the
        run had no other steps; see `compile_excluded`)."""
        rest = self.step_times[self.warmup_steps :] or self.step_times
        return float(np.median(rest)) if rest else float("nan")

    def elapsed(self):
        """Training time after each step, in seconds, compile time excluded
        if `compile_excluded`."""
        times = np.asarray(self.step_times, dtype=float)
        times[: self.warmup_steps] = self.median_step_s()
        return np.cumsum(times)

    def eval_times(self):
        """Training time (seconds) at each entry of `eval_steps`."""
        elapsed = np.concatenate([[0.0], self.elapsed()])
        return [float(elapsed[s]) for s in self.eval_steps]


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
        (`None` if not reached, or if backprop's best loss is its first).
    """
    best = int(np.argmin(backprop_losses))
    tb = float(backprop_times[best])
    tf_ = time_to_loss(forward_times, forward_losses, backprop_losses[best])
    ratio = None if tf_ is None or tb <= 0 else tf_ / tb
    return {"Tb": tb, "Tf": tf_, "Tf/Tb": ratio}
