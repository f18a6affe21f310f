"""Activity perturbation's general rule: every layer with trainable
variables (`EinsumDense`, `Embedding`, normalization, `MultiHeadAttention`,
LoRA-enabled layers, your own layers) gets its output perturbed and its
variables' estimate from a reverse pass through that one layer.

Runs on both backends (CI runs it on TensorFlow and on JAX); the reference
is the backend's reverse mode (`keras_fwdgrad.testing.tape_gradients`)."""

import keras
import numpy as np
import pytest

from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import backend
from keras_fwdgrad import directions
from keras_fwdgrad import testing
from keras_fwdgrad.activity import orthogonal
from tests import estimate_samples
from tests.conftest import ARCHITECTURE_MODES
from tests.conftest import backend_modes

LOSS = "sparse_categorical_crossentropy"


@keras.saving.register_keras_serializable(package="keras_fwdgrad_tests")
class Scale(keras.layers.Layer):
    """A layer nobody ships: `tanh(x·w + b)` with one `w` and `b` per
    channel."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")
        self.b = self.add_weight(shape=(input_shape[-1],), initializer="zeros")

    def call(self, x):
        return keras.ops.tanh(x * self.w + self.b)


def _frozen_softmax(units=3):
    return keras.layers.Dense(units, activation="softmax", trainable=False)


def _lora_dense():
    layer = keras.layers.Dense(3, activation="tanh")
    layer.build((None, 4))
    layer.enable_lora(2)
    # LoRA starts with `lora_b = 0`; a non-zero one tests both factors.
    layer.lora_kernel_b.assign(np.full((2, 3), 0.3, "float32"))
    return layer


def _masked(trainable):
    """Padded token sequences, masked as Keras masks them: frozen
    `Embedding(mask_zero=True)`, then `trainable` (a list of layers, the
    first taking the sequence), frozen self-attention (which reads the
    masks its inputs carry) and the masked mean over tokens."""
    tokens = keras.Input((3,), dtype="int32")
    h = keras.layers.Embedding(5, 3, mask_zero=True, trainable=False)(tokens)
    for layer in trainable:
        h = layer(h, h) if isinstance(layer, keras.layers.MultiHeadAttention) else layer(h)
    attention = keras.layers.MultiHeadAttention(num_heads=1, key_dim=2)
    h = keras.layers.GlobalAveragePooling1D()(attention(h, h))
    model = keras.Model(tokens, _frozen_softmax()(h))
    # Frozen once built: its sublayers are made in `build`.
    attention.trainable = False
    return model


def _one_layer_models():
    """Models whose only trainable layer is of the kind named, with few
    output units per example, and a frozen softmax head: `(layers, x,
    units)`."""
    rng = np.random.default_rng(0)
    x4 = rng.normal(size=(5, 4)).astype("float32")
    mha_in = keras.Input((2, 3))
    mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2)
    mha_out = _frozen_softmax()(keras.layers.Flatten()(mha(mha_in, mha_in)))
    # Token 0 is padding; every sequence has a token.
    padded = np.array([[1, 2, 0], [3, 0, 0], [4, 4, 4], [2, 0, 0], [1, 3, 0]], "int32")
    return {
        # The closed forms: pre-activations perturbed.
        "dense": (
            [keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), _frozen_softmax()],
            x4,
            3,
        ),
        "conv2d_relu": (
            [
                keras.Input((3, 3, 1)),
                keras.layers.Conv2D(2, 2, padding="same", activation="relu"),
                keras.layers.Flatten(),
                _frozen_softmax(),
            ],
            rng.normal(size=(5, 3, 3, 1)).astype("float32"),
            18,
        ),
        "einsum_dense": (
            [
                keras.Input((3, 4)),
                keras.layers.EinsumDense("abc,cd->abd", (3, 2), bias_axes="d"),
                keras.layers.Flatten(),
                _frozen_softmax(),
            ],
            rng.normal(size=(5, 3, 4)).astype("float32"),
            6,
        ),
        "embedding": (
            [
                keras.Input((3,), dtype="int32"),
                keras.layers.Embedding(5, 2),
                keras.layers.Flatten(),
                _frozen_softmax(),
            ],
            rng.integers(0, 5, size=(5, 3)).astype("int32"),
            6,
        ),
        "layer_normalization": (
            [
                keras.Input((4,)),
                keras.layers.Dense(4, trainable=False),
                keras.layers.LayerNormalization(),
                _frozen_softmax(),
            ],
            x4,
            4,
        ),
        "lora_dense": ([keras.Input((4,)), _lora_dense(), _frozen_softmax()], x4, 3),
        "custom": ([keras.Input((4,)), Scale(), _frozen_softmax()], x4, 4),
        "multi_head_attention": (
            keras.Model(mha_in, mha_out),
            rng.normal(size=(5, 2, 3)).astype("float32"),
            6,
        ),
        # Masked sequences: each layer's output carries the mask Keras
        # gives it, and a replayed call sees its inputs' masks.
        "masked_multi_head_attention": (
            _masked([keras.layers.MultiHeadAttention(num_heads=2, key_dim=2)]),
            padded,
            9,
        ),
        "masked_dense": (_masked([keras.layers.Dense(3, activation="tanh")]), padded, 9),
        "masked_batch_normalization": (
            _masked([keras.layers.Dense(3, trainable=False), keras.layers.BatchNormalization()]),
            padded,
            9,
        ),
    }


def _wrapped(base, **options):
    model = ForwardGradientModel(base, perturbation="activations", **options)
    model.compile(optimizer="sgd", loss=LOSS)
    return model


def _tape_gradient(base, x, y):
    """The backend's reverse-mode gradient of the compiled loss."""
    _, grads = testing.tape_gradients(_wrapped(base), x, y)
    return grads


