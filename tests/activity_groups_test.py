"""Local-loss groups and patches (`local_loss_groups`,
`local_loss_patches`): exactness against each block's reverse-mode
gradient, unbiasedness, variance and training.

Runs on both backends (CI runs it on TensorFlow and on JAX); the reference
is the backend's reverse mode (`keras_fwdgrad.testing.tape_gradients`)."""

import keras
import numpy as np
import pytest

from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import activity
from keras_fwdgrad import backend
from tests import estimate_samples
from tests import activity_models
from tests.conftest import ARCHITECTURE_MODES
from tests.conftest import backend_modes
from tests.conftest import tensorflow_runs_channels_first_convolutions

LOSS = "sparse_categorical_crossentropy"
NUM_SAMPLES = 3000
Z = 5.0


def _block_reference(model, x, y, split=1):
    """The reverse-mode gradient of each block's own loss for its own
    variables: the local head's loss for the first `split` layers (the
    hidden block), the model's loss for the rest (the last block, whose
    input is a constant)."""
    layers = model.model.layers
    hidden = layers[:split]
    local = keras.Sequential([keras.Input(x.shape[1:])] + hidden + [model.local_heads[0]])
    h = np.asarray(keras.Sequential([keras.Input(x.shape[1:])] + hidden)(x, training=True))
    out = keras.Sequential([keras.Input(h.shape[1:])] + layers[split:])
    by_id = {
        **activity_models.reference_gradients(local, x, y),
        **activity_models.reference_gradients(out, h, y),
    }
    return [by_id[id(v)] for v in model.trainable_variables]


def _forward_gradient(model, x, y, mode):
    _, grads = backend.run(lambda: model.forward_gradient(x, y), mode)
    return [np.asarray(g) for g in grads]


def _grouped_mlp(**options):
    """`(model, x, y)`: a 4-3-3 MLP with a local loss after its hidden
    layer, all units' tangents kept, compiled, and a batch of 6."""
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model = ForwardGradientModel(
        base,
        perturbation="activations",
        local_losses="auto",
        active_units_only=False,
        seed=2,
        **options,
    )
    model.compile(optimizer="sgd", loss=LOSS)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4)).astype("float32")
    return model, x, rng.integers(0, 3, size=(6,))


@pytest.mark.parametrize("mode", backend_modes(["eager", "graph", "xla"]))
@pytest.mark.parametrize("groups", [2, 3, "channels"])
def test_grouped_layer_full_basis_gives_its_block_gradient(groups, mode):
    """With `local_loss_groups`, the hidden layer's estimate takes each
    group's derivative of its own loss, and no tangent of any other layer:
    with a full orthogonal basis (K = 3 = its units) it must equal the
    reverse-mode gradient of the block's local loss (rtol=atol=1e-4), for
    groups of equal (3, "channels") and unequal (2: channels 0, 0, 1)
    sizes. With one group the head's tangents add a cross term, so this
    holds only with groups."""
    model, x, y = _grouped_mlp(
        local_loss_groups=groups, num_directions=3, orthogonal_directions=True
    )
    expected = _block_reference(model, x, y)
    grads = _forward_gradient(model, x, y, mode)
    # The hidden layer, the output layer and the head: each of the last
    # two takes one loss per group of its own units, from its own
    # tangents only, so it is exact with a full basis too.
    assert len(grads) == len(expected) == 6
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", backend_modes(ARCHITECTURE_MODES))
@pytest.mark.parametrize("direction", ["rademacher", "gaussian"])
def test_one_loss_per_unit_with_random_signs_is_the_block_gradient(direction, mode):
    """With one local loss per unit (`local_loss_groups="channels"`), each
    unit's estimate is its block loss's derivative times `u²`. Random-sign
    tangents (`direction="rademacher"`) have `u² = 1`, so one draw (K = 1)
    must equal the reverse-mode gradient of each block's loss (rtol=atol=
    1e-4) for the hidden layer, the head and the output layer. The
    negative control: Gaussian tangents (`u²` varies) must not."""
    model, x, y = _grouped_mlp(local_loss_groups="channels", direction=direction)
    expected = _block_reference(model, x, y)
    grads = _forward_gradient(model, x, y, mode)
    assert len(grads) == len(expected) == 6
    close = [np.allclose(g, e, rtol=1e-4, atol=1e-4) for g, e in zip(grads, expected)]
    if direction == "rademacher":
        for g, e in zip(grads, expected):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
    else:
        assert not any(close), close


