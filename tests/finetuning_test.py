"""The fine-tuning harness of `examples/finetune_lora.py` and
`benchmarks/finetune.py`: the small vision transformer, `enable_lora` and
`step_memory`."""

import keras
import numpy as np
import pytest

from keras_fwdgrad.research import architectures
from keras_fwdgrad.research import finetuning


def test_vit_as_layers_and_as_blocks_computes_the_same_function():
    """`block_layers=True` (one `EncoderBlock` per block) holds the same
    variables as the spelled-out model, and with them copied gives the same
    logits; the block model survives a `.keras` round trip."""
    flat = architectures.vit(depth=2, num_classes=3)
    blocks = architectures.vit(depth=2, num_classes=3, block_layers=True)
    assert [tuple(w.shape) for w in flat.weights] == [tuple(w.shape) for w in blocks.weights]
    blocks.set_weights(flat.get_weights())
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(blocks(x), flat(x), rtol=1e-5, atol=1e-5)


def test_encoder_block_round_trip(tmp_path):
    model = architectures.vit(depth=1, num_classes=3, block_layers=True)
    path = str(tmp_path / "vit.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.ones((1, 32, 32, 3), "float32")
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)


@pytest.mark.parametrize("block_layers", [False, True])
def test_enable_lora_trains_only_lora_factors_attention_biases_and_head(block_layers):
    model = architectures.vit(depth=2, num_classes=3, block_layers=block_layers)
    count = finetuning.enable_lora(model, 4)
    names = [v.path.split("/")[-2:] for v in model.trainable_variables]
    assert count == sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert sum(n.startswith("lora_kernel") for _, n in names) == 8  # 2 blocks × q, v × a, b
    assert all(layer in ("query", "value", "head") for layer, _ in names), names
    # The frozen kernels stay in the model, as non-trainable variables.
    assert any(v.path.endswith("query/kernel") for v in model.non_trainable_variables)


def test_enable_lora_errors():
    with pytest.raises(ValueError, match="no MultiHeadAttention"):
        finetuning.enable_lora(architectures.mlp(), 2)
    with pytest.raises(ValueError, match="rank"):
        finetuning.enable_lora(architectures.vit(depth=1), 0)
    with pytest.raises(ValueError, match="no layer named 'classifier'"):
        finetuning.enable_lora(architectures.vit(depth=1), 2, head="classifier")
    with pytest.raises(ValueError, match="multiple of `heads`"):
        architectures.vit(width=30, heads=4)


def test_step_memory_needs_a_compiled_model():
    with pytest.raises(ValueError, match="compiled"):
        finetuning.step_memory(architectures.vit(depth=1), np.ones((1, 32, 32, 3)), [0])