def _forward_gradient(model, x, y, mode):
    _, grads = backend.run(lambda: model.forward_gradient(x, y), mode)
    return [np.asarray(g) for g in grads]


def _build(case):
    keras.utils.set_random_seed(0)
    layers, x, units = _one_layer_models()[case]
    base = layers if isinstance(layers, keras.Model) else keras.Sequential(layers)
    y = np.random.default_rng(1).integers(0, 3, size=(len(x),))
    return base, x, y, units


@pytest.mark.parametrize("mode", backend_modes(ARCHITECTURE_MODES))
@pytest.mark.parametrize("case", list(_one_layer_models()))
def test_full_basis_gives_the_tape_gradient(case, mode):
    """With as many orthogonal tangents as the layer has outputs per
    example, the estimate is exact: each example's directional
    derivatives recover its loss's derivative at the layer's output, and
    the reverse pass through the layer alone turns that into the tape's
    gradient of the layer's variables (rtol=atol=1e-4, float32)."""
    base, x, y, units = _build(case)
    expected = _tape_gradient(base, x, y)
    assert expected, "the model must have trainable variables"
    model = _wrapped(base, num_directions=units, orthogonal_directions=True, seed=3)
    for g, e in zip(_forward_gradient(model, x, y, mode), expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_full_basis_check_can_fail():
    """The check above rejects an estimate with too few directions: with
    half the basis the custom layer's estimate is off by more than the
    tolerance."""
    base, x, y, units = _build("custom")
    expected = _tape_gradient(base, x, y)
    model = _wrapped(base, num_directions=units // 2, orthogonal_directions=True, seed=3)
    with pytest.raises(AssertionError):
        for g, e in zip(_forward_gradient(model, x, y, "graph"), expected):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def _orthogonal_rows(shape, num, mode="eager", seed=0):
    """`orthogonal.tangents` for a layer output of `shape` (on TensorFlow
    given as a shape tensor, as the pass gives it), as NumPy."""
    direction = directions.get("gaussian")

    def draw():
        key = backend.fold_in(backend.step_seed(seed, 1), 7)
        dims = shape if keras.backend.backend() == "jax" else keras.ops.convert_to_tensor(shape)
        return orthogonal.tangents(direction, dims, num, key)

    return keras.ops.convert_to_numpy(backend.run(draw, mode))


@pytest.mark.parametrize("mode", backend_modes(["eager", "graph", "xla"]))
@pytest.mark.parametrize("shape, num", [((5, 4), 4), ((3, 6, 5), 3), ((2, 3, 3, 8), 2)])
def test_orthogonal_tangents_are_orthogonal_with_a_gaussian_norm(shape, num, mode):
    """Each example's K tangents are orthogonal, each of squared norm
    `size` (a Gaussian tangent's expected one): `rows rowsᵀ = size·I` to
    float32 rounding (1e-5 relative)."""
    rows = _orthogonal_rows(shape, num, mode)
    size = int(np.prod(shape[1:]))
    assert rows.shape == (shape[0], num, size)
    gram = np.einsum("nkm,njm->nkj", rows, rows)
    np.testing.assert_allclose(
        gram, np.broadcast_to(size * np.eye(num), gram.shape), atol=1e-5 * size
    )


def _identity_z_scores(rows):
    """z-scores of the mean of `u uᵀ` over examples against `I`: each
    example's mean over its K tangents is one independent sample, and each
    entry's bound is its sample standard deviation over √N."""
    samples = np.einsum("nki,nkj->nij", rows, rows) / rows.shape[1]
    mean = samples.mean(axis=0)
    sem = samples.std(axis=0, ddof=1) / np.sqrt(len(samples))
    return (mean - np.eye(rows.shape[-1])) / sem


def test_orthogonal_tangents_have_identity_second_moment():
    """`E[u uᵀ] = I` for each of the K tangents, so their projected forward
    gradient is unbiased: over 20,000 examples of 4 units with K = 2 every
    entry of the mean of `u uᵀ` is within 5 standard errors of `I` (fixed
    seed). The check rejects tangents whose components are not symmetric
    (their absolute values), for which it fails by far."""
    rows = _orthogonal_rows((20_000, 4), 2)
    assert np.abs(_identity_z_scores(rows)).max() < 5
    assert np.abs(_identity_z_scores(np.abs(rows))).max() > 50


def _encoder(batch_norm=True):
    """Every layer kind of the general rule in one model: token
    embeddings, self-attention with a residual, layer and batch
    normalization, a LoRA feed-forward layer, a custom layer, and the
    closed-form `Dense` head."""
    tokens = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(6, 4)(tokens)
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2)
    h = keras.layers.Add()([h, attention(h, h)])
    h = keras.layers.LayerNormalization()(h)
    feed_forward = keras.layers.Dense(4, activation="relu")
    h = feed_forward(h)
    if batch_norm:
        h = keras.layers.BatchNormalization(momentum=0.0)(h)
    h = Scale()(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(3, activation="softmax")(h)
    model = keras.Model(tokens, outputs)
    feed_forward.enable_lora(2)
    feed_forward.lora_kernel_b.assign(np.full((2, 4), 0.3, "float32"))
    return model


NUM_SAMPLES = 3000
Z = 5.0


@pytest.mark.parametrize("mode", backend_modes(ARCHITECTURE_MODES))
def test_every_layer_kind_is_unbiased_together(mode):
    """Probabilistic, fixed seed: in one model holding every kind, the
    mean of 3,000 estimates is within 5 standard errors (estimated from
    the same samples) of the tape gradient in every component (a false
    alarm has probability below 1e-4 over the model's components), and a
    reference off by half is rejected. Eagerly, the first 20 estimates
    equal the compiled ones of the same steps (each eager draw runs the
    model op by op). Batch normalization mixes the examples of its block,
    so that block uses the whole batch's directional derivative."""
    base = _encoder()
    rng = np.random.default_rng(2)
    x = rng.integers(0, 6, size=(8, 4)).astype("int32")
    y = rng.integers(0, 3, size=(8,))
    true = np.concatenate([t.ravel() for t in _tape_gradient(base, x, y)])
    samples = estimate_samples.samples(_wrapped(base, seed=1), x, y, NUM_SAMPLES, mode)
    z = estimate_samples.z_scores(samples, true)
    assert np.max(z) < Z, np.sort(z)[-10:]
    # The negative control: the same samples against a reference off by
    # half are rejected.
    assert np.max(estimate_samples.z_scores(samples, true * 1.5)) > Z


def test_every_layer_kind_is_unbiased_with_random_sign_tangents():
    """As above, compiled, with `direction="rademacher"`: random-sign
    tangents (`E[u uᵀ] = I`) keep the estimate unbiased for every layer
    kind (3,000 estimates within 5 standard errors of the tape gradient),
    and a reference twice the tape gradient is rejected."""
    base = _encoder()
    rng = np.random.default_rng(2)
    x = rng.integers(0, 6, size=(8, 4)).astype("int32")
    y = rng.integers(0, 3, size=(8,))
    true = np.concatenate([t.ravel() for t in _tape_gradient(base, x, y)])
    model = _wrapped(base, seed=1, direction="rademacher")
    samples = estimate_samples.samples(model, x, y, NUM_SAMPLES, "graph")
    z = estimate_samples.z_scores(samples, true)
    assert np.max(z) < Z, np.sort(z)[-10:]
    assert np.max(estimate_samples.z_scores(samples, true * 2.0)) > Z


def test_a_layer_with_several_outputs_is_named():
    inputs = keras.Input((3, 2))
    outputs, state = keras.layers.GRU(2, return_state=True)(inputs)
    base = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Concatenate()([outputs, state])))
    model = ForwardGradientModel(base, perturbation="activations")
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="layer 'gru'.*one floating tensor|one floating.*'gru'"):
        model.forward_gradient(np.zeros((2, 3, 2), "float32"), np.zeros((2, 2), "float32"))


