"""`perturbation="activations"` and `local_losses`: exactness against the
tape, unbiasedness, training, saving and errors."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import activity
from tests import activity_models
from tests import estimate_samples
from tests.conftest import ARCHITECTURE_MODES

MODES = {
    "eager": dict(run_eagerly=True),
    "graph": dict(jit_compile=False),
    "xla": dict(jit_compile=True),
}
LOSS = "sparse_categorical_crossentropy"


def _tape_gradient(base, x, y, loss=LOSS):
    with tf.GradientTape() as tape:
        value = keras.losses.get(loss)(y, base(x, training=True))
        value = tf.reduce_mean(value)
    return [g.numpy() for g in tape.gradient(value, base.trainable_variables)]


def _single_layer_models():
    """Models with one perturbed layer of few pre-activations, so that
    `num_directions` orthogonal tangents span them all."""
    softmax = keras.layers.Activation("softmax")
    return {
        "dense": (
            [keras.Input((5,)), keras.layers.Dense(3, activation="tanh"), softmax],
            (5,),
            3,
        ),
        "conv1d_causal": (
            [
                keras.Input((4, 2)),
                keras.layers.Conv1D(3, 2, padding="causal", activation="tanh"),
                keras.layers.GlobalAveragePooling1D(),
                softmax,
            ],
            (4, 2),
            12,
        ),
        "conv2d_grouped": (
            [
                keras.Input((3, 3, 4)),
                keras.layers.Conv2D(2, 2, groups=2),
                keras.layers.GlobalAveragePooling2D(),
                softmax,
            ],
            (3, 3, 4),
            8,
        ),
        "conv2d_strided": (
            [
                keras.Input((4, 4, 2)),
                keras.layers.Conv2D(3, 2, strides=2, padding="same", activation="sigmoid"),
                keras.layers.GlobalAveragePooling2D(),
                softmax,
            ],
            (4, 4, 2),
            12,
        ),
        "conv3d": (
            [
                keras.Input((2, 3, 3, 1)),
                keras.layers.Conv3D(2, 2),
                keras.layers.GlobalAveragePooling3D(),
                softmax,
            ],
            (2, 3, 3, 1),
            8,
        ),
    }


@pytest.mark.parametrize("mode", ARCHITECTURE_MODES)
@pytest.mark.parametrize("case", list(_single_layer_models()))
def test_full_basis_gives_the_tape_gradient(case, mode):
    """With as many orthogonal tangents as a layer has pre-activations per
    example, `(n/K) Σ_k (∇·q_k) q_k = ∇` exactly: every per-example
    directional derivative and the layer-local kernel product must then
    reproduce the tape's gradient (rtol=atol=1e-4, float32)."""
    layers, shape, units = _single_layer_models()[case]
    keras.utils.set_random_seed(0)
    base = keras.Sequential(layers)
    model = ForwardGradientModel(
        base,
        perturbation="activations",
        num_directions=units,
        orthogonal_directions=True,
        active_units_only=False,
        seed=3,
    )
    model.compile(optimizer="sgd", loss=LOSS, **MODES[mode])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6,) + shape).astype("float32")
    y = rng.integers(0, 2, size=(6,))
    expected = _tape_gradient(base, x, y)
    if mode == "eager":
        _, grads = model.forward_gradient(x, y)
    else:
        fn = tf.function(model.forward_gradient, jit_compile=mode == "xla", autograph=False)
        _, grads = fn(x, y)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-4, atol=1e-4)


