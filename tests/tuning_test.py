"""Tests of the tuning module: separate searches find different learning
rates, the best model can be retrieved, and searches resume."""

import keras
import numpy as np
import pytest
import tensorflow as tf

keras_tuner = pytest.importorskip("keras_tuner")

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad import tuning  # noqa: E402

FEATURES = 100


def _linear():
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1)])


def _regression(n, seed):
    """Noise-free linear targets; one true weight vector for all splits."""
    w = np.random.default_rng(99).normal(size=(FEATURES, 1)) / np.sqrt(FEATURES)
    x = np.random.default_rng(seed).normal(size=(n, FEATURES)).astype("float32")
    y = (x @ w).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(32)


def _hypermodel(gradient, **kwargs):
    # Learning rates 1e-3, 1e-2, 1e-1, 1.
    return tuning.LearningRateHyperModel(
        _linear,
        gradient=gradient,
        optimizer="sgd",
        loss="mse",
        metrics=(),
        learning_rate_range=(1e-3, 1.0),
        decay_values=(0.0,),
        jit_compile=False,
        **kwargs,
    )


def test_separate_searches_find_different_learning_rates(tmp_path):
    """Linear least squares on 100 standardized features: the Hessian is
    about 2·I, so gradient descent is stable below lr 1 and is best at 0.1
    after 32 steps. A forward gradient's second moment is (n + 2)·|∇f|²
    for n = 101 parameters (Gaussian directions), so its stable learning
    rate is about 2/(2·103) ≈ 0.01: 0.1 and 1 diverge and its best is at
    least ten times smaller than backprop's."""
    train, val = _regression(512, 0), _regression(256, 1)
    best = {}
    for gradient in ("forward", "backprop"):
        tuner = tuning.make_tuner(_hypermodel(gradient), directory=str(tmp_path))
        tuner.search(train, validation_data=val, epochs=2, verbose=0)
        assert len(tuner.oracle.trials) == 4
        best[gradient] = tuner.get_best_hyperparameters(1)[0]["learning_rate"]
    assert best["backprop"] == pytest.approx(0.1)
    assert best["forward"] <= 0.01 + 1e-9
    assert best["forward"] < best["backprop"]


def test_best_model_is_retrievable_and_evaluates_to_its_score(tmp_path):
    train, val = _regression(256, 0), _regression(128, 1)
    tuner = tuning.make_tuner(_hypermodel("forward"), directory=str(tmp_path))
    tuner.search(train, validation_data=val, epochs=2, verbose=0)
    model = tuner.get_best_models(1)[0]
    assert isinstance(model, ForwardGradientModel)
    score = tuner.oracle.get_best_trials(1)[0].score
    # The checkpoint of the best epoch reproduces the best validation loss.
    np.testing.assert_allclose(model.evaluate(val, verbose=0), score, rtol=1e-5)


def test_search_resumes_without_redoing_trials(tmp_path):
    train, val = _regression(128, 0), _regression(64, 1)
    calls = []

    class Counting(tuning.LearningRateHyperModel):
        def build(self, hp):
            model = super().build(hp)
            calls.append(hp.values["learning_rate"])
            return model

    first = tuning.make_tuner(
        Counting(
            _linear,
            gradient="backprop",
            loss="mse",
            metrics=(),
            learning_rate_range=(1e-3, 1.0),
            decay_values=(0.0,),
            jit_compile=False,
        ),
        directory=str(tmp_path),
        project_name="p",
    )
    calls.clear()  # The tuner builds once on construction to read the space.
    first.search(train, validation_data=val, epochs=1, verbose=0)
    assert len(calls) == 4
    best = first.get_best_hyperparameters(1)[0].values
    again = tuning.make_tuner(
        Counting(
            _linear,
            gradient="backprop",
            loss="mse",
            metrics=(),
            learning_rate_range=(1e-3, 1.0),
            decay_values=(0.0,),
            jit_compile=False,
        ),
        directory=str(tmp_path),
        project_name="p",
    )
    calls.clear()
    again.search(train, validation_data=val, epochs=1, verbose=0)
    assert calls == []  # Nothing re-trained.
    assert len(again.oracle.trials) == 4
    assert again.get_best_hyperparameters(1)[0].values == best


@pytest.mark.parametrize(
    "optimizer, names",
    [
        ("sgd", {"learning_rate", "decay"}),
        ("nesterov", {"learning_rate", "decay", "momentum"}),
        ("adam", {"learning_rate", "decay", "beta_1", "beta_2"}),
    ],
)
def test_search_space_has_table_i_columns(optimizer, names):
    hm = tuning.LearningRateHyperModel(_linear, gradient="forward", optimizer=optimizer)
    hp = keras_tuner.HyperParameters()
    model = hm.build(hp)
    assert set(hp.values) == names
    # Default learning-rate grid: 1e-5, 1e-4, ..., 1e-1 on a log scale.
    lr = hp.space[0]
    assert lr.name == "learning_rate" and lr.sampling == "log"
    np.testing.assert_allclose([lr.min_value, lr.max_value, lr.step], [1e-5, 1e-1, 10])
    opt = model.optimizer
    expected = {
        "sgd": keras.optimizers.SGD,
        "nesterov": keras.optimizers.SGD,
        "adam": keras.optimizers.Adam,
    }[optimizer]
    assert type(opt) is expected
    assert isinstance(model, ForwardGradientModel)


def test_compare_searches_and_table(tmp_path):
    train, val, test = _regression(128, 0), _regression(64, 1), _regression(64, 2)
    rows = tuning.compare_searches(
        _linear,
        train,
        val,
        test,
        epochs=1,
        model_name="linear",
        dataset_name="synthetic",
        directory=str(tmp_path),
        loss="mse",
        metrics=(),
        learning_rate_range=(1e-3, 1e-1),
        decay_values=(0.0,),
        jit_compile=False,
    )
    assert [r["gradient"] for r in rows] == ["forward", "backprop"]
    for r in rows:
        assert set(tuning.TABLE_COLUMNS) <= set(r)
        assert r["trials"] == 3 and r["test_loss"] > 0
    csv_path, md_path = tuning.write_table(rows, str(tmp_path / "table"))
    md = open(md_path).read().splitlines()
    assert md[0] == "| " + " | ".join(tuning.TABLE_COLUMNS) + " |"
    assert len(md) == 4
    assert open(csv_path).readline().strip() == ",".join(tuning.TABLE_COLUMNS)


def test_argument_errors():
    with pytest.raises(ValueError, match="`gradient` must be one of"):
        tuning.LearningRateHyperModel(_linear, gradient="reverse")
    with pytest.raises(ValueError, match="`optimizer` must be one of"):
        tuning.LearningRateHyperModel(_linear, optimizer="rmsprop")
    with pytest.raises(ValueError, match="`learning_rate_range`"):
        tuning.LearningRateHyperModel(_linear, learning_rate_range=(1e-1, 1e-3))
    with pytest.raises(ValueError, match="`decay_values` must list"):
        tuning.LearningRateHyperModel(_linear, decay_values=())
    with pytest.raises(TypeError, match="`build_model` must be a function"):
        tuning.LearningRateHyperModel(_linear())
    with pytest.raises(ValueError, match="`tuner` must be one of"):
        tuning.make_tuner(tuning.LearningRateHyperModel(_linear), tuner="hyperband")
