"""The core of `ForwardGradientModel` on every supported backend.

CI runs this file twice: with the TensorFlow backend (as every other test
file) and with `KERAS_BACKEND=jax`. Everything here goes through the public
API and `keras.ops`; only the reference gradient (`_reverse_gradient`) uses
the backend's own reverse mode.
"""

import math

import keras
import numpy as np
import pytest
from conftest import MODES
from conftest import backend_modes
from conftest import compile_kwargs
import estimate_samples
from keras import layers as L

import keras_fwdgrad
from keras_fwdgrad import ForwardGradientModel

BACKEND = keras.backend.backend()
FAMILIES = keras_fwdgrad.directions.available()


def _mlp():
    return keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(5, activation="tanh"),
            L.Dense(3, activation="softmax"),
        ]
    )


def _cnn():
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            L.Conv2D(3, 3, activation="tanh"),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dense(3, activation="softmax"),
        ]
    )


def _data(model, n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + tuple(model.input_shape[1:])).astype("float32")
    y = rng.integers(0, 3, size=(n,)).astype("int32")
    return x, y


def _loss(y, y_pred):
    return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, y_pred))


def _reverse_gradient(base, x, y):
    """The gradient of `_loss` over `base`'s trainable variables, by the
    backend's reverse mode."""
    if BACKEND == "jax":
        import jax

        values = [v.value for v in base.trainable_variables]
        state = [v.value for v in base.non_trainable_variables]

        def f(values):
            y_pred, _ = base.stateless_call(values, state, x, training=True)
            return _loss(y, y_pred)

        return [np.asarray(g) for g in jax.grad(f)(values)]
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = _loss(y, base(x, training=True))
    return [g.numpy() for g in tape.gradient(loss, base.trainable_variables)]


def _flat(tensors):
    return np.concatenate([np.ravel(keras.ops.convert_to_numpy(t)) for t in tensors])


