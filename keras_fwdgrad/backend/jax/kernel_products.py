"""The kernel's product of a 2-D convolution, `Σ x ⋆ g` over examples
and positions, as matrix products on the CPU.

Activity perturbation forms each closed-form convolution's kernel
estimate as the gradient of `<conv(x, W), g>` with respect to `W`. XLA:CPU
lowers that filter gradient several times slower than the forward
convolution of the same size (a 64 → 64 channel 3 × 3 convolution on a
batch of 64 28 × 28 maps, 2 cores: 100 ms against 26 ms). For a stride-1
convolution it is `kh` matrix products, one per kernel row, of the input
shifted by that row and each column (side by side) with `g`: 83 ms there,
the same values up to rounding.
"""

import jax
import jax.numpy as jnp
import keras


def applies(layer, x):
    """Whether `kernel_product` forms `layer`'s kernel product: a plain
    `Conv2D` (stride 1, no dilation, one group, channels last, `"same"` or
    `"valid"` padding) on a rank-4 input whose trainable variables are its
    kernel and bias, running on the CPU."""
    own = [layer.kernel] + ([layer.bias] if layer.use_bias else [])
    trainable = [v for v in layer.variables if v.trainable]
    return (
        type(layer) is keras.layers.Conv2D
        and [id(v) for v in trainable] == [id(v) for v in own]
        and tuple(layer.strides) == (1, 1)
        and tuple(layer.dilation_rate) == (1, 1)
        and layer.groups == 1
        and layer.data_format == "channels_last"
        and layer.padding in ("same", "valid")
        and x.ndim == 4
        and jax.default_backend() == "cpu"
    )


def kernel_product(layer, x, g):
    """`Σ_{n, p} x[n, p + t, :]ᵀ g[n, p, :]` for every kernel tap `t`: the
    gradient of `<conv(x, W), g>` with respect to the kernel `W`
    (`[kh, kw, channels, filters]`).

    Args:
        layer: A `Conv2D` layer for which `applies(layer, x)` holds.
        x: Its input, `[batch, height, width, channels]`.
        g: The cotangent of its pre-activations, `[batch, out_height,
            out_width, filters]`.
    """
    kh, kw = layer.kernel_size
    if layer.padding == "same":
        # Stride 1: `k - 1` in all, the odd one after (as XLA and
        # TensorFlow pad).
        x = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    height, width, channels = g.shape[1], g.shape[2], x.shape[3]
    flat_g = g.reshape(-1, g.shape[3])
    rows = []
    for i in range(kh):
        shifted = jnp.concatenate(
            [x[:, i : i + height, j : j + width, :] for j in range(kw)], axis=-1
        )
        product = jax.lax.dot_general(
            shifted.reshape(-1, kw * channels), flat_g, (((0,), (0,)), ((), ()))
        )
        rows.append(product.reshape(kw, channels, -1))
    return jnp.stack(rows)
