"""Local heads with a hidden layer (`local_head_units`): exact with one
loss per unit and random signs, unbiased otherwise, on either backend."""

import os

import keras
import numpy as np
import pytest

from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import activity
from keras_fwdgrad import backend
from tests import activity_models
from tests import estimate_samples
from tests.conftest import ARCHITECTURE_MODES
from tests.conftest import backend_modes

LOSS = "sparse_categorical_crossentropy"
Z = 5.0


def _forward_gradient(model, x, y, mode):
    _, grads = backend.run(lambda: model.forward_gradient(x, y), mode)
    return {id(v): np.asarray(g) for v, g in zip(model.trainable_variables, grads)}


def _sequence_model(**options):
    """`(model, layers, x, y)`: tokens through an `EinsumDense` and a
    `Dense` (each ending a block with `local_losses="layers"`), the mean
    over tokens and a softmax output, wrapped with hidden heads of 5
    units; a batch of 4 sequences of 3 tokens."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 4))
    first = keras.layers.EinsumDense("abc,cd->abd", (3, 6), bias_axes="d", activation="tanh")
    second = keras.layers.Dense(4, activation="relu")
    pooled = keras.layers.GlobalAveragePooling1D()(second(first(inputs)))
    outputs = keras.layers.Dense(3, activation="softmax")(pooled)
    base = keras.Model(inputs, outputs)
    model = ForwardGradientModel(base, seed=2, local_head_units=5, **options)
    model.compile(optimizer="sgd", loss=LOSS)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 4)).astype("float32")
    y = rng.integers(0, 3, size=(4,))
    return model, (first, second), x, y


def _block_references(model, layers, x, y):
    """`{id(variable): gradient}` of each hidden block's local loss (its
    head's loss, with the block's input a constant) for the block's and
    its head's variables, and of the model's loss for the output layer."""
    first, second = layers
    expected = {}
    h = x
    for layer, head in zip(layers, model.local_heads):
        inputs = keras.Input(h.shape[1:])
        expected.update(
            activity_models.reference_gradients(keras.Model(inputs, head(layer(inputs))), h, y)
        )
        h = np.asarray(layer(h))
    inputs = keras.Input(h.shape[1:])
    top = keras.Model(
        inputs, model.model.layers[-1](keras.layers.GlobalAveragePooling1D()(inputs))
    )
    expected.update(activity_models.reference_gradients(top, h, y))
    return expected


@pytest.mark.parametrize("mode", backend_modes(ARCHITECTURE_MODES))
def test_hidden_heads_are_exact_with_one_loss_per_unit_and_random_signs(mode):
    """With one loss per unit and position and random-sign tangents
    (`u² = 1`), one draw of every variable's estimate equals the
    reverse-mode gradient of its block's loss through a head with a hidden
    ReLU layer (rtol=atol=1e-4): the block's layers (an `EinsumDense` of
    the general rule and a closed-form `Dense`), the head's hidden and
    output layers, and the model's output layer."""
    model, layers, x, y = _sequence_model(**activity_models.PER_UNIT_SIGNS)
    assert all(head.hidden is not None for head in model.local_heads)
    expected = _block_references(model, layers, x, y)
    grads = _forward_gradient(model, x, y, mode)
    assert set(grads) == set(expected)
    for v in model.trainable_variables:
        np.testing.assert_allclose(grads[id(v)], expected[id(v)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("output", ["activation_layer", "dense_softmax"])
def test_auto_ends_the_same_blocks_under_mixed_precision(policy, output):
    """`local_losses="auto"` ends a block after each hidden `Dense` and
    none at the output layer, under mixed precision (where no `Dense`
    runs in closed form) as in float32: the heads read the two hidden
    layers, and the model's output layer learns from the model's loss."""

    def heads(policy):
        keras.mixed_precision.set_global_policy(policy)
        try:
            layers = [
                keras.Input((20,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(16, activation="relu"),
            ]
            if output == "activation_layer":
                layers += [
                    keras.layers.Dense(4),
                    keras.layers.Activation("softmax", dtype="float32"),
                ]
            else:
                layers += [keras.layers.Dense(4, activation="softmax")]
            model = ForwardGradientModel(
                keras.Sequential(layers), perturbation="activations", local_losses="auto"
            )
            return [tuple(head.dense.kernel.shape) for head in model.local_heads]
        finally:
            keras.mixed_precision.set_global_policy("float32")

    assert heads("float32") == [(64, 4), (16, 4)]
    assert heads(policy) == [(64, 4), (16, 4)]


def _probability_outputs():
    return {
        "dense_softmax": lambda z: z,
        "activation_layer": keras.layers.Activation("softmax"),
        "softmax_layer": keras.layers.Softmax(),
        "ops_softmax": keras.ops.softmax,
        "ops_sigmoid": keras.ops.sigmoid,
        "linear": lambda z: z,
    }


@pytest.mark.parametrize("output", list(_probability_outputs()))
def test_heads_apply_the_activation_that_gives_the_output(output):
    """The compiled loss applies to each head as to the model, so a head
    ends with the softmax or sigmoid that gives the model its output,
    whether it is the last `Dense` layer's activation, a `Softmax` or
    `Activation` layer or a `keras.ops` call after it (the heads were
    linear behind a `Softmax` layer or `keras.ops.softmax`: rows summing
    to 2.68 or -0.94 fed to a cross-entropy that takes probabilities)."""
    keras.utils.set_random_seed(0)
    x = keras.Input((4,))
    h = keras.layers.Dense(8, activation="relu")(x)
    activation = "softmax" if output == "dense_softmax" else None
    out = _probability_outputs()[output](keras.layers.Dense(3, activation=activation)(h))
    model = ForwardGradientModel(
        keras.Model(x, out), perturbation="activations", local_losses="auto", seed=1
    )
    (head,) = model.local_heads
    expected = {"ops_sigmoid": "sigmoid", "linear": "linear"}.get(output, "softmax")
    assert head.activation.__name__ == expected
    features = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
    predictions = keras.ops.convert_to_numpy(head(features))
    if expected == "softmax":
        np.testing.assert_allclose(predictions.sum(axis=1), 1.0, rtol=1e-6)
    elif expected == "sigmoid":
        assert np.all((predictions > 0) & (predictions < 1))


@pytest.mark.parametrize("mode", backend_modes(["eager", "graph"]))
def test_hidden_heads_follow_the_gradient_under_mixed_precision(mode):
    """Under `mixed_bfloat16` the heads' hidden layers compute in bfloat16
    (on TensorFlow they then take the general rule: their output is
    perturbed). With one loss per unit and random signs one draw must
    still point along each block's reverse-mode gradient under the same
    policy: cosine above 0.99 for the blocks', the heads' and the output
    layer's variables (bfloat16 rounds to about 3 digits, so equality to
    1e-4 cannot hold). The output layer takes the general rule in
    bfloat16 and still one loss per output unit."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model, layers, x, y = _sequence_model(**activity_models.PER_UNIT_SIGNS)
        assert model.local_heads[0].hidden.compute_dtype == "bfloat16"
        expected = _block_references(model, layers, x, y)
        grads = _forward_gradient(model, x, y, mode)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert set(grads) == set(expected)
    for v in model.trainable_variables:
        g = np.ravel(grads[id(v)]).astype("float64")
        e = np.ravel(np.asarray(expected[id(v)], dtype="float32")).astype("float64")
        cosine = g @ e / (np.linalg.norm(g) * np.linalg.norm(e))
        assert cosine > 0.99, (v.path, cosine)


def test_the_exactness_check_rejects_gaussian_tangents():
    """The negative control of the check above: with Gaussian tangents
    (`u²` varies) the hidden layers' estimates are not the gradient."""
    options = {**activity_models.PER_UNIT_SIGNS, "direction": "gaussian"}
    model, layers, x, y = _sequence_model(**options)
    expected = _block_references(model, layers, x, y)
    grads = _forward_gradient(model, x, y, "graph")
    hidden = [v for head in model.local_heads for v in head.hidden.trainable_variables]
    for v in hidden:
        assert not np.allclose(grads[id(v)], expected[id(v)], rtol=1e-4, atol=1e-4), v.path


@pytest.mark.parametrize("groups", [1, "channels"])
def test_hidden_heads_stay_unbiased(groups):
    """Probabilistic, fixed seed: with Gaussian tangents and one loss per
    block (`groups=1`: the head's hidden tangents add to the block's
    derivative) or per channel, the mean of 3,000 estimates is within 5
    standard errors (from the same samples) of each block's reverse-mode
    gradient in every component (a false alarm has probability below 6e-7
    per component); the same samples against a reference off by half are
    rejected (the negative control)."""
    model, layers, x, y = _sequence_model(
        perturbation="activations", local_losses="layers", local_loss_groups=groups
    )
    expected = _block_references(model, layers, x, y)
    true = np.concatenate([np.ravel(expected[id(v)]) for v in model.trainable_variables])
    samples = estimate_samples.samples(model, x, y, 3000, "graph")
    z = estimate_samples.z_scores(samples, true)
    assert np.max(z) < Z, np.sort(z)[-10:]
    assert np.max(estimate_samples.z_scores(samples, true * 1.5)) > Z


def test_fit_with_hidden_heads_lowers_the_loss_and_saves(tmp_path):
    """`fit` with hidden heads on a convolution lowers the loss, and the
    model (its heads' hidden layers included) saves and loads."""
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    model = ForwardGradientModel(
        base,
        seed=1,
        local_head_units=8,
        **activity_models.PER_UNIT_SIGNS,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6, 6, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32") + (x[:, 0, 0, 0] > 1)
    history = model.fit(x, y, batch_size=16, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0], losses
    head = model.local_heads[0]
    assert head.hidden.kernel.shape == (4, 8)
    assert activity.LocalHead.from_config(head.get_config()).hidden_units == 8
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.local_head_units == 8
    for a, b in zip(model.local_heads, loaded.local_heads):
        assert len(a.weights) == len(b.weights) == 4
        for va, vb in zip(a.weights, b.weights):
            np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "value, options, message",
    [
        (0, {"local_losses": "layers"}, "an integer of at least 1"),
        (2.5, {"local_losses": "layers"}, "an integer of at least 1"),
        (True, {"local_losses": "layers"}, "an integer of at least 1"),
        ("wide", {"local_losses": "layers"}, "an integer of at least 1"),
        (8, {}, "requires `local_losses`"),
    ],
)
def test_bad_local_head_units_are_named(value, options, message):
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=message) as error:
        ForwardGradientModel(base, perturbation="activations", local_head_units=value, **options)
    assert "local_head_units" in str(error.value)


def test_a_list_ending_a_block_at_the_output_layer_is_refused():
    """The last block learns from the model's own loss: a list that ends a
    block at the output layer, or after it, leaves it nothing to train,
    also when a `Softmax` layer follows the output layer (it was
    accepted, and the output layer trained on a head's loss)."""
    base = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="logits"),
            keras.layers.Softmax(name="probabilities"),
        ]
    )
    with pytest.raises(ValueError, match=r"lists \['logits'\].*would train nothing"):
        ForwardGradientModel(base, perturbation="activations", local_losses=["logits"])
    with pytest.raises(ValueError, match="the last block always ends there"):
        ForwardGradientModel(base, perturbation="activations", local_losses=["probabilities"])
    model = ForwardGradientModel(base, perturbation="activations", local_losses=["hidden"])
    assert [head.dense.kernel.shape for head in model.local_heads] == [(8, 3)]


