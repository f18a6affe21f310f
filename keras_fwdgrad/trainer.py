"""The backend-neutral half of `ForwardGradientModel`'s training.

`ForwardGradientModel` (`keras_fwdgrad/model.py`) is Keras wiring: its
arguments, building, saving. It inherits its training from the trainer of
the backend Keras runs on, `keras_fwdgrad/backend/<name>/trainer.py`, a
thin subclass of `Trainer` here. The contract between them:

What each backend's trainer provides (and `model.py` calls):
- `_forward_gradient(x, y, sample_weight)`: one `Estimate`, nothing
  applied, the direction stream not advanced.
- `_reference_gradient(x, y)`: the loss and its gradient over the wrapped
  model's trainable variables by the backend's reverse mode (for
  `keras_fwdgrad.testing` and `GradientCosine`).
- `uses_layer_rules`, `all_reduce_bytes_per_step(num_replicas=None)`.
- Keras' `train_step` and `test_step`.

What `Trainer` gives them, written once in `keras.ops`: activity
perturbation's local heads (`_build_local_heads`), the step's logs
(the epoch's loss and metrics leave out non-finite steps; diagnostics;
skipped steps), the loss scale of a mixed-precision optimizer, and the
logs `evaluate` leaves out.
"""

from typing import Any
from typing import NamedTuple

import keras
from keras import ops

from keras_fwdgrad import _compat
from keras_fwdgrad import activity
from keras_fwdgrad import backend
from keras_fwdgrad import graph


def all_finite(tensors):
    """Whether every value of every tensor in `tensors` (`None` skipped)
    is finite, as a boolean scalar tensor."""
    return ops.all(ops.stack([ops.all(ops.isfinite(t)) for t in tensors if t is not None]))


def estimate_finite(estimate):
    """Whether every gradient estimate of `estimate` is finite, as a
    boolean scalar tensor: those of `finite_from_factors` from their
    factors' bound, the others read."""
    ok, indices = estimate.finite_from_factors
    skip = set(indices)
    checks = [ok] if ok is not None else []
    read = [g for i, g in enumerate(estimate.grads) if i not in skip and g is not None]
    if read:
        checks.append(all_finite(read))
    return ops.all(ops.stack(checks)) if checks else ops.convert_to_tensor(True)


class Estimate(NamedTuple):
    """One step's forward-gradient estimate.

    Attributes:
        loss: The loss, unscaled, averaged over the K directions.
        y_pred: The predictions of the forward pass.
        d: The directional derivatives after `jvp_clip`: `[K]`, or with
            `perturbation="activations"` `[K, blocks, batch]`.
        grads: The forward gradient, one tensor per trainable variable of
            the `ForwardGradientModel` (zero for a variable the loss does
            not use).
        local_losses: The mean local loss of each block with a head
            (activity perturbation), else empty.
        finite_from_factors: `(ok, indices)`: the estimates at `indices`
            of `grads` are finite when the boolean scalar `ok` holds,
            which is decided from the factors of their products without
            reading them (activity perturbation's closed-form `Dense`
            layers, on either backend); `(None, ())` when there are none.
    """

    loss: Any
    y_pred: Any
    d: Any
    grads: list
    local_losses: tuple = ()
    finite_from_factors: tuple = (None, ())


