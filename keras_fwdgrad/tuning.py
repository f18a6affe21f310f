"""Separate learning-rate searches for forward gradient and backprop.

The second paper's main finding is that forward gradient and
backpropagation need their own hyperparameter searches: at one shared
learning rate the comparison is unfair to one of them. This module makes
that the easy path with KerasTuner (install with
`pip install "keras-fwdgrad[tuning]"`).

- `LearningRateHyperModel` searches the columns of the paper's Table I:
  the learning rate (log scale), the decay k of η_i = η0·e^(−ik), and,
  where the optimizer has them, momentum (Nesterov) or β1 and β2 (Adam).
  Every forward option of `ForwardGradientModel`
  (`keras_fwdgrad.options.names()`: direction family, number of
  directions, JVP cap, perturbation, local losses, ...) and the
  optimizer's clipping are fixed by a value or searched by a tuple of
  values.
- `make_tuner` builds a grid (the paper's choice), random or Bayesian
  tuner on `val_loss` (`keras_fwdgrad.tuners`). Searches resume from their
  directory, and only a search with the same settings resumes: the
  default folder name carries a digest of the search space, and a search
  refuses (`ValueError`) to resume one made with another model, search
  space or budget. The number of trials is printed before a search starts.

The papers' Table I (one search per gradient type and optimizer, the best
retrained and tested) is `keras_fwdgrad.research.searches`.

Example:

```python
hypermodel = keras_fwdgrad.tuning.LearningRateHyperModel(
    keras_fwdgrad.research.architectures.mlp, gradient="forward", optimizer="sgd")
tuner = keras_fwdgrad.tuning.make_tuner(hypermodel, directory="tuning")
tuner.search(train, validation_data=val, epochs=5)
best = tuner.get_best_models(1)[0]
```
"""

import itertools
import math

import keras

from keras_fwdgrad import arguments
from keras_fwdgrad import optimizers
from keras_fwdgrad import options
from keras_fwdgrad import tuners
from keras_fwdgrad.model import ForwardGradientModel

# `tuners` raises an `ImportError` saying what to install without KerasTuner.
import keras_tuner  # noqa: E402

GRADIENTS = ("forward", "backprop")
TUNERS = tuple(tuners.TUNERS)


def _values(name, values):
    values = tuple(values)
    if not values:
        raise ValueError(f"`{name}` must list at least one value. Received: {name}={values!r}")
    return values


def _choice(hp, name, values):
    if len(values) == 1:
        return hp.Fixed(name, values[0])
    return hp.Choice(name, list(values))


# The optimizer's clipping options, which backprop searches take too, with
# their defaults (no clipping). The forward options are
# `keras_fwdgrad.options`.
OPTIMIZER_OPTIONS = {"clipnorm": None, "global_clipnorm": None}