def _siamese_and_tied():
    """A tower (`Sequential`) called on two inputs, then a hidden `Dense`;
    and a square `Dense` called twice (tied weights), then a hidden
    `Dense`. Both end in `out`."""
    L = keras.layers
    tower = keras.Sequential(
        [keras.Input((4,)), L.Dense(5, activation="tanh"), L.Dense(4, activation="tanh")],
        name="tower",
    )
    a, b = keras.Input((4,)), keras.Input((4,))
    hidden = L.Dense(6, activation="tanh", name="hidden")(L.Concatenate()([tower(a), tower(b)]))
    siamese = keras.Model([a, b], L.Dense(3, activation="softmax", name="out")(hidden))
    x = keras.Input((4,))
    tied = L.Dense(4, activation="tanh", name="tied")
    hidden = L.Dense(6, activation="relu", name="hidden_2")(tied(tied(x)))
    tied_model = keras.Model(x, L.Dense(3, activation="softmax", name="out_2")(hidden))
    return siamese, tied_model


def test_shared_layers_end_no_block():
    """A layer the model calls twice (tied weights, or inside a tower
    called twice) ends no block with `"auto"` or `"layers"`: its calls
    stay in the block that follows (each head reads one output). A list
    naming one is refused."""
    siamese, tied_model = _siamese_and_tied()
    for local_losses in ("auto", "layers"):
        assert activity.block_ends(siamese, local_losses) == ["hidden"]
        assert activity.block_ends(tied_model, local_losses) == ["hidden_2"]
    with pytest.raises(ValueError, match=r"calls more than once.*'tied': 2"):
        ForwardGradientModel(tied_model, perturbation="activations", local_losses=["tied"])
    inner = siamese.get_layer("tower").layers[0].name
    with pytest.raises(ValueError, match=rf"'{inner}': 2"):
        ForwardGradientModel(siamese, perturbation="activations", local_losses=[inner])
    # One `ReLU` after two residual merges: each block ends at its merge.
    L = keras.layers
    x = keras.Input((8,))
    relu = L.ReLU(name="relu")
    h = L.Dense(8, name="d0")(x)
    h = relu(L.Add(name="add0")([h, L.Dense(8, name="b0")(h)]))
    h = relu(L.Add(name="add1")([h, L.Dense(8, name="b1")(h)]))
    residual = keras.Model(x, L.Dense(3, activation="softmax")(h))
    assert activity.block_ends(residual, "auto") == ["add0", "add1"]
    assert activity.block_ends(residual, "layers") == ["d0", "add0", "add1"]


