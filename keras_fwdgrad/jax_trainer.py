"""`ForwardGradientModel`'s training step on the JAX backend.

`JAXTrainer` is the base class `ForwardGradientModel` gets when Keras runs on
JAX. Its `train_step` is stateless, as Keras' own JAX step: it draws the
step's K directions from the model's seed and step counter, runs the
forward pass once through `jax.jvp` with the K directions batched by
`jax.vmap` (the primal is computed once), forms the forward gradient,
applies it with the optimizer's `stateless_apply`, and keeps every weight,
optimizer slot and non-trainable weight as it was if the loss or a
directional derivative is not finite.

Differences from the TensorFlow backend (`keras_fwdgrad.tensorflow_trainer`):
- JAX differentiates every op in forward mode, so no layer rules are
  needed: `layer_rules` is accepted and ignored (`uses_layer_rules` is
  `False`).
- `perturbation="activations"` (and so local losses) is TensorFlow-only
  for now and raises a `ValueError` here.
- There is no `tf.distribute`; `all_reduce` has no effect.
- Derivatives are JAX's own: an op that JAX differentiates as zero
  (`jnp.round`, `jax.lax.stop_gradient`) gives zero, as `jax.grad` does,
  where the TensorFlow backend raises for an op without a gradient.

As on TensorFlow, a trainable variable the loss does not depend on (an
unused head, or one behind `stop_gradient`) gets an exactly zero forward
gradient rather than `d·v`: `used_variables` finds them once per input
signature from the jaxpr of the step's JVP.
"""

import jax
import jax.numpy as jnp
import keras
from jax.extend.core import Literal

from keras_fwdgrad import _compat
from keras_fwdgrad import stream
from keras_fwdgrad import tangents


# Primitives whose inner jaxpr takes the equation's inputs and gives its
# outputs one to one (checked on JAX 0.10): their dependences are followed
# inside. Any other equation with an inner jaxpr (`scan`, `while`, `cond`)
# is taken whole.
_CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call")


def _inner_jaxpr(equation):
    if equation.primitive.name not in _CALL_PRIMITIVES:
        return None
    inner = equation.params.get("jaxpr", equation.params.get("call_jaxpr"))
    inner = getattr(inner, "jaxpr", inner)
    if inner is None or len(inner.invars) != len(equation.invars):
        return None
    if len(inner.outvars) != len(equation.outvars):
        return None
    return inner


def _dependences(jaxpr, inputs):
    """For each output of `jaxpr`, the set of input labels it depends on,
    given the label sets `inputs` of its inputs."""
    depends = {var: labels for var, labels in zip(jaxpr.invars, inputs) if labels}

    def sources(variables):
        found = set()
        for var in variables:
            if not isinstance(var, Literal):
                found |= depends.get(var, set())
        return found

    for equation in jaxpr.eqns:
        inner = _inner_jaxpr(equation)
        if inner is not None:
            outputs = _dependences(inner, [sources([var]) for var in equation.invars])
        else:
            outputs = [sources(equation.invars)] * len(equation.outvars)
        for var, labels in zip(equation.outvars, outputs):
            if labels:
                depends[var] = labels
    return [sources([var]) for var in jaxpr.outvars]


def used_variables(fn, values, *args):
    """Which of `values` the output of `fn(values, *args)` depends on.

    Reads the jaxpr of `fn`'s JVP along `values` and follows data
    dependences from the tangent inputs to the tangent output, so a value
    whose tangent is cut (by `jax.lax.stop_gradient`, or by an op JAX
    differentiates as zero, such as `jnp.round`) counts as unused. The
    inner jaxprs of `jit` calls are followed; those of loops and branches
    (`scan`, `while`, `cond`) are taken whole: each of their outputs
    depends on all their inputs, which can only count a value as used.

    Args:
        fn: A function of `values` (a list of arrays) and `args`.
        values: The list of arrays to differentiate by.
        *args: The other arguments of `fn`; arrays or tracers.

    Returns:
        A list of booleans, one per entry of `values`.
    """

    def tangent_output(tangents, values, *args):
        return jax.jvp(lambda v: fn(v, *args), (values,), (tangents,))[1]

    jaxpr = jax.make_jaxpr(tangent_output)(values, values, *args).jaxpr
    inputs = [{i} if i < len(values) else set() for i in range(len(jaxpr.invars))]
    found = set().union(*_dependences(jaxpr, inputs))
    return [i in found for i in range(len(values))]


