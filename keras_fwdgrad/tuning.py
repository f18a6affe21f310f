"""Separate learning-rate searches for forward gradient and backprop.

The second paper's main finding is that forward gradient and
backpropagation need their own hyperparameter searches: at one shared
learning rate the comparison is unfair to one of them. This module makes
that the easy path with KerasTuner (install with
`pip install "keras-fwdgrad[tuning]"`).

- `LearningRateHyperModel` searches the columns of the paper's Table I:
  the learning rate (log scale), the decay k of η_i = η0·e^(−ik), and,
  where the optimizer has them, momentum (Nesterov) or β1 and β2 (Adam).
  The forward gradient's own options (direction family, number of
  directions, JVP cap, clipping, perturbation, local losses) are fixed by
  a value or searched by a tuple of values.
- `make_tuner` builds a grid (the paper's choice), random or Bayesian
  tuner on `val_loss`. Searches resume from their directory, and only a
  search with the same settings resumes: the default folder name carries
  a digest of the search space, and a search refuses (`ValueError`) to
  resume one made with another model, search space or budget. The number
  of trials is printed before a search starts.
- `compare_searches` runs one search per gradient type and optimizer,
  retrains each best configuration, evaluates it on the test split, and
  returns the rows of a Table I; `write_table` writes them as CSV and
  Markdown.

Example:

```python
hypermodel = keras_fwdgrad.tuning.LearningRateHyperModel(
    keras_fwdgrad.research.architectures.mlp, gradient="forward", optimizer="sgd")
tuner = keras_fwdgrad.tuning.make_tuner(hypermodel, directory="tuning")
tuner.search(train, validation_data=val, epochs=5)
best = tuner.get_best_models(1)[0]
```
"""

import csv
import hashlib
import json
import math
import os

import keras

from keras_fwdgrad.research import experiments

try:
    import keras_tuner
except ImportError as e:  # pragma: no cover - exercised without the extra.
    raise ImportError(
        "keras_fwdgrad.tuning needs KerasTuner: "
        "pip install 'keras-fwdgrad[tuning]' (or pip install keras-tuner)"
    ) from e

TUNERS = ("grid", "random", "bayesian")
TABLE_COLUMNS = (
    "gradient",
    "model",
    "dataset",
    "optimizer",
    "learning_rate",
    "decay",
    "momentum",
    "beta_1",
    "beta_2",
    "epochs",
    "test_loss",
)


def _values(name, values):
    values = tuple(values)
    if not values:
        raise ValueError(f"`{name}` must list at least one value. Received: {name}={values!r}")
    return values


def _choice(hp, name, values):
    if len(values) == 1:
        return hp.Fixed(name, values[0])
    return hp.Choice(name, list(values))


# The forward gradient's options a search may fix or search, with their
# defaults (those of `ForwardGradientModel` and of the optimizer).
FORWARD_OPTIONS = {
    "direction": "gaussian",
    "num_directions": 1,
    "jvp_clip": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "perturbation": "weights",
    "local_losses": None,
    "local_loss_groups": 1,
    "local_loss_patches": 1,
}
# Of these, the optimizer's, which backprop searches take too.
OPTIMIZER_OPTIONS = ("clipnorm", "global_clipnorm")


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


