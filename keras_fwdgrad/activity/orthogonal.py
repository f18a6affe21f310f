"""Orthogonal tangents per example (`orthogonal_directions`), in
`keras.ops`: each example's K tangents of a layer made orthogonal.

Gram-Schmidt on the K rows costs a few passes over them; a Householder QR
of the `[units, K]` columns was several times slower on a CPU (64
examples of 50,176 units, K = 3, 2 cores: TensorFlow 363 against 142 ms,
under XLA 3.9 s against 64 ms; JAX 219 against 97 ms)."""

import math

from keras import ops


def tangents(direction, shape, num, seed):
    """Each example's `num` tangents of one layer's output, orthogonal.

    Draws `num` tangents of the direction family per example
    (`direction.tangent`), then makes them orthonormal by Gram-Schmidt,
    twice (which leaves them orthogonal to float32 rounding), and scales
    each to norm `√size`, the expected norm of one Gaussian tangent of
    `size` units.

    Why `E[u uᵀ] = I` for each of them: the draws have independent,
    symmetric components, so their joint law does not change when the
    units are permuted or their signs flipped, and Gram-Schmidt commutes
    with those maps; so `E[q qᵀ]` commutes with all of them, which makes
    it a multiple of the identity, and `q` has norm 1, so it is `I / size`.
    With `num == size` the tangents span every direction: their projected
    forward gradient is the exact gradient.

    Args:
        direction: The model's `Direction` (its `tangent()` draws).
        shape: The layer output's shape (`[batch, ...]`); on TensorFlow it
            may be a dynamic shape tensor.
        num: Python int, the number of tangents per example, at most the
            number of units per example.
        seed: The backend's stateless seed, the layer's.

    Returns:
        A float32 tensor `[batch, num, size]`, `size` the number of units
        per example: row `k` of example `n` is its `k`-th tangent.
    """
    static = isinstance(shape, (tuple, list)) and all(isinstance(s, int) for s in shape)
    if static:
        size = math.prod(shape[1:])
        draw_shape = (shape[0], num, size)
    else:
        size = ops.prod(shape[1:])
        draw_shape = ops.stack([shape[0], ops.cast(num, size.dtype), size])
    g = direction.tangent(draw_shape, seed, "float32")
    rows = []
    for k in range(num):
        v = g[:, k, :]
        if rows:
            q = ops.stack(rows, axis=1)
            for _ in range(2):
                v = v - ops.einsum("nk,nkm->nm", ops.einsum("nkm,nm->nk", q, v), q)
        rows.append(v / ops.norm(v, axis=-1, keepdims=True))
    scale = ops.sqrt(ops.cast(size, "float32"))
    return ops.stack(rows, axis=1) * scale