@pytest.mark.parametrize("mode", backend_modes(ARCHITECTURE_MODES))
def test_shared_layers_stay_unbiased_inside_a_block(mode):
    """Probabilistic, fixed seed: with `local_losses="layers"` the tower
    called twice is in the first block (ended by `hidden`, whose head's
    loss it learns from) and its layers add up both calls' estimates; the
    mean of 2,000 estimates is within 5 standard errors of each block's
    reverse-mode gradient in every component, and a reference off by half
    is rejected."""
    keras.utils.set_random_seed(0)
    siamese, _ = _siamese_and_tied()
    model = ForwardGradientModel(
        siamese, perturbation="activations", local_losses="layers", seed=3
    )
    model.compile(optimizer="sgd", loss=LOSS)
    rng = np.random.default_rng(4)
    x = [rng.normal(size=(6, 4)).astype("float32") for _ in range(2)]
    y = rng.integers(0, 3, size=(6,))
    (head,) = model.local_heads
    hidden_out = siamese.get_layer("hidden").output
    first = keras.Model(siamese.inputs, head(hidden_out))
    expected = activity_models.reference_gradients(first, x, y)
    h = np.asarray(keras.Model(siamese.inputs, hidden_out)(x))
    inputs = keras.Input((6,))
    expected.update(
        activity_models.reference_gradients(
            keras.Model(inputs, siamese.get_layer("out")(inputs)), h, y
        )
    )
    true = np.concatenate([np.ravel(expected[id(v)]) for v in model.trainable_variables])
    samples = estimate_samples.samples(model, x, y, 2000, mode)
    z = estimate_samples.z_scores(samples, true)
    assert np.max(z) < Z, np.sort(z)[-10:]
    assert np.max(estimate_samples.z_scores(samples, true * 1.5)) > Z