def test_a_block_ending_at_a_layer_with_several_outputs_is_named():
    """With `local_losses="layers"` the GRU ends a block whose head would
    read its output: the same error as above, at construction."""
    inputs = keras.Input((3, 2))
    outputs, state = keras.layers.GRU(2, return_state=True)(inputs)
    base = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Concatenate()([outputs, state])))
    with pytest.raises(ValueError, match="layer 'gru'.*one floating tensor|one floating.*'gru'"):
        ForwardGradientModel(base, perturbation="activations", local_losses="layers")


@pytest.mark.parametrize("local_losses", ["auto", "layers"])
def test_local_losses_refuse_per_position_outputs(local_losses):
    """A token tagger's output, `(batch, tokens, classes)`, has one target
    per position, which a head averaging over positions cannot predict:
    a `ValueError` naming the output's shape and `local_losses=None`,
    which trains it."""
    base = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(8, 4),
            keras.layers.Dense(6, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    with pytest.raises(ValueError, match=r"\(batch, units\).*\(None, 5, 3\).*local_losses=None"):
        ForwardGradientModel(base, perturbation="activations", local_losses=local_losses)
    model = ForwardGradientModel(base, perturbation="activations")
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x = np.arange(10, dtype="int32").reshape(2, 5) % 8
    model.fit(x, x % 3, epochs=1, verbose=0)


@keras.saving.register_keras_serializable(package="keras_fwdgrad_tests")
class Penalty(keras.layers.Layer):
    """Adds `mean(h²)` to the model's loss with `add_loss()`."""

    def call(self, h):
        self.add_loss(keras.ops.mean(h**2))
        return h


def test_a_layer_adding_a_loss_is_named():
    """A loss added with `add_loss()` is a batch's term, not an example's:
    activity perturbation refuses it, naming the layer, where it would
    otherwise leave its gradient out; a weight regularizer's loss, which
    it does take, raises nothing."""
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    y = np.arange(4) % 2

    def wrapped(middle):
        inputs = keras.Input((3,))
        h = keras.layers.Dense(5, activation="relu", kernel_regularizer="l2")(inputs)
        outputs = keras.layers.Dense(2, activation="softmax")(middle(h))
        model = ForwardGradientModel(keras.Model(inputs, outputs), perturbation="activations")
        model.compile(optimizer="sgd", loss=LOSS)
        return model

    with pytest.raises(ValueError, match="layer 'penalty' added a loss.*perturbation=\"weights\""):
        wrapped(Penalty(name="penalty")).forward_gradient(x, y)
    wrapped(keras.layers.Identity()).forward_gradient(x, y)


def _token_task():
    """Each class draws its 4 tokens from its own pair: 256 examples."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, size=(256,)).astype("int32")
    x = (2 * y[:, None] + rng.integers(0, 2, size=(256, 4))).astype("int32")
    return x, y


def _masked_encoder():
    """Two self-attention blocks on padded tokens (`Embedding(mask_zero=True)`),
    a `Dense` layer between them: the second block's attention reads the
    mask from its input, which crosses a block boundary."""
    tokens = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(7, 4, mask_zero=True)(tokens)
    for _ in range(2):
        a = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2)(h, h)
        h = keras.layers.LayerNormalization()(keras.layers.Add()([h, a]))
        h = keras.layers.Dense(4, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(3, activation="softmax")(h))


@pytest.mark.parametrize("mode", backend_modes(ARCHITECTURE_MODES))
@pytest.mark.parametrize("local_losses", [None, "auto", "layers"])
def test_the_pass_computes_the_model_on_padded_tokens(local_losses, mode):
    """With blocks or without, the loss of the forward-gradient pass is the
    model's own on padded sequences (rtol 1e-5): every tensor the pass
    makes in a layer's place carries the layer's Keras mask (a pass
    without masks gives a loss 2-6 % off on this model)."""
    keras.utils.set_random_seed(0)
    base = _masked_encoder()
    rng = np.random.default_rng(5)
    x = rng.integers(1, 7, size=(8, 6)).astype("int32")
    for i, length in enumerate([1, 2, 3, 4, 5, 6, 2, 3]):
        x[i, length:] = 0
    y = rng.integers(0, 3, size=(8,))
    expected = keras.losses.sparse_categorical_crossentropy(y, base(x, training=True))
    model = _wrapped(base, local_losses=local_losses, seed=1)
    loss, _ = backend.run(lambda: model.forward_gradient(x, y), mode)
    np.testing.assert_allclose(
        float(loss), float(np.mean(keras.ops.convert_to_numpy(expected))), rtol=1e-5
    )


def test_fit_trains_the_encoder():
    """`fit` runs the general rule (no step skipped) and lowers the loss of
    the encoder on a task it can learn. Measured with these seeds: from
    1.06 to 0.80 in 4 epochs of Adam(3e-3) (backprop: 0.49)."""
    keras.utils.set_random_seed(0)
    x, y = _token_task()
    model = ForwardGradientModel(_encoder(), perturbation="activations", seed=0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=LOSS)
    before = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history
    after = model.evaluate(x, y, verbose=0)
    assert history["skipped_steps"] == [0.0] * 4
    assert after < 0.9 * before, (before, after)


def test_fit_with_local_losses_logs_each_block():
    """With `local_losses="auto"` the encoder's blocks end after the LoRA
    feed-forward layer and after the pooling; each head's loss is logged
    and finite."""
    keras.utils.set_random_seed(0)
    x, y = _token_task()
    model = ForwardGradientModel(
        _encoder(), perturbation="activations", local_losses="auto", seed=0
    )
    assert len(model._local_loss_ends) == 2
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS)
    history = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert history["skipped_steps"] == [0.0]
    for name in ("loss", "local_loss_0", "local_loss_1"):
        assert np.isfinite(history[name][0]), (name, history)


def test_auto_blocks_end_at_residual_merges():
    """In a model with residual `Add` merges, `local_losses="auto"` ends a
    block after each merge, or after the normalization or activation that
    alone follows it (post-normalization transformer blocks, ResNet's
    block output), and after pooling; no hidden `Dense` inside a residual
    branch ends one."""
    inputs = keras.Input((6, 8))
    h = inputs
    for i in range(2):
        a = keras.layers.MultiHeadAttention(2, 4, name=f"attention_{i}")(h, h)
        h = keras.layers.LayerNormalization(name=f"norm_{i}")(keras.layers.Add()([h, a]))
    f = keras.layers.Dense(8)(keras.layers.Dense(16, activation="relu")(h))
    # Pre-normalization: the merge's output also feeds the next merge, so
    # the block ends at the merge itself.
    merged = keras.layers.Add(name="pre_norm_merge")([h, f])
    g = keras.layers.Dense(8)(keras.layers.LayerNormalization()(merged))
    h = keras.layers.Add()([merged, g])
    h = keras.layers.ReLU(name="block_out")(h)
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    base = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(pooled))
    model = ForwardGradientModel(base, perturbation="activations", local_losses="auto")
    assert model._local_loss_ends == ["norm_0", "norm_1", "pre_norm_merge", "block_out", "pool"]
    # Each head pools its block's sequence output.
    assert [tuple(head.compute_output_shape((None, 6, 8))) for head in model.local_heads] == [
        (None, 3)
    ] * 5


@pytest.mark.parametrize("jit_compile", [False, True])
def test_an_overflowing_estimate_changes_nothing(jit_compile):
    """Inputs of 3e38 in a feature the kernel ignores (its row is zero)
    keep the loss and the directional derivatives finite, but with a
    mean-squared error of about 1e6 the kernel's estimate `xᵀ(d·u)`
    overflows: the step is skipped and no weight or optimizer slot
    changes (on TensorFlow the guard decides from the product's factors,
    without reading the estimate)."""
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model = ForwardGradientModel(base, perturbation="activations", seed=0)
    model.compile(optimizer="adam", loss="mse", jit_compile=jit_compile)
    kernel = base.layers[0].kernel
    kernel.assign(np.array([[0.0, 0.0], [0.5, -0.5], [0.3, 0.2]], "float32"))
    x = np.array([[3e38, 1.0, -1.0]] * 4, "float32")
    y = np.array([[1e3, -1e3]] * 4, "float32")
    loss, grads = model.forward_gradient(x, y)
    assert np.isfinite(np.asarray(loss))
    assert not np.all(np.isfinite(np.asarray(grads[0])))
    model.optimizer.build(model.trainable_variables)
    before = [v.numpy() for v in base.weights + model.optimizer.variables]
    history = model.fit(x, y, epochs=1, verbose=0)
    assert history.history["skipped_steps"] == [1]
    for b, v in zip(before, base.weights + model.optimizer.variables):
        np.testing.assert_array_equal(b, v.numpy(), err_msg=v.path)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_nan_step_changes_no_weight(jit_compile):
    """A batch with a NaN makes the step's estimate non-finite: the step is
    skipped and counted, and no weight, optimizer slot or normalization
    statistic changes."""
    keras.utils.set_random_seed(0)
    base = _encoder()
    model = ForwardGradientModel(base, perturbation="activations", local_losses="auto", seed=0)
    model.compile(optimizer="adam", loss=LOSS, jit_compile=jit_compile)
    x, y = _token_task()
    model.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0)

    def state():
        variables = (
            model.trainable_variables + model.non_trainable_variables + model.optimizer.variables
        )
        counters = (model.direction_step, model.skipped_steps)
        return {v.path: np.array(v) for v in variables if not any(v is c for c in counters)}

    before = state()
    # An Embedding row of NaN reaches every layer after it.
    table = base.get_layer(index=1).embeddings
    saved = np.array(table)
    poisoned = saved.copy()
    poisoned[5] = np.nan
    table.assign(poisoned)
    history = model.fit(x[:32], y[:32], batch_size=32, epochs=1, verbose=0).history
    table.assign(saved)
    assert history["skipped_steps"] == [1.0]
    after = state()
    assert before.keys() == after.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(value, after[path], err_msg=path)


@pytest.mark.heavy
def test_mobilenet_v2_trains_with_local_losses():
    """`keras.applications.MobileNetV2(weights=None)` (depthwise
    convolutions, batch normalization, ReLU6, residual merges) trains with
    activity perturbation and `local_losses="auto"`: its blocks end at the
    residual merges and pooling, and a few steps of `fit` skip nothing and
    log finite losses."""
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4
    )
    model = ForwardGradientModel(base, perturbation="activations", local_losses="auto", seed=0)
    assert len(model.local_heads) >= 10
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=LOSS)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 4, size=(32,))
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    assert history["skipped_steps"] == [0.0, 0.0]
    assert all(np.isfinite(v) for values in history.values() for v in values), history


@pytest.mark.skipif(
    backend.name() == "jax",
    reason="Keras' own mixed_float16 step fails on JAX's CPU (dot_general F16_F16_F32)",
)
def test_mixed_precision():
    """Under `mixed_float16` every layer computes in float16 with float32
    variables: the estimate has one float32 tensor per variable, finite,
    and `fit` skips no step."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = ForwardGradientModel(
            _encoder(), perturbation="activations", local_losses="auto", seed=0
        )
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS)
        x, y = _token_task()
        _, grads = model.forward_gradient(x[:32], y[:32])
        for v, g in zip(model.trainable_variables, grads):
            assert tuple(g.shape) == tuple(v.shape), v.path
            assert keras.backend.standardize_dtype(g.dtype) == "float32", (v.path, g.dtype)
            assert np.all(np.isfinite(np.asarray(g))), v.path
        history = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
        assert history["skipped_steps"] == [0.0]
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _mixed_precision_models(activation):
    """`(layers, input shape)`: Keras' advice for mixed precision (a float32
    softmax output layer), on `Dense` layers and on convolutions (a strided
    one, and one before a `BatchNormalization`), with `activation` in the
    hidden layers."""
    return {
        "dense": (
            lambda: [
                keras.Input((6,)),
                keras.layers.Dense(8, activation=activation),
                keras.layers.Dense(8, activation=activation),
                keras.layers.Dense(3, activation="softmax", dtype="float32"),
            ],
            (6,),
        ),
        "conv": (
            lambda: [
                keras.Input((8, 8, 2)),
                keras.layers.Conv2D(4, 3, strides=2, activation=activation),
                keras.layers.Conv2D(4, 3, padding="same", use_bias=False),
                keras.layers.BatchNormalization(),
                keras.layers.Activation(activation),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(3, activation="softmax", dtype="float32"),
            ],
            (8, 8, 2),
        ),
    }