@pytest.mark.parametrize("mode", backend_modes(ARCHITECTURE_MODES))
@pytest.mark.parametrize(
    "channels, filters, data_format",
    [(2, 4, "channels_last"), (5, 3, "channels_last"), (2, 4, "channels_first")],
)
def test_a_relu_convolution_bias_estimate_is_its_kernel_on_a_constant_channel(
    channels, filters, data_format, mode
):
    """A ReLU `Conv2D` (1 x 1) with one local loss per example (no groups,
    tangents on the active units only): on an input channel that is 1
    everywhere, each example's kernel product is the sum of its cotangent
    over positions, which is the bias's product, so in every draw the
    kernel's row for that channel must equal the bias's estimate (rtol=
    1e-5), and not be all zero. On TensorFlow the bias's product comes from
    the head's pooled tangent and each example's factor scales the
    smaller of the convolution's input and output tangent: its input
    with 2 channels and 4 filters, its output with 5 and 3; channels first,
    whose bias's product comes from the tape, neither. A wrong factor on
    either product (or on the sums) breaks the equality."""
    first = data_format == "channels_first"
    if first and mode != "xla" and not tensorflow_runs_channels_first_convolutions():
        pytest.skip("TensorFlow runs channels-first convolutions on this CPU only under XLA")
    keras.utils.set_random_seed(0)
    conv = keras.layers.Conv2D(filters, 1, activation="relu", data_format=data_format)
    shape = (channels, 4, 4) if first else (4, 4, channels)
    base = keras.Sequential(
        [
            keras.Input(shape),
            conv,
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model = ForwardGradientModel(base, perturbation="activations", local_losses="layers", seed=2)
    model.compile(optimizer="sgd", loss=LOSS)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5,) + shape).astype("float32")
    if first:
        x[:, -1] = 1.0
    else:
        x[..., -1] = 1.0
    y = rng.integers(0, 3, size=(5,))
    kernel, bias = _forward_gradient(model, x, y, mode)[:2]
    assert kernel.shape == (1, 1, channels, filters) and bias.shape == (filters,)
    assert np.abs(bias).max() > 1e-3, bias
    np.testing.assert_allclose(kernel[0, 0, -1], bias, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", backend_modes(["graph", "xla"]))
def test_a_batch_normalization_in_its_own_block_keeps_per_example_derivatives(mode):
    """`BatchNormalization` mixes examples, but only tangents that pass
    through it need the whole batch's derivative. With
    `local_losses="layers"` it ends a block of its own (it has trainable
    variables) and is perturbed at its output, so its units keep
    per-example derivatives: with one loss per unit and random-sign
    tangents, one draw of its scale and offset estimates equals the
    reverse-mode gradient of its block's loss (rtol=atol=1e-4). A
    whole-batch derivative would not."""
    keras.utils.set_random_seed(0)
    dense, norm = keras.layers.Dense(3, activation="tanh"), keras.layers.BatchNormalization()
    base = keras.Sequential(
        [keras.Input((4,)), dense, norm, keras.layers.Dense(3, activation="softmax")]
    )
    model = ForwardGradientModel(base, seed=2, **activity_models.PER_UNIT_SIGNS)
    model.compile(optimizer="sgd", loss=LOSS)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4)).astype("float32")
    y = rng.integers(0, 3, size=(6,))
    h = np.asarray(dense(x))
    local = keras.Sequential([keras.Input((3,)), norm, model.local_heads[1]])
    expected = activity_models.reference_gradients(local, h, y)
    grads = dict(
        zip([id(v) for v in model.trainable_variables], _forward_gradient(model, x, y, mode))
    )
    for v in norm.trainable_variables:
        np.testing.assert_allclose(grads[id(v)], expected[id(v)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", backend_modes(["eager", "graph", "xla"]))
@pytest.mark.parametrize("first", ["conv", "dense"])
def test_a_layer_before_batch_normalization_is_estimated_through_it(first, mode):
    """A `Dense`/convolution layer without activation whose output only a
    `BatchNormalization` reads (ResNet's `Conv2D(use_bias=False)` then
    `BatchNormalization` then `ReLU`) is not perturbed itself: the
    normalization's output is, and the layer's estimate takes the
    cotangent of the normalization's input from the normalization's
    reverse pass. With `local_losses="layers"` the three layers form one
    block, whose head reads the `ReLU`'s output; with one loss per unit
    and random signs, one draw of the estimates of the layer and of the
    normalization equals the reverse-mode gradient of that block's loss
    (rtol=atol=1e-4), and the layer's kernel estimate changes with the
    block's loss (a second block's kernel is checked as well)."""
    keras.utils.set_random_seed(0)
    L = keras.layers
    if first == "conv":
        shape = (5, 5, 2)
        layers = [L.Conv2D(3, 3, padding="same", use_bias=False), L.Conv2D(4, 3)]
        tail = [L.GlobalAveragePooling2D()]
        x = np.random.default_rng(1).normal(size=(6,) + shape).astype("float32")
    else:
        shape = (4,)
        layers = [L.Dense(3), L.Dense(4)]
        tail = []
        x = np.random.default_rng(1).normal(size=(6,) + shape).astype("float32")
    norms = [L.BatchNormalization(), L.BatchNormalization()]
    relus = [L.ReLU(), L.ReLU()]
    base = keras.Sequential(
        [keras.Input(shape)]
        + [layers[0], norms[0], relus[0], layers[1], norms[1], relus[1]]
        + tail
        + [L.Dense(3, activation="softmax")]
    )
    assert activity.normalized_layers(base) == {
        layers[0].name: norms[0].name,
        layers[1].name: norms[1].name,
    }
    assert activity.block_ends(base, "layers") == [relus[0].name, relus[1].name]
    model = ForwardGradientModel(base, seed=2, **activity_models.PER_UNIT_SIGNS)
    model.compile(optimizer="sgd", loss=LOSS)
    y = np.random.default_rng(2).integers(0, 3, size=(6,))
    grads = dict(
        zip([id(v) for v in model.trainable_variables], _forward_gradient(model, x, y, mode))
    )
    h = x
    for i in range(2):
        local = keras.Sequential(
            [keras.Input(h.shape[1:]), layers[i], norms[i], relus[i], model.local_heads[i]]
        )
        expected = activity_models.reference_gradients(local, h, y)
        for v in layers[i].trainable_variables + norms[i].trainable_variables:
            # (A bias before the normalization has no gradient.)
            assert v.path.endswith("bias") or np.abs(expected[id(v)]).max() > 1e-3
            np.testing.assert_allclose(grads[id(v)], expected[id(v)], rtol=1e-4, atol=1e-4)
        h = np.asarray(relus[i](norms[i](layers[i](h), training=True)))


def _general_rule_cases():
    """`(inputs, the layer, its output from inputs, x)`: one layer of the
    general rule that ends the first block."""
    rng = np.random.default_rng(3)
    x_seq = rng.normal(size=(5, 3, 4)).astype("float32")
    x_vec = rng.normal(size=(5, 4)).astype("float32")
    tokens = rng.integers(0, 6, size=(5, 3)).astype("int32")
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2)
    cases = {
        "einsum_dense": (
            keras.layers.EinsumDense("abc,cd->abd", (3, 2), bias_axes="d"),
            x_seq,
        ),
        "layer_normalization": (keras.layers.LayerNormalization(), x_vec),
        "embedding": (keras.layers.Embedding(6, 2), tokens),
        "multi_head_attention": (attention, x_seq),
    }
    return cases


@pytest.mark.parametrize("mode", backend_modes(["graph", "xla"]))
@pytest.mark.parametrize("case", list(_general_rule_cases()))
def test_one_loss_per_unit_is_exact_for_general_rule_layers(case, mode):
    """With `local_losses="layers"` every layer with trainable variables
    ends a block, also those of the general rule; with one loss per unit
    and position (`"channels"`, `"positions"`) and random-sign tangents,
    one draw of its variables' estimate equals the reverse-mode gradient
    of its block's loss (rtol=atol=1e-4): its output units take their own
    derivatives, as a `Dense` layer's do."""
    keras.utils.set_random_seed(0)
    layer, x = _general_rule_cases()[case]
    inputs = keras.Input(x.shape[1:], dtype=x.dtype)
    h = layer(inputs, inputs) if case == "multi_head_attention" else layer(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(h))
    base = keras.Model(inputs, outputs)
    model = ForwardGradientModel(base, seed=2, **activity_models.PER_UNIT_SIGNS)
    model.compile(optimizer="sgd", loss=LOSS)
    y = np.random.default_rng(1).integers(0, 3, size=(len(x),))
    head = model.local_heads[0]
    local = keras.Model(inputs, head(h))
    expected = activity_models.reference_gradients(local, x, y)
    ids = [id(v) for v in model.trainable_variables]
    grads = dict(zip(ids, _forward_gradient(model, x, y, mode)))
    assert layer.trainable_variables
    for v in layer.trainable_variables:
        np.testing.assert_allclose(grads[id(v)], expected[id(v)], rtol=1e-4, atol=1e-4)


def _parallel_branches(case):
    """Two branches of equal depth, which call order interleaves (both
    first layers, then both second ones), with different widths; `ends`
    the block ends `local_losses="layers"` gives, in call order."""
    keras.utils.set_random_seed(0)
    L = keras.layers
    inputs = keras.Input((6,))
    if case == "layer_ends":
        b = L.Dense(4, activation="tanh", name="b1")(inputs)
        c = L.Dense(5, activation="tanh", name="c1")(inputs)
        ends = ["b1", "c1", "b2", "c2"]
    else:
        # Each first layer's block ends at the activation layer after it:
        # `c1` is called before `b1`'s block ends.
        b = L.Activation("tanh", name="act_b")(L.Dense(4, name="b1")(inputs))
        c = L.Activation("tanh", name="act_c")(L.Dense(5, name="c1")(inputs))
        ends = None
    b = L.Dense(3, activation="tanh", name="b2")(b)
    c = L.Dense(2, activation="tanh", name="c2")(c)
    outputs = L.Dense(3, activation="softmax", name="out")(L.Concatenate()([b, c]))
    return keras.Model(inputs, outputs), ends


@pytest.mark.parametrize("mode", backend_modes(["graph", "xla"]))
@pytest.mark.parametrize("case", ["layer_ends", "activation_ends"])
def test_parallel_branches_take_their_own_blocks_heads(case, mode):
    """In a graph of parallel branches, call order interleaves the
    branches' layers and block ends. Each layer still takes the
    derivative of the head of the block its output reaches, and each head
    reads its own block's output: with one loss per unit and random-sign
    tangents, one draw of every branch layer's estimate equals the
    reverse-mode gradient of its block's loss (rtol=atol=1e-4)."""
    base, ends = _parallel_branches(case)
    if ends is not None:
        assert activity.block_ends(base, "layers") == ends
    model = ForwardGradientModel(base, seed=2, **activity_models.PER_UNIT_SIGNS)
    model.compile(optimizer="sgd", loss=LOSS)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 6)).astype("float32")
    y = rng.integers(0, 3, size=(8,))
    expected = {}
    for name, head in zip(activity.block_ends(base, "layers"), model.local_heads):
        local = keras.Model(base.input, head(base.get_layer(name).output))
        for key, value in activity_models.reference_gradients(local, x, y).items():
            if np.any(value != 0):
                expected.setdefault(key, value)
    grads = dict(
        zip([id(v) for v in model.trainable_variables], _forward_gradient(model, x, y, mode))
    )
    for name in ["b1", "c1", "b2", "c2"]:
        for v in base.get_layer(name).trainable_variables:
            np.testing.assert_allclose(
                grads[id(v)], expected[id(v)], rtol=1e-4, atol=1e-4, err_msg=v.path
            )


