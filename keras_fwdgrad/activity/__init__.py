"""Activity perturbation with local losses (Ren et al., 2023).

With `perturbation="activations"`, a `ForwardGradientModel` perturbs the
pre-activations `z = x W + b` of every `Dense` and convolution layer
instead of the weights. Each example `n` gets its own tangent `u_n` (one
standard Gaussian number per unit), and one forward-mode pass gives each
example's directional derivative `d_n = ∂L_n/∂z_n · u_n`. Then
`d_n u_n` is an unbiased estimate of `∂L/∂z_n`, and the kernel's gradient
estimate is the layer-local product `Σ_n x_nᵀ (d_n u_n)` (computed for a
convolution by TensorFlow's filter-gradient of that one op). Its variance
grows with the layer's width, not with its number of weights.

`local_losses` splits the model into blocks. Each block but the last gets
a small head (`LocalHead`: global average pooling for feature maps, then
`Dense` to the model's output size, with the activation of the model's
output layer); the block is trained only from its head's loss with the
compiled loss function, the last block from the model's own loss, and no
derivative crosses a block boundary (`tf.stop_gradient`). The heads' own
kernels are perturbed in the same way.

`local_loss_groups=G` splits the channels (last axis) of each block's
output into G groups (`"channels"`: one per channel), each with its own loss: the head's loss with the
other groups' channels held constant. A perturbed layer whose channels
reach the block's end through per-channel layers only (activations,
dropout, pooling, `BatchNormalization`) then takes, for the units of
group `g`, the derivative `d_g = ∂L/∂h_g · ṫh_g` of the block output's
tangent restricted to that group (a softmax mixes its units, so it ends
that path). The units of each head and of the model's output layer form
groups as well, each with the derivative of its own tangents
`d_g = Σ_{i in g} ∂L/∂z_i · u_i`. `local_loss_patches` splits the
positions of a feature map into patches as well, each (patch, channel
group) with its own loss. All are computed after the pass from the block
output's tangent and the head's derivative, for every group at once.
Its estimate keeps the block loss's expectation and loses the noise of
the other groups' tangents (and of the head's own). A convolution's
input tangent is convolved explicitly (`layer_rules.convolution`), since
TensorFlow's forward mode through a convolution is slow under XLA.

Every other layer with trainable variables (`EinsumDense`, `Embedding`,
normalization, `MultiHeadAttention`, LoRA-enabled layers, your own) takes
the general rule: its call is recorded on a tape of its own trainable
variables, its output gets a per-example tangent, and its estimate is that
tape's reverse pass with cotangent `d_n u_n` (docs/activity.md, "The
general rule"); its perturbed output takes local-loss groups as a
`Dense` layer's pre-activations do. Layers that mix examples (for now:
`BatchNormalization`) make the derivatives of the layers recorded before
them in their block whole-batch ones, which stays unbiased. A
`Dense`/convolution layer without activation whose output only a
`BatchNormalization` reads (`normalized_pairs`) is therefore not
perturbed: the normalization's output is, and the layer's estimate is its
closed-form product with the cotangent of the normalization's input from
the normalization's own reverse pass, the one place where a reverse pass
crosses from one layer into another.

The tangents are independent draws of the direction family's `tangent()`:
by default the `"gaussian"` family's quantized normal
(`directions.quantized_normal`: 2¹⁶ levels of equal probability, mean 0,
variance exactly 1, so `E[u uᵀ] = I` and the estimate stays unbiased); with
`direction="rademacher"` random signs (`directions.random_signs`), for
which `u² = 1`, so a unit with a local loss of its own gets its exact local
gradient. They are keyed by the model's seed and step counter: half a random
word and a table read per number, several times cheaper on a CPU than an
inverse-CDF normal, and the same numbers with and without XLA. With
`orthogonal_directions`, each example's K draws of a layer are made
orthogonal by Gram-Schmidt (`orthogonal.tangents`), each scaled to a
Gaussian tangent's expected norm; `E[u uᵀ] = I` still holds.
Within a step the same tangents are used throughout.

`model` in this module is a `ForwardGradientModel`; nothing here changes
its weights.
"""

from keras_fwdgrad.activity.blocks import CallOrder
from keras_fwdgrad.activity.blocks import block_end_layers
from keras_fwdgrad.activity.blocks import block_ends
from keras_fwdgrad.activity.blocks import call_blocks
from keras_fwdgrad.activity.blocks import check_local_loss_groups
from keras_fwdgrad.activity.blocks import check_model
from keras_fwdgrad.activity.blocks import check_num_directions
from keras_fwdgrad.activity.blocks import normalized_layers
from keras_fwdgrad.activity.blocks import normalized_pairs
from keras_fwdgrad.activity.blocks import perturbed
from keras_fwdgrad.activity.heads import LocalHead
from keras_fwdgrad.activity.heads import make_heads
from keras_fwdgrad.activity.losses import per_example_losses

__all__ = [
    "CallOrder",
    "LocalHead",
    "block_end_layers",
    "block_ends",
    "call_blocks",
    "check_local_loss_groups",
    "check_model",
    "check_num_directions",
    "make_heads",
    "normalized_layers",
    "normalized_pairs",
    "per_example_losses",
    "perturbed",
]
