"""`ForwardGradientModel`: trains any Keras model with forward gradients."""

import random

import keras

from keras_fwdgrad import arguments
from keras_fwdgrad import backend
from keras_fwdgrad import directions as directions_module
from keras_fwdgrad import options
from keras_fwdgrad import stream

backend.check()
if backend.name() == "jax":
    from keras_fwdgrad.backend.jax.trainer import JAXTrainer as _Trainer
else:
    from keras_fwdgrad.backend.tensorflow.trainer import TensorFlowTrainer as _Trainer


@keras.saving.register_keras_serializable(package="keras_fwdgrad")
class ForwardGradientModel(_Trainer, keras.Model):
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

    A step whose loss or directional derivative is NaN or infinite changes
    no weight, optimizer slot or non-trainable weight; the training logs
    count such steps per epoch in `skipped_steps` (`model.skipped_steps`
    over the model's life), and the epoch's loss and metrics average the
    finite steps only. Directions come from a stateless stream keyed by
    `seed` and a step counter saved with the model, so a reloaded model
    continues the same stream. Behaviour in detail: `docs/behaviour.md`.

    Backends: on TensorFlow forward mode is `tf.autodiff.ForwardAccumulator`
    or the layer rules; on JAX (`KERAS_BACKEND=jax`) it is `jax.jvp` with
    the K directions batched by `jax.vmap`; `perturbation="activations"`
    runs on both. On JAX `layer_rules` and `all_reduce` have no effect
    (`docs/backends.md`).

    Args:
        model: The Keras model (or layer) to train. Its variables are
            trained in place.
        direction: Distribution of the directions `v`: a name from
            `keras_fwdgrad.directions.available()` (`"gaussian"`, the
            paper's `N(0, I)`; `"rademacher"`, random signs;
            `"lowrank_gaussian"` and `"lowrank_rademacher"`, one rank-one
            direction per kernel, the fastest with `layer_rules`) or a
            `keras_fwdgrad.directions.Direction` instance. Defaults to
            `"gaussian"`. With `perturbation="activations"` it picks the
            per-unit tangents: `"gaussian"` (quantized normal) or
            `"rademacher"` (random signs: lower variance, and with one
            local loss per unit each unit's estimate is its exact local
            gradient, since `u² = 1`); the low-rank families have none.
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
            strategy: `"directional_derivatives"` (default; every replica
            draws the same directions and they all-reduce only the K
            derivatives) or `"gradients"` (as backprop). See
            `docs/distributed.md`.
        layer_rules: Bool. If `True` (default) and `model` is a
            `keras.Sequential` or single-output functional model of Keras
            layers, the forward pass runs layer by layer with
            `keras_fwdgrad.layer_rules` (stacked primal and tangent
            products, kernel tangents from the factors of low-rank
            directions). Otherwise `tf.autodiff.ForwardAccumulator`
            differentiates the whole model. Both give the same derivative
            to float rounding (`uses_layer_rules` says which runs).
        perturbation: `"weights"` (default): the papers' estimator above.
            `"activations"`: perturb the pre-activations of every `Dense`
            and `Conv1D/2D/3D` layer with one (quantized) Gaussian tangent per example
            and unit, and form each kernel's estimate as the layer-local
            product of its input with `d_n u_n` (Ren et al., 2023). Every
            other layer with trainable variables (`EinsumDense`,
            `Embedding`, normalization, `MultiHeadAttention`, LoRA-enabled
            layers, your own) gets its output perturbed the same way, and
            its variables' estimate from a reverse pass through that one
            layer with cotangent `d_n u_n`. A `Dense`/convolution layer
            without activation whose output only a `BatchNormalization`
            reads (ResNet's convolution) is not perturbed: the
            normalization's output is, and the layer's estimate takes the
            cotangent that the normalization's reverse pass gives its
            input. Needs a `keras.Sequential` or functional model with one
            output.
        local_losses: With `perturbation="activations"`: `None` (default,
            one loss), `"auto"` (a block ends after each hidden `Dense` and
            each pooling layer; in a model with residual `Add` merges,
            after each merge, or after the normalization or activation
            layers that alone follow it, and after each pooling layer; and
            after each block written as one layer: a layer not of Keras'
            own that holds layers with variables and keeps its input's
            shape, as KerasHub's transformer layers),
            `"layers"` (after every layer with trainable variables but
            the last, and after the activation layers that alone follow
            it; a `Dense`/convolution layer without activation that only
            a `BatchNormalization` reads shares that normalization's
            block; a residual branch's layer, whose output reaches an
            `Add` through activations or dropout only, each called once
            and read by nothing else, after that `Add` and the
            activations that alone follow it, so its head reads the
            residual stream) or the names of the layers that end a
            block. A layer the model calls more than once (a shared
            layer) ends no block. Each block but the last learns only
            from the compiled loss of its own small head (`local_heads`,
            saved with this model but not part of `predict` or `model`);
            each is logged as `local_loss_<i>`.
        orthogonal_directions: Bool. With `perturbation="activations"` and
            `num_directions > 1`, make each example's K tangents of a layer
            orthogonal. Defaults to `False`.
        active_units_only: Bool. With `perturbation="activations"`, keep
            only the tangents of active ReLU units. Defaults to `True`.
        local_loss_groups: Integer (default 1) or `"channels"`. With
            `local_losses`, split each block's output channels into this
            many groups, each with its own local loss.
        local_loss_patches: Integer (default 1) or `"positions"`. With
            `local_losses`, also split each block's output positions into
            this many patches per spatial axis, each with its own loss.
        local_head_units: Integer or `None` (default). With
            `local_losses`, each head first maps every position of its
            block's output through a `Dense(local_head_units,
            activation="relu")` layer (one per head, shared by the
            positions), then averages over positions. Sequence and
            feature-map blocks learn much better from such heads than from
            the average of their raw outputs (`docs/activity.md`).
            The activity options in full: `docs/activity.md`.
        **kwargs: Passed to `keras.Model` (for example `name`).

    Example:

    ```python
    base = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model = ForwardGradientModel(
        base, perturbation="activations", local_losses="auto", local_loss_groups="channels")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=64, epochs=10)
    ```

    Reference:
    - [Baydin et al., 2022. Gradients without Backpropagation](
        https://arxiv.org/abs/2202.08587)
    - [Ren et al., 2023. Scaling Forward Gradient With Local Losses](
        https://arxiv.org/abs/2210.03310)
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
        perturbation="weights",
        local_losses=None,
        orthogonal_directions=False,
        active_units_only=True,
        local_loss_groups=1,
        local_loss_patches=1,
        local_head_units=None,
        **kwargs,
    ):
        backend.check()
        arguments.check_model(model)
        # The forward options are the signature's arguments (`options`).
        given = locals()
        checked = arguments.checked_options({k: given[k] for k in options.names() + ("seed",)})
        super().__init__(**kwargs)
        self.model = model
        self.seed = int(seed) if seed is not None else random.randint(0, 2**31 - 1)
        # One attribute per forward option, named as the argument.
        for name, value in checked.items():
            setattr(self, name, value)
        self.local_heads = []
        # The names and ids of `activity.block_end_layers`.
        self._local_loss_ends = []
        self._local_loss_end_ids = []
        self._local_loss_trackers = []
        self._create_training_state()
        # Filled in by the first step (see `keras_fwdgrad.connectivity`).
        self._connectivity_checked = False
        self._disconnected = ()
        if model.built:
            arguments.check_variables(self.model)
            self._build_local_heads()
            self.built = True

    def build(self, input_shape=None):
        if not self.model.built:
            self.model.build(input_shape)
        if not self.model.variables and input_shape is not None:
            # A subclassed model creates its layers' variables when it is
            # first called, as `keras.Model.fit` does: a symbolic call.
            self.model(arguments.symbolic_inputs(input_shape))
        arguments.check_variables(self.model)
        self._build_local_heads()
        self.built = True

    @property
    def weights(self):
        """The weights of the wrapped model and of the local heads.

        The step counters (`direction_step`, `skipped_steps`) are state of
        the training, as Keras keeps the state of random seeds and the
        optimizer's iterations out of `weights`: they are in `variables`
        and saved with the model, and `get_weights()`/`set_weights()` (as
        `keras.callbacks.EarlyStopping(restore_best_weights=True)` calls
        them) leave them out, so the direction stream never rewinds.
        """
        counters = {id(getattr(self, name, None)) for name in ("direction_step", "skipped_steps")}
        return [w for w in super().weights if id(w) not in counters]

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def _ensure_built(self, x):
        if not (self.built and self.model.built):
            # Keras builds a model lazily on its first call; the directions
            # need the variables before the forward pass.
            self.build(keras.tree.map_structure(lambda t: tuple(t.shape), x))
        arguments.check_variables(self.model)

    def current_directions(self):
        """The K directions of the current step, as dense tensors.

        Returns:
            A list of K lists, each with one tensor per trainable variable
            (aligned with `trainable_variables`), that the next training
            step (or `forward_gradient()`) uses.

        Raises:
            ValueError: with `perturbation="activations"`, which perturbs
                layer outputs with tangents drawn during the pass, not the
                weights.
        """
        if self.perturbation == "activations":
            raise ValueError(
                '`current_directions()` gives weight directions; with `perturbation="activations"` '
                "the step perturbs layer outputs instead, with tangents drawn during the pass "
                "(docs/activity.md). Received: perturbation='activations'"
            )
        return [
            [directions_module.to_dense(t) for t in stream.sample(self, self.direction_step, k)]
            for k in range(self.num_directions)
        ]

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
        if y is None and self.loss is not None:
            raise ValueError(
                "`forward_gradient()` needs the targets `y` for the compiled loss "
                f"{self.loss!r}. Received: y=None"
            )
        self._ensure_built(x)
        estimate = self._forward_gradient(x, y, sample_weight)
        return estimate.loss, estimate.grads

    def export(self, filepath, format="tf_saved_model", **kwargs):
        """Exports the wrapped model for inference (see `keras.Model.export`).

        Training-only state (the direction stream's counters, the optimizer,
        local heads) is left out: what is served is `model.model`.

        Args:
            filepath: Where to write the export.
            format: Passed to `keras.Model.export`. Defaults to
                `"tf_saved_model"`.
            **kwargs: Passed to `keras.Model.export`.
        """
        return self.model.export(filepath, format=format, **kwargs)

    def summary(self, *args, **kwargs):
        """Prints the wrapped model's summary (`keras.Model.summary`); the
        training-only step counters and `local_heads` are not counted.

        Args:
            *args: Passed to `keras.Model.summary`.
            **kwargs: Passed to `keras.Model.summary`.
        """
        return self.model.summary(*args, **kwargs)

    def save(self, filepath, *args, **kwargs):
        if str(filepath).endswith((".h5", ".hdf5")):
            raise ValueError(
                "A `ForwardGradientModel` cannot be saved in the legacy HDF5 "
                "format: it would not load back. Save it as a `.keras` file, or "
                "save the wrapped model alone with `model.model.save(...)`. "
                f"Received: filepath={str(filepath)!r}"
            )
        return super().save(filepath, *args, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in options.names()})
        config.update(
            model=keras.saving.serialize_keras_object(self.model),
            direction=keras.saving.serialize_keras_object(self.direction),
            seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("model", "direction"):
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects
            )
        return cls(**config)
