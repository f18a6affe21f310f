"""`ForwardGradientModel`'s training step on the JAX backend.

`JAXTrainer` is the trainer `ForwardGradientModel` gets when Keras runs on
JAX (the contract: `keras_fwdgrad.trainer`). Its `train_step` is stateless, as Keras' own JAX step: it draws the
step's K directions from the model's seed and step counter, runs the
forward pass once through `jax.jvp` with the K directions batched by
`jax.vmap` (the primal is computed once), forms the forward gradient,
applies it with the optimizer's `stateless_apply`, and keeps every weight,
optimizer slot and non-trainable weight as it was if the loss or a
directional derivative is not finite.

Differences from the TensorFlow backend
(`keras_fwdgrad.backend.tensorflow.trainer`):
- JAX differentiates every op in forward mode, so no layer rules are
  needed: `layer_rules` is accepted and ignored (`uses_layer_rules` is
  `False`).
- `perturbation="activations"` runs `keras_fwdgrad.backend.jax.activity`
  (the same estimator, through `jax.jvp` and one `jax.vjp` per layer).
- There is no `tf.distribute`; `all_reduce` has no effect. Under
  `keras.distribution` XLA partitions the step and inserts the collectives
  (`keras_fwdgrad.backend.jax.distribution`).
- Derivatives are JAX's own: an op that JAX differentiates as zero
  (`jnp.round`, `jax.lax.stop_gradient`) gives zero, as `jax.grad` does,
  where the TensorFlow backend raises for an op without a gradient.

As on TensorFlow, a trainable variable the loss does not depend on (an
unused head, or one behind `stop_gradient`) gets an exactly zero forward
gradient rather than `d·v`: `used_variables` finds them once per input
signature from the jaxpr of the step's JVP
(`keras_fwdgrad.backend.jax.used_variables`).
"""

import inspect
import math

import jax
import jax.numpy as jnp
import keras

from keras_fwdgrad import ops
from keras_fwdgrad.arguments import check_variables
from keras_fwdgrad.backend.jax import activity
from keras_fwdgrad.activity import estimates as activity_estimates
from keras_fwdgrad.backend.jax import distribution
from keras_fwdgrad import stream
from keras_fwdgrad import tangents
from keras_fwdgrad import trainer
from keras_fwdgrad.backend.jax.used_variables import signature
from keras_fwdgrad.backend.jax.used_variables import used_variables