@pytest.mark.parametrize("mode", backend_modes(["graph", "xla"]))
@pytest.mark.parametrize("flatten", ["flatten", "reshape"])
def test_a_convolution_classifier_over_one_position_has_a_loss_per_unit(flatten, mode):
    """A 1×1 convolution over a 1×1 map, flattened (`Flatten` or
    `Reshape`) into a softmax, as `keras.applications.MobileNetV3`'s
    classifier: its units are the model's output units, so with one loss
    per unit and random-sign tangents one draw of its estimate equals the
    reverse-mode gradient of the model's loss (rtol=atol=1e-4), as a
    `Dense` output layer's does."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 4, 2))
    h = keras.layers.Conv2D(3, 3, activation="relu")(inputs)
    h = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)
    logits = keras.layers.Conv2D(5, 1, name="logits")(h)
    flat = keras.layers.Flatten() if flatten == "flatten" else keras.layers.Reshape((5,))
    base = keras.Model(inputs, keras.layers.Activation("softmax")(flat(logits)))
    model = ForwardGradientModel(base, seed=2, **activity_models.PER_UNIT_SIGNS)
    model.compile(optimizer="sgd", loss=LOSS)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 4, 4, 2)).astype("float32")
    y = rng.integers(0, 5, size=(8,))
    expected = activity_models.reference_gradients(base, x, y)
    grads = dict(
        zip([id(v) for v in model.trainable_variables], _forward_gradient(model, x, y, mode))
    )
    for v in base.get_layer("logits").trainable_variables:
        np.testing.assert_allclose(
            grads[id(v)], expected[id(v)], rtol=1e-4, atol=1e-4, err_msg=v.path
        )


@pytest.mark.parametrize("mode", backend_modes(["graph", "xla"]))
@pytest.mark.parametrize("branch", ["dense", "einsum_dense"])
def test_a_residual_branch_ends_its_block_after_the_merge(branch, mode):
    """With `local_losses="layers"` a layer whose output reaches a residual
    `Add` through per-channel layers alone ends its block after the `Add`
    (and the per-channel layers that alone follow it), so its head reads
    the residual stream. The skip comes from the block before, so the
    sum's tangent is the branch's own: with one loss per unit and token and
    random signs, one draw still equals the reverse-mode gradient of the
    block's loss through the merge (rtol=atol=1e-4), for a closed-form
    `Dense` and for a layer of the general rule."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 4))
    first = keras.layers.Dense(4, activation="tanh")
    norm = keras.layers.LayerNormalization(trainable=False)
    if branch == "dense":
        layer = keras.layers.Dense(4)
    else:
        layer = keras.layers.EinsumDense("abc,cd->abd", (3, 4), bias_axes="d")
    merge_layers = [keras.layers.Activation("tanh"), keras.layers.Add(), keras.layers.ReLU()]
    activation, add, relu = merge_layers

    def block(h):
        return relu(add([h, activation(layer(norm(h)))]))

    h = first(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(block(h)))
    base = keras.Model(inputs, outputs)
    assert activity.block_ends(base, "layers") == [first.name, relu.name]
    model = ForwardGradientModel(base, seed=2, **activity_models.PER_UNIT_SIGNS)
    model.compile(optimizer="sgd", loss=LOSS)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3, 4)).astype("float32")
    y = rng.integers(0, 3, size=(5,))
    h_in = keras.Input((3, 4))
    local = keras.Model(h_in, model.local_heads[1](block(h_in)))
    expected = activity_models.reference_gradients(local, np.asarray(first(x)), y)
    grads = dict(
        zip([id(v) for v in model.trainable_variables], _forward_gradient(model, x, y, mode))
    )
    for v in layer.trainable_variables:
        np.testing.assert_allclose(grads[id(v)], expected[id(v)], rtol=1e-4, atol=1e-4)


