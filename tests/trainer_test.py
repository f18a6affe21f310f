"""Tests of the backend-neutral trainer (`keras_fwdgrad/trainer.py`): a
non-finite step is skipped and changes nothing, the epoch logs average the
finite steps and count the skipped ones, and the diagnostics `mean_abs_d`
and `clipped_fraction` reach the history."""

import glob
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
from tests.helpers import weights_of


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_step_changes_nothing(mode):
    x, y = data(n=32)
    base = mlp(batch_norm=True)
    model = ForwardGradientModel(base, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=SCCE, **compile_kwargs(mode))
    model.train_on_batch(x, y)  # Builds everything and takes one real step.
    state = [np.array(v) for v in base.variables + model.optimizer.variables]
    x_bad = x.copy()
    x_bad[0, 0] = np.nan
    logs = model.train_on_batch(x_bad, y, return_dict=True)
    assert math.isnan(logs["loss"])
    assert logs["skipped_steps"] == 1
    after = [np.array(v) for v in base.variables + model.optimizer.variables]
    for a, b in zip(state, after):
        np.testing.assert_array_equal(a, b)
    # The stream moves on and the next finite step trains as usual; the
    # logs count this call's skipped steps, the model its lifetime's.
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["skipped_steps"] == 0
    assert int(model.skipped_steps) == 1
    assert int(model.optimizer.iterations) == 2
    assert int(model.direction_step) == 3


@pytest.mark.parametrize("mode", MODES)
def test_epoch_logs_stay_finite_and_count_skipped_steps_per_epoch(mode, tmp_path):
    """One NaN batch out of four, two epochs: the epoch logs (history and
    CSVLogger) average the three finite steps, `skipped_steps` is 1 per
    epoch, and the model's lifetime counter is 2."""
    x, y = data(n=32)
    x[8, 0] = np.nan  # in the second of four batches of 8
    model = ForwardGradientModel(mlp(), seed=0)
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss=SCCE,
        metrics=["accuracy"],
        **compile_kwargs(mode),
    )
    path = str(tmp_path / "log.csv")
    # The loss of each batch as the step measures it: at the weights before
    # its update (the MLP has no dropout or BatchNormalization).
    batch_losses = []
    measure = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: batch_losses.append(
            float(SCCE(y[8 * batch : 8 * batch + 8], model.model(x[8 * batch : 8 * batch + 8])))
        )
    )
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        shuffle=False,
        verbose=0,
        callbacks=[measure, keras.callbacks.CSVLogger(path)],
    )
    assert history.history["skipped_steps"] == [1, 1]
    assert int(model.skipped_steps) == 2
    for key in ("loss", "accuracy"):
        assert all(math.isfinite(v) for v in history.history[key]), history.history
    with open(path) as f:
        rows = f.read().strip().splitlines()
    assert "nan" not in rows[1].lower() and "nan" not in rows[2].lower()
    # Each epoch logs the mean loss of its three finite batches (measured:
    # within 6e-8 relative; float32 means of eight terms, rtol 1e-5). Losses
    # measured after each update differ by 1e-3 relative, and counting the
    # skipped batch as 0 gives 1.000 instead of 1.333.
    assert len(batch_losses) == 8 and math.isnan(batch_losses[1])
    for epoch in range(2):
        finite = [batch_losses[4 * epoch + i] for i in (0, 2, 3)]
        np.testing.assert_allclose(history.history["loss"][epoch], np.mean(finite), rtol=1e-5)


def test_skipped_steps_is_logged_as_a_float_per_epoch(capsys):
    x, y = data(n=32)
    x[8, 0] = np.nan
    model = ForwardGradientModel(mlp(), seed=0)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss=SCCE)
    capsys.readouterr()
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=2)
    # Like every Keras metric: a float per epoch, one bad batch each.
    assert history.history["skipped_steps"] == [1.0, 1.0]
    assert "skipped_steps: 1.0000" in capsys.readouterr().out
    assert int(model.skipped_steps) == 2


