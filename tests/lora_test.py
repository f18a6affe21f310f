"""Fine-tuning with LoRA: Keras layers after `enable_lora(rank)` and a
KerasHub backbone after `backbone.enable_lora(rank)`.

The forward gradient is exact against the backend's reverse mode
(`keras_fwdgrad.testing.check_exactness`) and unbiased; only the trainable
variables (the LoRA factors, biases and the new head) are perturbed and
changed. Runs on both backends (CI runs it on TensorFlow and on JAX). The
KerasHub backbone is built from its constructor with random weights:
nothing is downloaded.
"""

import keras
import keras_hub
import numpy as np
import pytest

from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import testing
from tests import activity_models
from tests import estimate_samples
from tests.conftest import backend_modes

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# float32 forward and reverse passes of a few hundred operations agree to a
# few ulps of the loss; 1e-4 leaves room for the longest (the backbone, whose
# derivative is of order 1e-2) and still fails for any wrong term.
RTOL = 1e-4


def _randomize_lora(model, seed=0):
    """LoRA starts with `lora_kernel_b = 0`, where the gradient of
    `lora_kernel_a` is zero; random factors test both."""
    rng = np.random.default_rng(seed)
    count = 0
    for v in model.trainable_variables:
        if "lora_kernel_b" in v.path:
            v.assign(rng.normal(scale=0.3, size=v.shape).astype(v.dtype))
            count += 1
    assert count, "the model has no LoRA factors"


def _lora_mlp():
    base = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )
    for layer in base.layers:
        layer.enable_lora(2)
    _randomize_lora(base)
    return base


def _lora_attention():
    """Self-attention whose query and value projections (`EinsumDense`)
    have LoRA, as KerasHub's `enable_lora` does; key and output frozen."""
    inputs = keras.Input((5, 8))
    attention = keras.layers.MultiHeadAttention(2, 4, dropout=0.1)
    h = attention(inputs, inputs)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h))
    base = keras.Model(inputs, outputs)
    attention.query_dense.enable_lora(2)
    attention.value_dense.enable_lora(2)
    attention.key_dense.trainable = False
    attention.output_dense.trainable = False
    _randomize_lora(base)
    return base


def _bert(num_layers=2, dropout=0.1):
    """A 2-layer `keras_hub.models.BertBackbone` with random weights and
    LoRA of rank 2, under a new 2-class head."""
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=12,
        dropout=dropout,
    )
    backbone.enable_lora(2)
    inputs = {
        "token_ids": keras.Input((12,), dtype="int32", name="token_ids"),
        "segment_ids": keras.Input((12,), dtype="int32", name="segment_ids"),
        "padding_mask": keras.Input((12,), dtype="int32", name="padding_mask"),
    }
    pooled = backbone(inputs)["pooled_output"]
    base = keras.Model(inputs, keras.layers.Dense(2)(pooled))
    _randomize_lora(base)
    return base, backbone


def _bert_data(n=4):
    rng = np.random.default_rng(1)
    padding = np.ones((n, 12), "int32")
    padding[:, 9:] = 0
    x = {
        "token_ids": rng.integers(0, 50, (n, 12)).astype("int32"),
        "segment_ids": np.zeros((n, 12), "int32"),
        "padding_mask": padding,
    }
    return x, rng.integers(0, 2, n)


def _data(shape, classes=3, n=4):
    rng = np.random.default_rng(2)
    return rng.normal(size=(n,) + shape).astype("float32"), rng.integers(0, classes, n)


@pytest.mark.parametrize("mode", backend_modes(["eager", "graph", "xla"]))
@pytest.mark.parametrize("name", ["dense", "attention"])
def test_lora_layers_are_exact(name, mode):
    """The directional derivative of LoRA `Dense` layers and of LoRA
    `EinsumDense` projections inside `MultiHeadAttention` (dropout on)
    equals reverse mode's `∇f·v` to rtol 1e-4."""
    base, shape = {"dense": (_lora_mlp, (8,)), "attention": (_lora_attention, (5, 8))}[name]
    base = base()
    x, y = _data(shape)
    result = testing.check_exactness(base, x, y, LOSS, mode=mode)
    assert result["relative_error"] < RTOL, result
    assert abs(result["reference"]) > 1e-3, result


@pytest.mark.parametrize("mode", ["graph"])
def test_keras_hub_backbone_after_enable_lora_is_exact(mode):
    """A KerasHub `BertBackbone` built from its constructor, after
    `enable_lora(2)`, with dropout 0.1: the forward-mode derivative equals
    reverse mode's to rtol 1e-4, and only the trainable variables (the
    LoRA factors and biases of the query and value projections, and the
    head) are perturbed."""
    base, backbone = _bert()
    x, y = _bert_data()
    result = testing.check_exactness(base, x, y, LOSS, mode=mode)
    assert result["relative_error"] < RTOL, result
    assert abs(result["reference"]) > 1e-4, result
    frozen = [v for v in backbone.weights if not v.trainable]
    assert any(v.path.endswith("kernel") for v in frozen)
    # `enable_lora` leaves the query and value biases trainable.
    trainable = [v.path.split("/")[-2:] for v in backbone.trainable_variables]
    assert all(layer in ("query", "value") for layer, _ in trainable), trainable
    assert sum(name.startswith("lora_kernel") for _, name in trainable) == 8, trainable
    model = ForwardGradientModel(base, seed=0)
    model.compile(optimizer="sgd", loss=LOSS)
    model.forward_gradient(x, y)
    shapes = [tuple(t.shape) for t in model.current_directions()[0]]
    assert shapes == [tuple(v.shape) for v in base.trainable_variables]