def _patch_cases():
    """(layers of the hidden block, input shape, its last layer's
    pre-activations per example, `local_loss_groups`,
    `local_loss_patches`): the block ends at its last layer."""
    conv = lambda channels: keras.layers.Conv2D(channels, 1, activation="tanh")  # noqa: E731
    return {
        # One loss per position and channel; the convolution mixes positions.
        "positions": (
            [keras.layers.Conv2D(2, 2, activation="tanh")],
            (3, 3, 1),
            8,
            "channels",
            "positions",
        ),
        # 2 × 2 patches of 4 positions each, one channel.
        "patches_of_four": ([conv(1)], (4, 4, 1), 16, 1, 2),
        # Positions reach the block's output through 2 × 2 max-pooling;
        # unequal channel groups (0, 0, 1).
        "through_pooling": (
            [conv(3), keras.layers.MaxPooling2D(2)],
            (4, 2, 1),
            24,
            2,
            "positions",
        ),
        # Overlapping pooling windows: positions cannot be told apart, so
        # the groups are channels only.
        "overlapping_pooling": (
            [conv(2), keras.layers.AveragePooling2D(2, strides=1)],
            (3, 3, 1),
            18,
            "channels",
            "positions",
        ),
    }


def _patch_model(case, **options):
    hidden, shape, units, groups, patches = _patch_cases()[case]
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [keras.Input(shape)]
        + hidden
        + [keras.layers.Flatten(), keras.layers.Dense(units, activation="softmax")]
    )
    model = ForwardGradientModel(
        base,
        perturbation="activations",
        local_losses=[hidden[-1].name],
        local_loss_groups=groups,
        local_loss_patches=patches,
        active_units_only=False,
        seed=2,
        **{"orthogonal_directions": True, **options},
    )
    model.compile(optimizer="sgd", loss=LOSS)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5,) + shape).astype("float32")
    y = rng.integers(0, units, size=(5,))
    return model, x, y, len(hidden), units