@pytest.mark.parametrize("local_losses", ["auto", "layers"])
def test_fit_with_shared_layers_and_local_losses(local_losses):
    """`fit` runs and moves every variable with a tower called twice and
    with tied weights (both raised a shape error once: each call of a
    shared layer ended a block that had no head of its own)."""
    for base in _siamese_and_tied():
        keras.utils.set_random_seed(0)
        model = ForwardGradientModel(base, perturbation="activations", local_losses=local_losses)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
        rng = np.random.default_rng(0)
        x = [rng.normal(size=(16, 4)).astype("float32") for _ in base.inputs]
        y = rng.integers(0, 3, size=(16,))
        before = [np.array(v) for v in model.trainable_variables]
        history = model.fit(x if len(x) > 1 else x[0], y, batch_size=8, verbose=0)
        assert np.isfinite(history.history["loss"][-1])
        assert history.history["skipped_steps"][-1] == 0
        moved = [not np.allclose(b, v) for b, v in zip(before, model.trainable_variables)]
        assert all(moved), [v.path for v, m in zip(model.trainable_variables, moved) if not m]


@pytest.mark.parametrize("local_losses", [["act"], "layers"])
def test_a_block_end_first_called_in_another_model(local_losses):
    """A variable-free layer called once in the model but first in another
    model, on 4 channels (a reused activation layer): its block's head
    reads the 16 channels it has in the model (it took the first call's 4
    and failed with a shape error once), and the step reports the
    model's loss (rtol 1e-5)."""
    keras.utils.set_random_seed(0)
    L = keras.layers
    act = L.Activation("relu", name="act")
    other = keras.Input((4,))
    keras.Model(other, act(other))
    x = keras.Input((8,))
    h = act(L.Dense(16, name="first")(x))
    h = L.Dense(12, activation="relu", name="second")(h)
    base = keras.Model(x, L.Dense(3, activation="softmax")(h))
    model = ForwardGradientModel(
        base, perturbation="activations", local_losses=local_losses, local_loss_groups=2
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS)
    assert act.output.shape[-1] == 4
    assert model.local_heads[0].dense.kernel.shape[0] == 16
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(8, 8)).astype("float32")
    ys = rng.integers(0, 3, size=(8,))
    logs = model.train_on_batch(xs, ys, return_dict=True)
    expected = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(ys, base(xs)))
    np.testing.assert_allclose(logs["loss"], float(expected), rtol=1e-5)