def test_epoch_with_no_finite_step_logs_nan():
    x, y = data(n=16)
    x[:, 0] = np.nan
    model = ForwardGradientModel(mlp(), seed=0)
    model.compile(optimizer="sgd", loss=SCCE, metrics=["accuracy"])
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert math.isnan(history.history["loss"][0])
    assert math.isnan(history.history["accuracy"][0])
    assert history.history["skipped_steps"] == [2]


def test_infinite_directional_derivative_is_skipped():
    class Exploding(directions.Direction):
        def sample(self, shapes, seed, dtype="float32"):
            return [tf.fill(s, float("inf")) for s in shapes]

    x, y = data(n=16)
    base = mlp()
    model = ForwardGradientModel(base, direction=Exploding())
    model.compile(optimizer="sgd", loss=SCCE)
    w0 = weights_of(base)
    expected = float(SCCE(y, base(x)))
    logs = model.train_on_batch(x, y, return_dict=True)
    # Only the derivative is infinite: the loss is logged as measured.
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-6)
    assert logs["skipped_steps"] == 1
    for a, b in zip(w0, weights_of(base)):
        np.testing.assert_array_equal(a, b)


def test_terminate_on_nan_stops_only_when_no_step_is_finite():
    """A skipped batch leaves the weights and the logs finite, so
    `TerminateOnNaN` lets training go on; when every step of the epoch so
    far is non-finite (a whole epoch, or its first batch) the logs are NaN
    and it stops training (docs/behaviour.md, "Non-finite steps")."""
    x, y = data(n=128)
    x[70, 0] = np.nan
    base = mlp()
    model = ForwardGradientModel(base, seed=0)
    model.compile(optimizer="sgd", loss=SCCE)
    fit = dict(
        batch_size=32, shuffle=False, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()]
    )
    history = model.fit(x, y, epochs=5, **fit)
    assert len(history.history["loss"]) == 5
    assert history.history["skipped_steps"] == [1] * 5
    assert all(np.all(np.isfinite(w)) for w in weights_of(base))
    x[:, 0] = np.nan
    before = weights_of(base)
    history = model.fit(x, y, epochs=5, **fit)
    assert len(history.history["loss"]) == 1
    assert math.isnan(history.history["loss"][0])
    # Every step of that epoch was skipped: no weight moved.
    for a, b in zip(before, weights_of(base)):
        np.testing.assert_array_equal(a, b)
    # The epoch's first step stopped it: one step of the four.
    assert int(model.direction_step) == 4 * 5 + 1
    x, y = data(n=128)
    x[0, 0] = np.nan
    history = model.fit(x, y, epochs=5, **fit)
    assert len(history.history["loss"]) == 1
    assert int(model.direction_step) == 4 * 5 + 1 + 1


def test_diagnostics_in_history_and_tensorboard(tmp_path):
    """`mean_abs_d` and, with `jvp_clip`, `clipped_fraction` reach the
    history and TensorBoard's event files. With a cap far below the
    typical |d| nearly every derivative is capped; without `jvp_clip`
    there is no `clipped_fraction`."""
    x, y = data(n=64)
    model = ForwardGradientModel(mlp(), seed=0, jvp_clip=1e-4)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss=SCCE)
    logdir = str(tmp_path / "tb")
    history = model.fit(
        x, y, batch_size=16, epochs=2, verbose=0, callbacks=[keras.callbacks.TensorBoard(logdir)]
    )
    assert history.history["clipped_fraction"][-1] > 0.9
    # Capped derivatives have |d| = 1e-4 exactly.
    assert 1e-4 * 0.99 < history.history["mean_abs_d"][-1] < 1e-4 * 1.01
    tags = set()
    for path in glob.glob(os.path.join(logdir, "train", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    assert {"epoch_mean_abs_d", "epoch_clipped_fraction", "epoch_skipped_steps"} <= tags

    plain = ForwardGradientModel(mlp(), seed=0)
    plain.compile(optimizer=keras.optimizers.SGD(1e-3), loss=SCCE)
    logs = plain.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert "clipped_fraction" not in logs and logs["mean_abs_d"][0] > 0
    assert set(plain.evaluate(x, y, verbose=0, return_dict=True)) == {"loss"}
