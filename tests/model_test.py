"""Tests of `ForwardGradientModel`: training, the update rule worked by
hand, clipping, saving and resuming, and its Keras wiring."""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import directions
from tests.conftest import MODES
from tests.conftest import compile_kwargs
from tests.helpers import SCCE
from tests.helpers import data
from tests.helpers import mlp
from tests.helpers import sample_direction
from tests.helpers import seed_of_step
from tests.helpers import tape_directional_derivative
from tests.helpers import weights_of

L = keras.layers


OPTIMIZERS = {
    "sgd": lambda clip: keras.optimizers.SGD(0.1, clipnorm=clip),
    "nesterov": lambda clip: keras.optimizers.SGD(
        0.02, momentum=0.9, nesterov=True, clipnorm=clip
    ),
    "adam": lambda clip: keras.optimizers.Adam(0.03, clipnorm=clip),
}


@pytest.mark.parametrize("clipnorm", [None, 1.0])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("mode", MODES)
def test_fit_lowers_loss(mode, optimizer, clipnorm):
    """Probabilistic, fixed seed: 96 steps cut the loss by more than 15 %.

    Over 8 direction seeds for each of the 6 optimizer settings the largest
    ratio of final to initial loss was 0.80; a model that does not learn
    stays near 1.
    """
    x, y = data()
    model = ForwardGradientModel(mlp(hidden=4), seed=1)
    model.compile(
        optimizer=OPTIMIZERS[optimizer](clipnorm),
        loss=SCCE,
        metrics=["accuracy"],
        **compile_kwargs(mode),
    )
    before = model.evaluate(x, y, verbose=0)[0]
    history = model.fit(x, y, batch_size=16, epochs=6, verbose=0)
    after = model.evaluate(x, y, verbose=0)[0]
    assert set(history.history) >= {"loss", "accuracy", "skipped_steps"}
    assert history.history["skipped_steps"][-1] == 0
    assert after < 0.85 * before, (before, after)


@pytest.mark.parametrize("layer_rules", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "direction",
    ["gaussian", "rademacher", "lowrank_gaussian", "lowrank_rademacher"],
)
def test_one_sgd_step_is_w_minus_lr_d_v(mode, direction, layer_rules):
    """One SGD step moves the weights by exactly -lr * d * v, with v drawn
    from the documented stream (seed, step) and d = ∇f·v from a tape, with
    the layer rules and with `tf.autodiff.ForwardAccumulator`."""
    x, y = data(n=16)
    base = mlp()
    model = ForwardGradientModel(base, direction=direction, seed=42, layer_rules=layer_rules)
    assert model.uses_layer_rules == layer_rules
    lr = 0.1
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=SCCE, **compile_kwargs(mode))
    w0 = weights_of(base)
    shapes = [w.shape for w in w0]
    v = sample_direction(direction, shapes, seed_of_step(42, 0), mode)
    d, _ = tape_directional_derivative(base, x, y, v)
    model.train_on_batch(x, y)
    for w_before, w_after, t in zip(w0, weights_of(base), v):
        np.testing.assert_allclose(w_after, w_before - lr * d * t.numpy(), rtol=1e-5, atol=1e-6)
    assert int(model.direction_step) == 1


@pytest.mark.parametrize(
    "clip_kwargs",
    [{"clipnorm": 0.5}, {"global_clipnorm": 0.5}, {"clipvalue": 0.01}],
)
def test_optimizer_clipping_applies_to_forward_gradient(clip_kwargs):
    x, y = data(n=16)
    base = mlp()
    model = ForwardGradientModel(base, seed=3)
    lr = 0.1
    model.compile(optimizer=keras.optimizers.SGD(lr, **clip_kwargs), loss=SCCE)
    w0 = weights_of(base)
    v = directions.Gaussian().sample([w.shape for w in w0], seed_of_step(3, 0))
    d, _ = tape_directional_derivative(base, x, y, v)
    g = [d * t.numpy() for t in v]
    if "clipnorm" in clip_kwargs:
        g = [gi * min(1.0, 0.5 / np.linalg.norm(gi)) for gi in g]
    elif "global_clipnorm" in clip_kwargs:
        norm = math.sqrt(sum(np.sum(gi**2) for gi in g))
        g = [gi * min(1.0, 0.5 / norm) for gi in g]
    else:
        g = [np.clip(gi, -0.01, 0.01) for gi in g]
    model.train_on_batch(x, y)
    for w_before, w_after, gi in zip(w0, weights_of(base), g):
        np.testing.assert_allclose(w_after, w_before - lr * gi, rtol=1e-5, atol=1e-6)


