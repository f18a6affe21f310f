"""Tests of the tuning module: separate searches find different learning
rates, the best model can be retrieved, and searches resume."""

import itertools

import keras
import numpy as np
import pytest

keras_tuner = pytest.importorskip("keras_tuner")

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad import tuning  # noqa: E402

from tests import helpers  # noqa: E402

pytestmark = pytest.mark.slow


def _hypermodel(gradient, **kwargs):
    # Learning rates 1e-3, 1e-2, 1e-1, 1.
    return tuning.LearningRateHyperModel(
        helpers.linear,
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
    train, val = helpers.regression(512, 0), helpers.regression(256, 1)
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
    train, val = helpers.regression(256, 0), helpers.regression(128, 1)
    tuner = tuning.make_tuner(_hypermodel("forward"), directory=str(tmp_path))
    tuner.search(train, validation_data=val, epochs=2, verbose=0)
    model = tuner.get_best_models(1)[0]
    assert isinstance(model, ForwardGradientModel)
    score = tuner.oracle.get_best_trials(1)[0].score
    # The checkpoint of the best epoch reproduces the best validation loss.
    np.testing.assert_allclose(model.evaluate(val, verbose=0), score, rtol=1e-5)


def test_search_resumes_without_redoing_trials(tmp_path):
    train, val = helpers.regression(128, 0), helpers.regression(64, 1)
    calls = []

    class Counting(tuning.LearningRateHyperModel):
        def build(self, hp):
            model = super().build(hp)
            calls.append(hp.values["learning_rate"])
            return model

    first = tuning.make_tuner(
        Counting(
            helpers.linear,
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
            helpers.linear,
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
    hm = tuning.LearningRateHyperModel(helpers.linear, gradient="forward", optimizer=optimizer)
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


def test_argument_errors():
    with pytest.raises(ValueError, match="`gradient` must be one of"):
        tuning.LearningRateHyperModel(helpers.linear, gradient="reverse")
    with pytest.raises(ValueError, match="`optimizer` must be one of"):
        tuning.LearningRateHyperModel(helpers.linear, optimizer="rmsprop")
    with pytest.raises(ValueError, match="`learning_rate_range`"):
        tuning.LearningRateHyperModel(helpers.linear, learning_rate_range=(1e-1, 1e-3))
    with pytest.raises(ValueError, match="`decay_values` must list"):
        tuning.LearningRateHyperModel(helpers.linear, decay_values=())
    with pytest.raises(TypeError, match="`build_model` must be a function"):
        tuning.LearningRateHyperModel(helpers.linear())
    with pytest.raises(ValueError, match="`tuner` must be one of"):
        tuning.make_tuner(tuning.LearningRateHyperModel(helpers.linear), tuner="hyperband")


def _backprop(build_model=helpers.linear, learning_rate_range=(1e-2, 1e-1)):
    return tuning.LearningRateHyperModel(
        build_model,
        gradient="backprop",
        loss="mse",
        metrics=(),
        learning_rate_range=learning_rate_range,
        decay_values=(0.0,),
        jit_compile=False,
    )


def test_changed_search_space_gets_its_own_folder(tmp_path):
    """A narrower learning-rate range in the same directory is a new
    search: its best learning rate lies in its own range."""
    train, val = helpers.regression(128, 0), helpers.regression(64, 1)
    wide = tuning.make_tuner(_hypermodel("backprop"), directory=str(tmp_path))
    wide.search(train, validation_data=val, epochs=2, verbose=0)
    assert wide.get_best_hyperparameters(1)[0]["learning_rate"] == pytest.approx(0.1)
    narrow = tuning.make_tuner(
        _backprop(learning_rate_range=(1e-3, 1e-2)), directory=str(tmp_path)
    )
    assert narrow.project_dir != wide.project_dir
    narrow.search(train, validation_data=val, epochs=2, verbose=0)
    assert len(narrow.oracle.trials) == 2
    assert narrow.get_best_hyperparameters(1)[0]["learning_rate"] <= 1e-2 + 1e-12


@pytest.mark.parametrize(
    "change",
    ["epochs", "model", "data"],
)
def test_resuming_a_different_search_in_one_folder_is_refused(tmp_path, change):
    train, val = helpers.regression(128, 0), helpers.regression(64, 1)
    first = tuning.make_tuner(_backprop(), directory=str(tmp_path), project_name="p")
    first.search(train, validation_data=val, epochs=1, verbose=0)
    hypermodel, epochs, data = _backprop(), 1, train
    if change == "epochs":
        epochs = 3
    elif change == "model":

        def _wider():
            return keras.Sequential([keras.Input((helpers.FEATURES,)), keras.layers.Dense(4)])

        hypermodel = _backprop(_wider)
    else:
        data = helpers.regression(256, 0)
    again = tuning.make_tuner(hypermodel, directory=str(tmp_path), project_name="p")
    with pytest.raises(ValueError, match="made with other settings") as e:
        again.search(data, validation_data=val, epochs=epochs, verbose=0)
    assert "overwrite=True" in str(e.value)
    # The same search resumes; overwrite=True starts afresh.
    tuning.make_tuner(_backprop(), directory=str(tmp_path), project_name="p").search(
        train, validation_data=val, epochs=1, verbose=0
    )
    fresh = tuning.make_tuner(
        hypermodel, directory=str(tmp_path), project_name="p", overwrite=True
    )
    fresh.search(data, validation_data=val, epochs=epochs, verbose=0)
    assert len(fresh.oracle.trials) == 2


@pytest.mark.parametrize(
    "settings, named",
    [
        (
            dict(perturbation=("weights", "activations"), local_losses=(None, "auto")),
            "perturbation='weights', local_losses='auto'",
        ),
        (
            dict(
                perturbation=("weights", "activations"),
                direction=("gaussian", "lowrank_rademacher"),
            ),
            "direction='lowrank_rademacher', perturbation='activations'",
        ),
        (
            dict(clipnorm=(None, 1.0), global_clipnorm=(None, 1.0)),
            "clipnorm=1.0, global_clipnorm=1.0",
        ),
        (dict(clipnorm=1.0, global_clipnorm=1.0), "none can be built"),
    ],
)
def test_a_grid_with_combinations_that_cannot_be_built_is_refused(settings, named):
    """The grid tries every combination of the values given: one that
    `ForwardGradientModel` or the optimizer refuses is named when the
    hypermodel is made (the search failed its trials, then stopped after
    three failures in a row)."""
    with pytest.raises(ValueError, match="tries every combination") as e:
        tuning.LearningRateHyperModel(helpers.linear, optimizer="sgd", loss="mse", **settings)
    assert named in str(e.value)
    # The valid combinations alone are searched as usual.
    hypermodel = tuning.LearningRateHyperModel(
        helpers.linear,
        optimizer="sgd",
        loss="mse",
        perturbation="activations",
        local_losses=(None, "auto"),
    )
    assert hypermodel.grid_size()[1]["local_losses"] == 2


def test_another_validation_split_is_another_search(tmp_path):
    """`validation_split` sets what a trial trains and is scored on: a
    search in the same folder with another share is refused (it resumed
    the old trials and their scores)."""
    train = next(iter(helpers.regression(40, 0).unbatch().batch(40)))
    x, y = (np.asarray(t) for t in train)
    first = tuning.make_tuner(_backprop(), directory=str(tmp_path), project_name="p")
    first.search(x, y, validation_split=0.1, epochs=1, verbose=0)
    again = tuning.make_tuner(_backprop(), directory=str(tmp_path), project_name="p")
    with pytest.raises(ValueError, match="validation_split: 0.1 there, 0.5 now"):
        again.search(x, y, validation_split=0.5, epochs=1, verbose=0)
    again.search(x, y, validation_split=0.1, epochs=1, verbose=0)


def test_trial_count_is_printed_before_the_search(tmp_path, capsys):
    train, val = helpers.regression(64, 0), helpers.regression(32, 1)
    hypermodel = tuning.LearningRateHyperModel(
        helpers.linear,
        gradient="forward",
        optimizer="adam",
        loss="mse",
        metrics=(),
        learning_rate_range=(1e-3, 1e-1),
        decay_values=(0.0,),
        beta_2_values=(0.999,),
        num_directions=(1, 4),
        jit_compile=False,
    )
    assert hypermodel.grid_size() == (12, {"learning_rate": 3, "beta_1": 2, "num_directions": 2})
    tuner = tuning.make_tuner(hypermodel, directory=str(tmp_path), max_trials=1)
    capsys.readouterr()
    tuner.search(train, validation_data=val, epochs=1, verbose=0)
    out = capsys.readouterr().out
    assert "1 trials of 1 epoch(s) from a grid of 12" in out
    assert "3 learning_rate × 2 beta_1 × 2 num_directions" in out
    # The default grids of the README: 5 learning rates × 3 decays, × 2 for
    # Nesterov's momentum, × 2 × 2 for Adam's β's.
    sizes = [
        tuning.LearningRateHyperModel(helpers.linear, optimizer=o).grid_size()[0]
        for o in ("sgd", "nesterov", "adam")
    ]
    assert sizes == [15, 30, 60]


def test_forward_options_are_searchable():
    """Every searched option reaches the trial's model and optimizer."""
    hypermodel = tuning.LearningRateHyperModel(
        helpers.linear,
        gradient="forward",
        optimizer="sgd",
        loss="mse",
        metrics=(),
        learning_rate_range=(1e-2, 1e-2),
        decay_values=(0.0,),
        direction=("gaussian", "rademacher"),
        num_directions=(1, 3),
        jvp_clip=(None, 1.0),
        global_clipnorm=(None, 2.0),
        perturbation=("weights", "activations"),
        jit_compile=False,
    )
    assert hypermodel.grid_size()[0] == 32
    seen = set()
    for direction, k, clip, gclip, perturbation in itertools.product(
        ("gaussian", "rademacher"),
        (1, 3),
        ("none", "1.0"),
        ("none", "2.0"),
        ("weights", "activations"),
    ):
        hp = keras_tuner.HyperParameters()
        hypermodel.declare(hp)
        hp.values.update(
            direction=direction,
            num_directions=k,
            jvp_clip=clip,
            global_clipnorm=gclip,
            perturbation=perturbation,
        )
        model = hypermodel.build(hp)
        assert isinstance(model, ForwardGradientModel)
        assert type(model.direction).__name__.lower() == direction
        assert model.num_directions == k
        assert model.jvp_clip == (None if clip == "none" else 1.0)
        assert model.perturbation == perturbation
        assert model.optimizer.global_clipnorm == (None if gclip == "none" else 2.0)
        seen.add((direction, k, clip, gclip, perturbation))
    assert len(seen) == 32


def _small_cnn():
    return keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            keras.layers.Conv2D(2, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )


def test_local_loss_options_are_searchable():
    """`local_losses`, `local_loss_groups` and `local_loss_patches` reach
    the trial's model, mixed value types included."""
    hypermodel = tuning.LearningRateHyperModel(
        _small_cnn,
        gradient="forward",
        loss="mse",
        metrics=(),
        learning_rate_range=(1e-2, 1e-2),
        decay_values=(0.0,),
        perturbation="activations",
        local_losses=("auto", "layers"),
        local_loss_groups=(1, "channels"),
        local_loss_patches=(1, 2, "positions"),
        jit_compile=False,
    )
    assert hypermodel.grid_size()[0] == 12
    seen = set()
    for combo in itertools.product(("auto", "layers"), ("1", "channels"), ("1", "2", "positions")):
        hp = keras_tuner.HyperParameters()
        hypermodel.declare(hp)
        hp.values.update(zip(("local_losses", "local_loss_groups", "local_loss_patches"), combo))
        model = hypermodel.build(hp)
        got = (model.local_losses, model.local_loss_groups, model.local_loss_patches)
        assert tuple(str(v) for v in got) == combo
        seen.add(got)
    assert len(seen) == 12


def test_forward_option_errors():
    with pytest.raises(ValueError, match="`num_directions` must list"):
        tuning.LearningRateHyperModel(helpers.linear, num_directions=())
    with pytest.raises(ValueError, match="`jvp_clip` lists a value twice"):
        tuning.LearningRateHyperModel(helpers.linear, jvp_clip=(1.0, 1.0))
    with pytest.raises(ValueError, match="`direction` applies to the forward gradient only"):
        tuning.LearningRateHyperModel(
            helpers.linear, gradient="backprop", direction=("gaussian", "lowrank_rademacher")
        )
    # Clipping is the optimizer's: backprop searches it too.
    hm = tuning.LearningRateHyperModel(helpers.linear, gradient="backprop", clipnorm=(None, 1.0))
    assert hm.grid_size()[1]["clipnorm"] == 2