class JAXTrainer(trainer.Trainer):
    """The backend-specific half of `ForwardGradientModel` on JAX."""

    @property
    def uses_layer_rules(self):
        """`False`: on JAX every step runs `jax.jvp` over the whole model."""
        return False

    def all_reduce_bytes_per_step(self, num_replicas=None):
        """Bytes each device all-reduces per training step, read from the
        compiled step under the current `keras.distribution` (zero without
        one), for the batch shapes of the model's last traced step.

        Under `DataParallel` the forward gradient all-reduces the loss, the
        K directional derivatives and a finiteness flag: `4·(1 + K) + 1`
        bytes in float32.

        Args:
            num_replicas: If given, must equal the distribution's replicas
                (the size of its batch axis).
        """
        return distribution.all_reduce_bytes(self, num_replicas)

    def fit(self, *args, **kwargs):
        """Keras' `fit`, after checking that a built model has trainable
        variables (Keras' JAX `fit` has taken the variables' values into its
        state by the first step, so an error raised there would leave the
        model without them) and that the model and its batches suit the
        current `keras.distribution` (`distribution.check_batches`,
        `distribution.check_variables`)."""
        if self.model.built:
            check_variables(self.model)
        arguments = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs).arguments
        x = arguments.get("x")
        num_examples = None
        leaves = keras.tree.flatten(x) if x is not None else []
        first = leaves[0] if leaves else None
        if hasattr(first, "shape") and len(first.shape) > 0:
            num_examples = int(first.shape[0])
            split = arguments.get("validation_split") or 0.0
            if split:
                num_examples = int(math.ceil(num_examples * (1.0 - split)))
        distribution.check_batches(num_examples, arguments.get("batch_size"))
        distribution.check_variables(self)
        return super().fit(*args, **kwargs)

    # -- the estimate -----------------------------------------------------

    def _state_index(self, variable):
        for i, v in enumerate(self.non_trainable_variables):
            if v is variable:
                return i
        raise RuntimeError(f"{variable.path} is not among the model's non-trainable variables.")

    def _estimate(self, state, x, y, sample_weight):
        """The step's forward gradient, statelessly.

        Returns:
            `(estimate, non_trainable_variables, metrics_variables)`: a
            `keras_fwdgrad.trainer.Estimate` (loss unscaled) and the state
            after the forward pass.
        """
        trainable, non_trainable, _, metrics = state
        if self.perturbation == "activations":
            estimate, non_trainable = self._activity_estimate(
                trainable, non_trainable, x, y, sample_weight
            )
            return estimate, non_trainable, metrics
        step = non_trainable[self._state_index(self.direction_step)]
        num = self.num_directions
        vs = [[tangents.to_dense(t) for t in stream.sample(self, step, k)] for k in range(num)]
        stacked = [jnp.stack(parts) for parts in zip(*vs)]
        loss_fn = self._loss_function(state, x, y, sample_weight)

        def one_direction(v):
            (loss, aux), (d, _) = jax.jvp(loss_fn, (trainable,), (v,))
            return loss, aux, d

        # The tangents are batched, the primals are not: the forward pass
        # runs once for all K directions.
        loss, aux, d = jax.vmap(one_direction)(stacked)
        used = self._used_variables(loss_fn, trainable, (x, y, sample_weight))
        loss, aux = loss[0], jax.tree.map(lambda t: t[0], aux)
        _, y_pred, non_trainable, metrics = aux
        d = ops.clip_directional_derivative(d.astype("float32"), self.jvp_clip)
        grads = [
            g if u else jnp.zeros_like(g) for g, u in zip(ops.forward_gradient(list(d), vs), used)
        ]
        return trainer.Estimate(loss, y_pred, d, grads), non_trainable, metrics

    def _activity_estimate(self, trainable, non_trainable, x, y, sample_weight):
        """The K passes of activity perturbation (`keras_fwdgrad.backend.jax
        .activity`), averaged, each from the same state."""
        results = [
            activity.estimate(self, (trainable, non_trainable), x, y, sample_weight, k)
            for k in range(self.num_directions)
        ]
        losses, y_preds, ds, grads, local, states, checked = zip(*results)

        def mean(values):
            return values[0] if len(values) == 1 else sum(values) / len(values)

        estimate = trainer.Estimate(
            mean(losses),
            y_preds[0],
            jnp.stack(ds),
            [mean(gs) for gs in zip(*grads)],
            tuple(mean(ls) for ls in zip(*local)),
            activity_estimates.combined(checked),
        )
        return estimate, list(states[0])

    def _used_variables(self, loss_fn, trainable, data):
        """`used_variables` of the step's loss, once per input signature
        (an eager step would otherwise trace the model twice)."""
        key = signature((trainable, data))
        cache = self.__dict__.setdefault("_used_variables_cache", {})
        if key not in cache:
            cache[key] = used_variables(lambda values: loss_fn(values)[0], trainable)
        return cache[key]

    def _prepare(self, x):
        """Builds the model and the optimizer, as `fit` would, so that the
        state can be read."""
        self._ensure_built(x)
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)

    def _forward_gradient(self, x, y, sample_weight):
        self._prepare(x)
        x, y, sample_weight = jax.tree.map(jnp.asarray, (x, y, sample_weight))
        return self._estimate(distribution.train_state(self), x, y, sample_weight)[0]

    def _loss_function(self, state, x, y, sample_weight):
        """The compiled loss of one training-mode forward pass as a function
        of the trainable values: `trainable -> (loss, (loss, y_pred,
        non_trainable, metrics))`, the loss unscaled."""
        _, non_trainable, optimizer_variables, metrics = state

        def loss_fn(trainable):
            _, aux = self.compute_loss_and_updates(
                trainable,
                non_trainable,
                metrics,
                x,
                y,
                sample_weight,
                training=True,
                optimizer_variables=optimizer_variables,
            )
            return aux[0], aux

        return loss_fn

    def _reference_gradient(self, x, y):
        """The loss and its gradient over the wrapped model's trainable
        variables by `jax.grad`, for `keras_fwdgrad.testing`. Zero (never
        `None`) for a variable the loss does not depend on: the reference
        does not share `used_variables` with the estimate it checks."""
        self._prepare(x)
        state = distribution.train_state(self)
        x, y = jax.tree.map(jnp.asarray, (x, y))
        loss_fn = self._loss_function(state, x, y, None)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state[0])
        return loss, grads[: len(self.model.trainable_variables)]

    # -- the training step --------------------------------------------------

    def train_step(self, state, data):
        trainable, non_trainable, optimizer_variables, metrics = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # The global batch's shapes, for `all_reduce_bytes_per_step`.
        self.__dict__["_step_batch_spec"] = tuple(
            None
            if t is None
            else jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)
            for t in (x, y, sample_weight)
        )
        estimate, new_non_trainable, metrics = self._estimate(state, x, y, sample_weight)
        finite = jnp.all(jnp.isfinite(estimate.d)) & jnp.all(jnp.isfinite(estimate.loss))
        if self.perturbation == "activations":
            # Each layer's estimate has its own reverse pass. `Dense`
            # layers' estimates are known finite from their factors:
            # reading them before the update's `cond` costs an MLP's step
            # a tenth of its time (1.11 × backprop's, 0.99 × without).
            finite = finite & trainer.estimate_finite(estimate)
        with keras.StatelessScope(
            state_mapping=list(zip(self.optimizer.variables, optimizer_variables))
        ):
            grads = self._scaled_for_optimizer(estimate.grads)

        def apply(values):
            trainable, optimizer_variables = values
            new_trainable, new_optimizer_variables = self.optimizer.stateless_apply(
                optimizer_variables, grads, trainable
            )
            return list(new_trainable), list(new_optimizer_variables)

        # A step that is not finite changes nothing. A conditional, not an
        # elementwise select of the new and old values: a select keeps
        # both copies of every weight and optimizer slot alive, which
        # blocks the in-place update of the donated state (a step of the
        # papers' MLP cost about twice its update that way).
        trainable, optimizer_variables = jax.lax.cond(
            finite, apply, lambda values: values, (list(trainable), list(optimizer_variables))
        )
        non_trainable = [jnp.where(finite, n, o) for n, o in zip(new_non_trainable, non_trainable)]
        skipped = 1 - finite.astype("int32")
        for counter, increment in ((self.direction_step, 1), (self.skipped_steps, skipped)):
            i = self._state_index(counter)
            non_trainable[i] = non_trainable[i] + jnp.asarray(increment, non_trainable[i].dtype)
        with keras.StatelessScope(
            state_mapping=list(zip(self.metrics_variables, metrics))
        ) as scope:
            logs = self._step_logs(x, y, sample_weight, estimate, skipped)
        metrics = []
        for variable in self.metrics_variables:
            value = scope.get_current_value(variable)
            metrics.append(variable.value if value is None else value)
        return logs, (trainable, non_trainable, optimizer_variables, metrics)

    def test_step(self, state, data):
        logs, state = super().test_step(state, data)
        return self._without_training_logs(logs), state