def test_forward_gradient_method_does_not_apply_or_advance():
    x, y = data(n=16)
    base = mlp()
    model = ForwardGradientModel(base, seed=5)
    model.compile(optimizer="sgd", loss=SCCE)
    w0 = weights_of(base)
    loss, grads = model.forward_gradient(x, y)
    v = directions.Gaussian().sample([w.shape for w in w0], seed_of_step(5, 0))
    d, _ = tape_directional_derivative(base, x, y, v)
    np.testing.assert_allclose(float(loss), float(SCCE(y, base(x))), rtol=1e-6)
    for g, t in zip(grads, v):
        np.testing.assert_allclose(g, d * t.numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip(w0, weights_of(base)):
        np.testing.assert_array_equal(a, b)
    assert int(model.direction_step) == 0


def test_forward_gradient_requires_compile():
    model = ForwardGradientModel(mlp())
    with pytest.raises(ValueError, match="compile"):
        model.forward_gradient(*data(n=4))


def test_forward_gradient_without_targets_is_a_clear_error():
    model = ForwardGradientModel(mlp())
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, _ = data(n=4)
    with pytest.raises(ValueError, match="needs the targets `y`"):
        model.forward_gradient(x)


def test_learning_rate_schedule_paper_decay():
    x, y = data(n=64)
    eta0, k = 0.01, 1e-4
    schedule = keras.optimizers.schedules.ExponentialDecay(eta0, 1, math.exp(-k))
    model = ForwardGradientModel(mlp(), seed=0)
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss=SCCE)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 4
    np.testing.assert_allclose(
        float(model.optimizer.learning_rate), eta0 * math.exp(-4 * k), rtol=1e-6
    )


@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_statistics_update(mode):
    x, y = data(n=64)
    base = mlp(batch_norm=True)
    model = ForwardGradientModel(base, seed=0)
    model.compile(optimizer="sgd", loss=SCCE, **compile_kwargs(mode))
    bn = base.layers[1]
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert not np.allclose(np.array(bn.moving_mean), 0.0)


def test_evaluate_and_predict_match_base_model():
    x, y = data(n=64)
    base = mlp(batch_norm=True)
    model = ForwardGradientModel(base)
    model.compile(optimizer="sgd", loss=SCCE)
    base.compile(loss=SCCE)
    np.testing.assert_allclose(model.predict(x, verbose=0), base.predict(x, verbose=0), atol=1e-6)
    np.testing.assert_allclose(
        model.evaluate(x, y, verbose=0), base.evaluate(x, y, verbose=0), atol=1e-6
    )


def test_config_round_trip():
    model = ForwardGradientModel(
        mlp(), direction="rademacher", num_directions=2, jvp_clip=1.0, seed=9, name="fg"
    )
    clone = ForwardGradientModel.from_config(model.get_config())
    assert isinstance(clone.direction, directions.Rademacher)
    assert (clone.num_directions, clone.jvp_clip, clone.seed, clone.name) == (2, 1.0, 9, "fg")
    assert len(clone.model.layers) == len(model.model.layers)


def test_save_load_predict_and_resume(tmp_path):
    """A saved model reloads with equal predictions and settings, and
    resuming from it gives the same weights as never stopping."""
    x, y = data()

    def new_model():
        keras.utils.set_random_seed(0)
        model = ForwardGradientModel(
            mlp(batch_norm=True), direction="rademacher", seed=21, jvp_clip=5.0
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.02, momentum=0.9, nesterov=True),
            loss=SCCE,
            metrics=["accuracy"],
        )
        return model

    fit = dict(batch_size=32, shuffle=False, verbose=0)
    uninterrupted = new_model()
    uninterrupted.fit(x, y, epochs=3, **fit)

    first = new_model()
    first.fit(x, y, epochs=2, **fit)
    path = os.path.join(tmp_path, "fg.keras")
    first.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, ForwardGradientModel)
    assert isinstance(loaded.direction, directions.Rademacher)
    assert (loaded.seed, loaded.jvp_clip) == (21, 5.0)
    assert int(loaded.direction_step) == int(first.direction_step) == 16
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), first.predict(x, verbose=0), atol=1e-6
    )

    loaded.fit(x, y, epochs=1, **fit)
    for a, b in zip(uninterrupted.model.variables, loaded.model.variables):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-6)