def _block_reference(model, x, y, split=1):
    """The tape gradient of each block's own loss for its own variables:
    the local head's loss for the first `split` layers (the hidden block),
    the model's loss for the rest (the last block, whose input is a
    constant)."""
    hidden = keras.Sequential(model.model.layers[:split])
    out = keras.Sequential(model.model.layers[split:])
    head = model.local_heads[0]
    loss = keras.losses.get(LOSS)
    with tf.GradientTape(persistent=True) as tape:
        h = hidden(x, training=True)
        local = tf.reduce_mean(loss(y, head(h)))
        final = tf.reduce_mean(loss(y, out(tf.stop_gradient(h), training=True)))
    first = tape.gradient(local, hidden.trainable_variables + head.trainable_variables)
    last = tape.gradient(final, out.trainable_variables)
    by_id = {}
    for v, g in zip(hidden.trainable_variables + head.trainable_variables, first):
        by_id[id(v)] = g.numpy()
    for v, g in zip(out.trainable_variables, last):
        by_id[id(v)] = g.numpy()
    return [by_id[id(v)] for v in model.trainable_variables]


def _two_blocks(activation, compile_args):
    """A hidden block with a head and the output block, and one batch."""
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, activation=activation),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model = ForwardGradientModel(base, perturbation="activations", local_losses="auto", seed=7)
    model.compile(optimizer="sgd", loss=LOSS, **compile_args)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.integers(0, 3, size=(8,))
    return model, x, y


NUM_SAMPLES = 3000
Z = 5.0


def _z_scores(model, x, y, true, mode="graph"):
    """|mean − true| / standard error, per component, of the estimates of
    `NUM_SAMPLES` steps (in eager mode compiled estimates, which the first
    eager ones must equal draw for draw: `estimate_samples.samples`)."""
    samples = estimate_samples.samples(model, x, y, NUM_SAMPLES, mode)
    std = samples.std(0)
    # A component with no spread beyond float32 round-off (a bias before a
    # normalization, whose gradient is 0) is checked against the tape to
    # round-off: a z-score of round-off says nothing.
    exact = std <= 1e-6 * std.max()
    np.testing.assert_allclose(
        samples.mean(0)[exact], true[exact], rtol=0, atol=1e-6 * np.abs(true).max()
    )
    se = std / np.sqrt(len(samples))
    return np.where(exact, 0.0, np.abs(samples.mean(0) - true) / np.maximum(se, 1e-12))


@pytest.mark.parametrize("mode", list(MODES))
def test_local_losses_are_unbiased_per_block(mode):
    """Probabilistic, fixed seed: the mean of 3,000 activity-perturbed
    estimates is within 5 standard errors (estimated from the same samples)
    of each block's tape gradient, in every one of the 50 components, for a
    hidden block with a head and the output block. A false alarm has
    probability below 3e-5 (50 two-sided 5-sigma tails). Eagerly, the
    first 20 estimates equal the compiled ones of the same steps."""
    model, x, y = _two_blocks("relu", MODES[mode])
    true = np.concatenate([t.ravel() for t in _block_reference(model, x, y)])
    assert true.size == 50
    z = _z_scores(model, x, y, true, mode)
    assert np.max(z) < Z, z


def _unbiased_against_tape(base, x, y):
    model = ForwardGradientModel(base, perturbation="activations", seed=1)
    model.compile(optimizer="sgd", loss=LOSS)
    true = np.concatenate([t.ravel() for t in _tape_gradient(base, x, y)])
    z = _z_scores(model, x, y, true)
    assert np.max(z) < Z, z


@pytest.mark.parametrize("activation", [None, "tanh"])
def test_batch_normalization_block_stays_unbiased(activation):
    """Probabilistic, fixed seed: `BatchNormalization` couples examples.
    With a `tanh` `Dense` before it, that layer's tangent passes through
    the normalization and the block uses the whole batch's directional
    derivative; without an activation, the normalization's output is
    perturbed instead and the `Dense` layer's estimate comes through the
    normalization's reverse pass (`activity.normalized_layers`). Either
    way the mean of 3,000 estimates is within 5 standard errors of the
    tape (the bias before the normalization, whose gradient is 0, to
    round-off)."""
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(3, activation=activation),
            keras.layers.BatchNormalization(momentum=0.0),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 3)).astype("float32")
    _unbiased_against_tape(base, x, rng.integers(0, 2, size=(8,)))


