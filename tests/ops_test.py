"""Tests of the pure forward-gradient functions.

The directional derivative from `jvp` is checked against `∇f·v` from
`tf.GradientTape` on the same forward pass (so dropout draws the same mask),
for every layer family in every execution mode.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

from keras_fwdgrad import backend
from keras_fwdgrad import directions
from keras_fwdgrad.research import objectives
from keras_fwdgrad.ops import clip_directional_derivative
from keras_fwdgrad.ops import forward_gradient
from keras_fwdgrad.ops import jvp
from tests.conftest import ARCHITECTURE_MODES
from tests.conftest import MODES

L = keras.layers
JVP_RTOL = 1e-5
JVP_ATOL = 1e-6


def _functional_multi_input():
    a = keras.Input((5,), name="a")
    b = keras.Input((3,), name="b")
    h = L.Concatenate()([L.Dense(4, activation="tanh")(a), L.Dense(4)(b)])
    return keras.Model({"a": a, "b": b}, L.Dense(3)(h))


def _case(name):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(4, 8, 8, 2)).astype("float32")
    vec = rng.normal(size=(8, 6)).astype("float32")
    cases = {
        "dense": (
            lambda: keras.Sequential(
                [keras.Input((6,)), L.Dense(5, activation="relu"), L.Dense(3)]
            ),
            vec,
        ),
        "conv2d": (
            lambda: keras.Sequential(
                [
                    keras.Input((8, 8, 2)),
                    L.Conv2D(3, 3, padding="same", activation="relu"),
                    L.Flatten(),
                    L.Dense(3),
                ]
            ),
            img,
        ),
        "max_pooling2d": (
            lambda: keras.Sequential(
                [
                    keras.Input((8, 8, 2)),
                    L.Conv2D(3, 3),
                    L.MaxPooling2D(),
                    L.Flatten(),
                    L.Dense(3),
                ]
            ),
            img,
        ),
        "average_pooling2d": (
            lambda: keras.Sequential(
                [
                    keras.Input((8, 8, 2)),
                    L.Conv2D(3, 3),
                    L.AveragePooling2D(2),
                    L.Flatten(),
                    L.Dense(3),
                ]
            ),
            img,
        ),
        "batch_normalization": (
            lambda: keras.Sequential(
                [
                    keras.Input((8, 8, 2)),
                    L.Conv2D(3, 3),
                    L.BatchNormalization(),
                    L.Flatten(),
                    L.Dense(3),
                ]
            ),
            img,
        ),
        "dropout": (
            lambda: keras.Sequential(
                [
                    keras.Input((6,)),
                    L.Dense(16),
                    L.Dropout(0.5, seed=3),
                    L.Dense(3),
                ]
            ),
            vec,
        ),
        "layer_normalization": (
            lambda: keras.Sequential(
                [
                    keras.Input((6,)),
                    L.Dense(5),
                    L.LayerNormalization(),
                    L.Dense(3),
                ]
            ),
            vec,
        ),
        "embedding": (
            lambda: keras.Sequential(
                [
                    keras.Input((4,), dtype="int32"),
                    L.Embedding(10, 3),
                    L.Flatten(),
                    L.Dense(3),
                ]
            ),
            rng.integers(0, 10, size=(8, 4)).astype("int32"),
        ),
        "flatten": (
            lambda: keras.Sequential([keras.Input((3, 4)), L.Flatten(), L.Dense(3)]),
            rng.normal(size=(8, 3, 4)).astype("float32"),
        ),
        "functional_multi_input": (
            _functional_multi_input,
            {
                "a": rng.normal(size=(8, 5)).astype("float32"),
                "b": rng.normal(size=(8, 3)).astype("float32"),
            },
        ),
    }
    build, x = cases[name]
    batch = len(tf.nest.flatten(x)[0])
    y = rng.integers(0, 3, size=(batch,))
    return build(), x, y


CASES = [
    "dense",
    "conv2d",
    "max_pooling2d",
    "average_pooling2d",
    "batch_normalization",
    "dropout",
    "layer_normalization",
    "embedding",
    "flatten",
    "functional_multi_input",
]


def _run(mode, fn):
    return backend.run(fn, mode)


@pytest.mark.parametrize("mode", ARCHITECTURE_MODES)
@pytest.mark.parametrize("case", CASES)
def test_jvp_matches_tape(case, mode):
    """d from forward mode equals sum(grad * v) from a tape, rtol 1e-5."""
    model, x, y = _case(case)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables
    shapes = [tuple(v.shape) for v in variables]
    v = directions.Gaussian().sample(shapes, tf.constant([7, 11]))

    def step():
        # One forward pass under both the tape and the accumulator: the same
        # dropout mask and batch statistics feed both derivatives.
        with tf.GradientTape() as tape:
            loss, d = jvp(lambda: loss_fn(y, model(x, training=True)), variables, v)
        grads = tape.gradient(loss, variables)
        ref = tf.add_n([tf.reduce_sum(tf.convert_to_tensor(g) * t) for g, t in zip(grads, v)])
        return d, ref

    d, ref = _run(mode, step)
    np.testing.assert_allclose(d.numpy(), ref.numpy(), rtol=JVP_RTOL, atol=JVP_ATOL)
    # The check is not vacuous: the derivative is far from zero.
    assert abs(ref.numpy()) > 1e-3


class BicubicUpsample(keras.layers.Layer):
    """A layer with a trainable gain followed by a bicubic resize, whose
    gradient op (`ResizeBicubicGrad`) has no registered gradient, so
    TensorFlow cannot differentiate it in forward mode."""

    def build(self, input_shape):
        self.gain = self.add_weight(shape=(), initializer="ones")

    def call(self, x):
        return tf.image.resize(x * self.gain, [7, 7], method="bicubic")


@pytest.mark.parametrize("mode", MODES)
def test_jvp_names_op_and_layer_it_cannot_differentiate(mode):
    model = keras.Sequential([keras.Input((4, 4, 1)), BicubicUpsample(), L.Flatten(), L.Dense(2)])
    x = np.ones((2, 4, 4, 1), "float32")
    variables = model.trainable_variables
    v = [tf.ones_like(w) for w in variables]
    with pytest.raises(ValueError, match="ResizeBicubicGrad") as info:
        _run(mode, lambda: jvp(lambda: tf.reduce_sum(model(x)), variables, v))
    message = str(info.value)
    assert "forward-mode derivative" in message
    assert "BicubicUpsample" in message


def test_jvp_of_unconnected_output_is_zero():
    w = keras.Variable(2.0)
    out, d = jvp(lambda: tf.constant(3.0), [w], [tf.ones(())])
    assert float(out) == 3.0 and float(d) == 0.0


def test_forward_gradient_is_mean_of_d_times_v():
    v1 = [tf.constant([1.0, -1.0]), tf.constant([[2.0]])]
    v2 = [tf.constant([0.5, 0.0]), tf.constant([[-1.0]])]
    g = forward_gradient([tf.constant(2.0), tf.constant(-4.0)], [v1, v2])
    np.testing.assert_allclose(g[0], [(2 * 1 - 4 * 0.5) / 2, (2 * -1 + 0) / 2])
    np.testing.assert_allclose(g[1], [[(2 * 2 - 4 * -1) / 2]])


def test_forward_gradient_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        forward_gradient([tf.constant(1.0)], [])


def test_clip_directional_derivative():
    d = tf.constant([-5.0, 0.3, 2.0])
    np.testing.assert_allclose(clip_directional_derivative(d, 1.0), [-1.0, 0.3, 1.0])
    assert clip_directional_derivative(d, None) is d


@pytest.mark.parametrize(
    "name, lr, start, steps",
    [
        # First paper, Section 5.1: Beale at lr 0.01, Rosenbrock at lr 5e-4.
        ("beale", 0.01, (1.0, 1.0), 2000),
        ("rosenbrock", 5e-4, (-0.5, 1.5), 4000),
    ],
)
def test_forward_gradient_descent_approaches_minimum_like_gd(name, lr, start, steps):
    """Probabilistic, fixed seeds: 10 runs of forward gradient descent
    (Gaussian directions) end close to the minimum, as gradient descent does.

    Criterion: the mean final loss of forward gradient descent is below 5 %
    of the starting loss, and within a factor of 10 of gradient descent's
    loss at the same number of steps (the estimator's extra variance slows
    it, it must not stall or diverge).
    """
    f = getattr(objectives, name)
    result = objectives.optimize(f, start, lr, steps, num_runs=10, seed=0)
    f0 = float(f(tf.constant(start)))
    fgd = np.mean(result["forward"][:, -1])
    gd = np.mean(result["backprop"][:, -1])
    assert np.all(np.isfinite(result["forward"]))
    assert fgd < 0.05 * f0, (fgd, f0)
    assert fgd < 10 * gd + 1e-3, (fgd, gd)
