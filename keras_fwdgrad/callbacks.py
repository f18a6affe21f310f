"""Callbacks that watch how good the forward gradient is while training."""

import keras
import numpy as np
from keras import ops

from keras_fwdgrad import testing


class GradientCosine(keras.callbacks.Callback):
    """Logs the cosine between the forward gradient and the true gradient.

    Every `every` training steps, on the held batch `(x, y)`, computes the
    `ForwardGradientModel`'s estimate at its current step
    (`forward_gradient()`, which does not advance the direction stream)
    and the gradient of the compiled loss by reverse mode, over the
    wrapped model's trainable variables, and records their cosine
    similarity. The epoch's mean is logged as `gradient_cosine`, so it
    reaches the history, `CSVLogger` and TensorBoard when those callbacks
    come after this one in the list. The tape makes this a diagnostic, not
    part of training: non-trainable state (BatchNormalization statistics)
    is put back after each measurement.

    A single forward gradient has cosine about `1/√n` with the true
    gradient for `n` parameters; averaging K directions, or activity
    perturbation with local losses (whose blocks follow their own losses),
    changes it.

    Args:
        x, y: The held batch.
        every: Positive integer, measure every this many training steps.
            With `steps_per_execution` in `compile()`, Keras calls
            callbacks once per execution of that many steps: the cosine is
            then measured at the end of each execution in which a multiple
            of `every` steps is reached. Defaults to `100`.

    Example:

    ```python
    model.fit(x, y, callbacks=[GradientCosine(x[:256], y[:256], every=50),
                               keras.callbacks.TensorBoard("logs")])
    ```
    """

    def __init__(self, x, y, every=100):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be a positive integer. Received: every={every!r}")
        self.x, self.y, self.every = x, y, every
        self.values = []
        self._epoch_values = []
        # Training steps seen, and those before this epoch.
        self._steps = 0
        self._epoch_start = 0

    def measure(self):
        """The cosine now, as a Python float."""
        model = self.model
        state = model.model.non_trainable_variables
        saved = [ops.copy(v.value) for v in state]
        _, estimate = model.forward_gradient(self.x, self.y)
        _, true = testing.tape_gradients(model, self.x, self.y)
        for var, value in zip(state, saved):
            var.assign(value)
        variables = model.model.trainable_variables
        a = np.concatenate([np.ravel(ops.convert_to_numpy(g)) for g in estimate[: len(true)]])
        b = np.concatenate(
            [
                np.zeros(int(np.prod(v.shape))) if g is None else np.ravel(g)
                for g, v in zip(true, variables)
            ]
        )
        a, b = a.astype("float64"), b.astype("float64")
        denominator = np.linalg.norm(a) * np.linalg.norm(b)
        return float(np.dot(a, b) / denominator) if denominator > 0 else float("nan")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_values = []
        self._epoch_start = self._steps

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the epoch's index of the execution's last step.
        steps = self._epoch_start + batch + 1
        reached = steps // self.every > self._steps // self.every
        self._steps = steps
        if reached:
            value = self.measure()
            self.values.append(value)
            self._epoch_values.append(value)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["gradient_cosine"] = (
                float(np.mean(self._epoch_values)) if self._epoch_values else float("nan")
            )