def test_stacked_convolutions_stay_unbiased():
    """Probabilistic, fixed seed: the second convolution's input carries
    the first one's tangent, which is convolved explicitly; the mean of
    3,000 estimates is within 5 standard errors of the tape in all 37
    components."""
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            keras.layers.Conv2D(2, 2, activation="tanh"),
            keras.layers.Conv2D(2, 2, activation="tanh", padding="same"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    rng = np.random.default_rng(7)
    x = rng.normal(size=(8, 4, 4, 1)).astype("float32")
    _unbiased_against_tape(base, x, rng.integers(0, 3, size=(8,)))


def test_shared_layer_adds_up_its_calls():
    """Probabilistic, fixed seed: a `Dense` layer called twice in a
    functional model gets the sum of both calls' layer-local estimates;
    the mean of 3,000 is within 5 standard errors of the tape."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    shared = keras.layers.Dense(3, activation="tanh")
    outputs = keras.layers.Dense(2, activation="softmax")(shared(shared(inputs)))
    rng = np.random.default_rng(5)
    x = rng.normal(size=(8, 3)).astype("float32")
    _unbiased_against_tape(keras.Model(inputs, outputs), x, rng.integers(0, 2, size=(8,)))


def test_the_unbiasedness_check_can_fail():
    """The check above rejects a block compared with the wrong loss: the
    hidden block against the model's loss instead of its head's."""
    model, x, y = _two_blocks("tanh", {})
    reference = _block_reference(model, x, y)
    # The hidden Dense layer's kernel and bias come first.
    reference[:2] = _tape_gradient(model.model, x, y)[:2]
    z = _z_scores(model, x, y, np.concatenate([r.ravel() for r in reference]))
    assert np.max(z[:20]) > Z


@pytest.mark.parametrize("mode", list(MODES))
def test_fit_with_local_losses_logs_and_skips_nothing(mode):
    keras.utils.set_random_seed(0)
    model = ForwardGradientModel(
        activity_models.cnn(),
        perturbation="activations",
        local_losses="auto",
        num_directions=2,
        seed=0,
    )
    assert model._local_loss_ends == ["max_pooling2d", "dense"]
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, global_clipnorm=1.0),
        loss=LOSS,
        metrics=["accuracy"],
        **MODES[mode],
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=(32,))
    before = [v.numpy() for v in model.trainable_variables]
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, validation_data=(x, y))
    logs = {k: v[-1] for k, v in history.history.items()}
    assert set(logs) == {
        "loss",
        "accuracy",
        "local_loss_0",
        "local_loss_1",
        "skipped_steps",
        "mean_abs_d",
        "val_loss",
        "val_accuracy",
    }
    assert logs["skipped_steps"] == 0
    assert all(np.isfinite(v) for v in logs.values())
    changed = [not np.allclose(b, v.numpy()) for b, v in zip(before, model.trainable_variables)]
    assert all(changed)


def test_layers_local_losses_end_a_block_after_every_layer_with_variables():
    base = activity_models.cnn()
    model = ForwardGradientModel(base, perturbation="activations", local_losses="layers")
    # Conv2D(4), Conv2D(4), BatchNormalization (4 channels), Dense(8) end
    # blocks; the output Dense does not.
    assert [head.dense.kernel.shape[0] for head in model.local_heads] == [4, 4, 4, 8]
    names = [layer.name for layer in base.layers]
    assert activity.block_ends(base, "layers") == [names[i] for i in (0, 2, 3, 5)]


class _ResidualBlock(keras.layers.Layer):
    """A residual block written as one layer: `x + Dense(relu(Dense(x)))`."""

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(width, activation="relu")
        self.outer = keras.layers.Dense(width)

    def call(self, x):
        return x + self.outer(self.inner(x))


class _Widen(keras.layers.Layer):
    """Holds a `Dense` and changes the width: not a block."""

    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(width)

    def call(self, x):
        return keras.ops.tanh(self.dense(x))


class _Scale(keras.layers.Layer):
    """A variable of its own, no layers inside: not a block."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale


def _block_layers_model():
    keras.utils.set_random_seed(0)
    L = keras.layers
    x = keras.Input((5, 8))
    h = _ResidualBlock(8, name="r0")(L.Dense(8, name="d0")(x))
    h = _Widen(16, name="widen")(_Scale(name="scale")(h))
    h = _ResidualBlock(16, name="r1")(h)
    h = L.MultiHeadAttention(2, 4, name="mha")(h, h)
    h = L.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(x, L.Dense(3, activation="softmax", name="out")(h))


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_auto_ends_a_block_after_a_block_written_as_one_layer(mode):
    """`local_losses="auto"` ends a block after a layer of your own that
    holds layers with variables and keeps its input's shape (a residual
    or transformer block written as one layer), not after one that
    changes the width, one without layers inside, or Keras'
    `MultiHeadAttention`; the heads read 8, 8, 16 and 16 channels, and a
    step reports the model's loss (rtol 1e-5)."""
    base = _block_layers_model()
    assert activity.block_ends(base, "auto") == ["d0", "r0", "r1", "pool"]
    model = ForwardGradientModel(
        base, perturbation="activations", local_losses="auto", local_loss_groups="channels"
    )
    assert [head.dense.kernel.shape[0] for head in model.local_heads] == [8, 8, 16, 16]
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS, **MODES[mode])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5, 8)).astype("float32")
    y = rng.integers(0, 3, size=(8,))
    logs = model.train_on_batch(x, y, return_dict=True)
    expected = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, base(x)))
    np.testing.assert_allclose(logs["loss"], float(expected), rtol=1e-5)
    assert logs["skipped_steps"] == 0


