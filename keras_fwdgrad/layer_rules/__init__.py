"""Forward-mode rules for Keras layers: primal and tangent in one pass.

`tf.autodiff.ForwardAccumulator` derives most forward-mode derivatives by
transposing each op's gradient twice. That is exact for any model, but it
cannot see the structure of a direction: a rank-one kernel direction
`u ⊗ w` (see `keras_fwdgrad.directions.LowRankGaussian`) is expanded to a
full matrix and multiplied like one. The rules here run a `keras.Sequential`
model (or a functional one) layer by layer, carrying each activation `x`
with its tangent `ẋ`:

- `Dense` and `Conv1D/2D/3D`: the input and its tangent go through the
  layer's kernel in one stacked matrix product or convolution
  (`[x; ẋ] @ W`, the first paper's suggestion), and the kernel's tangent
  adds `x @ Ẇ`, computed as `(x @ u) ⊗ w` when `Ẇ = u ⊗ w`; grouped
  convolutions run group by group and causal ones pad first, as the
  layers do (a configuration a rule does not implement falls back to the
  per-layer path below);
- ReLU and linear activations: `ẏ = ẋ · [x > 0]`;
- reshaping and average pooling layers (linear, without weights): the
  layer applied to the tangent;
- `MaxPooling` with non-overlapping windows: the tangent of the selected
  element;
- any other layer (dropout, normalization, your own layers): its exact
  derivative from `tf.autodiff.ForwardAccumulator`, for that layer only.

Functional models (`keras.Model(inputs, outputs)`) run node by node the
same way, with rules for `Add`, `Subtract`, `Average` and `Concatenate`
(when no input is broadcast). A tensor used twice (`Multiply()([h, h])`,
self-attention) carries its tangent to every use.

A softmax or sigmoid output keeps the tangent of its logits
(`logits_tangent`), since Keras' cross-entropies read those logits. Where
TensorFlow's own forward mode is wrong for a layer that falls back to the
per-layer path, `keras_fwdgrad.backend.tensorflow.forward_mode_fixes` makes it exact.

The package, one job a module (the walk through a model node by node,
shared with activity perturbation, is `keras_fwdgrad.graph`): `rules`
holds the per-layer rules, `dual` carries the tangents through a model
with them, and `logits` keeps the
tangent of the logits a cross-entropy reads.

`ForwardGradientModel` uses these rules when `supports(model)` holds and
`layer_rules=True` (the default), and `tf.autodiff.ForwardAccumulator` over
the whole model otherwise. Both give the same directional derivative to
float rounding; the tests check each rule against `tf.GradientTape`.
"""

from keras_fwdgrad.layer_rules.dual import NeedsSeparatePasses
from keras_fwdgrad.layer_rules.dual import dual_call
from keras_fwdgrad.layer_rules.dual import supports
from keras_fwdgrad.layer_rules.dual import supports_batched_tangents
from keras_fwdgrad.layer_rules.logits import logits_tangent
from keras_fwdgrad.layer_rules.rules import activation_jvp
from keras_fwdgrad.layer_rules.rules import convolution
from keras_fwdgrad.graph import runs_plain
