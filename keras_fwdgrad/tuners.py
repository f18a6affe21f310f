"""KerasTuner tuners that resume only the search they were made for.

A search's folder records what defines it (`search_key.json`: the model
builder, the search space, the losses, the seed and the training budget).
The tuners here resume a search of the same settings, refuse (`ValueError`)
to resume one made with other settings instead of returning its stale
trials, and print the number of trials before searching.
`keras_fwdgrad.tuning.make_tuner` builds them.
"""

import hashlib
import json
import os

import keras

try:
    import keras_tuner
except ImportError as e:  # pragma: no cover - exercised without the extra.
    raise ImportError(
        "keras_fwdgrad.tuning and keras_fwdgrad.tuners need KerasTuner: "
        "pip install 'keras-fwdgrad[tuning]' (or pip install keras-tuner)"
    ) from e


def describe(value):
    """A JSON-able description of a setting (for a search's key)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in sorted(value.items())}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    try:
        return describe(keras.saving.serialize_keras_object(value))
    except Exception:  # noqa: BLE001 - any object still gets a description.
        return f"{type(value).__module__}.{type(value).__qualname__}"


KEY_FILE = "search_key.json"


def digest(key):
    """A short digest of a search key, for folder names."""
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _budget(fit_args, fit_kwargs):
    """What defines a trial's training budget among `search()`'s fit
    arguments: epochs, steps, the share of the data held out for
    validation, and the training data's size where known."""
    budget = {
        k: fit_kwargs.get(k)
        for k in (
            "epochs",
            "steps_per_epoch",
            "validation_steps",
            "validation_split",
            "batch_size",
        )
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
    """Mixin of the tuners below: records what defines the search in its
    folder, refuses to resume a different one, and prints the number of
    trials before searching. `search_key` is set by
    `keras_fwdgrad.tuning.make_tuner`."""

    search_key = None

    def search(self, *fit_args, **fit_kwargs):
        key = dict(self.search_key, budget=_budget(fit_args, fit_kwargs))
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


class GridSearch(_KeyedSearch, keras_tuner.GridSearch):
    """`keras_tuner.GridSearch` that resumes only the same search."""


class RandomSearch(_KeyedSearch, keras_tuner.RandomSearch):
    """`keras_tuner.RandomSearch` that resumes only the same search."""


class BayesianOptimization(_KeyedSearch, keras_tuner.BayesianOptimization):
    """`keras_tuner.BayesianOptimization` that resumes only the same search."""


TUNERS = {"grid": GridSearch, "random": RandomSearch, "bayesian": BayesianOptimization}