def test_auto_fails_loudly_if_keras_moves_its_layers(monkeypatch):
    """Telling Keras' own layers from a user's block layers reads where
    Keras defines them; if a Keras upgrade moves them, `auto` raises
    instead of taking `MultiHeadAttention` for a user's block."""
    base = _block_layers_model()
    monkeypatch.setattr(keras.layers.Dense, "__module__", "keras.layers")
    with pytest.raises(RuntimeError, match="relies on Keras' layers being defined"):
        ForwardGradientModel(base, perturbation="activations", local_losses="auto")


def test_layers_local_losses_keep_a_branch_block_where_it_cannot_end_at_the_merge():
    """A residual branch ends its block after the `Add` only when the `Add`
    alone takes its output and each layer on the way is called once (a
    shared layer ends a block at every call): a shared layer on the way,
    or a graph operation that also reads the branch, keeps the block end at
    the branch's layer (or the activation layer that alone follows it),
    and a shared layer after the merge is not walked into."""
    L = keras.layers
    relu = L.ReLU(name="shared_relu")
    x = keras.Input((8,))
    h = relu(L.Dense(8, name="d0")(x))
    b = L.Dense(8, name="d1")(h)
    # The end stops at the merge, before the shared layer that follows it.
    out = L.Dense(3, name="out")(relu(L.Add(name="add")([h, b])))
    assert activity.block_ends(keras.Model(x, out), "layers") == ["d0", "add"]
    # A shared layer between the branch's layer and the merge.
    relu = L.ReLU(name="shared_relu_2")
    h = relu(L.Dense(8, name="d0")(x))
    b = relu(L.Dense(8, name="d1")(h))
    out = L.Dense(3, name="out")(L.Add(name="add")([h, b]))
    assert activity.block_ends(keras.Model(x, out), "layers") == ["d0", "d1"]

    x = keras.Input((8,))
    h = L.Dense(8, name="d0")(x)
    b = L.Activation("relu", name="act")(L.Dense(8, name="d1")(h))
    merged = L.Add(name="add")([h, b])
    out = L.Dense(3, name="out")(L.Concatenate()([merged, b * 2.0]))
    # (After the activation layer that alone follows the branch's layer.)
    assert activity.block_ends(keras.Model(x, out), "layers") == ["d0", "act"]

    # Without the extra reader, the branch ends at the merge.
    out = L.Dense(3, name="out")(L.Add(name="add2")([h, b]))
    assert activity.block_ends(keras.Model(x, out), "layers") == ["d0", "add2"]