# `(hidden activation, bound)` per policy. The bound is on the relative
# distance, per variable, between an estimate under mixed precision and
# the float32 one of the same draw. Float16 keeps 11 significant bits
# (rounding 2**-11 = 5e-4 per operation), bfloat16 8 (4e-3); sums of terms
# of both signs (the directional derivative, a normalization's centring)
# magnify it. Bfloat16's rounding also flips the sign of ReLU
# pre-activations near zero, which changes the set of active units and the
# estimate by up to 0.46 (measured): it is checked with a smooth
# activation. Measured over five seeds of weights and data, on both
# backends and in every mode: at most 0.0049 (float16, ReLU) and 0.018
# (bfloat16, tanh); with two groups per block (this test's seed) 0.0024 and
# 0.015. With this test's seed the largest distance of each
# model was 0.17-14 when these layers took the general rule (which perturbs
# their outputs after their activations).
_MIXED_PRECISION = {"mixed_float16": ("relu", 0.02), "mixed_bfloat16": ("tanh", 0.06)}


_MIXED_OPTIONS = {
    "one_loss": dict(local_losses=None),
    "layers": dict(local_losses="layers"),
    "layers_groups2": dict(local_losses="layers", local_loss_groups=2),
}


def _mixed_precision_runs():
    """Compiled only (`jax.jit` on JAX): TensorFlow's eager pass runs the
    same operations as its graph (the same estimates here, to the bit).
    Under XLA (TensorFlow), the options that reach most code."""
    runs = []
    for policy in _MIXED_PRECISION:
        for case in ("dense", "conv"):
            for name, options in _MIXED_OPTIONS.items():
                for mode in backend_modes(["graph", "xla"]):
                    if mode == "graph" or name == "layers_groups2":
                        runs.append(
                            pytest.param(
                                policy, case, options, mode, id=f"{policy}-{case}-{name}-{mode}"
                            )
                        )
    return runs


