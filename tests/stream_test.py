"""Tests of the direction stream: a run is a function of the model's
`seed`, so the same seed repeats it and another seed does not; without a
`seed` the model draws one and keeps it in its config."""

import keras
import numpy as np

from keras_fwdgrad import ForwardGradientModel
from tests.helpers import SCCE
from tests.helpers import data
from tests.helpers import mlp
from tests.helpers import weights_of


def test_same_seed_same_run_and_other_seed_differs():
    x, y = data()

    def train(seed):
        keras.utils.set_random_seed(0)
        base = mlp()
        model = ForwardGradientModel(base, seed=seed)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss=SCCE, jit_compile=True)
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        return weights_of(base)

    a, b, c = train(11), train(11), train(12)
    for wa, wb in zip(a, b):
        np.testing.assert_array_equal(wa, wb)
    assert any(not np.allclose(wa, wc) for wa, wc in zip(a, c))


def test_seed_none_draws_and_keeps_a_seed():
    model = ForwardGradientModel(mlp())
    assert isinstance(model.seed, int)
    assert ForwardGradientModel.from_config(model.get_config()).seed == model.seed