def test_local_heads_are_saved_and_not_exported(tmp_path):
    keras.utils.set_random_seed(0)
    model = ForwardGradientModel(
        activity_models.cnn(), perturbation="activations", local_losses="auto", seed=0
    )
    model.compile(optimizer="adam", loss=LOSS)
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32")
    y = np.arange(16) % 3
    model.fit(x, y, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.perturbation == "activations"
    assert len(loaded.local_heads) == 2
    for a, b in zip(model.local_heads, loaded.local_heads):
        for va, vb in zip(a.weights, b.weights):
            np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-6)
    np.testing.assert_allclose(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0), atol=1e-6
    )
    # The heads are not part of the wrapped model.
    assert len(model.model.weights) == len(activity_models.cnn().weights)
    config = model.get_config()
    assert config["local_losses"] == "auto"
    assert ForwardGradientModel.from_config(config).local_losses == "auto"
    grouped = ForwardGradientModel(
        activity_models.cnn(), perturbation="activations", local_losses="auto", local_loss_groups=2
    )
    assert ForwardGradientModel.from_config(grouped.get_config()).local_loss_groups == 2
    patched = ForwardGradientModel(
        activity_models.cnn(),
        perturbation="activations",
        local_losses="auto",
        local_loss_patches="positions",
    )
    config = patched.get_config()
    assert ForwardGradientModel.from_config(config).local_loss_patches == "positions"


def test_nan_step_changes_nothing():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model = ForwardGradientModel(base, perturbation="activations")
    model.compile(optimizer="adam", loss=LOSS, jit_compile=True)
    x = np.array([[np.nan, 0, 0]] * 4, "float32")
    before = [v.numpy() for v in base.weights]
    history = model.fit(x, np.zeros(4), epochs=1, verbose=0)
    assert history.history["skipped_steps"] == [1]
    for b, v in zip(before, base.weights):
        np.testing.assert_array_equal(b, v.numpy())