@pytest.mark.parametrize("mode", backend_modes(ARCHITECTURE_MODES))
@pytest.mark.parametrize("case", list(_patch_cases()))
def test_patches_full_basis_gives_the_block_gradient(case, mode):
    """With `local_loss_patches`, each unit of the block's last perturbed
    layer takes the derivative of the (patch, channel group) it reaches:
    with a full orthogonal basis (K = its pre-activations per example) its
    estimate must equal the reverse-mode gradient of the block's local
    loss (rtol=atol=1e-4). A unit mapped to the wrong group, or a group
    whose units reach other groups too, fails this."""
    _, _, units, _, _ = _patch_cases()[case]
    model, x, y, split, _ = _patch_model(case, num_directions=units)
    expected = _block_reference(model, x, y, split=split)[:2]
    for g, e in zip(_forward_gradient(model, x, y, mode)[:2], expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", backend_modes(["graph", "xla"]))
def test_one_loss_per_position_and_channel_with_random_signs_is_exact(mode):
    """With `local_loss_patches="positions"` and channel groups every unit
    of a convolution has its own loss; with random-sign tangents one draw
    gives the block's reverse-mode gradient (rtol=atol=1e-4)."""
    model, x, y, split, _ = _patch_model(
        "positions", num_directions=1, orthogonal_directions=False, direction="rademacher"
    )
    expected = _block_reference(model, x, y, split=split)[:2]
    for g, e in zip(_forward_gradient(model, x, y, mode)[:2], expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_the_full_basis_check_can_fail():
    """The check above rejects an estimate with half the basis."""
    model, x, y, split, units = _patch_model("positions", num_directions=4)
    expected = _block_reference(model, x, y, split=split)[:2]
    with pytest.raises(AssertionError):
        for g, e in zip(_forward_gradient(model, x, y, "graph")[:2], expected):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def _check_unbiased(model, x, y, split, size):
    """Probabilistic, fixed seed: the mean of 3,000 estimates is within 5
    standard errors (estimated from the same samples) of each block's
    reverse-mode gradient in all `size` components (a false alarm has
    probability below 6e-7 per component); the same samples against a
    reference off by half are rejected (the negative control)."""
    true = np.concatenate([t.ravel() for t in _block_reference(model, x, y, split=split)])
    assert true.size == size
    samples = estimate_samples.samples(model, x, y, NUM_SAMPLES, "graph")
    z = estimate_samples.z_scores(samples, true)
    assert np.max(z) < Z, np.sort(z)[-10:]
    assert np.max(estimate_samples.z_scores(samples, true * 1.5)) > Z


def test_groups_through_a_softmax_stay_unbiased():
    """A hidden block that ends in a softmax (which mixes its units, so
    one unit's loss is not the block's) with `local_loss_groups="channels"`
    stays unbiased (`_check_unbiased`) in all 50 components."""
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4),
            keras.layers.Activation("softmax", name="mix"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model = ForwardGradientModel(
        base,
        perturbation="activations",
        local_losses=["mix"],
        local_loss_groups="channels",
        seed=5,
    )
    model.compile(optimizer="sgd", loss=LOSS)
    rng = np.random.default_rng(8)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.integers(0, 3, size=(8,))
    _check_unbiased(model, x, y, split=2, size=20 + 15 + 15)


def test_grouped_convolution_block_stays_unbiased():
    """A Conv2D → BatchNormalization → max-pooling block with 2 local-loss
    groups (a block that mixes examples, so each group's derivative is
    summed over the batch) and the output block stay unbiased
    (`_check_unbiased`) in all 78 components."""
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            keras.layers.Conv2D(4, 3, activation="tanh"),
            keras.layers.BatchNormalization(momentum=0.0),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model = ForwardGradientModel(
        base, perturbation="activations", local_losses="auto", local_loss_groups=2, seed=4
    )
    model.compile(optimizer="sgd", loss=LOSS)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, 4, 4, 1)).astype("float32")
    y = rng.integers(0, 3, size=(8,))
    _check_unbiased(model, x, y, split=3, size=78)


