"""Exactness on models nobody on this project wrote.

For every architecture: the directional derivative behind
`ForwardGradientModel.forward_gradient()` equals `∇f·v` from
`tf.GradientTape` (same weights, same non-trainable state, same compiled
loss) in eager, graph and XLA modes, on both paths (the layer rules and
`tf.autodiff.ForwardAccumulator` over the whole model); and two SGD steps
through `fit` move every trainable variable by `-lr·g`.

Tolerances: float32 models to a relative 2e-5 of `d` (float32 rounding of
a loss of order 1 through a few layers; the largest seen is 2e-6). The
`keras.applications` models run in float64: at 32×32 pixels their last
feature maps are 1×1, so BatchNormalization over a batch of 8 makes a
float32 derivative ill-conditioned (the float32 tape itself is 2e-4 away
from the float64 one on MobileNetV2); in float64 every path agrees to 1e-6
(the loss is float32).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import testing
from tests.model_zoo import CASES
from tests.model_zoo import MIXED_PRECISION
from tests.model_zoo import application
from tests.model_zoo import application_data
from tests.model_zoo import check_directional_derivative
from tests.model_zoo import check_fit_steps
from tests.model_zoo import dtype_policy
from tests.model_zoo import random_inputs
from tests.model_zoo import random_labels
from tests.conftest import ARCHITECTURE_MODES
from tests.conftest import MODES

L = keras.layers
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
RTOL = 2e-5
RTOL_FLOAT64 = 1e-6


@pytest.mark.parametrize("layer_rules", [True, False], ids=["rules", "accumulator"])
@pytest.mark.parametrize("mode", ARCHITECTURE_MODES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_directional_derivative_matches_tape(case, mode, layer_rules):
    build, data, loss = CASES[case]
    d, ref, err = check_directional_derivative(build, data, loss, mode, layer_rules)
    # Not vacuous: a derivative far from zero.
    assert abs(ref) > 1e-3
    assert err < RTOL, (d, ref)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_fit_steps_move_every_variable_by_minus_lr_g(case):
    build, data, loss = CASES[case]
    assert check_fit_steps(build, data, loss, "graph") < 1e-4


@pytest.mark.parametrize("layer_rules", [True, False], ids=["rules", "accumulator"])
@pytest.mark.parametrize("mode", MODES)
def test_mixed_precision_derivative_is_unscaled(mode, layer_rules):
    """Under `mixed_float16` Keras wraps the optimizer in a
    `LossScaleOptimizer` (scale 32768): `forward_gradient()` is the
    gradient of the loss itself, to float16 rounding (rtol 5e-3)."""
    with dtype_policy("mixed_float16"):
        d, ref, err = check_directional_derivative(*MIXED_PRECISION, mode, layer_rules)
    assert abs(ref) > 1e-2
    assert err < 5e-3, (d, ref)


@pytest.mark.parametrize("mode", MODES)
def test_loss_scale_factor_is_undone_before_jvp_clip_and_in_the_update(mode):
    """With `SGD(loss_scale_factor=64)`, `jvp_clip` clips the true `d`, and
    one step moves the weights by `-lr·clip(d)·v` (not 64 times less or
    more)."""
    keras.utils.set_random_seed(3)
    build, (x, y), loss = CASES["softmax_sparse_crossentropy"]
    base = build()
    _, ref, _ = check_directional_derivative(lambda: base, (x, y), loss, "eager", True)
    clip = abs(ref) / 2
    model = ForwardGradientModel(base, direction=testing.FixedDirection(), jvp_clip=clip, seed=0)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, loss_scale_factor=64.0),
        loss=loss,
        run_eagerly=mode == "eager",
        jit_compile=mode == "xla",
    )
    v = testing.FixedDirection().numpy_sample([tuple(w.shape) for w in base.trainable_variables])
    _, grads = model.forward_gradient(x, y)
    for g, t in zip(grads, v):
        np.testing.assert_allclose(g, np.sign(ref) * clip * t, rtol=1e-5, atol=1e-7)
    before = [np.array(w) for w in base.trainable_variables]
    model.train_on_batch(x, y)
    for b, w, t in zip(before, base.trainable_variables, v):
        np.testing.assert_allclose(
            np.array(w) - b, -0.1 * np.sign(ref) * clip * t, rtol=1e-4, atol=1e-6
        )


# Every `keras.applications` model is left out of the fast tier; the three
# large ones run only on request (`-m heavy`).
APPLICATIONS = [
    pytest.param("MobileNetV2", marks=pytest.mark.slow),
    pytest.param("EfficientNetB0", marks=[pytest.mark.slow, pytest.mark.heavy]),
    pytest.param("ResNet50V2", marks=[pytest.mark.slow, pytest.mark.heavy]),
    pytest.param("DenseNet121", marks=[pytest.mark.slow, pytest.mark.heavy]),
]


APPLICATIONS_WITHOUT_DROPOUT = ("MobileNetV2", "ResNet50V2", "DenseNet121")


@pytest.mark.parametrize("layer_rules", [True, False], ids=["rules", "accumulator"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", APPLICATIONS)
def test_keras_applications_default_softmax_head(name, mode, layer_rules):
    """The default head (softmax, `from_logits=False`) of
    `keras.applications` models, in float64 (see the module docstring).
    ResNet50V2 and DenseNet121 have overlapping max-pooling in their stem.
    The reference is the eager tape's in every mode (compiling a large
    model's reverse pass once more per mode costs most of a check), except
    for models with dropout (EfficientNetB0), whose masks differ under
    XLA."""
    d, ref, err = check_directional_derivative(
        application(name),
        application_data(),
        "sparse_categorical_crossentropy",
        mode,
        layer_rules,
        reference_mode="eager" if name in APPLICATIONS_WITHOUT_DROPOUT else None,
    )
    assert abs(ref) > 1e-3
    assert err < RTOL_FLOAT64, (d, ref)


class _OwnGroupedConv(L.Layer):
    """Your own layer calling `keras.ops.conv` with a grouped kernel (Keras
    runs it through a nested XLA-compiled function)."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(3, 3, input_shape[-1] // 2, 4))

    def call(self, x):
        return keras.ops.conv(x, self.kernel)


