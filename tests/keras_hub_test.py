"""KerasHub backbones under a new classification head, trained in full
(every variable trainable): decoder-only language models (GPT-2, Llama
and Gemma: rotary embeddings, grouped-query attention, RMS normalization,
gated feed-forward layers, causal and padding masks), a vision
transformer (ViT) and a ResNet. BERT, whose encoder layers are KerasHub's
`TransformerEncoder`, is in `lora_test.py`, with LoRA.

Each backbone is built from its constructor, tiny and with random
weights (`model_zoo.KERAS_HUB_CASES`): nothing is downloaded. On both
backends (CI runs this file on TensorFlow and on JAX):

- the papers' estimator (weight perturbation) computes the tape's
  directional derivative;
- activity perturbation's estimate is unbiased against the backend's
  reverse mode (every transformer layer, embedding and normalization of
  the backbone has its output perturbed and takes its one-layer reverse
  pass);
- `fit` with the README's transformer recipe (a block after every layer
  with variables, one loss per unit and position) computes the model's
  loss and changes exactly the variables that backprop changes.
- `local_losses="auto"` ends a block after each transformer layer.
"""

import statistics

import keras
import numpy as np
import pytest

from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import activity
from keras_fwdgrad import testing
from tests import activity_models
from tests import estimate_samples
from tests import model_zoo

# float32 forward and reverse passes of a few hundred operations agree to a
# few ulps of the loss (measured: at most 5e-6 relative, Gemma); 1e-4 still
# fails for any wrong term.
RTOL = 1e-4
# Draws of the unbiasedness check, and the probability that it fails for
# an unbiased estimator (for all components together).
DRAWS = 1000
FALSE_ALARM = 1e-3


def _case(name):
    build, (x, y), loss = model_zoo.KERAS_HUB_CASES[name]
    keras.utils.set_random_seed(0)
    return build(), x, y, loss


def _flat_gradient(base, grads):
    """The tape's gradients as one vector; zeros where the loss does not
    use a variable (Llama's untied output embedding; the tape says `None`
    on TensorFlow)."""
    return np.concatenate(
        [
            np.zeros(v.shape).ravel() if g is None else np.asarray(g).ravel()
            for v, g in zip(base.trainable_variables, grads)
        ]
    )


def _bound(components):
    """The z-score that an unbiased estimate's mean stays under in every
    component with probability `1 - FALSE_ALARM` (Bonferroni over the
    components, normal means: each mean is of `DRAWS` independent draws)."""
    return statistics.NormalDist().inv_cdf(1 - FALSE_ALARM / (2 * components))


@pytest.mark.parametrize("name", list(model_zoo.KERAS_HUB_CASES))
def test_weight_perturbation_is_exact(name):
    """The papers' estimator: forward mode's `∇f·v` equals the tape's
    (`RTOL`), and so does the loss, in a traced step (eager and XLA steps
    run the same code; `architectures_test.py` checks them on
    `keras.applications` models and a transformer block)."""
    base, x, y, loss = _case(name)
    result = testing.check_exactness(base, x, y, loss, mode="graph")
    assert result["relative_error"] < RTOL, result
    np.testing.assert_allclose(result["loss"], result["reference_loss"], rtol=1e-5)


# The transformers: their layers take the general rule. ResNet's are stock
# convolutions and normalizations, whose estimates `activity_layers_test.py`
# checks (its `fit` step below still runs them inside KerasHub's graph).
@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma", "vit"])
def test_activity_perturbation_is_unbiased(name):
    """Probabilistic, fixed seed: over `DRAWS` estimates (one loss,
    random-sign tangents) the mean is within `_bound` standard errors of
    reverse mode's gradient in every component (1,155 to 2,835 of them;
    bound 4.9 to 5.1), and a reference twice as large is rejected."""
    base, x, y, loss = _case(name)
    model = ForwardGradientModel(base, perturbation="activations", direction="rademacher", seed=3)
    model.compile(optimizer="sgd", loss=loss)
    _, grads = testing.tape_gradients(model, x, y)
    true = _flat_gradient(base, grads)
    samples = estimate_samples.samples(model, x, y, DRAWS, "graph")
    assert samples.shape[1] == true.size
    bound = _bound(true.size)
    assert estimate_samples.z_scores(samples, true).max() < bound
    assert estimate_samples.z_scores(samples, 2.0 * true).max() > bound


@pytest.mark.parametrize("name", list(model_zoo.KERAS_HUB_CASES))
def test_fit_with_a_block_per_layer_trains_what_backprop_trains(name):
    """The README's transformer recipe: one `train_on_batch` reports the
    model's own loss (rtol 1e-5), skips no step, logs one local loss per
    head, and changes exactly the variables whose reverse-mode gradient is
    not zero."""
    base, x, y, loss = _case(name)
    model = ForwardGradientModel(base, seed=0, **activity_models.PER_UNIT_SIGNS)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    _, grads = testing.tape_gradients(model, x, y)
    used = [g is not None and np.any(np.asarray(g) != 0) for g in grads]
    expected_loss = float(keras.ops.mean(loss(y, base(x, training=True))))
    before = [keras.ops.convert_to_numpy(v) for v in base.trainable_variables]
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["loss"], expected_loss, rtol=1e-5)
    assert logs["skipped_steps"] == 0.0
    assert model.local_heads
    assert {f"local_loss_{i}" for i in range(len(model.local_heads))} <= set(logs)
    moved = [
        bool(np.any(keras.ops.convert_to_numpy(v) != b))
        for v, b in zip(base.trainable_variables, before)
    ]
    paths = [v.path for v in base.trainable_variables]
    assert dict(zip(paths, moved)) == dict(zip(paths, used))


# Where `local_losses="auto"` ends blocks: after each transformer layer
# (each is a block written as one layer), the ViT encoder (all its blocks
# in one layer), GPT-2's sum of token and position embeddings (a merge),
# ResNet's first pooling and residual block output; then the pooling
# before the new head.
AUTO_ENDS = {
    "gpt2": ["embeddings_add", "transformer_layer_0", "transformer_layer_1"],
    "llama": ["transformer_layer_0", "transformer_layer_1"],
    "gemma": ["decoder_block_0", "decoder_block_1"],
    "vit": ["vit_encoder"],
    "resnet": ["pool1_pool", "stack0_block0_out"],
}


@pytest.mark.parametrize("name", list(model_zoo.KERAS_HUB_CASES))
def test_auto_ends_a_block_after_each_transformer_layer(name):
    """`local_losses="auto"` ends a block after each of KerasHub's
    transformer layers (it ended none inside a backbone of them once: the
    whole backbone was one block)."""
    base, _, _, _ = _case(name)
    pooling = base.layers[-2]
    assert activity.block_ends(base, "auto") == AUTO_ENDS[name] + [pooling.name]
