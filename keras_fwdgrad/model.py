"""`ForwardGradientModel`: trains any Keras model with forward gradients."""

import contextlib
import numbers
import random

import keras
import tensorflow as tf

from keras_fwdgrad import _compat
from keras_fwdgrad import connectivity
from keras_fwdgrad import directions as directions_module
from keras_fwdgrad import layer_rules as layer_rules_module
from keras_fwdgrad.forward_gradient import clip_directional_derivative
from keras_fwdgrad.forward_gradient import forward_gradient
from keras_fwdgrad.forward_gradient import jvp


ALL_REDUCE_MODES = ("directional_derivatives", "gradients")


def _is_multi_worker(strategy):
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.extended._in_multi_worker_mode()


def _num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def _skip_gradient_all_reduce(optimizer):
    """Makes `optimizer.apply` use the gradients as given, without summing
    them over replicas (they are already identical on every replica)."""
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        if opt is not None and hasattr(opt, "_all_reduce_sum_gradients"):
            opt._all_reduce_sum_gradients = list


def _check_backend():
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            "`ForwardGradientModel` requires the TensorFlow backend, since "
            "it uses `tf.autodiff.ForwardAccumulator`. Set the environment "
            "variable `KERAS_BACKEND=tensorflow` before importing Keras. "
            f"Received: backend={backend!r}"
        )