def _label(value):
    """A trial's label of an option value (KerasTuner choices are scalars
    of one type)."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _option(hp, name, candidates):
    """Declares option `name` (a tuple of candidate values) on `hp` and
    returns the chosen value."""
    if len(candidates) == 1:
        return candidates[0]
    kinds = {type(c) for c in candidates}
    if len(kinds) == 1 and kinds <= {int, float, str}:
        return hp.Choice(name, list(candidates))
    labels = {_label(c): c for c in candidates}
    return labels[hp.Choice(name, list(labels))]


def _candidates(name, value):
    """An option's candidate values: a tuple is searched, anything else
    (a list of layer names included) is one value."""
    if isinstance(value, tuple):
        candidates = _values(name, value)
        if len({_label(c) for c in candidates}) != len(candidates):
            raise ValueError(f"`{name}` lists a value twice. Received: {name}={value!r}")
        return candidates
    return (value,)


class LearningRateHyperModel(keras_tuner.HyperModel):
    """Searches the optimizer settings of one gradient type (Table I).

    Args:
        build_model: Callable returning a fresh Keras model (logits out).
        gradient: `"forward"` (wrapped in `ForwardGradientModel`) or
            `"backprop"`.
        optimizer: `"sgd"`, `"nesterov"` or `"adam"`.
        loss: Loss for `compile()`. Defaults to sparse categorical
            cross-entropy on logits.
        metrics: Metrics for `compile()`. Defaults to `["accuracy"]`.
        learning_rate_range: `(min, max)` of the learning rate, searched on
            a log scale. Defaults to `(1e-5, 1e-1)`.
        learning_rate_step: Factor between grid points of the learning
            rate. Defaults to `10` (1e-5, 1e-4, ..., 1e-1).
        decay_values: Values of the decay k. Defaults to `(0.0, 1e-5,
            1e-4)`. One value fixes it.
        momentum_values: Momentum values of `"nesterov"`. Defaults to
            `(0.5, 0.9)`.
        beta_1_values: β1 values of `"adam"`. Defaults to `(0.9, 0.99)`.
        beta_2_values: β2 values of `"adam"`. Defaults to `(0.999, 0.9999)`.
        clipnorm: Optional clipping of each variable's gradient to this
            norm (Keras' `clipnorm`).
        global_clipnorm: Optional clipping of all gradients together to
            this norm (Keras' `global_clipnorm`; what the second paper's
            PyTorch code does).
        jit_compile: Whether to XLA-compile the steps. Defaults to `True`.
        seed: Seed of the initial weights and of the directions, the same
            for every trial. Defaults to `0`.
        name: Optional name of the hypermodel.
        **forward_options: Any forward option of `ForwardGradientModel`
            (`keras_fwdgrad.options.names()`: `direction`,
            `num_directions`, `jvp_clip`, `perturbation`, `local_losses`,
            `local_loss_groups`, `orthogonal_directions`, ...). Those not
            given take the model's defaults.

    `clipnorm`, `global_clipnorm` and each forward option are one value or,
    to search them, a **tuple** of values (a list, such as layer names for
    `local_losses`, is one value): `num_directions=(1, 4, 16)`,
    `jvp_clip=(None, 1.0)`, `local_losses=(None, "auto")`. The forward
    options apply to the forward gradient only; a backprop search with one
    of them set raises a `ValueError`.

    Example:

    ```python
    hypermodel = LearningRateHyperModel(
        build_model, gradient="forward", optimizer="adam",
        direction=("gaussian", "lowrank_rademacher"), num_directions=(1, 4))
    hypermodel.grid_size()  # 5 learning rates × 3 decays × 2 × 2 × 2 × 2
    ```
    """

    def __init__(
        self,
        build_model,
        gradient="forward",
        optimizer="sgd",
        loss=None,
        metrics=("accuracy",),
        learning_rate_range=(1e-5, 1e-1),
        learning_rate_step=10.0,
        decay_values=(0.0, 1e-5, 1e-4),
        momentum_values=(0.5, 0.9),
        beta_1_values=(0.9, 0.99),
        beta_2_values=(0.999, 0.9999),
        clipnorm=None,
        global_clipnorm=None,
        jit_compile=True,
        seed=0,
        name=None,
        **forward_options,
    ):
        super().__init__(name=name or f"{gradient}_{optimizer}")
        if isinstance(build_model, keras.Model) or not callable(build_model):
            raise TypeError(
                "`build_model` must be a function that returns a fresh Keras "
                "model (a new one per call), not a model. "
                f"Received: build_model={build_model!r}"
            )
        if gradient not in GRADIENTS:
            raise ValueError(
                f"`gradient` must be one of {GRADIENTS}. Received: gradient={gradient!r}"
            )
        if optimizer not in optimizers.OPTIMIZERS:
            raise ValueError(
                f"`optimizer` must be one of {optimizers.OPTIMIZERS}. "
                f"Received: optimizer={optimizer!r}"
            )
        options.check_names(forward_options, "`LearningRateHyperModel`")
        low, high = learning_rate_range
        if not 0 < low <= high:
            raise ValueError(
                "`learning_rate_range` must be `(min, max)` with 0 < min <= max. "
                f"Received: learning_rate_range={learning_rate_range!r}"
            )
        if not learning_rate_step > 1:
            raise ValueError(
                "`learning_rate_step` must be a factor greater than 1. "
                f"Received: learning_rate_step={learning_rate_step!r}"
            )
        self.build_model = build_model
        self.gradient = gradient
        self.optimizer = optimizer
        self.loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.metrics = list(metrics)
        self.learning_rate_range = (float(low), float(high))
        self.learning_rate_step = float(learning_rate_step)
        self.decay_values = _values("decay_values", decay_values)
        self.momentum_values = _values("momentum_values", momentum_values)
        self.beta_1_values = _values("beta_1_values", beta_1_values)
        self.beta_2_values = _values("beta_2_values", beta_2_values)
        defaults = {**options.defaults(), **OPTIMIZER_OPTIONS}
        given = dict(forward_options, clipnorm=clipnorm, global_clipnorm=global_clipnorm)
        self.options = {k: _candidates(k, given.get(k, v)) for k, v in defaults.items()}
        if gradient == "backprop":
            for k in forward_options:
                if self.options[k] != (defaults[k],):
                    raise ValueError(
                        f"`{k}` applies to the forward gradient only; a backprop "
                        f"search takes its default. Received: {k}={given[k]!r}"
                    )
        self.jit_compile = jit_compile
        self.seed = seed
        self._check_combinations()

    def _check_combinations(self):
        """Raises a `ValueError` naming the first combination of the
        settings' candidates that cannot be built (the grid runs every
        combination: `perturbation=("weights", "activations")` with
        `local_losses=(None, "auto")` holds `"weights"` with `"auto"`)."""
        names = list(self.options)
        searched = [n for n in names if len(self.options[n]) > 1]
        for values in itertools.product(*(self.options[n] for n in names)):
            settings = dict(zip(names, values))
            forward, rest = options.split(settings)
            try:
                optimizers.check_clipping(rest["clipnorm"], rest["global_clipnorm"])
                if self.gradient == "forward":
                    arguments.checked_options({**forward, "seed": self.seed})
            except (ValueError, TypeError) as e:
                shown = ", ".join(f"{n}={settings[n]!r}" for n in searched)
                which = f"this one cannot be built ({shown})" if shown else "none can be built"
                raise ValueError(
                    "A `LearningRateHyperModel` search tries every combination of "
                    f"its settings' values, and {which}: {str(e).rstrip('.')}. "
                    "Search such settings with separate hypermodels."
                ) from e

    def declare(self, hp):
        """Declares the search space on `hp`; returns the settings dict."""
        low, high = self.learning_rate_range
        if low == high:
            lr = hp.Fixed("learning_rate", low)
        else:
            lr = hp.Float("learning_rate", low, high, step=self.learning_rate_step, sampling="log")
        settings = {
            # Grid points are low·step^i; round off the float drift.
            "learning_rate": float(f"{lr:.6g}"),
            "decay": float(_choice(hp, "decay", self.decay_values)),
        }
        if self.optimizer == "nesterov":
            settings["momentum"] = float(_choice(hp, "momentum", self.momentum_values))
        if self.optimizer == "adam":
            settings["beta_1"] = float(_choice(hp, "beta_1", self.beta_1_values))
            settings["beta_2"] = float(_choice(hp, "beta_2", self.beta_2_values))
        for name, candidates in self.options.items():
            if self.gradient == "forward" or name in OPTIMIZER_OPTIONS:
                settings[name] = _option(hp, name, candidates)
        return settings

    def grid_size(self):
        """The number of trials of a full grid over this search space.

        Returns:
            A pair `(trials, sizes)`: the product of the sizes, and a dict
            of the number of values of each searched setting (settings
            with one value are left out).
        """
        hp = keras_tuner.HyperParameters()
        self.declare(hp)
        sizes = {}
        for p in hp.space:
            if isinstance(p, keras_tuner.engine.hyperparameters.Choice):
                n = len(p.values)
            elif isinstance(p, keras_tuner.engine.hyperparameters.Float):
                n = (
                    int(math.floor(math.log(p.max_value / p.min_value) / math.log(p.step) + 1e-9))
                    + 1
                )
            else:  # Fixed.
                n = 1
            if n > 1:
                sizes[p.name] = n
        return math.prod(sizes.values()), sizes

    def search_key(self):
        """A JSON-able description of everything that defines this search
        space (the model builder, the losses, every setting and its values).
        Two hypermodels with the same key search the same trials."""
        return {
            "build_model": tuners.describe(self.build_model),
            "gradient": self.gradient,
            "optimizer": self.optimizer,
            "loss": tuners.describe(self.loss),
            "metrics": tuners.describe(self.metrics),
            "learning_rate_range": list(self.learning_rate_range),
            "learning_rate_step": self.learning_rate_step,
            "decay_values": tuners.describe(self.decay_values),
            "momentum_values": tuners.describe(self.momentum_values),
            "beta_1_values": tuners.describe(self.beta_1_values),
            "beta_2_values": tuners.describe(self.beta_2_values),
            "options": tuners.describe(self.options),
            "jit_compile": self.jit_compile,
            "seed": self.seed,
        }

    def build(self, hp):
        forward_options, optimizer_settings = options.split(self.declare(hp))
        keras.utils.set_random_seed(self.seed)
        model = self.build_model()
        if self.gradient == "forward":
            model = ForwardGradientModel(model, seed=self.seed, **forward_options)
        model.compile(
            optimizer=optimizers.make_optimizer(self.optimizer, **optimizer_settings),
            loss=self.loss,
            metrics=self.metrics,
            jit_compile=self.jit_compile,
        )
        return model


def make_tuner(
    hypermodel,
    tuner="grid",
    directory="tuning",
    project_name=None,
    objective="val_loss",
    max_trials=None,
    seed=0,
    overwrite=False,
    **kwargs,
):
    """Builds a KerasTuner tuner for `hypermodel`.

    The tuner's `search()` prints the number of trials before it starts,
    resumes a search of the same settings from its folder, and raises a
    `ValueError` if the folder holds a search made with another model
    builder, search space, loss, seed or budget (epochs, steps,
    `validation_split`, training data size) instead of returning its
    stale trials.

    Args:
        hypermodel: A `LearningRateHyperModel` (or any KerasTuner
            `HyperModel`).
        tuner: `"grid"` (every combination, as the second paper),
            `"random"` or `"bayesian"`. Defaults to `"grid"`.
        directory: Folder of the searches. A search resumes from it unless
            `overwrite=True`. Defaults to `"tuning"`.
        project_name: Sub-folder. Defaults to the hypermodel's name and a
            digest of its search space (`LearningRateHyperModel.search_key`),
            so that a changed search space starts a new search.
        objective: Defaults to `"val_loss"`.
        max_trials: Cap on the trials. Required by `"random"` and
            `"bayesian"` (defaults to 10 there); `None` runs the whole grid.
        seed: Seed of the tuner. Defaults to `0`.
        overwrite: Whether to discard a previous search. Defaults to
            `False`.
        **kwargs: Passed to the KerasTuner tuner.

    Returns:
        A `keras_fwdgrad.tuners.GridSearch`, `RandomSearch` or
        `BayesianOptimization` (subclasses of KerasTuner's that add the
        checks).
    """
    if tuner not in tuners.TUNERS:
        raise ValueError(f"`tuner` must be one of {TUNERS}. Received: tuner={tuner!r}")
    if tuner != "grid" and max_trials is None:
        max_trials = 10
    if hasattr(hypermodel, "search_key"):
        key = {"hypermodel": hypermodel.name, **hypermodel.search_key()}
    else:
        key = {"hypermodel": hypermodel.name, "class": tuners.describe(type(hypermodel))}
    key.update(tuner=tuner, objective=tuners.describe(objective), max_trials=max_trials, seed=seed)
    if project_name is None:
        project_name = f"{hypermodel.name}_{tuners.digest(key)}"
    search = tuners.TUNERS[tuner](
        hypermodel,
        objective=objective,
        max_trials=max_trials,
        seed=seed,
        directory=directory,
        project_name=project_name,
        overwrite=overwrite,
        **kwargs,
    )
    search.search_key = key
    return search