def _describe(value):
    """A JSON-able description of a setting (for the search's key)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items())}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    try:
        return _describe(keras.saving.serialize_keras_object(value))
    except Exception:  # noqa: BLE001 - any object still gets a description.
        return f"{type(value).__module__}.{type(value).__qualname__}"


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
        direction: Direction family of the forward gradient. Defaults to
            `"gaussian"`.
        num_directions: Directions per step (K). Defaults to `1`.
        jvp_clip: Optional cap on |∇f·v| (the second paper uses 1).
        clipnorm: Optional clipping of each variable's gradient to this
            norm (Keras' `clipnorm`).
        global_clipnorm: Optional clipping of all gradients together to
            this norm (Keras' `global_clipnorm`; what the second paper's
            PyTorch code does).
        perturbation: `"weights"` or `"activations"`.
        local_losses: `None`, `"auto"`, `"layers"` or a list of layer
            names (with `perturbation="activations"`).
        local_loss_groups: `1`, an integer or `"channels"`.
        local_loss_patches: `1`, an integer or `"positions"`.
        jit_compile: Whether to XLA-compile the steps. Defaults to `True`.
        seed: Seed of the initial weights and of the directions, the same
            for every trial. Defaults to `0`.
        name: Optional name of the hypermodel.

    Each option from `direction` to `local_loss_patches` is one value or,
    to search it, a **tuple** of values (a list, such as layer names for
    `local_losses`, is one value): `num_directions=(1, 4, 16)`,
    `jvp_clip=(None, 1.0)`, `local_losses=(None, "auto")`. The options
    from `direction` on, except the two clipping ones, apply to the
    forward gradient only; a backprop search with one of them searched
    raises a `ValueError`.

    Example:

    ```python
    hypermodel = LearningRateHyperModel(
        build_model, gradient="forward", optimizer="adam",
        direction=("gaussian", "rank1"), num_directions=(1, 4))
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
        direction="gaussian",
        num_directions=1,
        jvp_clip=None,
        clipnorm=None,
        global_clipnorm=None,
        perturbation="weights",
        local_losses=None,
        local_loss_groups=1,
        local_loss_patches=1,
        jit_compile=True,
        seed=0,
        name=None,
    ):
        super().__init__(name=name or f"{gradient}_{optimizer}")
        if isinstance(build_model, keras.Model) or not callable(build_model):
            raise TypeError(
                "`build_model` must be a function that returns a fresh Keras "
                "model (a new one per call), not a model. "
                f"Received: build_model={build_model!r}"
            )
        experiments.method(gradient, 1.0, optimizer=optimizer)  # Validates.
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
        given = dict(
            direction=direction,
            num_directions=num_directions,
            jvp_clip=jvp_clip,
            clipnorm=clipnorm,
            global_clipnorm=global_clipnorm,
            perturbation=perturbation,
            local_losses=local_losses,
            local_loss_groups=local_loss_groups,
            local_loss_patches=local_loss_patches,
        )
        self.options = {k: _candidates(k, v) for k, v in given.items()}
        if gradient == "backprop":
            for k, candidates in self.options.items():
                if k not in OPTIMIZER_OPTIONS and candidates != (FORWARD_OPTIONS[k],):
                    raise ValueError(
                        f"`{k}` applies to the forward gradient only; a backprop "
                        f"search takes its default. Received: {k}={given[k]!r}"
                    )
        self.jit_compile = jit_compile
        self.seed = seed

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

    def method(self, hp):
        """The `experiments.method` spec of the trial `hp` describes."""
        return experiments.method(self.gradient, optimizer=self.optimizer, **self.declare(hp))

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
            "build_model": _describe(self.build_model),
            "gradient": self.gradient,
            "optimizer": self.optimizer,
            "loss": _describe(self.loss),
            "metrics": _describe(self.metrics),
            "learning_rate_range": list(self.learning_rate_range),
            "learning_rate_step": self.learning_rate_step,
            "decay_values": _describe(self.decay_values),
            "momentum_values": _describe(self.momentum_values),
            "beta_1_values": _describe(self.beta_1_values),
            "beta_2_values": _describe(self.beta_2_values),
            "options": _describe(self.options),
            "jit_compile": self.jit_compile,
            "seed": self.seed,
        }

    def build(self, hp):
        spec = self.method(hp)
        keras.utils.set_random_seed(self.seed)
        model = experiments.build_training_model(spec, self.build_model(), seed=self.seed)
        model.compile(
            optimizer=experiments.make_method_optimizer(spec),
            loss=self.loss,
            metrics=self.metrics,
            jit_compile=self.jit_compile,
        )
        return model


KEY_FILE = "search_key.json"


def _digest(key):
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _budget(fit_args, fit_kwargs):
    """What defines a trial's training budget among `search()`'s fit
    arguments: epochs, steps, and the training data's size where known."""
    budget = {
        k: fit_kwargs.get(k)
        for k in ("epochs", "steps_per_epoch", "validation_steps", "batch_size")
        if fit_kwargs.get(k) is not None
    }
    budget.setdefault("epochs", 1)
    data = fit_args[0] if fit_args else fit_kwargs.get("x")
    try:
        cardinality = int(data.cardinality())  # A tf.data.Dataset.
    except (AttributeError, TypeError, ValueError):
        shape = getattr(data, "shape", None)
        cardinality = int(shape[0]) if shape else None
    if cardinality is not None:
        budget["training_batches_or_examples"] = cardinality
    return budget