@pytest.mark.parametrize("policy, case, options, mode", _mixed_precision_runs())
def test_mixed_precision_perturbs_what_float32_perturbs(policy, case, options, mode):
    """Under mixed precision each `Dense`/convolution layer is perturbed at
    its pre-activations, as in float32 (its compute dtype is not its
    variables', and so is the float32 output layer's input): the estimate of
    each variable is float32's of the same draw up to the policy's rounding,
    and comes in float32. (Such layers took the general rule, whose tangent
    on a softmax output has a variance of order `1 / p²` for a label of
    probability `p`: on MNIST a float32 softmax output layer after float16
    ones diverged on TensorFlow.)"""
    activation, bound = _MIXED_PRECISION[policy]
    layers, shape = _mixed_precision_models(activation)[case]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8,) + shape).astype("float32")
    y = rng.integers(0, 3, size=(8,))
    estimates = {}
    weights = None
    for name in ("float32", policy):
        keras.mixed_precision.set_global_policy(name)
        try:
            keras.utils.set_random_seed(0)
            model = ForwardGradientModel(
                keras.Sequential(layers()),
                perturbation="activations",
                seed=3,
                **options,
            )
            model.compile(optimizer="sgd", loss=LOSS)
            if weights is None:
                weights = [np.asarray(v) for v in model.variables]
            else:
                for v, w in zip(model.variables, weights):
                    v.assign(w)
            estimates[name] = _forward_gradient(model, x, y, mode)
        finally:
            keras.mixed_precision.set_global_policy("float32")
    paths = [v.path for v in model.trainable_variables]
    for path, exact, mixed in zip(paths, estimates["float32"], estimates[policy]):
        assert mixed.dtype == np.float32, (path, mixed.dtype)
        distance = np.linalg.norm(mixed - exact) / np.linalg.norm(exact)
        assert distance < bound, (path, distance)


