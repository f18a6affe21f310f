"""Tests of `keras_fwdgrad.layer_rules`: every rule's directional
derivative against `∇f·v` from `tf.GradientTape`, for dense and factored
directions, in every execution mode; and which models the rules run."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fwdgrad import backend
from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import layer_rules
from keras_fwdgrad import testing
from tests.conftest import ARCHITECTURE_MODES
from tests.conftest import MODES

L = keras.layers
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
RTOL = 1e-5
ATOL = 1e-6


def _seq(input_shape, layers):
    """A builder of fresh models: `layers` is a function returning new
    layers, so no two models share weights."""
    return lambda: keras.Sequential([keras.Input(input_shape), *layers()])


def _residual():
    inputs = keras.Input((6,))
    h = L.Dense(8, activation="relu")(inputs)
    r = L.Dense(8)(h)
    h = L.Add()([h, r])
    h = L.Activation("tanh")(h)
    return keras.Model(inputs, L.Dense(3)(h))


def _two_inputs():
    a = keras.Input((5,), name="a")
    b = keras.Input((3,), name="b")
    ha = L.Dense(4, activation="relu")(a)
    hb = L.Dense(4)(b)
    h = L.Concatenate()([ha, hb, a])
    d = L.Subtract()([L.Dense(4)(h), hb])
    m = L.Average()([d, ha])
    return keras.Model({"a": a, "b": b}, L.Dense(3)(m))


def _with_op():
    inputs = keras.Input((6,))
    h = L.Dense(8)(inputs)
    h = keras.ops.sin(h) * h
    return keras.Model(inputs, L.Dense(3)(L.Dropout(0.3, seed=1)(h)))


def _nested_functional():
    inner = _residual()
    return keras.Sequential([keras.Input((6,)), inner, L.Dense(3)])


# name -> (builder, input shape). Each exercises one rule (or the
# per-layer fallback) with a trainable layer before it, so the rule sees a
# non-zero input tangent.
CASES = {
    "dense_relu": _seq((6,), lambda: [L.Dense(5, activation="relu"), L.Dense(3)]),
    "dense_tanh_no_bias": _seq(
        (6,), lambda: [L.Dense(5, activation="tanh", use_bias=False), L.Dense(3)]
    ),
    "dense_rank3_input": _seq(
        (4, 6), lambda: [L.Dense(5, activation="relu"), L.Flatten(), L.Dense(3)]
    ),
    "conv2d_same_relu": _seq(
        (8, 8, 2),
        lambda: [
            L.Conv2D(3, 3, padding="same", activation="relu"),
            L.Conv2D(4, 3, strides=2),
            L.Flatten(),
            L.Dense(3),
        ],
    ),
    "conv2d_dilated_no_bias": _seq(
        (8, 8, 2),
        lambda: [
            L.Conv2D(3, 3, dilation_rate=2, use_bias=False),
            L.Activation("sigmoid"),
            L.Flatten(),
            L.Dense(3),
        ],
    ),
    "conv1d": _seq((9, 2), lambda: [L.Conv1D(4, 3, activation="relu"), L.Flatten(), L.Dense(3)]),
    "conv3d": _seq(
        (4, 4, 4, 1),
        lambda: [L.Conv3D(2, 2, activation="relu"), L.Flatten(), L.Dense(3)],
    ),
    "max_pool2d_tiled": _seq(
        (8, 8, 2),
        lambda: [
            L.Conv2D(3, 3, padding="same"),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dense(3),
        ],
    ),
    "max_pool1d_tiled": _seq(
        (8, 2), lambda: [L.Dense(3), L.MaxPooling1D(2), L.Flatten(), L.Dense(3)]
    ),
    "max_pool1d_same_overlapping": _seq(
        (9, 2),
        lambda: [
            L.Dense(3),
            L.MaxPooling1D(3, strides=2, padding="same"),
            L.Flatten(),
            L.Dense(3),
        ],
    ),
    "max_pool2d_same_strided": _seq(
        (7, 7, 2),
        lambda: [L.Conv2D(3, 3), L.MaxPooling2D(2, padding="same"), L.Flatten(), L.Dense(3)],
    ),
    "max_pool3d": _seq(
        (4, 4, 4, 1),
        lambda: [L.Conv3D(2, 1), L.MaxPooling3D(2), L.Flatten(), L.Dense(3)],
    ),
    "max_pool2d_overlapping": _seq(
        (8, 8, 2),
        lambda: [L.Conv2D(3, 3), L.MaxPooling2D(3, strides=2), L.Flatten(), L.Dense(3)],
    ),
    "average_pool_and_global": _seq(
        (8, 8, 2),
        lambda: [
            L.Conv2D(3, 3, padding="same"),
            L.AveragePooling2D(2),
            L.GlobalAveragePooling2D(),
            L.Dense(3),
        ],
    ),
    "relu_layer_and_reshape": _seq(
        (6,), lambda: [L.Dense(8), L.ReLU(), L.Reshape((2, 4)), L.Flatten(), L.Dense(3)]
    ),
    "leaky_relu_layer": _seq((6,), lambda: [L.Dense(8), L.ReLU(negative_slope=0.1), L.Dense(3)]),
    "dropout": _seq((6,), lambda: [L.Dense(16), L.Dropout(0.5, seed=3), L.Dense(3)]),
    "batch_normalization": _seq(
        (8, 8, 2),
        lambda: [L.Conv2D(3, 3), L.BatchNormalization(), L.Flatten(), L.Dense(3)],
    ),
    "batch_normalization_dense_without_scale": _seq(
        (6,),
        lambda: [L.Dense(8), L.BatchNormalization(scale=False), L.ReLU(), L.Dense(3)],
    ),
    "batch_normalization_axis_1_without_center": _seq(
        (4, 6),
        lambda: [L.Dense(5), L.BatchNormalization(axis=1, center=False), L.Flatten(), L.Dense(3)],
    ),
    "batch_normalization_frozen": _seq(
        (8, 8, 2),
        lambda: [
            L.Conv2D(3, 3),
            L.BatchNormalization(
                trainable=False,
                moving_mean_initializer="random_normal",
                moving_variance_initializer=keras.initializers.Constant(2.0),
            ),
            L.Flatten(),
            L.Dense(3),
        ],
    ),
    "batch_normalization_renorm": _seq(
        (6,), lambda: [L.Dense(8), L.BatchNormalization(renorm=True), L.Dense(3)]
    ),
    "nested_sequential": lambda: keras.Sequential(
        [
            keras.Input((6,)),
            keras.Sequential([L.Dense(5, activation="relu"), L.Dense(4)]),
            L.Dense(3),
        ]
    ),
    "functional_residual": _residual,
    "functional_two_inputs": _two_inputs,
    "functional_keras_op_and_dropout": _with_op,
    "functional_in_sequential": _nested_functional,
    "kernel_regularizer": _seq(
        (6,),
        lambda: [L.Dense(5, activation="relu", kernel_regularizer="l2"), L.Dense(3)],
    ),
}


def _data(input_shape, batch=8):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch,) + input_shape).astype("float32")
    y = rng.integers(0, 3, size=(batch,))
    return x, y


def _model_data(model, batch=8):
    """Random inputs with the structure of `model.input` (one tensor or a
    dict), and labels."""
    if isinstance(model, keras.Sequential):
        return _data(tuple(model.input_shape[1:]), batch)
    rng = np.random.default_rng(0)
    x = tf.nest.map_structure(
        lambda t: rng.normal(size=(batch,) + tuple(t.shape[1:])).astype("float32"),
        model.input,
    )
    return x, rng.integers(0, 3, size=(batch,))


def _run(mode, fn):
    return backend.run(fn, mode)


@pytest.mark.parametrize("direction", ["gaussian", "rademacher", "lowrank_gaussian"])
@pytest.mark.parametrize("mode", ARCHITECTURE_MODES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_rules_match_tape(case, mode, direction):
    """d from the layer rules equals sum(grad * v) from a tape on the same
    weights and state (so dropout draws the same mask), rtol 1e-5."""
    keras.utils.set_random_seed(1)
    base = CASES[case]()
    x, y = _model_data(base)
    assert ForwardGradientModel(base, seed=0).uses_layer_rules
    report = testing.check_exactness(base, x, y, SCCE, mode=mode, direction=direction, seed=5)
    np.testing.assert_allclose(
        report["directional_derivative"], report["reference"], rtol=RTOL, atol=ATOL
    )
    # Not vacuous: the derivative is far from zero and the loss is the
    # model's (regularization included).
    assert abs(report["reference"]) > 1e-3
    expected = SCCE(y, base(x, training=False)) + sum(base.losses)
    if "dropout" not in case and "batch_normalization" not in case:
        np.testing.assert_allclose(report["loss"], expected.numpy(), rtol=1e-5)


def test_rule_and_accumulator_give_the_same_step():
    """One SGD step with the layer rules and one with
    `tf.autodiff.ForwardAccumulator` over the whole model move the weights
    identically (same seed, so same direction), to float rounding."""
    results = [
        _sgd_step("conv2d_same_relu", rules, direction="lowrank_rademacher")[1]
        for rules in (True, False)
    ]
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _sgd_step(case, rules, mode="xla", **options):
    """One SGD step (learning rate 0.1) of
    `ForwardGradientModel(CASES[case](), seed=3, layer_rules=rules,
    **options)` on `_model_data`, run in `mode`.

    Returns:
        `(base, trainable, weights, before)`: the wrapped model, its
        trainable variables' values after the step, and all its weights'
        (moving statistics included) after and before it.
    """
    keras.utils.set_random_seed(2)
    base = CASES[case]()
    x, y = _model_data(base)
    model = ForwardGradientModel(base, seed=3, layer_rules=rules, **options)
    assert model.uses_layer_rules is rules
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=SCCE,
        run_eagerly=mode == "eager",
        jit_compile=mode == "xla",
    )
    before = [v.numpy() for v in base.weights]
    model.train_on_batch(x, y)
    trainable = [v.numpy() for v in base.trainable_variables]
    return base, trainable, [v.numpy() for v in base.weights], before


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "layer",
    [
        lambda: L.MaxPooling1D(2),
        lambda: L.MaxPooling1D(2, strides=1),
        lambda: L.MaxPooling1D(3, strides=2, padding="same"),
    ],
    ids=["tiled", "overlapping", "same"],
)
def test_max_pool_rule_on_ties_follows_the_gradient(layer, mode):
    """With tied maxima (and all-negative windows next to padding), the
    tangent is the Jacobian that TensorFlow's gradient defines (it routes
    to the first maximal element) times the input tangent."""
    layer = layer()
    x = tf.constant([[[3.0], [3.0], [-1.0], [-5.0], [-1.0], [-1.0]]])
    x_dot = tf.constant([[[10.0], [20.0], [30.0], [40.0], [50.0], [60.0]]])

    def both():
        _, y_dot = layer_rules.dual_call(layer, x, x_dot, lambda v: None)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        jacobian = tape.jacobian(y, x)  # [1, out, 1, 1, 6, 1]
        ref = tf.einsum("aobcid,cid->abo", jacobian, x_dot)
        return y_dot, ref

    y_dot, ref = _run(mode, both)
    np.testing.assert_array_equal(y_dot.numpy().ravel(), ref.numpy().ravel())


class _Custom(L.Layer):
    def call(self, x):
        return 2.0 * x


@pytest.mark.parametrize(
    "build, supported",
    [
        (CASES["dense_relu"], True),
        (CASES["nested_sequential"], True),
        (lambda: keras.Model(*_functional()), True),
        (_two_inputs, True),
        (lambda: _multi_output(), False),
        (lambda: _Subclassed(), False),
        (_seq((6,), lambda: [_Custom(), L.Dense(3)]), False),
        (_seq((6,), lambda: [L.Dense(3, activity_regularizer="l2")]), False),
        (_seq((6,), lambda: [L.Masking(), L.Dense(3)]), False),
        (
            _seq(
                (4,),
                lambda: [L.Embedding(10, 3, mask_zero=True), L.Flatten(), L.Dense(3)],
            ),
            False,
        ),
        (_seq((4,), lambda: [L.Embedding(10, 3), L.Flatten(), L.Dense(3)]), True),
    ],
)
def test_supports(build, supported):
    assert layer_rules.supports(build()) is supported


def _functional():
    inputs = keras.Input((6,))
    return inputs, L.Dense(3)(inputs)


def _multi_output():
    inputs = keras.Input((6,))
    return keras.Model(inputs, [L.Dense(3)(inputs), L.Dense(2)(inputs)])


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(3)

    def call(self, x):
        return self.dense(x)


def test_unsupported_model_still_trains_with_the_accumulator():
    """A model the rules do not run (a custom layer) takes the
    `tf.autodiff.ForwardAccumulator` path, and a step is exact there: it
    logs the loss and moves the weights by `-lr·d·v`, with `d = ∇f·v` from
    a tape (rtol 1e-4, atol 1e-6, as the other worked steps)."""
    base = _seq((6,), lambda: [_Custom(), L.Dense(3)])()
    model = ForwardGradientModel(base, direction=testing.FixedDirection(), seed=0)
    assert not model.uses_layer_rules
    x, y = _data((6,))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=SCCE)
    v = testing.FixedDirection().numpy_sample([tuple(w.shape) for w in base.trainable_variables])
    with tf.GradientTape() as tape:
        loss = SCCE(y, base(x, training=True))
    grads = tape.gradient(loss, base.trainable_variables)
    d = sum(float(np.sum(g.numpy() * t)) for g, t in zip(grads, v))
    assert abs(d) > 1e-3
    before = [w.numpy() for w in base.trainable_variables]
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["loss"], float(loss), rtol=1e-6)
    for b, w, t in zip(before, base.trainable_variables, v):
        np.testing.assert_allclose(w.numpy() - b, -0.1 * d * t, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ARCHITECTURE_MODES)
@pytest.mark.parametrize(
    "case",
    sorted(
        c
        for c in CASES
        if "batch_normalization" not in c
        and c
        not in (
            "dropout",
            "leaky_relu_layer",
            "max_pool3d",
            "functional_keras_op_and_dropout",
        )
    ),
)
def test_several_directions_in_one_pass_match_separate_passes(case, mode):
    """K = 3 directions carried in one pass through the layer rules give
    the estimate of K separate passes of `tf.autodiff.ForwardAccumulator`
    (run eagerly, where TensorFlow's forward mode is exact for every layer
    here), rtol 1e-5."""
    assert layer_rules.supports_batched_tangents(CASES[case]())
    results = []
    for rules in (True, False):
        keras.utils.set_random_seed(1)
        base = CASES[case]()
        x, y = _model_data(base)
        model = ForwardGradientModel(
            base, direction="lowrank_gaussian", seed=5, num_directions=3, layer_rules=rules
        )
        model.compile(optimizer="sgd", loss=SCCE)
        fn = lambda: model.forward_gradient(x, y)[1]  # noqa: E731
        results.append(_run(mode if rules else "eager", fn))
        directions_of_step = model.current_directions()
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    # The three directions differ, so the check averages three estimates.
    first = [np.asarray(v[0]).ravel()[:4] for v in directions_of_step]
    assert not np.allclose(first[0], first[1]) and not np.allclose(first[1], first[2])


@pytest.mark.parametrize(
    "case",
    # One pass; K passes (a layer without rule); K passes after the one-pass
    # attempt finds that the leaky ReLU's rule does not apply.
    [
        "dense_relu",
        "max_pool2d_tiled",
        "dropout",
        "batch_normalization",
        "leaky_relu_layer",
        "functional_two_inputs",
        "functional_keras_op_and_dropout",
    ],
)
@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_several_directions_step_equals_the_accumulator_step(case, direction):
    """With K = 3, one SGD step through the layer rules moves the weights
    as K passes of `tf.autodiff.ForwardAccumulator` do."""
    results = [
        _sgd_step(case, rules, direction=direction, num_directions=3)[1] for rules in (True, False)
    ]
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_directions", [1, 3])
@pytest.mark.parametrize("mode", ARCHITECTURE_MODES)
def test_batch_normalization_step_moves_every_variable_as_the_accumulator(mode, num_directions):
    """A step through the layer rules (`BatchNormalization` by its exact
    per-layer fallback, K directions in K passes) moves the weights and
    the moving statistics as a step of `tf.autodiff.ForwardAccumulator`
    over the whole model (run eagerly), rtol 1e-5; every variable moved."""
    # The reference: the accumulator's step, run eagerly.
    base, _, with_rules, before = _sgd_step(
        "batch_normalization", True, mode, num_directions=num_directions
    )
    _, _, reference, _ = _sgd_step(
        "batch_normalization", False, "eager", num_directions=num_directions
    )
    names = [v.path for v in base.weights]
    assert any("moving_mean" in n for n in names) and any("moving_variance" in n for n in names)
    for name, a, b, start in zip(names, with_rules, reference, before):
        assert not np.allclose(a, start), name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_layer_without_forward_mode_derivative_is_named():
    """A Keras layer whose op TensorFlow cannot differentiate in forward
    mode (bicubic resizing) raises the same clear error through the rules'
    per-layer fallback."""
    base = _seq(
        (4, 4, 1),
        lambda: [L.Dense(2), L.Resizing(7, 7, interpolation="bicubic"), L.Flatten(), L.Dense(2)],
    )()
    model = ForwardGradientModel(base, seed=0)
    assert model.uses_layer_rules
    model.compile(optimizer="sgd", loss=SCCE)
    with pytest.raises(ValueError, match="ResizeBicubicGrad"):
        model.fit(np.ones((4, 4, 4, 1), "float32"), np.zeros(4), verbose=0)