def _differences(saved, key, prefix=""):
    out = []
    for k in sorted(set(saved) | set(key)):
        a, b = saved.get(k), key.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} there, {b!r} now")
    return out


class _KeyedSearch:
    """Mixin of the tuners `make_tuner` builds: records what defines the
    search in its folder, refuses to resume a different one, and prints
    the number of trials before searching."""

    _fwdgrad_key = None

    def search(self, *fit_args, **fit_kwargs):
        key = dict(self._fwdgrad_key, budget=_budget(fit_args, fit_kwargs))
        path = os.path.join(self.project_dir, KEY_FILE)
        key = json.loads(json.dumps(key, default=str))  # As it reads back.
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved != key:
                raise ValueError(
                    f"The search in {self.project_dir!r} was made with other "
                    "settings, so its trials do not answer this search:\n  "
                    + "\n  ".join(_differences(saved, key))
                    + "\nPass `overwrite=True` to `make_tuner` to discard it, or "
                    "another `project_name` (or `directory`) to keep both."
                )
        elif self.oracle.trials:
            raise ValueError(
                f"The folder {self.project_dir!r} holds a search with no record "
                f"of its settings ({KEY_FILE}), so it cannot be checked against "
                "this one. Pass `overwrite=True` to `make_tuner` to discard it, "
                "or another `project_name`."
            )
        else:
            os.makedirs(self.project_dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump(key, f, indent=1, sort_keys=True)
        print(self._fwdgrad_plan(key["budget"]), flush=True)
        return super().search(*fit_args, **fit_kwargs)

    def _fwdgrad_plan(self, budget):
        hypermodel = self.hypermodel
        done = len(self.oracle.trials)
        if hasattr(hypermodel, "grid_size"):
            grid, sizes = hypermodel.grid_size()
            factors = " × ".join(f"{n} {name}" for name, n in sizes.items()) or "1 setting"
            planned = grid if self.oracle.max_trials is None else min(grid, self.oracle.max_trials)
            space = f"grid of {grid} ({factors})"
        else:
            planned = self.oracle.max_trials
            space = "search space of the hypermodel"
        return (
            f"Search {self.project_name!r}: {planned} trials of {budget['epochs']} "
            f"epoch(s) from a {space}; {done} done before."
        )


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
    builder, search space, loss, seed or budget (epochs, steps, training
    data size) instead of returning its stale trials.

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
        A `keras_tuner.GridSearch`, `RandomSearch` or
        `BayesianOptimization` (a subclass of it that adds the checks).
    """
    classes = {
        "grid": keras_tuner.GridSearch,
        "random": keras_tuner.RandomSearch,
        "bayesian": keras_tuner.BayesianOptimization,
    }
    if tuner not in classes:
        raise ValueError(f"`tuner` must be one of {TUNERS}. Received: tuner={tuner!r}")
    if tuner != "grid" and max_trials is None:
        max_trials = 10
    if hasattr(hypermodel, "search_key"):
        key = {"hypermodel": hypermodel.name, **hypermodel.search_key()}
    else:
        key = {"hypermodel": hypermodel.name, "class": _describe(type(hypermodel))}
    key.update(tuner=tuner, objective=_describe(objective), max_trials=max_trials, seed=seed)
    if project_name is None:
        project_name = f"{hypermodel.name}_{_digest(key)}"
    cls = type(classes[tuner].__name__, (_KeyedSearch, classes[tuner]), {})
    cls.__module__ = __name__
    search = cls(
        hypermodel,
        objective=objective,
        max_trials=max_trials,
        seed=seed,
        directory=directory,
        project_name=project_name,
        overwrite=overwrite,
        **kwargs,
    )
    search._fwdgrad_key = key
    return search


def compare_searches(
    build_model,
    train,
    validation,
    test,
    epochs,
    gradients=("forward", "backprop"),
    optimizer_names=("sgd",),
    model_name="model",
    dataset_name="dataset",
    tuner="grid",
    directory="tuning",
    max_trials=None,
    search_epochs=None,
    overwrite=False,
    verbose=0,
    **hypermodel_kwargs,
):
    """Tunes each gradient type separately, retrains the best, tests it.

    For every optimizer and gradient type: a search on `validation` (loss),
    then the best configuration retrained from scratch on `train` for
    `epochs` epochs and evaluated on `test`.

    Args:
        build_model: Callable returning a fresh Keras model.
        train: Training `tf.data.Dataset`.
        validation: Validation dataset (the search objective).
        test: Test dataset.
        epochs: Epochs of the retraining (the table's `epochs` column).
        gradients: Gradient types to tune. Defaults to both.
        optimizer_names: Optimizers to tune. Defaults to `("sgd",)`.
        model_name: The table's `model` column.
        dataset_name: The table's `dataset` column.
        tuner: See `make_tuner`. Defaults to `"grid"`.
        directory: Root folder of the searches (one project each).
        max_trials: See `make_tuner`.
        search_epochs: Epochs of each trial. Defaults to `epochs`.
        overwrite: Whether to discard previous searches. Defaults to
            `False` (resume).
        verbose: Verbosity of the searches and fits. Defaults to `0`.
        **hypermodel_kwargs: Passed to `LearningRateHyperModel`.

    Returns:
        A list of dicts with the columns of `TABLE_COLUMNS`, plus
        `val_loss` (the best trial's score) and `trials`.
    """
    rows = []
    for optimizer_name in optimizer_names:
        for gradient in gradients:
            hypermodel = LearningRateHyperModel(
                build_model,
                gradient=gradient,
                optimizer=optimizer_name,
                name=f"{model_name}_{dataset_name}_{optimizer_name}_{gradient}",
                **hypermodel_kwargs,
            )
            search = make_tuner(
                hypermodel,
                tuner=tuner,
                directory=directory,
                max_trials=max_trials,
                overwrite=overwrite,
            )
            search.search(
                train,
                validation_data=validation,
                epochs=search_epochs or epochs,
                verbose=verbose,
            )
            best_hp = search.get_best_hyperparameters(1)[0]
            best_trial = search.oracle.get_best_trials(1)[0]
            spec = hypermodel.method(best_hp)
            model = hypermodel.build(best_hp)
            model.fit(train, epochs=epochs, verbose=verbose)
            test_loss = model.evaluate(test, verbose=0, return_dict=True)["loss"]
            rows.append(
                {
                    "gradient": gradient,
                    "model": model_name,
                    "dataset": dataset_name,
                    "optimizer": optimizer_name,
                    "learning_rate": spec["learning_rate"],
                    "decay": spec["decay"],
                    "momentum": spec.get("momentum", 0.0),
                    "beta_1": spec.get("beta_1", 0.0),
                    "beta_2": spec.get("beta_2", 0.0),
                    "epochs": epochs,
                    "test_loss": float(test_loss),
                    "val_loss": float(best_trial.score),
                    "trials": len(search.oracle.trials),
                }
            )
            keras.backend.clear_session()
    return rows


def write_table(rows, path, columns=TABLE_COLUMNS):
    """Writes `rows` as `<path>.csv` and `<path>.md`.

    Args:
        rows: Dicts, e.g. from `compare_searches`.
        path: Path without extension.
        columns: Columns to write. Defaults to Table I's.

    Returns:
        The pair of paths written.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    csv_path, md_path = f"{path}.csv", f"{path}.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(md_path, "w") as f:
        f.write(markdown_table(rows, columns))
    return csv_path, md_path


def markdown_table(rows, columns=TABLE_COLUMNS):
    """`rows` as a Markdown table (floats with 4 significant digits)."""

    def fmt(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"