def test_errors():
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="`perturbation` must be one of"):
        ForwardGradientModel(base, perturbation="inputs")
    with pytest.raises(ValueError, match="`local_losses` requires"):
        ForwardGradientModel(base, local_losses="auto")
    with pytest.raises(TypeError, match="`local_losses` must be"):
        ForwardGradientModel(base, perturbation="activations", local_losses=3)
    # A NumPy array of names is not a list (`in` would compare elementwise).
    with pytest.raises(TypeError, match="`local_losses` must be"):
        ForwardGradientModel(base, perturbation="activations", local_losses=np.array(["auto"]))
    with pytest.raises(ValueError, match="`local_losses` must be.*'everything'"):
        ForwardGradientModel(base, perturbation="activations", local_losses="everything")
    with pytest.raises(ValueError, match="`local_losses` names a layer twice"):
        ForwardGradientModel(base, perturbation="activations", local_losses=["a", "b", "a"])
    # It returned weight directions that the step never used.
    with pytest.raises(ValueError, match="`current_directions\(\)` gives weight directions"):
        ForwardGradientModel(base, perturbation="activations").current_directions()
    # An empty list made no block, and passed the check that groups need
    # local losses.
    for empty in ([], ()):
        with pytest.raises(ValueError, match="`local_losses` must name at least one layer"):
            ForwardGradientModel(
                base, perturbation="activations", local_losses=empty, local_loss_groups=2
            )
    with pytest.raises(TypeError, match="`active_units_only` must be a bool"):
        ForwardGradientModel(base, perturbation="activations", active_units_only=1)
    with pytest.raises(ValueError, match="does not have"):
        ForwardGradientModel(base, perturbation="activations", local_losses=["nope"])
    with pytest.raises(ValueError, match="the last block always ends there"):
        ForwardGradientModel(base, perturbation="activations", local_losses=["dense"])
    with pytest.raises(ValueError, match="num_directions"):
        ForwardGradientModel(
            base, perturbation="activations", orthogonal_directions=True, num_directions=3
        )
    with pytest.raises(ValueError, match="family with per-unit tangents.*LowRankRademacher"):
        ForwardGradientModel(base, perturbation="activations", direction="lowrank_rademacher")
    with pytest.raises(ValueError, match='needs `direction="gaussian"`'):
        ForwardGradientModel(
            base,
            perturbation="activations",
            direction="rademacher",
            orthogonal_directions=True,
            num_directions=2,
        )
    for groups in (0, 1.5, True, "units"):
        with pytest.raises(ValueError, match="`local_loss_groups` must be an integer"):
            ForwardGradientModel(
                base, perturbation="activations", local_losses="auto", local_loss_groups=groups
            )
    with pytest.raises(ValueError, match="requires `local_losses`"):
        ForwardGradientModel(base, perturbation="activations", local_loss_groups=2)
    for patches in (0, 2.0, False, "patches"):
        with pytest.raises(ValueError, match="`local_loss_patches` must be an integer"):
            ForwardGradientModel(
                base, perturbation="activations", local_losses="auto", local_loss_patches=patches
            )
    with pytest.raises(ValueError, match="`local_loss_patches` other than 1 requires"):
        ForwardGradientModel(base, perturbation="activations", local_loss_patches="positions")
    with pytest.raises(ValueError, match="at most the size of every spatial axis"):
        # The first block's output is 3 × 3 (after 2 × 2 pooling).
        ForwardGradientModel(
            activity_models.cnn(),
            perturbation="activations",
            local_losses="auto",
            local_loss_patches=5,
        )
    two = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="at most the number of channels"):
        ForwardGradientModel(
            two, perturbation="activations", local_losses="auto", local_loss_groups=5
        )

    class Own(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    own = Own()
    own(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="Sequential` or functional"):
        ForwardGradientModel(own, perturbation="activations")
    # The way the error gives: a functional model sharing its layers.
    inputs = keras.Input((3,))
    traced = keras.Model(inputs, own.call(inputs))
    model = ForwardGradientModel(traced, perturbation="activations")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = keras.ops.convert_to_numpy(own.dense.kernel)
    model.fit(np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"), verbose=0)
    assert not np.allclose(keras.ops.convert_to_numpy(own.dense.kernel), before)


@pytest.mark.parametrize("loss", ["mse_sequence", LOSS])
def test_full_basis_with_sample_weights(loss):
    """Sample weights (per example, or per time step of a sequence
    output) weight each example's directional derivative as the compiled
    loss weights it: with a full orthogonal basis the estimate equals the
    tape gradient of the weighted loss (rtol=atol=1e-4)."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(4)
    if loss == LOSS:
        base = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
        x = rng.normal(size=(6, 5)).astype("float32")
        y = rng.integers(0, 3, size=(6,))
        weight = rng.uniform(size=(6,)).astype("float32")
        loss_fn, units = keras.losses.SparseCategoricalCrossentropy(), 3
    else:
        base = keras.Sequential([keras.Input((4, 2)), keras.layers.Dense(2)])
        x = rng.normal(size=(6, 4, 2)).astype("float32")
        y = rng.normal(size=(6, 4, 2)).astype("float32")
        weight = rng.uniform(size=(6, 4)).astype("float32")
        loss_fn, units = keras.losses.MeanSquaredError(), 8
    model = ForwardGradientModel(
        base,
        perturbation="activations",
        num_directions=units,
        orthogonal_directions=True,
        seed=5,
    )
    model.compile(optimizer="sgd", loss=loss_fn)
    with tf.GradientTape() as tape:
        value = loss_fn(y, base(x), sample_weight=weight)
    expected = tape.gradient(value, base.trainable_variables)
    _, grads = tf.function(model.forward_gradient)(x, y, weight)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-4)