def _wrapped(base, mode="eager", **kwargs):
    model = ForwardGradientModel(base, seed=3, **kwargs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss="sparse_categorical_crossentropy",
        **compile_kwargs(mode),
    )
    return model


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_jvp_matches_reverse_mode(make):
    """`keras_fwdgrad.jvp` against reverse mode, to float32 rounding."""
    base = make()
    x, y = _data(base)
    variables = base.trainable_variables
    rng = np.random.default_rng(1)
    tangents = [rng.normal(size=v.shape).astype("float32") for v in variables]
    loss, d = keras_fwdgrad.jvp(lambda: _loss(y, base(x, training=True)), variables, tangents)
    expected = np.dot(_flat(_reverse_gradient(base, x, y)), _flat(tangents))
    np.testing.assert_allclose(float(loss), float(_loss(y, base(x))), rtol=1e-6)
    np.testing.assert_allclose(float(d), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_forward_gradient_is_the_directional_derivative_times_the_direction(make, family):
    """`forward_gradient()` is `(∇f·v) v` for the step's direction `v`,
    with `∇f` from reverse mode (rtol 1e-4)."""
    base = make()
    x, y = _data(base)
    model = _wrapped(base, direction=family)
    (v,) = model.current_directions()
    v = _flat(v)
    loss, g = model.forward_gradient(x, y)
    d = np.dot(_flat(_reverse_gradient(base, x, y)), v)
    np.testing.assert_allclose(_flat(g), d * v, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(loss), float(_loss(y, base(x))), rtol=1e-6)


class _Scaled(keras_fwdgrad.directions.Direction):
    """Random signs times 1.5: `E[v vᵀ] = 2.25 I`, a biased family."""

    def sample(self, shapes, seed, dtype="float32"):
        return [1.5 * t for t in keras_fwdgrad.directions.Rademacher().sample(shapes, seed, dtype)]


def _max_z_score(direction, calls=1000, per_call=10):
    """Max over components of |mean − true| / standard error, for the mean
    of `calls × per_call` directions (each `forward_gradient()` call
    averages `per_call` of them in one pass). Many calls of a few
    directions each: a call's directions are unrolled in its program, and
    on JAX compiling 50 of them took 22 s against 2 s for 10."""
    base = _mlp()
    x, y = _data(base)
    model = _wrapped(base, direction=direction, num_directions=per_call)
    true = _flat(_reverse_gradient(base, x, y))
    # Compiled: eagerly, 10,000 directions take minutes.
    samples = estimate_samples.samples(model, x, y, calls, "graph")
    standard_error = samples.std(0, ddof=1) / math.sqrt(calls)
    return np.max(np.abs(samples.mean(0) - true) / standard_error)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_gradient_is_unbiased(family):
    """Probabilistic, fixed seed: the mean of 10,000 directions is within 5
    standard errors of the reverse-mode gradient in every component. A
    component's standard error is the sample standard deviation of the
    1,000 call means (each of 10 directions) over √1000; with 53
    components a correct estimator fails with probability below 1e-4
    (53 × 5.7e-7)."""
    assert _max_z_score(family) < 5.0


def test_unbiasedness_check_detects_a_biased_family():
    """The same check rejects directions with `E[v vᵀ] = 2.25 I`."""
    assert _max_z_score(_Scaled()) > 5.0


@pytest.mark.parametrize("mode", backend_modes(MODES))
def test_tangent_draws_read_the_words_the_same_way_in_every_mode(mode):
    """Random signs and quantized normals (activity perturbation's
    tangents) are formed otherwise outside XLA than under it; every mode
    gives the values the random words define: bit `j` of word `i` is sign
    `32 i + j` (+1 where set), and the low and high halves of word `i`
    index the levels of components `2 i` and `2 i + 1`."""
    from keras_fwdgrad import backend
    from keras_fwdgrad import directions

    seed = backend.step_seed(3, 4)
    shape = (3, 25)
    run = lambda fn: keras.ops.convert_to_numpy(backend.run(fn, mode))  # noqa: E731
    signs = run(lambda: directions.random_signs(shape, seed))
    words = keras.ops.convert_to_numpy(backend.random_bits(3, seed))
    bits = (words[:, None] >> np.arange(32, dtype="uint32")) & 1
    np.testing.assert_array_equal(signs.ravel(), 2.0 * bits.ravel()[:75] - 1)
    normals = run(lambda: directions.quantized_normal(shape, seed))
    words = keras.ops.convert_to_numpy(backend.random_bits(38, seed))
    index = np.stack([words & 0xFFFF, words >> 16], axis=1).ravel()[:75]
    levels = directions.gaussian_levels().astype("float32")
    np.testing.assert_array_equal(normals.ravel(), levels[index])


def test_restoring_the_best_weights_keeps_the_step_counters():
    """`EarlyStopping(restore_best_weights=True)` sets the weights of its
    best epoch: the model's weights, not the counters, which go on (it
    rewound the direction stream to step 4 of 8, and `skipped_steps` to 1
    of 2). The counters are still variables, saved with the model."""
    base = _mlp()
    x, y = _data(base, n=32)
    x[8:16] = np.nan  # The second of each epoch's four steps is skipped.
    model = _wrapped(base)

    class WorseAfterTheFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch > 0:
                logs["loss"] = 1e9

    early = keras.callbacks.EarlyStopping(monitor="loss", patience=0, restore_best_weights=True)
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[WorseAfterTheFirstEpoch(), early],
    )
    assert len(history.epoch) == 2
    assert int(model.direction_step) == 8 and int(model.skipped_steps) == 2
    assert len(model.get_weights()) == len(base.get_weights())
    assert {id(model.direction_step), id(model.skipped_steps)} <= {id(v) for v in model.variables}


def test_every_bit_of_the_seed_counts():
    """Seeds are signed 64-bit integers: seeds that agree in their low 32
    bits give other directions (on JAX `3` and `2**32 + 3`, `2**62` and
    `-2**63` gave the same ones)."""
    base = _mlp()
    seeds = [3, 2**32 + 3, -5, 2**32 - 5, 2**62, -(2**63), 2**63 - 1]
    drawn = [
        _flat(ForwardGradientModel(base, seed=seed).current_directions()[0]) for seed in seeds
    ]
    for i in range(len(seeds)):
        for j in range(i):
            assert not np.array_equal(drawn[i], drawn[j]), (seeds[i], seeds[j])


