"""`ForwardGradientModel`'s training step on the TensorFlow backend.

`TensorFlowTrainer` is the base class `ForwardGradientModel` gets when Keras
runs on TensorFlow: its `train_step` runs `keras_fwdgrad.estimator` (layer
rules or `tf.autodiff.ForwardAccumulator`, activity perturbation and local
losses), the NaN guard and the `tf.distribute` specifics.
"""

import keras
import tensorflow as tf

from keras_fwdgrad import _compat
from keras_fwdgrad import activity
from keras_fwdgrad import distribute
from keras_fwdgrad import estimator


class TensorFlowTrainer(_compat.BuildsFromOneReplica):
    """The backend-specific half of `ForwardGradientModel` on TensorFlow."""

    def _check_backend_arguments(self):
        pass

    def _forward_gradient(self, x, y, sample_weight):
        loss, _, _, grads, _ = estimator.estimate(self, x, y, sample_weight)
        return loss, grads

    def _true_gradient(self, x, y):
        """The gradient of the compiled loss over the wrapped model's
        trainable variables, by `tf.GradientTape` (for diagnostics)."""
        base = self.model
        with tf.GradientTape() as tape:
            y_pred = base(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        return tape.gradient(loss, base.trainable_variables, unconnected_gradients="zero")

    def _reference_gradient(self, x, y):
        """The loss and its gradient over the wrapped model's trainable
        variables by `tf.GradientTape` (`None` for a variable the loss does
        not depend on), for `keras_fwdgrad.testing`."""
        base = self.model
        with tf.GradientTape() as tape:
            y_pred = base(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        grads = tape.gradient(loss, base.trainable_variables)
        return loss, [None if g is None else tf.convert_to_tensor(g) for g in grads]

    def _build_local_heads(self):
        if self.perturbation != "activations" or self.local_heads:
            return
        activity.check_model(self.model)
        self._local_loss_ends = activity.block_ends(self.model, self.local_losses)
        self.local_heads = activity.make_heads(self.model, self._local_loss_ends)
        self._local_loss_trackers = [
            keras.metrics.Mean(name=f"local_loss_{i}") for i in range(len(self.local_heads))
        ]
        activity.check_num_directions(self)
        activity.check_local_loss_groups(self)

    @property
    def uses_layer_rules(self):
        """Whether steps run through `keras_fwdgrad.layer_rules` (`True`) or
        `tf.autodiff.ForwardAccumulator` over the whole model (`False`)."""
        return estimator.uses_layer_rules(self)

    def all_reduce_bytes_per_step(self, num_replicas=None):
        """Bytes each replica all-reduces per training step.

        `K` floats for `all_reduce="directional_derivatives"`, one float per
        trainable parameter (the forward gradient) plus one finiteness flag
        for `"gradients"`. Zero on a single replica.

        Args:
            num_replicas: Defaults to the current strategy's replicas.
        """
        if num_replicas is None:
            num_replicas = self.distribute_strategy.num_replicas_in_sync
        return distribute.all_reduce_bytes(self, num_replicas)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self._ensure_built(x)
        variables = self.trainable_variables
        weights = self.model.non_trainable_weights
        # Snapshot of non-trainable weights (e.g. BatchNormalization
        # statistics) so a non-finite step can be undone completely.
        saved_weights = [tf.identity(w.value) for w in weights]
        xla = bool(self.jit_compile) and not self.run_eagerly
        loss, y_pred, d, grads, local_losses = estimator.estimate(
            self, x, y, sample_weight, xla=xla
        )
        finite = tf.reduce_all(tf.math.is_finite(d))
        if not distribute.reduces_directional_derivatives(self):
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(loss)))
        if not self.optimizer.built:
            self.optimizer.build(variables)
        grads = estimator.scaled_for_optimizer(self.optimizer, grads)
        skipped = distribute.guarded_apply(self, grads, variables, finite, weights, saved_weights)
        self.skipped_steps.assign_add(skipped)
        self.direction_step.assign_add(1)
        self._update_diagnostics(d)
        logs = self._step_logs(x, y, y_pred, sample_weight, loss, local_losses, skipped)
        return distribute.multi_worker_logs(self.distribute_strategy, logs)

    def _update_diagnostics(self, d):
        """`mean_abs_d` and `clipped_fraction` over this step's directional
        derivatives (after `jvp_clip`: a capped one equals the cap), unless
        they are not finite."""
        d = tf.abs(tf.cast(d, "float32"))
        finite = tf.reduce_all(tf.math.is_finite(d))
        weight = tf.cast(finite, "float32")
        self._abs_d_tracker.update_state(
            tf.where(finite, tf.reduce_mean(d), 0.0), sample_weight=weight
        )
        if self._clipped_tracker is not None:
            capped = tf.reduce_mean(tf.cast(d >= self.jvp_clip, "float32"))
            self._clipped_tracker.update_state(tf.where(finite, capped, 0.0), sample_weight=weight)

    def _step_logs(self, x, y, y_pred, sample_weight, loss, local_losses, skipped):
        """Updates the epoch's loss and metrics with this step, unless its
        loss or predictions are not finite (then the epoch's averages leave
        it out), and returns the logs. An epoch with no such step logs NaN;
        `skipped_steps` counts the epoch's skipped steps."""
        loss = distribute.unscale_loss(loss)
        measured = tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(t)) for t in tf.nest.flatten([loss, y_pred])]
        )
        weight = tf.cast(measured, "float32")

        def kept(t):
            return tf.where(measured, t, tf.zeros_like(t))

        batch = tf.shape(tf.nest.flatten(x)[0])[0]
        _compat.loss_tracker(self).update_state(
            kept(loss), sample_weight=tf.cast(batch, "float32") * weight
        )
        y_pred = tf.nest.map_structure(kept, y_pred)
        if sample_weight is None:
            sample_weight = tf.ones([batch]) * weight
        else:
            sample_weight = tf.nest.map_structure(
                lambda w: tf.cast(w, "float32") * weight, sample_weight
            )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        for tracker, value in zip(self._local_loss_trackers, local_losses):
            tracker.update_state(kept(distribute.unscale_loss(value)), weight)
            logs[tracker.name] = tracker.result()
        self._skipped_tracker.update_state(tf.cast(skipped, "float32"))
        self._measured_tracker.update_state(weight)
        any_measured = self._measured_tracker.result() > 0
        logs.pop(self._measured_tracker.name, None)
        for tracker in self._diagnostic_trackers():
            logs[tracker.name] = tracker.result()
        logs = {
            k: tf.where(any_measured, v, tf.constant(float("nan"), v.dtype))
            if tf.as_dtype(v.dtype).is_floating
            else v
            for k, v in logs.items()
        }
        logs["skipped_steps"] = self._skipped_tracker.result()
        return logs

    def test_step(self, data):
        logs = super().test_step(data)
        for tracker in self._training_only_trackers():
            logs.pop(tracker.name, None)
        return distribute.multi_worker_logs(self.distribute_strategy, logs)