def _kernel_variance(patches, draws=300):
    """The total variance of a convolution's kernel estimate over `draws`
    steps, with one local loss per channel and `patches`."""
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    model = ForwardGradientModel(
        base,
        perturbation="activations",
        local_losses="auto",
        local_loss_groups="channels",
        local_loss_patches=patches,
        seed=1,
    )
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=(16,))
    kernel = model.trainable_variables[0]
    samples = estimate_samples.samples(model, x, y, draws, "graph")
    return samples[:, : int(np.prod(kernel.shape))].var(0).sum()


def test_patches_lower_the_variance_of_a_convolution():
    """Fixed seed, 300 draws: the total variance of a convolution's kernel
    estimate with one loss per channel and 2 × 2 patches, and with one per
    position, against one per channel only. Measured ratios 3.7 and 11 on
    TensorFlow; the bounds (2 and 4) leave room for the sampling error of
    a variance from 300 draws (about 8 % each)."""
    channels = _kernel_variance(1)
    assert _kernel_variance(2) < channels / 2
    assert _kernel_variance("positions") < channels / 4


@pytest.mark.parametrize("mode", backend_modes(["eager", "graph", "xla"]))
def test_fit_with_patches(mode):
    """`local_losses="layers"` with one loss per channel and position,
    K = 2, a block with `BatchNormalization`, clipping: every variable
    moves, no step is skipped, the logs are finite."""
    keras.utils.set_random_seed(0)
    model = ForwardGradientModel(
        activity_models.cnn(),
        perturbation="activations",
        local_losses="layers",
        local_loss_groups="channels",
        local_loss_patches="positions",
        num_directions=2,
        seed=0,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3, clipnorm=1.0),
        loss=LOSS,
        run_eagerly=mode == "eager",
        jit_compile=mode == "xla",
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, size=(32,))
    before = [np.asarray(v) for v in model.trainable_variables]
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    logs = {k: v[-1] for k, v in history.history.items()}
    assert logs["skipped_steps"] == 0
    assert {"local_loss_0", "local_loss_1", "local_loss_2"} <= set(logs)
    assert all(np.isfinite(v) for v in logs.values())
    changed = [
        not np.allclose(b, np.asarray(v)) for b, v in zip(before, model.trainable_variables)
    ]
    assert all(changed)