@pytest.mark.parametrize("mode", MODES)
def test_own_layer_with_grouped_keras_conv_is_exact(mode):
    """Outside the layer rules too: TensorFlow's forward mode through Keras'
    nested XLA function for grouped convolutions is wrong in a
    `tf.function` (relative error 0.53 here before), so it never sees it."""
    build = lambda: keras.Sequential(  # noqa: E731
        [keras.Input((6, 6, 4)), _OwnGroupedConv(), L.Flatten(), L.Dense(10)]
    )
    _, ref, err = check_directional_derivative(
        build, (random_inputs(6, 6, 4), random_labels()), SCCE, mode, True
    )
    assert abs(ref) > 1e-3
    assert err < RTOL


OVERLAPPING_MAX_POOLS = {
    "residual_cnn_2d": (CASES["residual_overlapping_max_pool"][0], (12, 12, 3)),
    "conv1d": (
        lambda: keras.Sequential(
            [
                keras.Input((11, 3)),
                L.Conv1D(4, 3, activation="relu"),
                L.MaxPooling1D(3, strides=2, padding="same"),
                L.Flatten(),
                L.Dense(10),
            ]
        ),
        (11, 3),
    ),
    "conv3d": (
        lambda: keras.Sequential(
            [
                keras.Input((7, 7, 7, 2)),
                L.Conv3D(3, 2, activation="relu"),
                L.MaxPooling3D(3, strides=2, padding="same"),
                L.Flatten(),
                L.Dense(10),
            ]
        ),
        (7, 7, 7, 2),
    ),
}


@pytest.mark.parametrize("layer_rules", [True, False], ids=["rules", "accumulator"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(OVERLAPPING_MAX_POOLS))
def test_overlapping_max_pool_is_exact_on_every_path(case, mode, layer_rules):
    """Keras max-pooling layers with overlapping windows (1-D, 2-D in a
    residual CNN, 3-D) on both paths: TensorFlow's own forward mode is
    wrong for them under XLA, so `keras_fwdgrad.backend.tensorflow.forward_mode_fixes`
    computes their derivative, and `d` equals the tape's `∇f·v` to
    rtol=atol=1e-5."""
    build, shape = OVERLAPPING_MAX_POOLS[case]
    keras.utils.set_random_seed(7)
    report = testing.check_exactness(
        build(), random_inputs(*shape), random_labels(), SCCE, mode=mode, layer_rules=layer_rules
    )
    assert abs(report["reference"]) > 1e-3
    np.testing.assert_allclose(
        report["directional_derivative"], report["reference"], rtol=1e-5, atol=1e-5
    )


def test_accumulator_trains_overlapping_max_pool_under_xla():
    """`fit` under XLA on the accumulator path with an overlapping Keras
    max-pooling layer: no error, a finite loss."""
    base = CASES["residual_overlapping_max_pool"][0]()
    model = ForwardGradientModel(base, seed=0, layer_rules=False)
    model.compile(optimizer="sgd", loss=SCCE, jit_compile=True)
    history = model.fit(random_inputs(12, 12, 3), random_labels(), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_recurrent_layer_without_static_length_says_what_to_change():
    """A graph traced for sequences of any length cannot unroll; eagerly,
    and in `fit` on batches of one length, it trains."""
    base = keras.Sequential([keras.Input((None, 3)), L.LSTM(4), L.Dense(10)])
    model = ForwardGradientModel(base, seed=0)
    model.compile(optimizer="sgd", loss=SCCE)
    model.fit(random_inputs(5, 3), random_labels(), verbose=0)
    any_length = tf.function(
        model.forward_gradient,
        input_signature=[tf.TensorSpec([None, None, 3]), tf.TensorSpec([None], "int64")],
    )
    with pytest.raises(ValueError, match="static sequence length.*run_eagerly=True"):
        any_length(random_inputs(5, 3), random_labels())
    model.forward_gradient(random_inputs(5, 3), random_labels())


class _RawOverlappingMaxPool(L.Layer):
    def call(self, x):
        return tf.nn.max_pool2d(x, ksize=3, strides=2, padding="VALID")


def test_raw_overlapping_max_pool_under_xla_is_an_error():
    """Your own layer with `tf.nn.max_pool2d` over overlapping windows:
    exact in a graph, an error under XLA (where TensorFlow's forward mode
    is wrong), never a silently wrong step."""
    build = lambda: keras.Sequential(  # noqa: E731
        [
            keras.Input((7, 7, 2)),
            L.Conv2D(3, 3),
            _RawOverlappingMaxPool(),
            L.Flatten(),
            L.Dense(10),
        ]
    )
    data = (random_inputs(7, 7, 2), random_labels())
    _, _, err = check_directional_derivative(build, data, SCCE, "graph", True)
    assert err < RTOL
    with pytest.raises(ValueError, match="MaxPoolGradGrad.*overlapping"):
        check_directional_derivative(build, data, SCCE, "xla", True)