@keras.saving.register_keras_serializable(package="keras_fwdgrad")
class ForwardGradientModel(keras.Model):
    """Wraps a Keras model so that `fit()` trains it with forward gradients.

    Each training step samples a random direction `v` over all trainable
    variables, runs the forward pass once under forward-mode automatic
    differentiation to get the loss `f` and its directional derivative
    `d = ∇f·v`, and hands the forward gradient `g = d·v` to the compiled
    optimizer in place of the gradient. No backward pass is run. Because
    `E[v] = 0` and `E[v vᵀ] = I`, `E[g] = ∇f`: `g` is an unbiased estimate
    of the gradient.

    Everything else is ordinary Keras: the loss goes through
    `compute_loss` (compiled loss, sample weights, regularization losses),
    metrics through `compute_metrics`, and the update through the stock
    optimizer's `apply`, so `clipnorm`, `global_clipnorm`, `clipvalue`,
    learning-rate schedules, momentum and Adam work as usual. `evaluate()`
    and `predict()` behave as for the wrapped model.

    The papers' learning-rate decay `η_i = η0·e^(−ik)` with `k = 1e-4` is
    `keras.optimizers.schedules.ExponentialDecay(η0, decay_steps=1,
    decay_rate=math.exp(-1e-4))`.

    A step whose loss or directional derivative is NaN or infinite changes
    no weight and no optimizer state (non-trainable weights such as
    BatchNormalization statistics are restored too). Such steps are counted
    in the `skipped_steps` entry of the training logs. The `loss` log still
    shows the NaN, so `keras.callbacks.TerminateOnNaN` stops training if
    you ask it to.

    Directions come from a stateless random stream keyed by `seed` and a
    step counter saved with the model: the same seed replays the same run,
    and a saved and reloaded model continues the same stream.

    Args:
        model: The Keras model (or layer) to train. Its variables are
            trained in place.
        direction: Distribution of the directions `v`: a name from
            `keras_fwdgrad.directions.available()` (`"gaussian"`, the
            paper's `N(0, I)`; `"rademacher"`, random signs;
            `"lowrank_gaussian"` and `"lowrank_rademacher"`, one rank-one
            direction per kernel, the fastest with `layer_rules`) or a
            `keras_fwdgrad.directions.Direction` instance. Defaults to
            `"gaussian"`.
        num_directions: Integer, number of directions averaged per step.
            With the layer rules and a model of layers that all have a
            rule, the K directions share one pass (the primal is computed
            once, and each kernel product takes the K tangents at once);
            otherwise each costs one forward pass. Defaults to `1`.
        jvp_clip: Positive float. If given, each directional derivative is
            clamped to `[-jvp_clip, jvp_clip]` before forming `g` (the
            second paper caps it at 1). Defaults to `None` (no clamp).
        seed: Integer seed of the direction stream. Defaults to `None`,
            which draws one at construction time (it is then saved in the
            config, so a reloaded model continues the same stream).
        all_reduce: What replicas exchange under a `tf.distribute`
            strategy. `"directional_derivatives"` (default): every replica
            draws the same directions, so they all-reduce only the K
            directional derivatives (K floats per step) and each applies
            the identical update without the optimizer's gradient
            all-reduce. `"gradients"`: each replica forms its local forward
            gradient and the optimizer all-reduces it as for backprop (for
            comparison; `jvp_clip` then clips each replica's derivative).
            Without a strategy both are the same.
        layer_rules: Bool. If `True` (default) and `model` is a
            `keras.Sequential` or single-output functional model of Keras
            layers, the forward pass runs layer by layer with `keras_fwdgrad.layer_rules`: stacked primal and
            tangent products, and kernel tangents computed from the factors
            of structured directions (`"lowrank_gaussian"`,
            `"lowrank_rademacher"`). Otherwise, or if `False`,
            `tf.autodiff.ForwardAccumulator` differentiates the whole
            model. Both give the same directional derivative up to float
            rounding.
        **kwargs: Passed to `keras.Model` (for example `name`).

    Example:

    ```python
    import math
    import keras
    from keras_fwdgrad import ForwardGradientModel

    base = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(1024, activation="relu"),
        keras.layers.Dense(10),
    ])
    model = ForwardGradientModel(base, direction="gaussian", seed=0)
    lr = keras.optimizers.schedules.ExponentialDecay(
        2e-4, decay_steps=1, decay_rate=math.exp(-1e-4))
    model.compile(
        optimizer=keras.optimizers.SGD(lr, momentum=0.9, nesterov=True,
                                       clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=True,
    )
    model.fit(x_train, y_train, batch_size=64, epochs=5)
    ```

    Reference:
    - [Baydin et al., 2022. Gradients without Backpropagation](
        https://arxiv.org/abs/2202.08587)
    - Rike and Førland. A comparison of backpropagation and forward
        gradients for deep learning (EPFL).
    """

    def __init__(
        self,
        model,
        direction="gaussian",
        num_directions=1,
        jvp_clip=None,
        seed=None,
        all_reduce="directional_derivatives",
        layer_rules=True,
        **kwargs,
    ):
        _check_backend()
        if all_reduce not in ALL_REDUCE_MODES:
            raise ValueError(
                f"`all_reduce` must be one of {ALL_REDUCE_MODES}. "
                f"Received: all_reduce={all_reduce!r}"
            )
        if not isinstance(model, keras.layers.Layer):
            raise TypeError(
                "`model` must be a Keras model or layer. "
                f"Received: model={model!r} of type {type(model)}"
            )
        if (
            isinstance(num_directions, bool)
            or not isinstance(num_directions, numbers.Integral)
            or num_directions < 1
        ):
            raise ValueError(
                "`num_directions` must be a positive integer. "
                f"Received: num_directions={num_directions!r}"
            )
        if jvp_clip is not None:
            if isinstance(jvp_clip, bool) or not isinstance(
                jvp_clip, numbers.Real
            ):
                raise TypeError(
                    "`jvp_clip` must be a positive number or `None`. "
                    f"Received: jvp_clip={jvp_clip!r}"
                )
            if not jvp_clip > 0 or jvp_clip == float("inf"):
                raise ValueError(
                    "`jvp_clip` must be a positive finite number or `None`. "
                    f"Received: jvp_clip={jvp_clip!r}"
                )
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
        ):
            raise TypeError(
                f"`seed` must be an integer or `None`. Received: seed={seed!r}"
            )
        if not isinstance(layer_rules, bool):
            raise TypeError(
                "`layer_rules` must be a bool. "
                f"Received: layer_rules={layer_rules!r}"
            )
        direction = directions_module.get(direction)
        super().__init__(**kwargs)
        self.model = model
        self.direction = direction
        self.num_directions = int(num_directions)
        self.jvp_clip = None if jvp_clip is None else float(jvp_clip)
        self.seed = int(seed) if seed is not None else random.randint(0, 2**31 - 1)
        self.all_reduce = all_reduce
        self.layer_rules = layer_rules
        # The step counter keys the direction stream; it is saved with the
        # model so a reloaded model continues the same stream.
        self.direction_step = self._counter("direction_step")
        self.skipped_steps = self._counter("skipped_steps")
        self._connectivity_checked = False
        self._disconnected = ()
        if model.built:
            self._check_trainable_variables()
            self.built = True

    def _counter(self, name):
        return self.add_weight(
            name=name,
            shape=(),
            dtype="int64",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
        )

    def build(self, input_shape=None):
        if not self.model.built:
            self.model.build(input_shape)
        if not self.model.variables and input_shape is not None:
            # A subclassed model creates its layers' variables when it is
            # first called, as `keras.Model.fit` does: a symbolic call.
            self.model(
                tree_map_shapes(
                    lambda shape: keras.KerasTensor(shape), input_shape
                )
            )
        self._check_trainable_variables()
        self.built = True

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def _check_trainable_variables(self):
        variables = self.model.trainable_variables
        if not variables:
            raise ValueError(
                "`model` has no trainable variables, so there is nothing to "
                f"train. Received: model={self.model.name!r}"
            )
        for v in variables:
            if not tf.as_dtype(v.dtype).is_floating:
                raise TypeError(
                    "Every trainable variable of `model` must have a floating "
                    f"dtype to be trained with forward gradients. Received: "
                    f"variable {v.path!r} with dtype={v.dtype}"
                )

    def _ensure_built(self, x):
        if not (self.built and self.model.built):
            # Keras builds a model lazily on its first call; the directions
            # need the variables before the forward pass.
            self.build(tf.nest.map_structure(lambda t: tuple(t.shape), x))
        self._check_trainable_variables()

    def _directions(self, variables, k, structured=False):
        """Samples direction `k` of the current step (with `Factored` or
        `PackedSigns` components where the family has them, if
        `structured`)."""
        seed = tf.stack(
            [
                tf.constant(self.seed, dtype="int64"),
                tf.convert_to_tensor(self.direction_step),
            ]
        )
        if self.num_directions > 1:
            seed = tf.random.experimental.stateless_fold_in(seed, k)
        shapes = [tuple(v.shape) for v in variables]
        dtype = variables[0].dtype
        if structured:
            v = self.direction.sample_structured(shapes, seed, dtype=dtype)
        else:
            v = self.direction.sample(shapes, seed, dtype=dtype)
        return [
            t if t.dtype == var.dtype else t.cast(var.dtype)
            if isinstance(t, (directions_module.Factored, directions_module.PackedSigns))
            else tf.cast(t, var.dtype)
            for t, var in zip(v, variables)
        ]

    def _check_accumulator_is_exact(self):
        """Raises where TensorFlow's forward mode over the whole model would
        be silently wrong (see `layer_rules.inexact_reason`)."""
        graph = not tf.executing_eagerly()
        for layer in _compat.all_layers(self.model):
            reason = layer_rules_module.inexact_reason(layer, graph)
            if reason is None:
                continue
            if layer_rules_module.supports(self.model):
                fix = "Use `layer_rules=True` (the default), which computes it exactly"
            else:
                fix = (
                    "Compile with `run_eagerly=True` (or `jit_compile=False` "
                    "for max-pooling)"
                )
            raise ValueError(
                f"Cannot compute an exact forward-mode derivative of layer "
                f"{layer.name!r} ({type(layer).__name__}): {reason}. {fix}."
            )

    def _uses_layer_rules(self):
        return self.layer_rules and layer_rules_module.supports(self.model)

    def _rules_pass(self, x, y, sample_weight, variables, v):
        """One forward pass with `keras_fwdgrad.layer_rules`.

        Returns:
            `(y_pred, loss, d)`: the predictions, the loss and its
            directional derivative (before any loss scaling).
        """
        y_pred, losses, ds = self._rules_pass_many(x, y, sample_weight, variables, [v])
        return y_pred, losses[0], ds[0]

    def _rules_pass_many(self, x, y, sample_weight, variables, vs):
        """One forward pass with `keras_fwdgrad.layer_rules` carrying the
        K directions `vs` at once.

        Returns:
            `(y_pred, losses, ds)`: the predictions, and the loss and its
            directional derivative for each direction.

        Raises:
            `layer_rules.NeedsSeparatePasses` if K > 1 and a layer has no
            rule for several tangents.
        """
        k = len(vs)
        tangents = {
            id(var): ts[0] if k == 1 else tuple(ts)
            for var, *ts in zip(variables, *vs)
        }
        def standardize(t):
            t = tf.convert_to_tensor(t)
            if t.dtype.is_floating and t.dtype != self.model.compute_dtype:
                # As `Layer.__call__` casts floating inputs.
                t = tf.cast(t, self.model.compute_dtype)
            return t

        x = tf.nest.map_structure(standardize, x)
        # Losses from `add_loss` of the previous call would be stale.
        self._clear_losses()
        y_pred, y_dot = layer_rules_module.dual_call(
            self.model,
            x,
            None,
            lambda var: tangents.get(id(var)),
            training=True,
            num_tangents=k,
        )
        if y_dot is None:
            y_dot = tf.zeros(
                tf.concat([[k * tf.shape(y_pred)[0]], tf.shape(y_pred)[1:]], 0),
                y_pred.dtype,
            )
        batch = tf.shape(y_pred)[0]
        # A softmax or sigmoid output whose logits Keras' cross-entropy reads.
        logits = layer_rules_module.logits_tangent(y_pred)
        losses, ds = [], []
        for i, v in enumerate(vs):
            block = slice(i * batch, (i + 1) * batch)
            primals, duals = [y_pred], [y_dot[block]]
            if logits is not None and logits[1] is not None:
                primals.append(logits[0])
                duals.append(logits[1][block])
            for var, t in zip(variables, v):
                # Weight regularizers read the variables in `compute_loss`.
                if getattr(var, "regularizer", None) is not None:
                    primals.append(var.value)
                    duals.append(directions_module.to_dense(t))
            with tf.autodiff.ForwardAccumulator(primals, duals) as acc:
                loss = self.compute_loss(
                    x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                    training=True,
                )
            losses.append(loss)
            ds.append(
                acc.jvp(loss, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            )
        return y_pred, losses, ds

    def _check_connectivity(self, x, y, sample_weight):
        """Once per model: raises if an op without a derivative cuts a
        trainable variable from the loss (see `keras_fwdgrad.connectivity`).
        Under a strategy with several replicas the check is skipped."""
        if self._connectivity_checked or _num_replicas() > 1:
            return

        def loss_fn(x, y, sample_weight):
            y_pred = self.model(x, training=True)
            return self.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                training=True,
            )

        disconnected = connectivity.check_connected(
            loss_fn,
            self.trainable_variables,
            (x, y, sample_weight),
            layer_names=[layer.name for layer in _compat.all_layers(self.model)],
        )
        # Variables the loss does not use get a zero gradient, as with
        # backprop, instead of the zero-mean noise `d·v`.
        self._disconnected = tuple(
            id(v) for v, cut in zip(self.trainable_variables, disconnected) if cut
        )
        self._connectivity_checked = True

    def _estimate(self, x, y, sample_weight, xla=False):
        self._ensure_built(x)
        self._check_connectivity(x, y, sample_weight)
        with _recurrences_unrolled(self.model):
            try:
                return self._estimate_unrolled(x, y, sample_weight, xla)
            except ValueError as e:
                if "Cannot unroll a RNN" not in str(e):
                    raise
                raise ValueError(
                    "In a `tf.function` (graph or XLA), `ForwardGradientModel` "
                    "unrolls recurrent layers, since TensorFlow cannot "
                    "differentiate their loop in forward mode; that needs a "
                    "static sequence length. Give the model's `keras.Input` a "
                    "fixed time dimension, or compile with `run_eagerly=True`. "
                    f"Original error: {e}"
                ) from e

    def _estimate_unrolled(self, x, y, sample_weight, xla=False):
        """Runs the K forward-mode passes of one step.

        Args:
            xla: Whether the step is XLA-compiled. Packed sign directions
                are kept packed only then: XLA fuses each unpacking into
                its consumer, elsewhere every unpacking is a full-size op,
                so they are unpacked once.

        Returns:
            `(loss, y_pred, d, grads)`: the loss (before any loss scaling by
            the optimizer, averaged over the K passes), the predictions,
            the `[K]` directional derivatives after clipping, and the
            forward gradient, one tensor per trainable variable.
        """
        variables = self.trainable_variables
        state = self.model.non_trainable_variables
        if self.num_directions > 1 and state:
            # Every direction must differentiate the same function: the
            # later passes start from the same BatchNormalization statistics
            # and dropout seed state as the first.
            saved_state = [tf.identity(v.value) for v in state]

        def draw(k):
            v = self._directions(variables, k, structured=True)
            if xla:
                return v
            return [
                directions_module.to_dense(t)
                if isinstance(t, directions_module.PackedSigns) else t
                for t in v
            ]

        losses, ds, vs = [], [], []
        y_pred = None
        rules = self._uses_layer_rules()
        if not rules:
            self._check_accumulator_is_exact()
        if (
            rules
            and self.num_directions > 1
            and layer_rules_module.supports_batched_tangents(self.model)
        ):
            # All K directions in one pass: the primal runs once.
            vs = [draw(k) for k in range(self.num_directions)]
            try:
                y_pred, losses, ds = self._rules_pass_many(
                    x, y, sample_weight, variables, vs
                )
            except layer_rules_module.NeedsSeparatePasses:
                vs = []
        for k in range(0 if ds else self.num_directions):
            if k > 0 and state:
                for var, value in zip(state, saved_state):
                    var.assign(value)
            v = draw(k)
            if rules:
                y_pred, loss, d = self._rules_pass(x, y, sample_weight, variables, v)
                losses.append(loss)
                ds.append(d)
                vs.append(v)
                continue

            def loss_fn():
                nonlocal y_pred
                y_pred = self(x, training=True)
                loss = self.compute_loss(
                    x=x,
                    y=y,
                    y_pred=y_pred,
                    sample_weight=sample_weight,
                    training=True,
                )
                losses.append(loss)
                return loss

            dense = [directions_module.to_dense(t) for t in v]
            _, d = jvp(loss_fn, variables, dense)
            ds.append(d)
            vs.append(v)
        loss = losses[0] if len(losses) == 1 else tf.add_n(losses) / len(losses)
        d = tf.stack(ds)
        if self._reduces_directional_derivatives():
            # Each replica's loss is already divided by the number of
            # replicas, so the sum of the local derivatives is the
            # derivative of the mean loss over the global batch. A
            # non-finite local loss poisons the sum, so every replica skips.
            d = tf.where(tf.reduce_all(tf.math.is_finite(loss)), d, float("nan"))
            d = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, d
            )
        d = clip_directional_derivative(d, self.jvp_clip)
        grads = forward_gradient(tf.unstack(d), vs)
        grads = [
            tf.zeros_like(g) if id(var) in self._disconnected else g
            for g, var in zip(grads, variables)
        ]
        return loss, y_pred, d, grads

    def _scaled_for_optimizer(self, grads):
        """Multiplies the gradient by the optimizer's loss scale.

        The directional derivative is that of the loss itself, so that
        `jvp_clip`, the NaN guard and `forward_gradient()` see true values.
        An optimizer that scales the loss (`LossScaleOptimizer` under the
        `mixed_float16` policy, or `loss_scale_factor`) divides what it
        receives by that scale in `apply`, so it receives the gradient of
        the scaled loss, as from Keras' own trainer.
        """
        one = tf.constant(1.0, "float32")
        scale = self.optimizer.scale_loss(one)
        if scale is one:
            return grads
        return [g * tf.cast(scale, g.dtype) for g in grads]

    def _reduces_directional_derivatives(self):
        return (
            self.all_reduce == "directional_derivatives"
            and _num_replicas() > 1
            and tf.distribute.get_replica_context() is not None
        )

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
        if num_replicas <= 1:
            return 0
        itemsize = tf.as_dtype(self.trainable_variables[0].dtype).size
        if self.all_reduce == "directional_derivatives":
            return self.num_directions * itemsize
        params = sum(int(tf.size(v)) for v in self.trainable_variables)
        return params * itemsize + 4


    def forward_gradient(self, x, y=None, sample_weight=None):
        """Computes one forward-gradient estimate without applying it.

        Uses the model's direction stream at its current step (the counter
        does not advance) and its compiled loss.

        Args:
            x: Input data.
            y: Target data.
            sample_weight: Optional sample weights.

        Returns:
            A tuple `(loss, grads)`: the loss and the forward gradient, a
            list of tensors aligned with `model.trainable_variables`.

        Example:

        ```python
        loss, grads = model.forward_gradient(x_batch, y_batch)
        ```
        """
        if not self.compiled:
            raise ValueError(
                "You must call `compile(optimizer=..., loss=...)` before "
                "calling `forward_gradient()`."
            )
        loss, _, _, grads = self._estimate(x, y, sample_weight)
        return loss, grads

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self._ensure_built(x)
        variables = self.trainable_variables
        weights = self.model.non_trainable_weights
        # Snapshot of non-trainable weights (e.g. BatchNormalization
        # statistics) so a non-finite step can be undone completely.
        saved_weights = [tf.identity(w.value) for w in weights]

        loss, y_pred, d, grads = self._estimate(
            x, y, sample_weight, xla=bool(self.jit_compile) and not self.run_eagerly
        )
        finite = tf.reduce_all(tf.math.is_finite(d))
        if not self._reduces_directional_derivatives():
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(loss)))
        if not self.optimizer.built:
            self.optimizer.build(variables)
        grads = self._scaled_for_optimizer(grads)
        if self.all_reduce == "directional_derivatives":
            # Idempotent, so safe from concurrent replica threads.
            _skip_gradient_all_reduce(self.optimizer)

        if tf.__internal__.distribute.strategy_supports_no_merge_call():

            def apply():
                self.optimizer.apply(grads, variables)
                return tf.constant(0, dtype="int64")

            def skip():
                for w, value in zip(weights, saved_weights):
                    w.assign(value)
                return tf.constant(1, dtype="int64")

            skipped = tf.cond(finite, apply, skip)
        else:
            skipped = self._apply_across_replicas(grads, variables, finite)
        self.skipped_steps.assign_add(skipped)
        self.direction_step.assign_add(1)

        self._loss_tracker.update_state(
            _unscale_loss_for_distribution(loss),
            sample_weight=tf.shape(tf.nest.flatten(x)[0])[0],
        )
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        logs["skipped_steps"] = tf.convert_to_tensor(self.skipped_steps)
        return self._multi_worker_logs(logs)

    def test_step(self, data):
        return self._multi_worker_logs(super().test_step(data))

    def _multi_worker_logs(self, logs):
        # Keras (3.15) averages the logs of a `MultiWorkerMirroredStrategy`
        # step with `strategy.reduce("MEAN", value, axis=0)`, which fails on
        # scalars; as `[1]` tensors they reduce to the same scalar mean.
        if not _is_multi_worker(self.distribute_strategy):
            return logs
        return {k: tf.reshape(v, [1]) for k, v in logs.items()}

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a strategy, Keras (3.15) builds the model from the first
        # input batch, which it first averages over replicas with
        # `strategy.reduce("MEAN", ...)`; under `MultiWorkerMirroredStrategy`
        # that reduce fails on the distributed batch. The build needs only
        # the batch's shapes and dtypes, which one replica's batch has.
        strategy = self._distribute_strategy
        if strategy is None or iterator is None:
            return super()._maybe_symbolic_build(
                iterator=iterator, data_batch=data_batch
            )
        for _, _, it in iterator:
            data_batch = next(it)
            break
        data_batch = tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0]
            if isinstance(v, tf.distribute.DistributedValues)
            else v,
            data_batch,
        )
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def _apply_across_replicas(self, grads, variables, finite):
        """The guarded update under a strategy that synchronizes through
        `merge_call` (e.g. `MirroredStrategy` on CPUs): a `cond` whose
        branch synchronizes replicas must run in cross-replica context, as
        Keras' `LossScaleOptimizer` does it."""
        context = tf.distribute.get_replica_context()
        if self.all_reduce == "gradients":
            # Replicas must agree on skipping: one flag per replica.
            bad = context.all_reduce(
                tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, "float32")
            )
            finite = tf.equal(bad, 0.0)

        def cross_replica(distribution, grads, finite):
            agreed = distribution.experimental_local_results(finite)[0]

            def apply():
                distribution.extended.call_for_each_replica(
                    self.optimizer.apply, args=(grads, variables)
                )

            tf.cond(agreed, apply, lambda: None)

        context.merge_call(cross_replica, args=(grads, finite))
        # Under a strategy, a skipped step leaves weights and optimizer
        # state untouched; BatchNormalization statistics keep that step's
        # update.
        return 1 - tf.cast(finite, "int64")

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "direction": keras.saving.serialize_keras_object(
                    self.direction
                ),
                "num_directions": self.num_directions,
                "jvp_clip": self.jvp_clip,
                "seed": self.seed,
                "all_reduce": self.all_reduce,
                "layer_rules": self.layer_rules,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        config["direction"] = keras.saving.deserialize_keras_object(
            config["direction"], custom_objects=custom_objects
        )
        return cls(**config)