def _assert_nested_estimates_as_flat(flat, nested, mode):
    """Under `mixed_bfloat16`, the estimates of the models `flat()` and
    `nested()` build (each returns `(base, the model holding "d1")`, with
    layers "d0", "d1" and "out") must agree to rtol=atol=1e-5, with the
    same weights, heads and draws: `auto` blocks, one loss per channel,
    random signs, every unit's tangent kept; a batch of 5 examples of 6
    features. Eight tensors each: kernels and biases of d0, d1, out and
    the head."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        flat_estimate, nested_estimate = _flat_and_nested_estimates(flat, nested, mode)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert len(flat_estimate) == len(nested_estimate) == 8
    for a, b in zip(flat_estimate, nested_estimate):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def _flat_and_nested_estimates(flat, nested, mode):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 6)).astype("float32")
    y = rng.integers(0, 3, size=(5,))
    estimates, first = [], None
    for build in (flat, nested):
        keras.utils.set_random_seed(0)
        base, inner = build()
        layers = [base.get_layer("d0"), inner.get_layer("d1"), base.get_layer("out")]
        model = ForwardGradientModel(
            base,
            perturbation="activations",
            local_losses="auto",
            local_loss_groups="channels",
            direction="rademacher",
            active_units_only=False,
            seed=2,
        )
        if first is None:
            first = (layers, model.local_heads)
        assert len(model.local_heads) == len(first[1]) == 1
        for layer, source in zip(layers + model.local_heads, first[0] + first[1]):
            layer.set_weights(source.get_weights())
        model.compile(optimizer="sgd", loss=LOSS)
        estimates.append(_forward_gradient(model, x, y, mode))
    return estimates


@pytest.mark.parametrize("mode", backend_modes(["eager", "graph"]))
def test_a_nested_model_under_mixed_precision_groups_as_the_flat_one(mode):
    """Under mixed precision Keras casts a nested model's inputs to the
    input layer's dtype, which makes new tensors. The local-loss groups
    follow them: a residual `Add` inside the nested model whose skip
    carries the tangent of a layer of the same block is not taken for a
    branch's merge (whose units could have losses of their own), so the
    nested model's estimate is the flat model's: same weights, heads and
    draws, rtol=atol=1e-5. (Without following the cast, the `Add` is
    taken for a merge and `d1`'s estimate differs by far more.)"""
    L = keras.layers

    def flat():
        x = keras.Input((6,))
        h = L.Dense(6, activation="tanh", name="d0")(x)
        merged = L.Add(name="add")([h, L.Dense(6, name="d1")(h)])
        base = keras.Model(x, L.Dense(3, activation="softmax", name="out")(merged))
        return base, base

    def nested():
        inner_in = keras.Input((6,))
        merged = L.Add(name="add")([inner_in, L.Dense(6, name="d1")(inner_in)])
        inner = keras.Model(inner_in, merged, name="inner")
        x = keras.Input((6,))
        h = L.Dense(6, activation="tanh", name="d0")(x)
        out = L.Dense(3, activation="softmax", name="out")(inner(h))
        return keras.Model(x, out), inner

    _assert_nested_estimates_as_flat(flat, nested, mode)


def _output_layer_cases():
    """How a model's last layer with variables reaches its output: with its
    own softmax, through a float32 `Activation` or `Softmax` layer (Keras'
    advice for mixed precision), or as a float32 `Dense`."""
    L = keras.layers
    return {
        "own_activation": lambda h: L.Dense(3, activation="softmax")(h),
        "activation_layer": lambda h: L.Activation("softmax", dtype="float32")(L.Dense(3)(h)),
        "softmax_layer": lambda h: L.Softmax(dtype="float32")(L.Dense(3)(h)),
        "float32_dense": lambda h: L.Dense(3, activation="softmax", dtype="float32")(h),
    }


@pytest.mark.parametrize("mode", backend_modes(["graph", "xla"]))
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("case", list(_output_layer_cases()))
def test_the_output_layer_takes_one_loss_per_unit(case, policy, mode):
    """The model's output layer takes one loss per output unit (from its
    own tangents) also when activation layers follow it, and under mixed
    precision, where it computes in bfloat16 and takes the general rule
    (its output is perturbed, not its pre-activations). With random-sign
    tangents one draw of its estimate is then the reverse-mode gradient of
    the last block's loss: rtol=atol=1e-4 in float32; in bfloat16 (about
    3 digits) a cosine above 0.999. A shared derivative for all output
    units gives cosines of 0.62-0.91 on this model."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((3, 4))
        hidden = keras.layers.Dense(4, activation="relu")
        pooled = keras.layers.GlobalAveragePooling1D()(hidden(inputs))
        outputs = _output_layer_cases()[case](pooled)
        base = keras.Model(inputs, outputs)
        model = ForwardGradientModel(base, seed=2, **activity_models.PER_UNIT_SIGNS)
        model.compile(optimizer="sgd", loss=LOSS)
        rng = np.random.default_rng(1)
        x = rng.normal(size=(4, 3, 4)).astype("float32")
        y = rng.integers(0, 3, size=(4,))
        h = np.asarray(hidden(x)).astype("float32")
        top_in = keras.Input(h.shape[1:])
        top = top_in
        for layer in base.layers[2:]:
            top = layer(top)
        expected = activity_models.reference_gradients(keras.Model(top_in, top), h, y)
        grads = dict(
            zip([id(v) for v in model.trainable_variables], _forward_gradient(model, x, y, mode))
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    output_layer = [layer for layer in base.layers if layer.trainable_variables][-1]
    assert len(output_layer.trainable_variables) == 2
    for v in output_layer.trainable_variables:
        g = np.asarray(grads[id(v)], dtype="float32")
        e = np.asarray(expected[id(v)], dtype="float32")
        if policy == "float32":
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
        else:
            cosine = np.dot(g.ravel(), e.ravel()) / (np.linalg.norm(g) * np.linalg.norm(e))
            assert cosine > 0.999, (v.path, cosine)


@pytest.mark.parametrize("mode", backend_modes(["eager", "graph"]))
def test_a_nested_model_called_with_a_dict_groups_as_the_flat_one(mode):
    """A nested model whose inputs are a list may be called with a dict
    keyed by their names, in any order: Keras reorders it, and under mixed
    precision casts each input (new tensors). The local-loss groups follow
    each input to its own cast, so the nested model's estimate is the flat
    model's (same weights, heads and draws, rtol=atol=1e-5): its residual
    `Add` merges the branch `d1` with a skip from the model's input, which
    carries no tangent, and `d1` takes one loss per unit. (Paired by
    position, the skip would take `h`'s tangent and `d1` the whole
    block's derivative.)"""
    L = keras.layers

    def flat():
        x = keras.Input((6,))
        h = L.Dense(6, activation="tanh", name="d0")(x)
        merged = L.Add(name="add")([x, L.Dense(6, name="d1")(h)])
        base = keras.Model(x, L.Dense(3, activation="softmax", name="out")(merged))
        return base, base

    def nested():
        skip_in = keras.Input((6,), name="b_skip")
        branch_in = keras.Input((6,), name="a_branch")
        merged = L.Add(name="add")([skip_in, L.Dense(6, name="d1")(branch_in)])
        inner = keras.Model([skip_in, branch_in], merged, name="inner")
        x = keras.Input((6,))
        h = L.Dense(6, activation="tanh", name="d0")(x)
        out = L.Dense(3, activation="softmax", name="out")(inner({"a_branch": h, "b_skip": x}))
        return keras.Model(x, out), inner

    _assert_nested_estimates_as_flat(flat, nested, mode)
