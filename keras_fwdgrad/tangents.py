"""Compact tangent types and the one protocol that handles them.

A direction component (the tangent of one variable) is one of:
- a tensor of the variable's shape;
- `Factored(u, w)`, a rank-one `u ⊗ w` kept as its factors (the low-rank
  families);
- `PackedSigns(words, shape)`, random signs kept as 32-bit words (the
  Rademacher families);
- `None`, a zero tangent;
- with K directions in one pass, a tuple of K of those (`several`).

Every other module goes through the functions here (`to_dense`, `cast`,
`unpack_signs`, `kernel_product`, `is_several`) and never checks these
types itself.
"""

import math

import keras
from keras import ops


class Factored:
    """A rank-one direction for one variable, kept in factored form.

    `v = u ⊗ w`: `u` spans every axis of the variable but the last (for a
    `Dense` kernel, its inputs; for a convolution kernel, the window and
    input channels) and `w` spans the last axis (the units or filters).
    Layer rules use the factors directly: the tangent of `x @ (u ⊗ w)` is
    `(x @ u) ⊗ w`, which costs `O(batch · (fan_in + fan_out))` instead of
    a full matrix product.

    Args:
        u: Tensor with the variable's shape without its last axis.
        w: 1-D tensor, the size of the variable's last axis.
    """

    def __init__(self, u, w):
        self.u = u
        self.w = w

    @property
    def shape(self):
        return tuple(self.u.shape) + tuple(self.w.shape)

    @property
    def dtype(self):
        return self.u.dtype

    def dense(self, scale=None):
        """Returns `scale · u ⊗ w` as a tensor of the variable's shape."""
        u = self.u if scale is None else ops.cast(scale, self.u.dtype) * self.u
        return ops.expand_dims(u, -1) * self.w

    def cast(self, dtype):
        return Factored(ops.cast(self.u, dtype), ops.cast(self.w, dtype))

    def __repr__(self):
        return f"Factored(shape={self.shape})"


class PackedSigns:
    """A random-sign direction for one variable, kept as its random words.

    Bit `j` of word `i` (least significant first) gives component
    `32 i + j` of the flattened variable: `+1` where the bit is set, `-1`
    where it is not, as in `Rademacher.sample()`. The words take 1/32 of
    the memory of the dense direction and unpacking them is element-wise,
    so a training step unpacks them where each layer reads its kernel's
    direction and again inside the optimizer's update, and never holds
    the dense direction of every layer at once.

    Args:
        words: `[ceil(n / 32)]` `uint32` tensor, `n` the variable's size.
        shape: The variable's shape (tuple of ints).
        dtype: Floating dtype of the dense direction.
    """

    def __init__(self, words, shape, dtype="float32"):
        self.words = words
        self._shape = tuple(shape)
        self._dtype = keras.backend.standardize_dtype(dtype)

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._dtype

    def dense(self, scale=None):
        """Returns `scale · v` as a tensor of the variable's shape."""
        bits = ops.reshape(unpack_bits(self.words, math.prod(self._shape)), self._shape)
        if scale is None:
            # Maps a bit b in {0, 1} to 2b - 1 in {-1, +1}.
            return ops.cast(bits, self._dtype) * 2 - 1
        scale = ops.cast(scale, self._dtype)
        return ops.where(ops.equal(bits, ops.convert_to_tensor(1, "uint32")), scale, -scale)

    def cast(self, dtype):
        return PackedSigns(self.words, self._shape, dtype)

    def __repr__(self):
        return f"PackedSigns(shape={self._shape})"


def unpack_bits(words, n):
    """The first `n` bits of the uint32 `words`, as a flat uint32 tensor
    of 0s and 1s: bit `j` of word `i` is element `32 i + j`. `n` may be a
    dynamic scalar tensor (TensorFlow)."""
    shifts = ops.convert_to_tensor([list(range(32))], dtype="uint32")
    one = ops.convert_to_tensor(1, dtype="uint32")
    bits = ops.bitwise_and(ops.right_shift(ops.expand_dims(words, 1), shifts), one)
    return ops.reshape(bits, [-1])[:n]


def to_dense(tangent, scale=None):
    """Returns a tangent as a dense tensor (times `scale`)."""
    if isinstance(tangent, (Factored, PackedSigns)):
        return tangent.dense(scale)
    if scale is None:
        return tangent
    return ops.cast(scale, tangent.dtype) * tangent


def cast(tangent, dtype):
    """Casts a tangent's values to `dtype`, keeping its form."""
    if isinstance(tangent, (Factored, PackedSigns)):
        return tangent if tangent.dtype == dtype else tangent.cast(dtype)
    return tangent if tangent.dtype == dtype else ops.cast(tangent, dtype)


def unpack_signs(tangent):
    """`PackedSigns` as a dense tensor; any other tangent unchanged.

    Outside XLA every unpacking is a full-size op, so a step unpacks signs
    once instead of where each reader needs them.
    """
    return tangent.dense() if isinstance(tangent, PackedSigns) else tangent


def parts(tangent):
    """The tensors a tangent is made of (for example to time drawing it)."""
    if isinstance(tangent, Factored):
        return [tangent.u, tangent.w]
    if isinstance(tangent, PackedSigns):
        return [tangent.words]
    return [tangent]


def several(tangents):
    """K tangents of one variable, carried together through one pass."""
    return tuple(tangents)


def is_several(tangent):
    """Whether `tangent` holds K tangents (see `several`)."""
    return isinstance(tangent, tuple)


def computed_after(words, tensor):
    """Returns `words` unchanged, but as a value computed from `tensor`.

    The unpacked direction of a kernel is as large as the kernel. Without a
    data dependency, XLA's scheduler unpacks every layer's direction at the
    start of the step and holds them all; tied to the layer's stacked
    product, each is unpacked when its layer runs and freed after it.
    `tensor > inf` is false for every float, NaN included, so `zero` is 0,
    which the compiler cannot prove.
    """
    zero = ops.cast(ops.any(tensor > float("inf")), words.dtype)
    return words + zero


def kernel_product(tangent, x, product, channels, after=None, factored=True):
    """`product(x, Ẇ)` for a kernel tangent `Ẇ`.

    Uses the factors when `Ẇ = u ⊗ w` (the product with `u`, times `w`,
    which `channels` reshapes to broadcast against the output) and unpacks
    `PackedSigns` only once `after` is computed. K tangents give the K
    products stacked on the batch axis.

    Args:
        tangent: The kernel's tangent, `None`, or K of them.
        x: The layer's input.
        product: The linear map `(x, kernel) -> output`.
        channels: Reshapes a per-output-channel vector for broadcasting.
        after: A tensor the unpacking waits for, or `None`.
        factored: Whether `product` may take the factor `u` as a kernel of
            one output channel (not for grouped convolutions).

    Returns:
        A tensor, or `None` for a zero tangent.
    """
    if is_several(tangent):
        terms = [kernel_product(t, x, product, channels, after, factored) for t in tangent]
        if all(t is None for t in terms):
            return None
        zero = ops.zeros_like(next(t for t in terms if t is not None))
        return ops.concatenate([zero if t is None else t for t in terms], axis=0)
    if tangent is None:
        return None
    if isinstance(tangent, Factored) and factored:
        return product(x, ops.expand_dims(tangent.u, -1)) * channels(tangent.w)
    if isinstance(tangent, PackedSigns) and after is not None:
        tangent = PackedSigns(computed_after(tangent.words, after), tangent.shape, tangent.dtype)
    return product(x, to_dense(tangent))
