"""`keras_fwdgrad.backend` on JAX.

Seeds are raw `uint32[2]` keys of JAX's default (threefry) generator, so
`keras.random` functions accept them too.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np


# The dtype of the step counters (JAX without `jax_enable_x64` has no int64).
COUNTER_DTYPE = "int32"


def random_bits(n, seed):
    return jax.random.bits(seed, (n,), jnp.uint32)


def fold_in(seed, i):
    return jax.random.fold_in(seed, i)


def key(seed):
    """The raw key of a signed 64-bit `seed`: its two 32-bit halves, high
    then low (two's complement), as `jax.random.PRNGKey` makes it with
    `jax_enable_x64`. Without that flag `PRNGKey` keeps the low 32 bits
    only (seeds `3` and `2**32 + 3` gave the same directions); seeds in
    `[0, 2**32)` get the key they got from it."""
    s = int(seed) % 2**64
    return jnp.array([s >> 32, s & 0xFFFFFFFF], dtype=jnp.uint32)


def step_seed(seed, step):
    return jax.random.fold_in(key(seed), jnp.asarray(step).astype(jnp.uint32))


def split(flat, sizes):
    if len(sizes) == 1:
        return [flat]
    return jnp.split(flat, np.cumsum(sizes)[:-1].tolist())


def gather(table, index):
    return jnp.take(table, index.astype(jnp.int32), axis=0)


def view(words, dtype):
    return jax.lax.bitcast_convert_type(words, dtype).reshape(-1)


def compiled_by_xla():
    return True


def run(fn, mode):
    return fn() if mode == "eager" else jax.jit(fn)()


def jvp(fn, variables, tangents):
    """`keras_fwdgrad.ops.jvp` on JAX: `fn()` and its JVP along `tangents`,
    from one `jax.jvp` pass with the variables' values as primals."""

    def pure(values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn()

    values = [v.value for v in variables]
    tangents = [jnp.asarray(t, v.dtype) for t, v in zip(tangents, values)]
    return jax.jvp(pure, (values,), (tangents,))
