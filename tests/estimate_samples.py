"""Many draws of `ForwardGradientModel.forward_gradient` on either backend,
and their z-scores against a reference: the statistical checks of the
activity tests."""

import keras
import numpy as np

from keras_fwdgrad import backend


def samples(model, x, y, n, mode):
    """`n` estimates, flattened: those of steps `0 … n-1` of the model's
    direction stream."""
    if backend.name() == "jax":
        import jax

        def draw(step):
            # The step counter, read from a stateless scope: one compiled
            # function draws every step's estimate.
            scope = [(model.direction_step, step)]
            with keras.StatelessScope(state_mapping=scope):
                _, grads = model.forward_gradient(x, y)
            return keras.ops.concatenate([keras.ops.reshape(g, [-1]) for g in grads])

        steps = np.arange(n, dtype="int64")
        if mode == "eager":
            return np.stack([np.asarray(draw(s)) for s in steps])
        return np.asarray(jax.jit(lambda s: jax.lax.map(draw, s))(steps))
    import tensorflow as tf

    def draw(i):
        model.direction_step.assign(tf.cast(i, tf.int64))
        _, grads = model.forward_gradient(x, y)
        return tf.concat([tf.reshape(g, [-1]) for g in grads], 0)

    if mode != "eager":
        draw = tf.function(draw, jit_compile=mode == "xla")
    return np.stack([draw(tf.constant(i)).numpy() for i in range(n)])


def z_scores(samples, true):
    """|mean − true| / standard error, per component."""
    # The floor: a gradient that is zero by symmetry (attention's key
    # bias: softmax ignores a shift shared by all keys) has estimates of
    # float32 rounding, of order 1e-10, whose mean need not be exactly
    # zero.
    se = np.maximum(samples.std(0) / np.sqrt(len(samples)), 1e-8)
    return np.abs(samples.mean(0) - true) / se