def _backbone_and_head():
    """A loaded backbone keeps the names it was saved with, and a head
    built after loading takes Keras' default names again: here
    `backbone/dense` (without activation, read only by a
    `BatchNormalization`) and the head's `dense`, and `dense_1` in both."""
    L = keras.layers
    backbone = keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(8, use_bias=False, name="dense"),
            L.BatchNormalization(name="bn"),
            L.ReLU(name="re_lu"),
            L.Dense(8, activation="tanh", name="dense_1"),
        ],
        name="backbone",
    )
    x = keras.Input((6,))
    h = L.Dense(5, activation="relu", name="dense")(backbone(x))
    return keras.Model(x, L.Dense(3, activation="softmax", name="dense_1")(h))


def test_layers_of_one_name_in_nested_models_are_told_apart():
    """Block ends and the layers a normalization reads are layers, not
    names: `"layers"` ends a block after the backbone's `ReLU`, its
    `dense_1` and the head's `dense`; only the backbone's `dense` shares
    the normalization's block. A list naming a name that two layers
    carry is refused. (Keyed by name, both `dense` layers were taken
    for the normalized one and `fit` raised on both backends.)"""
    base = _backbone_and_head()
    backbone = base.get_layer("backbone")
    ends = activity.block_end_layers(base, "layers")
    assert [layer.name for layer in ends] == ["re_lu", "dense_1", "dense"]
    assert ends[1] is backbone.get_layer("dense_1") and ends[2] is base.get_layer("dense")
    pairs = activity.normalized_pairs(base)
    assert [(a, b) for a, b in pairs] == [(backbone.get_layer("dense"), backbone.get_layer("bn"))]
    with pytest.raises(ValueError, match=r"several layers.*\['dense'\]"):
        ForwardGradientModel(base, perturbation="activations", local_losses=["dense"])