@pytest.mark.parametrize("mode", MODES)
def test_one_sgd_step_by_hand(mode):
    """One `fit` step of SGD with `jvp_clip` and K = 2 directions moves the
    weights by `-lr · (1/K) Σ clip(∇f·v_k) v_k`, with `∇f` from reverse
    mode."""
    base = _mlp()
    x, y = _data(base)
    model = _wrapped(base, mode, num_directions=2, jvp_clip=0.05)
    directions = [_flat(v) for v in model.current_directions()]
    before = _flat(base.trainable_variables)
    grad = _flat(_reverse_gradient(base, x, y))
    expected = sum(np.clip(np.dot(grad, v), -0.05, 0.05) * v for v in directions) / 2
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    after = _flat(base.trainable_variables)
    np.testing.assert_allclose(after, before - 0.1 * expected, rtol=1e-4, atol=1e-6)
    assert int(keras.ops.convert_to_numpy(model.direction_step)) == 1


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_step_changes_no_weight(mode):
    """A batch with a NaN input leaves every weight, the optimizer's state
    and its iteration count as they were; the step counts as skipped and
    the epoch's loss averages the finite steps only."""
    base = _mlp()
    x, y = _data(base, n=16)
    x[8] = np.nan
    model = ForwardGradientModel(base, seed=3)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01, clipnorm=1.0),
        loss="sparse_categorical_crossentropy",
        **compile_kwargs(mode),
    )
    model.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)
    weights = _flat(model.model.weights)
    slots = _flat(model.optimizer.variables)
    history = model.fit(x[8:], y[8:], batch_size=8, epochs=1, verbose=0)
    np.testing.assert_array_equal(_flat(model.model.weights), weights)
    np.testing.assert_array_equal(_flat(model.optimizer.variables), slots)
    assert history.history["skipped_steps"] == [1.0]
    assert int(keras.ops.convert_to_numpy(model.skipped_steps)) == 1
    # The finite batch comes first, so the epoch's loss is its loss at the
    # weights as they are now (rtol 1e-5).
    expected = float(keras.ops.convert_to_numpy(_loss(y[:8], base(x[:8]))))
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert history.history["skipped_steps"] == [1.0]
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_variables_the_loss_does_not_use_get_zero_and_stay(mode):
    """An output the compiled loss leaves out and a layer behind
    `keras.ops.stop_gradient` get an exactly zero forward gradient, as with
    reverse mode, and `fit` leaves them as they were; the other variables
    get their `d·v`."""
    inputs = keras.Input((6,))
    h = L.Dense(5, activation="tanh", name="hidden")(inputs)
    stopped = L.Lambda(keras.ops.stop_gradient)(L.Dense(5, name="stopped")(inputs))
    h = L.Add()([h, stopped])
    base = keras.Model(
        inputs, {"used": L.Dense(3, name="used")(h), "unused": L.Dense(2, name="unused")(h)}
    )
    x, y = _data(_mlp())
    y = {"used": y, "unused": np.zeros((len(y), 2), "float32")}
    model = ForwardGradientModel(base, seed=3)
    model.compile(
        optimizer=keras.optimizers.Adam(0.1),
        loss={"used": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
        **compile_kwargs(mode),
    )
    _, grads = model.forward_gradient(x, y)
    for variable, g in zip(base.trainable_variables, grads):
        unused = variable.path.split("/")[0] in ("stopped", "unused")
        assert np.all(keras.ops.convert_to_numpy(g) == 0) == unused, variable.path
    before = {v.path: keras.ops.convert_to_numpy(v) for v in base.trainable_variables}
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    for variable in base.trainable_variables:
        unused = variable.path.split("/")[0] in ("stopped", "unused")
        same = np.array_equal(keras.ops.convert_to_numpy(variable), before[variable.path])
        assert same == unused, variable.path


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_resume_continue_the_same_stream(tmp_path, family):
    """Two epochs in one run give the same weights as one epoch, a `.keras`
    round trip, and one more epoch (same directions, same optimizer
    state)."""
    x, y = _data(_mlp(), n=32)

    def make():
        keras.utils.set_random_seed(7)
        model = ForwardGradientModel(_mlp(), direction=family, seed=5)
        model.compile(
            optimizer=keras.optimizers.Adam(0.01),
            loss="sparse_categorical_crossentropy",
            jit_compile=True,
        )
        return model

    straight = make()
    straight.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    first = make()
    first.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    path = str(tmp_path / "model.keras")
    first.save(path)
    resumed = keras.saving.load_model(path)
    assert isinstance(resumed, ForwardGradientModel)
    assert resumed.direction.get_config() == straight.direction.get_config()
    resumed.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(
        _flat(resumed.model.weights), _flat(straight.model.weights), rtol=1e-6, atol=1e-7
    )
    assert int(keras.ops.convert_to_numpy(resumed.direction_step)) == 8


def test_fit_learns_with_the_stock_optimizers():
    """On a separable problem, 30 epochs of each stock optimizer with
    clipping bring the loss below half its starting value."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    for optimizer in (
        keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True, clipnorm=1.0),
        keras.optimizers.Adam(0.02, global_clipnorm=1.0),
    ):
        model = ForwardGradientModel(_mlp(), direction="rademacher", num_directions=4, seed=0)
        model.compile(
            optimizer=optimizer, loss="sparse_categorical_crossentropy", jit_compile=True
        )
        start = model.evaluate(x, y, verbose=0)
        model.fit(x, y, batch_size=16, epochs=30, verbose=0)
        assert model.evaluate(x, y, verbose=0) < 0.5 * start, optimizer


def test_gradient_cosine_callback():
    """`GradientCosine` logs a cosine in [-1, 1]; with K = 64 Rademacher
    directions on a 53-parameter model it is clearly positive."""
    base = _mlp()
    x, y = _data(base, n=16)
    model = _wrapped(base, num_directions=64, direction="rademacher")
    callback = keras_fwdgrad.GradientCosine(x, y, every=1)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    assert 0.5 < history.history["gradient_cosine"][0] <= 1.0


@pytest.mark.parametrize(
    "steps_per_execution, every, measurements",
    # 16 steps: at steps 3, 6, 9, 12, 15; at the end of each execution of
    # four (each reaches a multiple of 2); at steps 8 and 12 (6 and 12
    # reached). With executions of four it counted executions (2 and 0).
    [(1, 3, 5), (4, 2, 4), (4, 6, 2)],
)
def test_gradient_cosine_counts_training_steps(steps_per_execution, every, measurements):
    base = _mlp()
    x, y = _data(base, n=64)
    model = ForwardGradientModel(base, seed=3)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss="sparse_categorical_crossentropy",
        steps_per_execution=steps_per_execution,
    )
    callback = keras_fwdgrad.GradientCosine(x[:8], y[:8], every=every)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[callback])
    assert int(model.direction_step) == 16
    assert len(callback.values) == measurements


def test_a_model_frozen_after_wrapping_is_refused_before_fit_starts():
    """`fit` of a wrapper whose model has no trainable variables left
    raises the library's `ValueError` before Keras starts (on JAX it raised
    an `IndexError` from inside Keras' `fit`, after the variables' values
    had been taken into its state: the model could not run afterwards)."""
    base = _mlp()
    x, y = _data(base)
    model = _wrapped(base)
    model.fit(x, y, verbose=0)
    model.trainable = False
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="no trainable variables"):
        model.fit(x, y, verbose=0)
    assert base(x).shape == (8, 3)


_ON_JAX = keras.backend.backend() == "jax"


@pytest.mark.skipif(not _ON_JAX, reason="JAX's closed-form convolution products")
@pytest.mark.parametrize(
    "kernel_size, padding",
    [((3, 3), "same"), ((1, 1), "same"), ((2, 2), "same"), ((4, 3), "same"), ((3, 5), "valid")],
)
def test_jax_convolution_kernel_products_are_the_filter_gradient(kernel_size, padding):
    """On the CPU, activity perturbation forms a stride-1 `Conv2D`'s kernel
    estimate as matrix products (`backend.jax.kernel_products`): equal to
    the gradient of `<conv(x, W), g>` by `jax.vjp`, to float32 rounding
    (each entry within 1e-5 of the largest), for odd, even and non-square
    kernels."""
    import jax

    from keras_fwdgrad.backend.jax import kernel_products

    layer = L.Conv2D(5, kernel_size, padding=padding)
    layer.build((2, 9, 7, 3))
    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.normal(size=(2, 9, 7, 3)), "float32")
    kernel = layer.kernel.value
    out, vjp = jax.vjp(lambda w: layer.convolution_op(x, w), kernel)
    g = jax.numpy.asarray(rng.normal(size=out.shape), "float32")
    assert kernel_products.applies(layer, x)
    got = np.asarray(kernel_products.kernel_product(layer, x, g))
    want = np.asarray(vjp(g)[0])
    assert got.shape == want.shape == tuple(kernel_size) + (3, 5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.skipif(not _ON_JAX, reason="JAX's closed-form convolution products")
def test_jax_convolution_kernel_products_leave_other_convolutions_to_jax():
    """Strides, dilation, groups, channels first, a depthwise convolution
    and a frozen kernel keep JAX's own reverse pass."""
    from keras_fwdgrad.backend.jax import kernel_products

    x = keras.ops.zeros((2, 8, 8, 4))
    others = [
        L.Conv2D(4, 3, strides=2),
        L.Conv2D(4, 3, dilation_rate=2),
        L.Conv2D(4, 3, groups=2),
        L.Conv2D(4, 3, data_format="channels_first"),
        L.DepthwiseConv2D(3),
    ]
    for layer in others:
        layer.build(x.shape)
        assert not kernel_products.applies(layer, x), layer.get_config()
    frozen = L.Conv2D(4, 3)
    frozen.build(x.shape)
    frozen.kernel.trainable = False
    assert not kernel_products.applies(frozen, x)
    plain = L.Conv2D(4, 3)
    plain.build(x.shape)
    assert kernel_products.applies(plain, x)
