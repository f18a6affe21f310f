"""Tests of `keras_fwdgrad.research.table1`, the second paper's Table I
that `examples/tune_table1.py` and `benchmarks/table1.py` both read."""

import pytest

from keras_fwdgrad.research import table1


def test_every_model_has_both_gradients_for_each_of_its_optimizers():
    expected = {
        "mlp": ("sgd", "nesterov", "adam"),
        "cnn": ("sgd", "nesterov", "adam"),
        "vgg": ("sgd",),
    }
    assert len(table1.ROWS) == 14
    for model, optimizers in expected.items():
        keys = [(r["optimizer"], r["gradient"]) for r in table1.rows(model)]
        # The paper's order: per optimizer, forward gradient then backprop.
        assert keys == [(o, g) for o in optimizers for g in ("forward", "backprop")]
        for r in table1.rows(model):
            assert r["dataset"] == table1.DATASETS[model]
            assert r["epochs"] == (100 if model == "vgg" else 50)


def test_rows_are_the_published_values():
    # Spot checks of one row per optimizer and model against the paper's
    # Table I (learning rate, decay, momentum, β1, β2, epochs, test loss).
    published = {
        ("mlp", "forward", "sgd"): (0.000464, 1e-5, 0.0, 0.0, 0.0, 50, 0.332),
        ("mlp", "forward", "adam"): (0.0005, 5e-5, 0.0, 0.99, 0.999, 50, 0.283),
        ("cnn", "backprop", "nesterov"): (0.01, 0.0, 0.783, 0.0, 0.0, 50, 0.0),
        ("cnn", "forward", "adam"): (0.00025, 1e-4, 0.0, 0.9, 0.9999, 50, 0.669),
        ("vgg", "forward", "sgd"): (0.000433, 1e-6, 0.0, 0.0, 0.0, 100, 6.955),
        ("vgg", "backprop", "sgd"): (0.01, 1e-4, 0.0, 0.0, 0.0, 100, 1.685),
    }
    keys = ("learning_rate", "decay", "momentum", "beta_1", "beta_2", "epochs", "test_loss")
    for (model, gradient, optimizer), values in published.items():
        r = table1.row(model, gradient, optimizer)
        assert tuple(r[k] for k in keys) == values, (model, gradient, optimizer)


def test_row_returns_a_copy():
    r = table1.row("mlp", "forward", "sgd")
    r["learning_rate"] = 1.0
    table1.rows("mlp")[0]["learning_rate"] = 1.0
    assert table1.row("mlp", "forward", "sgd")["learning_rate"] == 0.000464


def test_unknown_rows_and_models_are_errors():
    with pytest.raises(ValueError, match=r"model='vgg', gradient='forward', optimizer='adam'"):
        table1.row("vgg", "forward", "adam")
    with pytest.raises(ValueError, match=r"`model` must be one of .*'resnet'"):
        table1.rows("resnet")