class Trainer:
    """Base of the per-backend trainers: see the module docstring."""

    def _create_training_state(self):
        """The step counters, saved with the model, and the epoch's
        trackers of the training logs."""
        # The step counter keys the direction stream; it is saved with the
        # model so a reloaded model continues the same stream.
        self.direction_step = self._counter("direction_step")
        self.skipped_steps = self._counter("skipped_steps")
        # Per epoch (reset with the metrics): steps skipped, and steps
        # whose loss and predictions were finite (the logs average over
        # those).
        self._skipped_tracker = keras.metrics.Sum(name="skipped_steps", dtype="float32")
        self._measured_tracker = keras.metrics.Sum(name="_measured_steps", dtype="float32")
        # Diagnostics of the estimate, per epoch: the mean |d| and, with
        # `jvp_clip`, the fraction of directional derivatives it capped.
        self._abs_d_tracker = keras.metrics.Mean(name="mean_abs_d")
        self._clipped_tracker = (
            keras.metrics.Mean(name="clipped_fraction") if self.jvp_clip is not None else None
        )

    def _counter(self, name):
        return self.add_weight(
            name=name,
            shape=(),
            dtype=backend.module().COUNTER_DTYPE,
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
        )

    def _build_local_heads(self):
        """With `perturbation="activations"`: checks the model and builds
        the blocks' heads and their loss trackers (once)."""
        if self.perturbation != "activations" or self.local_heads:
            return
        activity.check_model(self.model)
        # Layers are kept as ids: nested models may hold layers of one
        # name, and a Keras model tracks the layers its attributes hold.
        ends = activity.block_end_layers(self.model, self.local_losses)
        self._local_loss_ends = [layer.name for layer in ends]
        self._local_loss_end_ids = [id(layer) for layer in ends]
        # The block of each call of a pass, in call order: parallel
        # branches interleave in call order (`activity.call_blocks`).
        self._local_loss_call_blocks = activity.call_blocks(self.model, ends)
        self.local_heads = activity.make_heads(self.model, ends, self.local_head_units)
        self._local_loss_trackers = [
            keras.metrics.Mean(name=f"local_loss_{i}") for i in range(len(self.local_heads))
        ]
        activity.check_num_directions(self)
        activity.check_local_loss_groups(self)

    def _normalized_layers(self):
        """`{id(layer): id(normalization)}` of `activity.normalized_pairs`,
        for the trainability of the model's layers now: a pass calls it
        once, as it starts. A `BatchNormalization` frozen after wrapping (as
        fine-tuning does, then `compile()` again) runs in inference mode,
        each example alone, and the layer before it is then perturbed
        itself."""
        by_id = {id(layer): layer for layer in graph.flat_layers(self.model)}
        ends = [by_id[i] for i in self._local_loss_end_ids if i in by_id]
        return {
            id(layer): id(normalization)
            for layer, normalization in activity.normalized_pairs(self.model, ends)
        }

    def _diagnostic_trackers(self):
        return [t for t in (self._abs_d_tracker, self._clipped_tracker) if t is not None]

    def _training_only_trackers(self):
        """The trackers of training-only logs (local losses, diagnostics,
        skipped steps), which `evaluate` leaves out."""
        return (
            self._local_loss_trackers
            + self._diagnostic_trackers()
            + [self._skipped_tracker, self._measured_tracker]
        )

    def _unscaled_loss(self, loss):
        """The loss as the logs show it (a backend may scale it for its
        replicas)."""
        return loss

    def _scaled_for_optimizer(self, grads):
        """Multiplies the gradient by the optimizer's loss scale.

        The directional derivative is that of the loss itself, so that
        `jvp_clip`, the NaN guard and `forward_gradient()` see true values.
        An optimizer that scales the loss (`LossScaleOptimizer` under the
        `mixed_float16` policy, or `loss_scale_factor`) divides what it
        receives by that scale in `apply`, so it receives the gradient of
        the scaled loss, as from Keras' own trainer. On JAX call it in a
        `keras.StatelessScope` of the optimizer's variables.
        """
        one = ops.ones((), "float32")
        scale = self.optimizer.scale_loss(one)
        if scale is one:
            return grads
        return [g * ops.cast(scale, g.dtype) for g in grads]

    def _step_logs(self, x, y, sample_weight, estimate, skipped):
        """Updates the epoch's trackers with this step and returns its logs.

        The loss and metrics leave the step out if its loss or predictions
        are not finite (an epoch with no finite step logs NaN);
        `mean_abs_d` and `clipped_fraction` leave it out if a directional
        derivative is not finite; `skipped_steps` counts the epoch's
        skipped steps. On JAX call it in a `keras.StatelessScope` of the
        metrics' variables.
        """
        loss = self._unscaled_loss(estimate.loss)
        leaves = keras.tree.flatten([loss, estimate.y_pred])
        measured = all_finite(leaves)
        weight = ops.cast(measured, "float32")

        def kept(t):
            return ops.where(measured, t, ops.zeros_like(t))

        batch = ops.shape(keras.tree.flatten(x)[0])[0]
        _compat.loss_tracker(self).update_state(
            kept(loss), sample_weight=ops.cast(batch, "float32") * weight
        )
        y_pred = keras.tree.map_structure(kept, estimate.y_pred)
        if sample_weight is None:
            sample_weight = ops.ones((batch,)) * weight
        else:
            sample_weight = keras.tree.map_structure(
                lambda w: ops.cast(w, "float32") * weight, sample_weight
            )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        for tracker, value in zip(self._local_loss_trackers, estimate.local_losses):
            tracker.update_state(kept(self._unscaled_loss(value)), weight)
            logs[tracker.name] = tracker.result()
        self._update_diagnostics(estimate.d)
        self._skipped_tracker.update_state(ops.cast(skipped, "float32"))
        self._measured_tracker.update_state(weight)
        any_measured = self._measured_tracker.result() > 0
        logs.pop(self._measured_tracker.name, None)
        for tracker in self._diagnostic_trackers():
            logs[tracker.name] = tracker.result()
        logs = {
            k: ops.where(any_measured, v, ops.cast(float("nan"), v.dtype))
            if keras.backend.is_float_dtype(keras.backend.standardize_dtype(v.dtype))
            else v
            for k, v in logs.items()
        }
        logs["skipped_steps"] = self._skipped_tracker.result()
        return logs

    def _update_diagnostics(self, d):
        """`mean_abs_d` and `clipped_fraction` over this step's directional
        derivatives (after `jvp_clip`: a capped one equals the cap), unless
        they are not finite."""
        d = ops.abs(ops.cast(d, "float32"))
        finite = ops.all(ops.isfinite(d))
        weight = ops.cast(finite, "float32")
        self._abs_d_tracker.update_state(ops.where(finite, ops.mean(d), 0.0), sample_weight=weight)
        if self._clipped_tracker is not None:
            capped = ops.mean(ops.cast(d >= self.jvp_clip, "float32"))
            self._clipped_tracker.update_state(
                ops.where(finite, capped, 0.0), sample_weight=weight
            )

    def _without_training_logs(self, logs):
        """`logs` without the training-only entries (local losses,
        diagnostics, skipped steps), for `evaluate`."""
        for tracker in self._training_only_trackers():
            logs.pop(tracker.name, None)
        return logs