def _full_basis_against_tape(base, x, y, units, mode, loss=LOSS, **compile_options):
    """The full-basis estimate (`num_directions` = the layer's outputs per
    example; for one output, one random sign, `u² = 1`) and the tape's
    gradient, each of a model compiled with `loss` and `compile_options`."""

    def compiled(**options):
        model = ForwardGradientModel(base, perturbation="activations", **options)
        model.compile(optimizer="sgd", loss=loss, **compile_options)
        return model

    _, expected = testing.tape_gradients(compiled(), x, y)
    if units == 1:
        model = compiled(direction="rademacher", seed=3)
    else:
        model = compiled(num_directions=units, orthogonal_directions=True, seed=3)
    return _forward_gradient(model, x, y, mode), expected


def _compiled_loss_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4)).astype("float32")
    y = rng.integers(0, 3, size=(5,))
    tokens = np.array([[1, 2, 0], [3, 0, 0], [4, 4, 4], [2, 0, 0]], "int32")
    return {
        # One trainable layer, its three outputs the full basis.
        "loss_weights": (
            lambda: keras.Sequential(
                [
                    keras.Input((4,)),
                    keras.layers.Dense(3, activation="tanh"),
                    keras.layers.Dense(3, activation="softmax", trainable=False),
                ]
            ),
            x,
            y,
            3,
            {"loss_weights": [0.25]},
        ),
        # A prediction per token, masked where the token is 0: the loss
        # counts the valid tokens only (3 tokens x 3 units).
        "output_mask": (
            lambda: keras.Sequential(
                [
                    keras.Input((3,), dtype="int32"),
                    keras.layers.Embedding(5, 2, mask_zero=True, trainable=False),
                    keras.layers.Dense(3, activation="softmax"),
                ]
            ),
            tokens,
            rng.integers(0, 3, size=(4, 3)),
            9,
            {},
        ),
    }