def _signature(tree):
    leaves, structure = jax.tree.flatten(tree)
    return structure, tuple((tuple(t.shape), str(t.dtype)) for t in leaves)


class JAXTrainer:
    """The backend-specific half of `ForwardGradientModel` on JAX."""

    def _check_backend_arguments(self):
        if self.perturbation != "weights":
            raise ValueError(
                '`perturbation="activations"` is available on the TensorFlow '
                'backend only; on JAX use `perturbation="weights"` or set '
                "`KERAS_BACKEND=tensorflow`. "
                f"Received: perturbation={self.perturbation!r} with backend='jax'"
            )

    def _build_local_heads(self):
        pass

    @property
    def uses_layer_rules(self):
        """`False`: on JAX every step runs `jax.jvp` over the whole model."""
        return False

    def all_reduce_bytes_per_step(self, num_replicas=None):
        """Bytes each replica all-reduces per step: zero on one device (the
        JAX backend has no `tf.distribute`)."""
        if num_replicas not in (None, 1):
            raise ValueError(
                "On the JAX backend `ForwardGradientModel` runs on one device. "
                f"Received: num_replicas={num_replicas!r}"
            )
        return 0

    # -- the estimate -----------------------------------------------------

    def _state_index(self, variable):
        for i, v in enumerate(self.non_trainable_variables):
            if v is variable:
                return i
        raise RuntimeError(f"{variable.path} is not among the model's non-trainable variables.")

    def _estimate(self, state, x, y, sample_weight):
        """The step's forward gradient, statelessly.

        Returns:
            `(loss, y_pred, d, grads, non_trainable_variables,
            metrics_variables)`: the unscaled loss, the predictions, the K
            directional derivatives after `jvp_clip`, the forward gradient
            (one array per trainable variable) and the state after the
            forward pass.
        """
        trainable, non_trainable, _, _ = state
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
        d = d.astype("float32")
        if self.jvp_clip is not None:
            d = jnp.clip(d, -self.jvp_clip, self.jvp_clip)
        grads = [
            jnp.tensordot(d.astype(s.dtype), s, axes=1) / num
            if u
            else jnp.zeros(s.shape[1:], s.dtype)
            for s, u in zip(stacked, used)
        ]
        return loss, y_pred, d, grads, non_trainable, metrics

    def _used_variables(self, loss_fn, trainable, data):
        """`used_variables` of the step's loss, once per input signature
        (an eager step would otherwise trace the model twice)."""
        key = _signature((trainable, data))
        cache = self.__dict__.setdefault("_used_variables_cache", {})
        if key not in cache:
            cache[key] = used_variables(lambda values: loss_fn(values)[0], trainable)
        return cache[key]

    def _current_state(self):
        return (
            [v.value for v in self.trainable_variables],
            [v.value for v in self.non_trainable_variables],
            [v.value for v in self.optimizer.variables] if self.optimizer else [],
            [v.value for v in self.metrics_variables],
        )

    def _prepare(self, x):
        """Builds the model and the optimizer, as `fit` would, so that the
        state can be read."""
        self._ensure_built(x)
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)

    def _forward_gradient(self, x, y, sample_weight):
        self._prepare(x)
        x, y, sample_weight = jax.tree.map(jnp.asarray, (x, y, sample_weight))
        loss, _, _, grads, _, _ = self._estimate(self._current_state(), x, y, sample_weight)
        return loss, grads[: len(self.model.trainable_variables)]

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
        state = self._current_state()
        x, y = jax.tree.map(jnp.asarray, (x, y))
        loss_fn = self._loss_function(state, x, y, None)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state[0])
        return loss, grads[: len(self.model.trainable_variables)]

    def _true_gradient(self, x, y):
        """The gradient of the compiled loss over the wrapped model's
        trainable variables, by `jax.grad` (for diagnostics)."""
        return self._reference_gradient(x, y)[1]

    # -- the training step --------------------------------------------------

    def train_step(self, state, data):
        trainable, non_trainable, optimizer_variables, metrics = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        loss, y_pred, d, grads, new_non_trainable, metrics = self._estimate(
            state, x, y, sample_weight
        )
        finite = jnp.all(jnp.isfinite(d)) & jnp.all(jnp.isfinite(loss))
        with keras.StatelessScope(
            state_mapping=list(zip(self.optimizer.variables, optimizer_variables))
        ):
            # The optimizer divides by its loss scale (mixed precision) in
            # `apply`: it receives the gradient of the scaled loss.
            scale = self.optimizer.scale_loss(jnp.ones((), "float32"))
        grads = [g * jnp.asarray(scale, g.dtype) for g in grads]
        new_trainable, new_optimizer_variables = self.optimizer.stateless_apply(
            optimizer_variables, grads, trainable
        )

        def keep_if_finite(new, old):
            return [jnp.where(finite, n, o) for n, o in zip(new, old)]

        trainable = keep_if_finite(new_trainable, trainable)
        optimizer_variables = keep_if_finite(new_optimizer_variables, optimizer_variables)
        non_trainable = keep_if_finite(new_non_trainable, non_trainable)
        skipped = 1 - finite.astype("int32")
        for counter, increment in ((self.direction_step, 1), (self.skipped_steps, skipped)):
            i = self._state_index(counter)
            non_trainable[i] = non_trainable[i] + jnp.asarray(increment, non_trainable[i].dtype)
        logs, metrics = self._stateless_step_logs(
            metrics, x, y, y_pred, sample_weight, loss, d, skipped
        )
        return logs, (trainable, non_trainable, optimizer_variables, metrics)

    def _stateless_step_logs(self, metrics, x, y, y_pred, sample_weight, loss, d, skipped):
        """The logs of the TensorFlow backend's `_step_logs` (the epoch's
        averages leave out steps whose loss or predictions are not finite),
        computed on the metrics' values `metrics`."""
        mapping = list(zip(self.metrics_variables, metrics))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            leaves = jax.tree.leaves((loss, y_pred))
            measured = jnp.all(jnp.stack([jnp.all(jnp.isfinite(t)) for t in leaves]))
            weight = measured.astype("float32")

            def kept(t):
                return jnp.where(measured, t, jnp.zeros_like(t))

            batch = jax.tree.leaves(x)[0].shape[0]
            _compat.loss_tracker(self).update_state(kept(loss), sample_weight=batch * weight)
            y_pred = jax.tree.map(kept, y_pred)
            if sample_weight is None:
                sample_weight = jnp.ones([batch]) * weight
            else:
                sample_weight = jax.tree.map(lambda w: w.astype("float32") * weight, sample_weight)
            logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
            self._skipped_tracker.update_state(jnp.asarray(skipped, "float32"))
            self._measured_tracker.update_state(weight)
            abs_d = jnp.abs(d)
            finite = jnp.all(jnp.isfinite(abs_d)).astype("float32")
            self._abs_d_tracker.update_state(
                jnp.where(finite > 0, jnp.mean(abs_d), 0.0), sample_weight=finite
            )
            if self._clipped_tracker is not None:
                capped = jnp.mean((abs_d >= self.jvp_clip).astype("float32"))
                self._clipped_tracker.update_state(
                    jnp.where(finite > 0, capped, 0.0), sample_weight=finite
                )
            any_measured = self._measured_tracker.result() > 0
            logs.pop(self._measured_tracker.name, None)
            for tracker in self._diagnostic_trackers():
                logs[tracker.name] = tracker.result()
            logs = {
                k: jnp.where(any_measured, v, jnp.nan)
                if jnp.issubdtype(v.dtype, jnp.floating)
                else v
                for k, v in logs.items()
            }
            logs["skipped_steps"] = self._skipped_tracker.result()
        new_metrics = []
        for variable in self.metrics_variables:
            value = scope.get_current_value(variable)
            new_metrics.append(variable.value if value is None else value)
        return logs, new_metrics

    def test_step(self, state, data):
        logs, state = super().test_step(state, data)
        for tracker in self._training_only_trackers():
            logs.pop(tracker.name, None)
        return logs, state
