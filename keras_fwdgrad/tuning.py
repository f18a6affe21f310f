"""Separate learning-rate searches for forward gradient and backprop.

The second paper's main finding is that forward gradient and
backpropagation need their own hyperparameter searches: at one shared
learning rate the comparison is unfair to one of them. This module makes
that the easy path with KerasTuner (install with
`pip install "keras-fwdgrad[tuning]"`).

- `LearningRateHyperModel` searches the columns of the paper's Table I:
  the learning rate (log scale), the decay k of η_i = η0·e^(−ik), and,
  where the optimizer has them, momentum (Nesterov) or β1 and β2 (Adam).
- `make_tuner` builds a grid (the paper's choice), random or Bayesian
  tuner on `val_loss`. Searches resume from their directory.
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
        jvp_clip: Optional cap on |∇f·v| (forward only; the second paper
            uses 1).
        clipnorm: Optional gradient-norm clipping of the optimizer.
        jit_compile: Whether to XLA-compile the steps. Defaults to `True`.
        seed: Seed of the initial weights and of the directions, the same
            for every trial. Defaults to `0`.
        name: Optional name of the hypermodel.
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
        jvp_clip=None,
        clipnorm=None,
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
        self.direction = direction
        self.jvp_clip = jvp_clip
        self.clipnorm = clipnorm
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
        return settings

    def method(self, hp):
        """The `experiments.method` spec of the trial `hp` describes."""
        settings = self.declare(hp)
        extra = {}
        if self.gradient == "forward":
            extra = {"direction": self.direction, "jvp_clip": self.jvp_clip}
        return experiments.method(
            self.gradient,
            optimizer=self.optimizer,
            clipnorm=self.clipnorm,
            **settings,
            **extra,
        )

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

    Args:
        hypermodel: A `LearningRateHyperModel` (or any KerasTuner
            `HyperModel`).
        tuner: `"grid"` (every combination, as the second paper),
            `"random"` or `"bayesian"`. Defaults to `"grid"`.
        directory: Folder of the search. A search resumes from it unless
            `overwrite=True`. Defaults to `"tuning"`.
        project_name: Sub-folder. Defaults to the hypermodel's name.
        objective: Defaults to `"val_loss"`.
        max_trials: Cap on the trials. Required by `"random"` and
            `"bayesian"` (defaults to 10 there); `None` runs the whole grid.
        seed: Seed of the tuner. Defaults to `0`.
        overwrite: Whether to discard a previous search. Defaults to
            `False`.
        **kwargs: Passed to the KerasTuner tuner.

    Returns:
        A `keras_tuner.GridSearch`, `RandomSearch` or
        `BayesianOptimization`.
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
    return classes[tuner](
        hypermodel,
        objective=objective,
        max_trials=max_trials,
        seed=seed,
        directory=directory,
        project_name=project_name or hypermodel.name,
        overwrite=overwrite,
        **kwargs,
    )


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
