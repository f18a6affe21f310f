"""`keras_fwdgrad.backend` on TensorFlow.

Seeds are `[2]` `int64` tensors; random words come from one stateless
Philox draw, the same on every device and replica for a given seed.
"""

import sys

import tensorflow as tf

from keras_fwdgrad import _compat


# The dtype of the step counters.
COUNTER_DTYPE = "int64"


def _philox_words(shape, seed, dtype):
    """`tf.random.stateless_uniform(shape, seed, minval=None, maxval=None,
    dtype=dtype, alg="philox")`, with the seed scrambled in a few ops
    (`_compat.philox_key_counter`)."""
    key, counter = _compat.philox_key_counter(seed)
    return tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=shape, key=key, counter=counter, alg=tf.random.Algorithm.PHILOX.value, dtype=dtype
    )


def random_bits(n, seed):
    if compiled_by_xla() or sys.byteorder != "little":
        # XLA keeps the draw as one op that every consumer reads, rather
        # than recomputing it inside each fused consumer.
        return tf.bitcast(_philox_words([n], seed, tf.int32), tf.uint32)
    # Outside XLA TensorFlow's kernel draws 64-bit words about three times
    # faster per bit than 32-bit ones (3.2 M bits: 0.18 against 0.56 ms,
    # 2 cores, TensorFlow 2.21), and each 64-bit word holds the two 32-bit
    # words of the same draw, the first in its low half: on a little-endian
    # machine their bits are the same words in the same order.
    wide = _philox_words([(n + 1) // 2], seed, tf.int64)
    return tf.reshape(tf.bitcast(wide, tf.uint32), [-1])[:n]


def fold_in(seed, i):
    # `tf.random.experimental.stateless_fold_in(seed, i, alg="philox")`.
    # Philox named: with the default ("auto_select") a seed folded twice
    # (as K > 1 directions do) gives another seed under XLA than eagerly
    # (TensorFlow 2.21), so XLA would draw other directions.
    i = tf.convert_to_tensor(i)
    return tf.stack([_philox_words([], seed, i.dtype), i])


def step_seed(seed, step):
    return tf.stack(
        [tf.constant(seed, dtype="int64"), tf.cast(tf.convert_to_tensor(step), "int64")]
    )


def split(flat, sizes):
    return tf.split(flat, sizes) if len(sizes) > 1 else [flat]


def gather(table, index):
    return tf.gather(table, tf.cast(index, tf.int32))


def view(words, dtype):
    return tf.reshape(tf.bitcast(words, dtype), [-1])


def compiled_by_xla():
    return _compat.in_xla_context()


def run(fn, mode):
    if mode != "eager":
        fn = tf.function(fn, jit_compile=mode == "xla", autograph=False)
    return fn()