@contextlib.contextmanager
def _recurrences_unrolled(model):
    """Unrolls `model`'s recurrent layers while a graph is traced.

    TensorFlow (2.21) cannot differentiate the `while_loop` of a recurrent
    layer in forward mode inside a `tf.function` (its loop state is a
    `variant` tensor); an unrolled loop is a chain of ordinary ops. Eagerly
    the loop runs step by step and needs no unrolling.
    """
    if tf.executing_eagerly():
        yield
        return
    rolled = [
        layer
        for layer in _compat.all_layers(model)
        if isinstance(layer, keras.layers.RNN) and not layer.unroll
    ]
    for layer in rolled:
        layer.unroll = True
    try:
        yield
    finally:
        for layer in rolled:
            layer.unroll = False


def tree_map_shapes(fn, shapes):
    """Maps `fn` over the shapes (tuples of ints or `None`) of a nested
    structure of shapes."""
    if isinstance(shapes, dict):
        return {k: tree_map_shapes(fn, v) for k, v in shapes.items()}
    if isinstance(shapes, (list, tuple)) and not all(
        d is None or isinstance(d, int) for d in shapes
    ):
        return type(shapes)(tree_map_shapes(fn, v) for v in shapes)
    return fn(tuple(shapes))


def _unscale_loss_for_distribution(loss):
    """Undoes Keras' division of the loss by the number of replicas."""
    num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if num_replicas > 1:
        loss = loss * tf.cast(num_replicas, loss.dtype)
    return loss
