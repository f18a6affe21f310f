"""`ForwardGradientModel`'s training step on the TensorFlow backend.

`TensorFlowTrainer` is the trainer `ForwardGradientModel` gets when Keras
runs on TensorFlow (the contract: `keras_fwdgrad.trainer`). Its
`train_step` runs `keras_fwdgrad.estimator` (layer rules or
`tf.autodiff.ForwardAccumulator`, activity perturbation and local losses),
the NaN guard and the `tf.distribute` specifics
(`keras_fwdgrad.backend.tensorflow.distribute`).
"""

import keras
import tensorflow as tf

from keras_fwdgrad import _compat
from keras_fwdgrad.backend.tensorflow import distribute
from keras_fwdgrad import estimator
from keras_fwdgrad import trainer


class TensorFlowTrainer(_compat.BuildsFromOneReplica, trainer.Trainer):
    """The backend-specific half of `ForwardGradientModel` on TensorFlow."""

    # Not converted by AutoGraph when you trace `forward_gradient()` in a
    # `tf.function` of your own: Keras' step does not convert it either, and
    # converting the estimator's code doubled the tracing time.
    @tf.autograph.experimental.do_not_convert
    def _forward_gradient(self, x, y, sample_weight):
        return estimator.estimate(self, x, y, sample_weight)

    @tf.autograph.experimental.do_not_convert
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
        estimate = estimator.estimate(self, x, y, sample_weight, xla=xla)
        finite = tf.reduce_all(tf.math.is_finite(estimate.d))
        if not distribute.reduces_directional_derivatives(self):
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(estimate.loss)))
        if self.perturbation == "activations":
            # The estimates take part in the guard. Used outside the
            # guarded update's `cond`, convolution kernels' estimates are
            # not moved into its branch by Grappler, where XLA:CPU runs a
            # filter gradient element by element (about 50 × slower).
            # `Dense` layers' estimates are known finite from their
            # factors instead: reading them before the `cond` costs an
            # MLP's step under XLA 2 ms (1.35 × backprop's, 0.99 ×
            # without).
            finite = tf.logical_and(finite, trainer.estimate_finite(estimate))
        if not self.optimizer.built:
            self.optimizer.build(variables)
        grads = self._scaled_for_optimizer(estimate.grads)
        skipped = distribute.guarded_apply(self, grads, variables, finite, weights, saved_weights)
        self.skipped_steps.assign_add(skipped)
        self.direction_step.assign_add(1)
        logs = self._step_logs(x, y, sample_weight, estimate, skipped)
        return distribute.multi_worker_logs(self.distribute_strategy, logs)

    def _unscaled_loss(self, loss):
        return distribute.unscale_loss(loss)

    def test_step(self, data):
        logs = self._without_training_logs(super().test_step(data))
        return distribute.multi_worker_logs(self.distribute_strategy, logs)
