"""Tests of the callbacks: `GradientCosine`, the cosine of the forward
gradient with the true one."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import GradientCosine
from tests.helpers import SCCE
from tests.helpers import data
from tests.helpers import mlp


def test_gradient_cosine_callback():
    """With one parameter the forward gradient is `g v²`, so its cosine
    with the true gradient is exactly 1; on the MLP it is the cosine of
    `forward_gradient()` with the tape's gradient, logged once per epoch,
    and training state is untouched by the measurement (BatchNormalization
    statistics are put back)."""
    x, y = data(n=32)
    single = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    model = ForwardGradientModel(single, seed=0)
    model.compile(optimizer="sgd", loss="mse")
    xs, ys = x[:, :1], y[:, None].astype("float32")
    cosine = GradientCosine(xs, ys, every=1)
    history = model.fit(xs, ys, batch_size=8, epochs=1, verbose=0, callbacks=[cosine])
    np.testing.assert_allclose(cosine.values, 1.0, rtol=1e-6)
    assert history.history["gradient_cosine"] == [pytest.approx(1.0)]

    base = mlp(batch_norm=True)
    model = ForwardGradientModel(base, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=SCCE)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    stats = [v.numpy() for v in base.non_trainable_variables]
    cosine = GradientCosine(x, y, every=2)
    cosine.set_model(model)
    value = cosine.measure()
    for before, var in zip(stats, base.non_trainable_variables):
        np.testing.assert_array_equal(before, var.numpy())
    # The same cosine worked from the public pieces: one direction's
    # estimate `(∇f·v) v` (the stream does not advance) and the tape's
    # gradient of the loss in training mode, in float64 (rtol 1e-5). With
    # one direction it is |cos(v, ∇f)| > 0, of order sqrt(2 / (π n)) for
    # n = 131 parameters (0.070); measured: 0.0699 from both.
    _, estimate = model.forward_gradient(x, y)
    with tf.GradientTape() as tape:
        loss = SCCE(y, base(x, training=True))
    true = tape.gradient(loss, base.trainable_variables)
    a = np.concatenate([np.ravel(g) for g in estimate]).astype("float64")
    b = np.concatenate([np.ravel(g) for g in true]).astype("float64")
    expected = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert expected > 0
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="`every` must be a positive integer"):
        GradientCosine(x, y, every=0)
