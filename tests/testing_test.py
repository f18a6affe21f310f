"""Tests of `keras_fwdgrad.testing`: `check_exactness` and `tape_gradients`
against `tf.GradientTape` and the direction `FixedDirection` documents,
worked by hand."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import testing
from tests.conftest import MODES
from tests.helpers import SCCE
from tests.helpers import data
from tests.helpers import mlp


def _tape(model, x, y):
    """The loss of a training-mode pass of `model` and its gradients, from
    `tf.GradientTape`."""
    with tf.GradientTape() as tape:
        loss = SCCE(y, model(x, training=True))
    return float(loss), tape.gradient(loss, model.trainable_variables)


@pytest.mark.parametrize("mode", MODES)
def test_check_exactness_on_an_mlp(mode):
    """The report's reference is `sum(grad * v)` worked by hand, with the
    tape's gradient and `v` from `FixedDirection(seed).numpy_sample`, and
    the forward-mode derivative equals it (float32: relative 1e-5)."""
    x, y = data(n=16)
    base = mlp()
    report = testing.check_exactness(base, x, y, SCCE, mode=mode, seed=3)
    loss, grads = _tape(base, x, y)
    v = testing.FixedDirection(3).numpy_sample([tuple(w.shape) for w in base.trainable_variables])
    reference = sum(float(np.sum(np.float64(g) * t)) for g, t in zip(grads, v))
    assert abs(reference) > 1e-3
    np.testing.assert_allclose(report["reference"], reference, rtol=1e-5)
    np.testing.assert_allclose(report["directional_derivative"], reference, rtol=1e-5)
    assert report["relative_error"] < 1e-5, report
    np.testing.assert_allclose(report["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(report["reference_loss"], loss, rtol=1e-6)


def test_check_exactness_leaves_the_model_as_it_was():
    """The trainable weights are not changed and the BatchNormalization
    statistics that the two training-mode passes update are put back."""
    x, y = data(n=16)
    base = mlp(batch_norm=True)
    before = [np.array(v) for v in base.variables]
    report = testing.check_exactness(base, x, y, SCCE, mode="graph")
    assert report["relative_error"] < 1e-5, report
    for a, b in zip(before, base.variables):
        np.testing.assert_array_equal(a, np.array(b))


@pytest.mark.parametrize("mode", MODES)
def test_reference_mode_runs_the_tape_in_that_mode(mode):
    """With `reference_mode="eager"` the reference is the eager tape's
    (the report of a plain check in eager mode, to float32 rounding) and
    the derivative is still the one of `mode`; BatchNormalization's batch
    statistics are the same in both."""
    x, y = data(n=16)
    base = mlp(batch_norm=True)
    eager = testing.check_exactness(base, x, y, SCCE, mode="eager", seed=3)
    report = testing.check_exactness(base, x, y, SCCE, mode=mode, seed=3, reference_mode="eager")
    assert abs(eager["reference"]) > 1e-3
    np.testing.assert_allclose(report["reference"], eager["reference"], rtol=1e-6)
    np.testing.assert_allclose(report["reference_loss"], eager["reference_loss"], rtol=1e-6)
    assert report["relative_error"] < 1e-5, report


class _CountsEagerCalls(keras.layers.Layer):
    """The identity, counting the calls that run eagerly."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.eager_calls = 0

    def call(self, x):
        if tf.executing_eagerly():
            self.eager_calls += 1
        return x


def test_reference_mode_eager_runs_the_tape_eagerly():
    """Under `mode="xla"` the reference of `reference_mode="eager"` calls
    the model eagerly once more than that of `reference_mode="xla"` (both
    build the model with one eager call first)."""
    x, y = data(n=16)
    counter = _CountsEagerCalls()
    base = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(8, activation="tanh"),
            counter,
            keras.layers.Dense(3),
        ]
    )

    def eager_calls(reference_mode):
        before = counter.eager_calls
        report = testing.check_exactness(
            base, x, y, SCCE, mode="xla", reference_mode=reference_mode
        )
        assert report["relative_error"] < 1e-5, report
        return counter.eager_calls - before

    assert eager_calls("eager") == eager_calls("xla") + 1


def test_reference_mode_other_than_mode_is_refused_with_random_layers():
    """Dropout draws other masks under XLA than outside it, so a reference
    from another mode would not be the same function: refused, naming
    the layer. In the same mode it is allowed."""
    x, y = data(n=16)
    base = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(3),
        ]
    )
    with pytest.raises(ValueError, match=r"`reference_mode` must be `mode` \('xla'\).*drop"):
        testing.check_exactness(base, x, y, SCCE, mode="xla", reference_mode="eager")
    report = testing.check_exactness(base, x, y, SCCE, mode="xla", reference_mode="xla")
    assert report["relative_error"] < 1e-5, report
    with pytest.raises(ValueError, match="`reference_mode` must be one of .* Received"):
        testing.check_exactness(mlp(), x, y, SCCE, reference_mode="jit")


@pytest.mark.parametrize("mode", MODES)
def test_tape_gradients_match_gradient_tape(mode):
    x, y = data(n=16)
    base = mlp()
    model = ForwardGradientModel(base, seed=0)
    model.compile(optimizer="sgd", loss=SCCE)
    loss, grads = testing.tape_gradients(model, x, y, mode)
    expected_loss, expected = _tape(base, x, y)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    assert len(grads) == len(expected)
    for g, e in zip(grads, expected):
        assert g.dtype == np.float64
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-5, atol=1e-7)


def test_unknown_mode_is_an_error():
    x, y = data(n=4)
    model = ForwardGradientModel(mlp(), seed=0)
    model.compile(optimizer="sgd", loss=SCCE)
    with pytest.raises(ValueError, match="`mode` must be one of .* Received: mode='jit'"):
        testing.check_exactness(mlp(), x, y, SCCE, mode="jit")
    with pytest.raises(ValueError, match="`mode` must be one of .* Received: mode='jit'"):
        testing.tape_gradients(model, x, y, mode="jit")


def test_fixed_direction_is_the_same_at_every_step_and_round_trips():
    direction = testing.FixedDirection(seed=4)
    shapes = [(3, 2), (2,)]
    first = direction.sample(shapes, tf.constant([0, 0]))
    later = direction.sample(shapes, tf.constant([0, 9]))
    for a, b, n in zip(first, later, direction.numpy_sample(shapes)):
        np.testing.assert_array_equal(np.array(a), np.array(b))
        np.testing.assert_array_equal(np.array(a), n)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(direction))
    assert isinstance(clone, testing.FixedDirection) and clone.seed == 4