@pytest.mark.parametrize("local_losses", [None, "auto", "layers"])
def test_fit_with_layers_of_one_name(local_losses):
    """`fit` runs and moves every variable of the backbone-and-head model."""
    keras.utils.set_random_seed(0)
    base = _backbone_and_head()
    model = ForwardGradientModel(base, perturbation="activations", local_losses=local_losses)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 6)).astype("float32"), rng.integers(0, 3, size=(16,))
    before = [np.array(v) for v in model.trainable_variables]
    history = model.fit(x, y, batch_size=8, verbose=0)
    assert history.history["skipped_steps"][-1] == 0
    moved = [not np.allclose(b, v) for b, v in zip(before, model.trainable_variables)]
    assert all(moved), [v.path for v, m in zip(model.trainable_variables, moved) if not m]


@pytest.mark.parametrize("mode", backend_modes(ARCHITECTURE_MODES))
def test_layers_of_one_name_unbiased(mode):
    """Probabilistic, fixed seed: with one loss, the mean of 2,000
    estimates on the backbone-and-head model is within 5 standard errors
    of the reverse-mode gradient in every component (the normalized
    `dense` in closed form through the normalization, the head's `dense`
    perturbed itself), and a reference off by half is rejected."""
    keras.utils.set_random_seed(0)
    base = _backbone_and_head()
    model = ForwardGradientModel(base, perturbation="activations", seed=3)
    model.compile(optimizer="sgd", loss=LOSS)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 6)).astype("float32"), rng.integers(0, 3, size=(6,))
    expected = activity_models.reference_gradients(base, x, y)
    true = np.concatenate([np.ravel(expected[id(v)]) for v in model.trainable_variables])
    samples = estimate_samples.samples(model, x, y, 2000, mode)
    z = estimate_samples.z_scores(samples, true)
    assert np.max(z) < Z, np.sort(z)[-10:]
    assert np.max(estimate_samples.z_scores(samples, true * 1.5)) > Z


@pytest.mark.parametrize("local_losses", [None, "auto"])
def test_mixed_float16_estimates_take_their_variables_dtype(local_losses):
    """Under `mixed_float16` every estimate comes in its variable's dtype
    (float32), the heads' included, so that the loss scale the compiled
    `LossScaleOptimizer` multiplies them by cannot overflow float16: in
    12 steps of `fit` the optimizer applies all 12 updates and keeps its
    scale, and with inputs 30 times larger it skips none either. (On JAX the
    heads' estimates were float16 and overflowed at a scale of 32,768
    whenever one entry exceeded 2, and the optimizer dropped those steps
    and halved its scale; their float16 products overflowed too.)"""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        base = keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(6, activation="relu"),
                keras.layers.Dense(6, activation="relu"),
                keras.layers.Dense(3),
                keras.layers.Activation("softmax", dtype="float32"),
            ]
        )
        model = ForwardGradientModel(
            base, perturbation="activations", local_losses=local_losses, seed=1
        )
        model.compile(optimizer="sgd", loss=LOSS)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(96, 5)).astype("float32")
        y = rng.integers(0, 3, size=(96,))
        _, grads = model.forward_gradient(x[:8], y[:8])
        dtypes = [keras.backend.standardize_dtype(g.dtype) for g in grads]
        assert dtypes == [v.dtype for v in model.trainable_variables] == ["float32"] * len(dtypes)
        history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        # Inputs 30 times larger: the heads' float16 products would
        # overflow, and the NaN guard skipped every step.
        large = model.fit(x * 30.0, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert history.history["skipped_steps"] == [0]
    assert large.history["skipped_steps"] == [0]
    assert int(model.optimizer.iterations.value) == 24
    assert float(model.optimizer.dynamic_scale.value) == model.optimizer.initial_scale
