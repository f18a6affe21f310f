"""Table I from separate searches: tune each gradient type, retrain the
best configuration, test it, and write the table.

`compare_searches` runs one `keras_fwdgrad.tuning` search per gradient type
and optimizer, retrains each best configuration from scratch, evaluates it
on the test split, and returns the rows of a Table I; `write_table` writes
them as CSV and Markdown.
"""

import csv
import os

import keras

from keras_fwdgrad import tuning
from keras_fwdgrad.research import experiments
from keras_fwdgrad.research import table1

# Table I's columns (`table1.COLUMNS`), with the dataset after the model.
TABLE_COLUMNS = table1.COLUMNS[:2] + ("dataset",) + table1.COLUMNS[2:]


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

    For every optimizer and gradient type: a search on `validation` (loss)
    with `keras_fwdgrad.tuning`,
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
        tuner: See `keras_fwdgrad.tuning.make_tuner`. Defaults to `"grid"`.
        directory: Root folder of the searches (one project each).
        max_trials: See `keras_fwdgrad.tuning.make_tuner`.
        search_epochs: Epochs of each trial. Defaults to `epochs`.
        overwrite: Whether to discard previous searches. Defaults to
            `False` (resume).
        verbose: Verbosity of the searches and fits. Defaults to `0`.
        **hypermodel_kwargs: Passed to
            `keras_fwdgrad.tuning.LearningRateHyperModel`.

    Returns:
        A list of dicts with the columns of `TABLE_COLUMNS`, plus
        `val_loss` (the best trial's score) and `trials`.
    """
    rows = []
    for optimizer_name in optimizer_names:
        for gradient in gradients:
            hypermodel = tuning.LearningRateHyperModel(
                build_model,
                gradient=gradient,
                optimizer=optimizer_name,
                name=f"{model_name}_{dataset_name}_{optimizer_name}_{gradient}",
                **hypermodel_kwargs,
            )
            search = tuning.make_tuner(
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
            spec = experiments.method(
                gradient, optimizer=optimizer_name, **hypermodel.declare(best_hp)
            )
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