@pytest.mark.parametrize("perturbation", ["weights", "activations"])
def test_fit_changes_only_the_trainable_variables(perturbation):
    """Two `fit` steps move every LoRA factor and leave the frozen kernels
    as they were, with either estimator."""
    base = _lora_mlp()
    x, y = _data((8,), n=16)
    frozen = [(v, keras.ops.convert_to_numpy(v)) for v in base.non_trainable_variables]
    lora = [(v, keras.ops.convert_to_numpy(v)) for v in base.trainable_variables]
    assert len(frozen) == 2 and len(lora) == 6
    model = ForwardGradientModel(base, perturbation=perturbation, seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for v, before in frozen:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), before, err_msg=v.path)
    for v, before in lora:
        assert np.any(keras.ops.convert_to_numpy(v) != before), v.path


def test_lora_forward_gradient_is_unbiased():
    """Probabilistic, fixed seed: the mean of 3,000 forward gradients of the
    LoRA MLP (Gaussian directions) is within 5 standard errors of reverse
    mode's gradient in every one of its 105 components (standard errors
    from the same samples; a false alarm has probability below 5e-5), and
    the check rejects the estimate scaled by 1.5."""
    base = _lora_mlp()
    x, y = _data((8,), n=16)
    model = ForwardGradientModel(base, seed=7)
    model.compile(optimizer="sgd", loss=LOSS)
    _, true = testing.tape_gradients(model, x, y)
    true = np.concatenate([g.ravel() for g in true])
    samples = estimate_samples.samples(model, x, y, 3000, "graph")
    assert samples.shape[1] == true.size == 105
    assert estimate_samples.z_scores(samples, true).max() < 5.0
    assert estimate_samples.z_scores(1.5 * samples, true).max() > 5.0


def test_keras_hub_backbone_activity_perturbation_is_unbiased():
    """Probabilistic, fixed seed: activity perturbation walks into the
    backbone (a KerasHub `Backbone` is a functional model: its dict output
    is followed node by node) and perturbs the output of each transformer
    layer, whose only trainable variables are the LoRA factors and biases
    of its attention, inside a layer frozen by `enable_lora`. Over 1,000
    draws (one loss, random-sign tangents, dropout off) the mean estimate
    is within 5 standard errors of reverse mode's gradient in every
    component; a reference twice as large is rejected."""
    base, _ = _bert(dropout=0.0)
    x, y = _bert_data(n=8)
    model = ForwardGradientModel(base, perturbation="activations", direction="rademacher", seed=3)
    model.compile(optimizer="sgd", loss=LOSS)
    _, true = testing.tape_gradients(model, x, y)
    true = np.concatenate([np.asarray(g).ravel() for g in true])
    samples = estimate_samples.samples(model, x, y, 1000, "graph")
    assert samples.shape[1] == true.size
    assert estimate_samples.z_scores(samples, true).max() < 5.0
    assert estimate_samples.z_scores(samples, 2.0 * true).max() > 5.0


def test_keras_hub_backbone_trains_with_a_loss_per_layer_and_unit():
    """`fit` with a block after every layer with variables (each transformer
    layer of the backbone gets a head), one loss per unit and token, random
    signs and dropout on: the LoRA factors move, the frozen kernels do
    not, and one local loss is logged per head."""
    base, backbone = _bert()
    x, y = _bert_data(n=16)
    frozen = [(v, keras.ops.convert_to_numpy(v)) for v in backbone.weights if not v.trainable]
    model = ForwardGradientModel(base, seed=0, **activity_models.PER_UNIT_SIGNS)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS)
    lora = [(v, keras.ops.convert_to_numpy(v)) for v in base.trainable_variables]
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert len(model.local_heads) == 2
    assert {"local_loss_0", "local_loss_1"} <= set(history)
    assert history["skipped_steps"] == [0.0]
    for v, before in frozen:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), before, err_msg=v.path)
    for v, before in lora:
        assert np.any(keras.ops.convert_to_numpy(v) != before), v.path


def test_keras_hub_backbone_forward_gradient_is_unbiased():
    """Probabilistic, fixed seed: over 1,000 draws (Rademacher directions)
    the mean forward gradient of the LoRA `BertBackbone` classifier (dropout
    off, so that every draw sees the same function) is within 5 standard
    errors of reverse mode's gradient in every component; scaled by 1.5 it
    is not."""
    base, _ = _bert(dropout=0.0)
    x, y = _bert_data(n=8)
    model = ForwardGradientModel(base, direction="rademacher", seed=3)
    model.compile(optimizer="sgd", loss=LOSS)
    _, true = testing.tape_gradients(model, x, y)
    true = np.concatenate([g.ravel() for g in true])
    samples = estimate_samples.samples(model, x, y, 1000, "graph")
    assert samples.shape[1] == true.size
    assert estimate_samples.z_scores(samples, true).max() < 5.0
    assert estimate_samples.z_scores(1.5 * samples, true).max() > 5.0
