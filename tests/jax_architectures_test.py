"""Exactness on the JAX backend, on models nobody on this project wrote.

The JAX half of `tests/architectures_test.py`: every architecture of
`tests/model_zoo.py` (a transformer encoder, LSTM, GRU, bidirectional
and convolutional recurrent layers, grouped, separable, transposed and 3-D
convolutions, residual and concatenating blocks, two inputs and outputs, a
subclassed model, raw `jax.numpy` ops, a frozen backbone, regularizers),
a `keras.applications` model and mixed precision. The directional
derivative behind `forward_gradient()` must equal `∇f·v` from `jax.grad`
(same weights, non-trainable state and compiled loss), eagerly and under
`jax.jit`, and two SGD steps through `fit` must move every trainable
variable by `-lr·g`.

CI runs this file with `KERAS_BACKEND=jax`; on TensorFlow it is skipped
(`tests/architectures_test.py` covers that backend).

Tolerances: float32 models to a relative 2e-5 of `d`, as on TensorFlow
(the largest measured here is 3e-6, `benchmarks/results/exactness_jax`).
JAX runs without `jax_enable_x64`, so the `keras.applications` model runs
in float32 here; at 32×32 pixels its last feature maps are 1×1 and
BatchNormalization over a batch of 8 makes a float32 derivative
ill-conditioned (on TensorFlow the float32 tape is 2e-4 from the float64
one), hence a relative 1e-4 for it (measured: 7e-6 under `jax.jit`).
"""

import keras
import numpy as np
import pytest

from keras_fwdgrad import ForwardGradientModel
from tests.model_zoo import CASES
from tests.model_zoo import MIXED_PRECISION
from tests.model_zoo import application
from tests.model_zoo import application_data
from tests.model_zoo import check_directional_derivative
from tests.model_zoo import check_fit_steps
from tests.model_zoo import dtype_policy
from tests.model_zoo import random_inputs
from tests.model_zoo import random_labels

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the JAX backend's half; tests/architectures_test.py covers TensorFlow",
)

L = keras.layers
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
RTOL = 2e-5
RTOL_APPLICATION = 1e-4
# On JAX, "graph" and "xla" both mean `jax.jit`.
MODES = ("eager", "xla")


@pytest.mark.parametrize("mode", ["eager", pytest.param("xla", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_directional_derivative_matches_jax_grad(case, mode):
    build, data, loss = CASES[case]
    d, ref, err = check_directional_derivative(build, data, loss, mode, layer_rules=True)
    # Not vacuous: a derivative far from zero.
    assert abs(ref) > 1e-3
    assert err < RTOL, (d, ref)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_fit_steps_move_every_variable_by_minus_lr_g(case):
    build, data, loss = CASES[case]
    assert check_fit_steps(build, data, loss, "xla") < 1e-4


@pytest.mark.slow
def test_keras_applications_mobilenet_v2():
    """`keras.applications.MobileNetV2` (alpha 0.35, default softmax head,
    BatchNormalization, depthwise convolutions) in float32, under
    `jax.jit` (eagerly it takes a minute; the small cases cover eager
    mode)."""
    d, ref, err = check_directional_derivative(
        application("MobileNetV2"),
        application_data(),
        "sparse_categorical_crossentropy",
        "xla",
        layer_rules=True,
    )
    assert abs(ref) > 1e-3
    assert err < RTOL_APPLICATION, (d, ref)


@pytest.mark.parametrize("mode", MODES)
def test_mixed_precision_derivative_is_unscaled(mode):
    """Under `mixed_float16` Keras wraps the optimizer in a
    `LossScaleOptimizer` (scale 32768): `forward_gradient()` is the
    gradient of the loss itself, to float16 rounding (rtol 5e-3)."""
    with dtype_policy("mixed_float16"):
        d, ref, err = check_directional_derivative(*MIXED_PRECISION, mode, layer_rules=True)
    assert abs(ref) > 1e-2
    assert err < 5e-3, (d, ref)


def test_mixed_precision_fit_steps_are_unscaled():
    """Two steps through `fit` under `mixed_float16` (the optimizer is a
    `LossScaleOptimizer`) move the weights by `-lr·g` of the unscaled
    loss, to float16 rounding."""
    with dtype_policy("mixed_float16"):
        worst = check_fit_steps(*MIXED_PRECISION, "xla")
    assert worst < 5e-3


class _Round(L.Layer):
    def call(self, x):
        import jax.numpy as jnp

        return jnp.round(x)


@pytest.mark.parametrize("mode", MODES)
def test_op_differentiated_as_zero_gives_zero_as_jax_grad_does(mode):
    """JAX differentiates `jnp.round` as zero (the TensorFlow backend raises
    for `tf.round`, which has no gradient there): the variables before it
    get an exactly zero forward gradient, as `jax.grad` gives them, and the
    others their `d·v`."""
    base = keras.Sequential([keras.Input((6,)), L.Dense(8, name="cut"), _Round(), L.Dense(10)])
    model = ForwardGradientModel(base, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=SCCE, jit_compile=mode == "xla")
    _, grads = model.forward_gradient(random_inputs(6), random_labels())
    for var, g in zip(base.trainable_variables, grads):
        assert np.all(np.asarray(g) == 0) == ("cut" in var.path), var.path