@pytest.mark.parametrize("mode", backend_modes(ARCHITECTURE_MODES))
@pytest.mark.parametrize("case", list(_compiled_loss_cases()))
def test_each_example_takes_the_compiled_loss_as_keras_reduces_it(case, mode):
    """The per-example losses whose derivatives the pass takes are the
    compiled loss as Keras computes it: with `loss_weights`, and with the
    Keras mask of a per-token output (only the valid tokens, each weighed
    by the batch's count over its valid ones). With the full basis the
    estimate then equals the tape's gradient of the compiled loss
    (rtol=atol=1e-4, float32); the loss weight of 0.25 was left out before
    (four times the gradient) and the mask too (0.0041 off where the
    gradient is at most 0.0087)."""
    build, x, y, units, options = _compiled_loss_cases()[case]
    keras.utils.set_random_seed(0)
    estimate, expected = _full_basis_against_tape(build(), x, y, units, mode, **options)
    assert max(float(np.max(np.abs(e))) for e in expected) > 1e-3
    for g, e in zip(estimate, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_sample_weights_of_shape_batch_by_one_are_keras_sample_weights():
    """Keras takes sample weights of shape `(batch, 1)` as `(batch,)`."""
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model = _wrapped(base, seed=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 4)).astype("float32")
    y = np.array([0, 1, 2, 0])
    weights = np.array([1.0, 2.0, 0.0, 1.0], "float32")
    loss, grads = model.forward_gradient(x, y, sample_weight=weights)
    loss_column, grads_column = model.forward_gradient(x, y, sample_weight=weights[:, None])
    np.testing.assert_allclose(float(loss_column), float(loss), rtol=1e-6)
    for a, b in zip(grads_column, grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_a_frozen_batch_normalization_does_not_mix_examples():
    """Keras runs a `BatchNormalization` with `trainable=False` in
    inference mode, each example alone, so the layer before it keeps its
    per-example derivatives: the full basis is exact (rtol=atol=1e-4; it
    was 0.36 off where the gradient is at most 0.46, the whole batch's
    derivative)."""
    keras.utils.set_random_seed(0)
    normalization = keras.layers.BatchNormalization()
    base = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="tanh"),
            normalization,
            keras.layers.Dense(3, activation="softmax", trainable=False),
        ]
    )
    normalization.trainable = False
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype("float32")
    y = rng.integers(0, 3, size=(6,))
    estimate, expected = _full_basis_against_tape(base, x, y, 3, "graph")
    assert max(float(np.max(np.abs(e))) for e in expected) > 1e-2
    for g, e in zip(estimate, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_a_batch_normalization_frozen_after_wrapping():
    """Fine-tuning freezes a `BatchNormalization` of a wrapped, trained
    model and compiles again. The `Dense` layer before it fed a trainable
    normalization (so the normalization's output was perturbed in its
    place); now it is perturbed itself, and the full basis is its exact
    gradient (rtol=atol=1e-4). `fit` raised a `ValueError` saying that no
    layer call used the kernel. The frozen normalization's statistics stay
    as they were."""
    keras.utils.set_random_seed(0)
    normalization = keras.layers.BatchNormalization()
    base = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, use_bias=False),
            normalization,
            keras.layers.Dense(3, activation="softmax", trainable=False),
        ]
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype("float32")
    y = rng.integers(0, 3, size=(6,))
    model = ForwardGradientModel(
        base, perturbation="activations", num_directions=3, orthogonal_directions=True, seed=3
    )
    model.compile(optimizer="sgd", loss=LOSS)
    model.fit(x, y, batch_size=6, verbose=0)
    normalization.trainable = False
    model.compile(optimizer="sgd", loss=LOSS)
    _, expected = testing.tape_gradients(model, x, y)
    estimate = _forward_gradient(model, x, y, "graph")
    assert len(estimate) == 1 and float(np.max(np.abs(expected[0]))) > 1e-2
    np.testing.assert_allclose(estimate[0], expected[0], rtol=1e-4, atol=1e-4)
    statistics = [np.array(v) for v in normalization.non_trainable_variables]
    kernel = np.array(base.layers[0].kernel)
    model.fit(x, y, batch_size=6, verbose=0)
    assert np.any(np.array(base.layers[0].kernel) != kernel)
    for v, before in zip(normalization.non_trainable_variables, statistics):
        np.testing.assert_array_equal(np.array(v), before)


