"""The few operations whose implementation differs between Keras backends.

Everything else in `keras_fwdgrad` that is shared between backends is
written with `keras.ops`. This package holds what `keras.ops` does not
offer, or offers at a cost on a hot path: counter-based random words, seed
folding, and splitting or gathering with static sizes; and how a function
runs compiled (`run`, for `keras_fwdgrad.testing`). `keras_fwdgrad.
backend.tensorflow` and `keras_fwdgrad.backend.jax` implement them; the
functions here dispatch to the backend Keras runs on.

Supported backends: `SUPPORTED`.
"""

import importlib

import keras

SUPPORTED = ("tensorflow", "jax")


def name():
    """The Keras backend in use (`keras.backend.backend()`)."""
    return keras.backend.backend()


def check():
    """Raises a `ValueError` unless Keras runs on a supported backend."""
    if name() not in SUPPORTED:
        raise ValueError(
            "`keras_fwdgrad` supports the Keras backends "
            f"{SUPPORTED}: forward-mode automatic differentiation comes from "
            "`tf.autodiff.ForwardAccumulator` or `jax.jvp`. Set the "
            "environment variable `KERAS_BACKEND` to one of them before "
            f"importing Keras. Received: backend={name()!r}"
        )


# Keras fixes its backend when it is imported, so the implementation is
# chosen once.
_IMPLEMENTATION = (
    importlib.import_module(f"keras_fwdgrad.backend.{name()}") if name() in SUPPORTED else None
)


def module():
    """The module implementing this package's functions for the current
    backend."""
    check()
    return _IMPLEMENTATION


def random_bits(n, seed):
    """Counter-based random 32-bit words, a pure function of `seed`.

    Args:
        n: Python int, number of words.
        seed: The backend's stateless seed (see `step_seed`).

    Returns:
        A `[n]` `uint32` tensor.
    """
    return module().random_bits(n, seed)


def fold_in(seed, i):
    """A new seed from `seed` and the integer `i`, independent of both.

    Args:
        seed: The backend's stateless seed.
        i: A Python int or an integer tensor.

    Returns:
        A seed of the same kind as `seed`.
    """
    return module().fold_in(seed, i)


def step_seed(seed, step):
    """The seed of one training step of a direction stream.

    Args:
        seed: Python int, the key of the stream (`ForwardGradientModel`'s
            `seed`).
        step: Integer tensor, the step.

    Returns:
        The backend's stateless seed for that step.
    """
    return module().step_seed(seed, step)


def split(flat, sizes):
    """Splits a 1-D tensor into pieces of the given static sizes.

    Args:
        flat: A 1-D tensor of `sum(sizes)` entries.
        sizes: List of Python ints.

    Returns:
        A list of 1-D tensors, one per size, in order.
    """
    return module().split(flat, sizes)


def gather(table, index):
    """`table[index]`: rows of `table` for non-negative integer indices.

    Args:
        table: A tensor.
        index: An integer tensor of indices into the first axis of
            `table`, each at least 0 and below its length.

    Returns:
        A tensor of shape `index.shape + table.shape[1:]`.
    """
    return module().gather(table, index)


def view(words, dtype):
    """The 1-D `uint32` tensor `words` as a 1-D tensor of the narrower
    unsigned integer `dtype` (`"uint8"` or `"uint16"`), in memory order (on
    a little-endian machine the low part of each word first): a bitcast,
    which outside XLA reads and writes nothing. Unlike `keras.ops.view`,
    the length may be dynamic.

    Args:
        words: A 1-D `uint32` tensor.
        dtype: `"uint8"` or `"uint16"`.

    Returns:
        A 1-D tensor of `dtype`, 4 or 2 entries per word.
    """
    return module().view(words, dtype)


def compiled_by_xla():
    """Whether the operations created now are compiled by XLA: on
    TensorFlow inside `tf.function(jit_compile=True)`, on JAX always (its
    training steps run under `jax.jit`). Only for choosing the faster of
    two formulas of the same values."""
    return module().compiled_by_xla()


def run(fn, mode):
    """Calls `fn()` eagerly (`mode="eager"`) or compiled: `tf.function`
    (`"graph"`) or with XLA (`"xla"`) on TensorFlow, `jax.jit` for both on
    JAX. On TensorFlow `fn` is traced without AutoGraph, as Keras traces a
    training step: it must not rely on Python control flow over tensors.

    Args:
        fn: A function of no arguments.
        mode: `"eager"`, `"graph"` or `"xla"`.

    Returns:
        What `fn()` returns.
    """
    return module().run(fn, mode)
