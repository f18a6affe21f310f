"""Tests of `keras_fwdgrad.estimator`, weight perturbation's estimate on
TensorFlow: K directions averaged and clamped, worked by hand, and the K
passes sharing one forward state."""

import keras
import numpy as np
import pytest

from keras_fwdgrad import ForwardGradientModel
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


@pytest.mark.parametrize("mode", MODES)
def test_num_directions_averages_and_jvp_clip_clamps(mode):
    x, y = data(n=16)
    base = mlp()
    k, clip, lr = 3, 0.05, 0.1
    model = ForwardGradientModel(base, num_directions=k, jvp_clip=clip, seed=7)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=SCCE, **compile_kwargs(mode))
    w0 = weights_of(base)
    shapes = [w.shape for w in w0]
    expected = [np.zeros_like(w) for w in w0]
    clipped = 0
    for i in range(k):
        v = sample_direction("gaussian", shapes, seed_of_step(7, 0, i), mode)
        d, _ = tape_directional_derivative(base, x, y, v)
        clipped += abs(d) > clip
        d = float(np.clip(d, -clip, clip))
        for e, t in zip(expected, v):
            e += d * t.numpy() / k
    assert clipped > 0, "the test must exercise the clamp"
    model.train_on_batch(x, y)
    for w_before, w_after, e in zip(w0, weights_of(base), expected):
        np.testing.assert_allclose(w_after, w_before - lr * e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_multiple_directions_share_one_forward_state(mode):
    """With K passes, BatchNormalization statistics are updated once and
    every pass sees the same dropout mask (same as K = 1)."""
    x, y = data(n=32)

    def run(k):
        keras.utils.set_random_seed(0)
        base = keras.Sequential(
            [
                keras.Input((10,)),
                L.Dense(8),
                L.BatchNormalization(momentum=0.5),
                L.Dropout(0.5, seed=1),
                L.Dense(3),
            ]
        )
        model = ForwardGradientModel(base, num_directions=k, seed=0)
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss=SCCE, **compile_kwargs(mode))
        model.train_on_batch(x, y)
        return np.array(base.layers[1].moving_mean)

    np.testing.assert_allclose(run(3), run(1), rtol=1e-6, atol=1e-7)
