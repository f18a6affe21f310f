"""Tests of `keras_fwdgrad.options`: the forward options are written once
(`ForwardGradientModel`'s signature), and every one of them can be set by
an experiment's method, searched by the tuner and saved with the model."""

import inspect
import os

import keras
import pytest

from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import options
from keras_fwdgrad.research import experiments

# For each forward option: a value other than its default, and the other
# options it needs. A new option of `ForwardGradientModel` must be added
# here, which makes these tests check that it is searchable and recorded.
ACTIVITY = {"perturbation": "activations"}
ALTERNATIVES = {
    "direction": ("rademacher", {}),
    "num_directions": (2, {}),
    "jvp_clip": (1.0, {}),
    "all_reduce": ("gradients", {}),
    "layer_rules": (False, {}),
    "perturbation": ("activations", {}),
    "local_losses": ("layers", ACTIVITY),
    "orthogonal_directions": (True, dict(ACTIVITY, num_directions=2)),
    "active_units_only": (False, ACTIVITY),
    "local_loss_groups": (2, dict(ACTIVITY, local_losses="layers")),
    "local_loss_patches": (2, dict(ACTIVITY, local_losses="layers")),
    "local_head_units": (8, dict(ACTIVITY, local_losses="layers")),
}


def _mlp():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.Dense(2),
        ]
    )


def _value(model, name):
    value = getattr(model, name)
    if name == "direction":
        return type(value).__name__.lower()
    return value


def test_options_are_the_model_signature():
    parameters = inspect.signature(ForwardGradientModel.__init__).parameters
    expected = [n for n in parameters if n not in ("self", "model", "seed", "kwargs")]
    assert list(options.names()) == expected
    assert options.defaults()["direction"] == "gaussian"
    assert options.defaults()["num_directions"] == 1
    assert set(ALTERNATIVES) == set(options.names()), (
        "Add the new forward option to ALTERNATIVES, with a value other than "
        "its default, so that the tests below check it."
    )


def test_every_option_is_saved_in_the_config():
    config = ForwardGradientModel(_mlp(), seed=0).get_config()
    assert set(options.names()) <= set(config)


@pytest.mark.parametrize("name", sorted(ALTERNATIVES))
def test_every_option_reaches_the_model_of_an_experiment(name):
    value, needs = ALTERNATIVES[name]
    assert value != options.defaults()[name]
    spec = experiments.method("forward", 1e-3, **dict(needs, **{name: value}))
    assert set(options.names()) <= set(spec)
    model = experiments.build_training_model(spec, _mlp(), seed=0)
    assert _value(model, name) == value


@pytest.mark.parametrize("name", sorted(ALTERNATIVES))
def test_every_option_is_searchable(name):
    keras_tuner = pytest.importorskip("keras_tuner")
    from keras_fwdgrad import tuning

    value, needs = ALTERNATIVES[name]
    default = options.defaults()[name]
    hypermodel = tuning.LearningRateHyperModel(
        _mlp,
        gradient="forward",
        learning_rate_range=(1e-2, 1e-2),
        decay_values=(0.0,),
        jit_compile=False,
        **dict(needs, **{name: (default, value)}),
    )
    assert hypermodel.grid_size()[1] == {name: 2}
    hp = keras_tuner.HyperParameters()
    hypermodel.declare(hp)
    (param,) = [p for p in hp.space if p.name == name]
    built = []
    for choice in param.values:
        hp.values[name] = choice
        built.append(_value(hypermodel.build(hp), name))
    assert built == [default, value]


def test_unknown_options_are_refused_by_name():
    with pytest.raises(TypeError, match="unknown keyword argument.*'directions'"):
        experiments.method("forward", 1e-3, directions="gaussian")
    pytest.importorskip("keras_tuner")
    from keras_fwdgrad import tuning

    with pytest.raises(TypeError, match="unknown keyword argument.*'num_direction'"):
        tuning.LearningRateHyperModel(_mlp, num_direction=(1, 2))


def test_every_option_is_in_the_readme_options_table():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    table = readme[readme.index("## Options") :]
    table = table[: table.index("\n## ", 1)]
    missing = [n for n in options.names() if f"| `{n}` |" not in table]
    assert not missing, f"README's options table lacks {missing}"