def test_half_precision_predictions_take_the_loss_in_float32():
    """Under `mixed_float16` a float16 output's loss is computed in float32,
    as Keras computes it: squared errors of about 9e4 overflow float16
    (every estimate was NaN and every step skipped on TensorFlow). The
    one-unit output's estimate with a random sign is exact up to float16
    rounding (rtol 1e-2) and the step changes the weights."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        base = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, activation="relu", trainable=False),
                keras.layers.Dense(1),
            ]
        )
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 4)).astype("float32")
        y = np.full((8, 1), 300.0, "float32")
        estimate, expected = _full_basis_against_tape(base, x, y, 1, "graph", loss="mse")
        for g, e in zip(estimate, expected):
            assert np.all(np.isfinite(g))
            np.testing.assert_allclose(g, e, rtol=1e-2)
        model = _wrapped(base, seed=1)
        model.compile(optimizer="sgd", loss="mse")
        before = [np.array(v) for v in base.trainable_variables]
        model.train_on_batch(x, y)
        assert int(model.skipped_steps) == 0
        assert any(np.any(np.array(v) != b) for v, b in zip(base.trainable_variables, before))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_orthogonal_directions_beyond_an_outputs_units_are_refused():
    """K orthogonal tangents need K units in every perturbed output, that of
    a layer of the general rule and a head's hidden layer too (an
    `EinsumDense` of 2 outputs with K = 3 gave NaN estimates on
    TensorFlow, and a wrong one on JAX)."""
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.EinsumDense("ab,bc->ac", (2,)),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    with pytest.raises(ValueError, match="num_directions=3 and 'einsum_dense' with 2"):
        ForwardGradientModel(
            base, perturbation="activations", orthogonal_directions=True, num_directions=3
        )
    base = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    with pytest.raises(ValueError, match="the hidden layer of the head after 'hidden' with 2"):
        ForwardGradientModel(
            base,
            perturbation="activations",
            local_losses="layers",
            local_head_units=2,
            orthogonal_directions=True,
            num_directions=3,
        )
    ForwardGradientModel(
        base,
        perturbation="activations",
        local_losses="layers",
        local_head_units=3,
        orthogonal_directions=True,
        num_directions=3,
    )


def _token_model():
    tokens = keras.Input((2,), dtype="int32")
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(5000, 4)(tokens))
    return keras.Model(tokens, keras.layers.Dense(3, activation="softmax", dtype="float32")(h))


def _raw_input_models():
    return {
        # Float token ids fed to an `int32` input: Keras casts them to
        # int32 (3001, not float16's 3000).
        "token_ids": (_token_model, np.array([[3001.0, 4097.0], [2049.0, 10.0]])),
        # Raw features up to 70,000 before a float32 `Rescaling`: float16
        # would make them inf.
        "float32_preprocessing": (
            lambda: keras.Sequential(
                [
                    keras.Input((1,)),
                    keras.layers.Rescaling(1e-4, dtype="float32"),
                    keras.layers.Dense(2, activation="softmax", dtype="float32"),
                ]
            ),
            np.array([[70000.0], [12345.6]], "float32"),
        ),
    }


@pytest.mark.parametrize("case", list(_raw_input_models()))
def test_inputs_reach_the_model_as_keras_converts_them(case):
    """Under `mixed_float16` the pass gives the model its inputs as Keras
    does, in each `Input`'s dtype, not first in the float16 compute dtype:
    its loss is the model's own, and the estimates are finite."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        build, x = _raw_input_models()[case]
        base = build()
        y = np.array([0, 1])
        model = _wrapped(base, seed=1)
        loss, grads = model.forward_gradient(x, y)
        expected = keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(y, base(x, training=True))
        )
        np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    finally:
        keras.mixed_precision.set_global_policy("float32")