def test_weights_load_into_fresh_instance(tmp_path):
    model = ForwardGradientModel(mlp(), seed=0)
    path = os.path.join(tmp_path, "fg.weights.h5")
    model.save_weights(path)
    fresh = ForwardGradientModel(mlp(), seed=0)
    fresh.load_weights(path)
    for a, b in zip(model.weights, fresh.weights):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_unbuilt_sequential_base_builds_on_fit():
    x, y = data(n=32)
    base = keras.Sequential([L.Dense(4, activation="relu"), L.Dense(3)])
    model = ForwardGradientModel(base, seed=0)
    model.compile(optimizer="sgd", loss=SCCE)
    model.fit(x, y, epochs=1, verbose=0)
    assert base.built


def test_fit_reports_layer_without_forward_mode_rule():
    from tests.ops_test import BicubicUpsample

    base = keras.Sequential([keras.Input((4, 4, 1)), BicubicUpsample(), L.Flatten(), L.Dense(2)])
    model = ForwardGradientModel(base)
    model.compile(optimizer="sgd", loss=SCCE)
    with pytest.raises(ValueError, match="ResizeBicubicGrad"):
        model.fit(np.ones((4, 4, 4, 1), "float32"), np.zeros(4), verbose=0)


def test_layer_rules_argument_and_config():
    model = ForwardGradientModel(mlp(), layer_rules=False, seed=1)
    assert model.get_config()["layer_rules"] is False
    assert ForwardGradientModel.from_config(model.get_config()).layer_rules is False
    assert ForwardGradientModel(mlp(), seed=1).layer_rules is True
    with pytest.raises(TypeError, match="`layer_rules` must be a bool"):
        ForwardGradientModel(mlp(), layer_rules="yes")


def test_all_reduce_argument_and_config():
    model = ForwardGradientModel(mlp(), all_reduce="gradients", seed=1)
    assert model.get_config()["all_reduce"] == "gradients"
    restored = ForwardGradientModel.from_config(model.get_config())
    assert restored.all_reduce == "gradients"
    # On one replica nothing is all-reduced.
    assert model.all_reduce_bytes_per_step() == 0
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert model.all_reduce_bytes_per_step(num_replicas=8) == 4 * params + 4
    default = ForwardGradientModel(mlp(), num_directions=3, seed=1)
    assert default.all_reduce_bytes_per_step(num_replicas=8) == 3 * 4
    with pytest.raises(ValueError, match="`all_reduce` must be one of"):
        ForwardGradientModel(mlp(), all_reduce="allgather")


def test_deployment_goes_through_the_wrapped_model(tmp_path):
    """`export()` serves the wrapped model after `fit`, `summary()` counts
    only its parameters, its weights move into a fresh copy through
    `model.model`, and a legacy `.h5` file is refused with a message."""
    x, y = data(n=32)
    base = mlp()
    model = ForwardGradientModel(base, seed=0)
    model.compile(optimizer="sgd", loss=SCCE)
    model.fit(x, y, epochs=1, verbose=0)
    expected = base.predict(x, verbose=0)

    path = str(tmp_path / "served")
    model.export(path)
    served = tf.saved_model.load(path)
    np.testing.assert_allclose(served.serve(x).numpy(), expected, rtol=1e-5, atol=1e-6)

    lines = []
    model.summary(print_fn=lambda line, **kwargs: lines.append(line))
    text = "\n".join(lines)
    assert f"Total params: {base.count_params():,}" in text
    assert "Non-trainable params: 0" in text

    weights = str(tmp_path / "base.weights.h5")
    model.model.save_weights(weights)
    fresh = mlp()
    fresh.load_weights(weights)
    np.testing.assert_allclose(fresh.predict(x, verbose=0), expected, rtol=1e-6)

    with pytest.raises(ValueError, match="legacy HDF5"):
        model.save(str(tmp_path / "model.h5"))
