"""Many draws of `ForwardGradientModel.forward_gradient` on either backend,
and their z-scores against a reference: the statistical checks of the
activity tests."""

import keras
import numpy as np

from keras_fwdgrad import backend


# Eager draws run the model op by op (40-200 ms each on a 2-core CPU), too
# slow for thousands. So in eager mode the estimator is checked draw for
# draw: its first `EAGER_DRAWS` estimates must equal the compiled
# estimator's of the same steps (to float32 rounding), and the statistics
# are those of the compiled draws. An eager estimate that differs from the
# compiled one in any of these draws fails; one that equals it inherits
# the compiled check's bounds, at the compiled sample size.
EAGER_DRAWS = 20


def samples(model, x, y, n, mode):
    """`n` estimates, flattened: those of steps `0 … n-1` of the model's
    direction stream. With `mode="eager"`, compiled estimates, checked
    against eager ones draw for draw (see `EAGER_DRAWS`)."""
    if mode != "eager":
        return _draws(model, x, y, n, mode)
    compiled = _draws(model, x, y, n, "graph")
    eager = _draws(model, x, y, min(n, EAGER_DRAWS), "eager")
    np.testing.assert_allclose(
        eager, compiled[: len(eager)], rtol=1e-5, atol=1e-6 * np.abs(compiled).max()
    )
    return compiled


def _draws(model, x, y, n, mode):
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
        draw = tf.function(draw, jit_compile=mode == "xla", autograph=False)
    return np.stack([draw(tf.constant(i)).numpy() for i in range(n)])


def z_scores(samples, true):
    """|mean − true| / standard error, per component."""
    # The floor: a gradient that is zero by symmetry (attention's key
    # bias: softmax ignores a shift shared by all keys) has estimates of
    # float32 rounding, of order 1e-10, whose mean need not be exactly
    # zero.
    se = np.maximum(samples.std(0) / np.sqrt(len(samples)), 1e-8)
    return np.abs(samples.mean(0) - true) / se
