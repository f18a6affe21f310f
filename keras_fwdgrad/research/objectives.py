"""Two-dimensional test functions and forward gradient descent on them.

The first paper (Section 5.1) compares forward gradient descent with
gradient descent on the Beale and Rosenbrock functions, where trajectories
can be drawn. `optimize` runs both, many runs at once.
"""

import numpy as np
import tensorflow as tf

from keras_fwdgrad import directions as directions_module
from keras_fwdgrad.ops import jvp

BEALE_MINIMUM = (3.0, 0.5)
ROSENBROCK_MINIMUM = (1.0, 1.0)


def beale(theta):
    """Beale function, minimum 0 at `(3, 0.5)`.

    `f(x, y) = (1.5 − x + xy)² + (2.25 − x + xy²)² + (2.625 − x + xy³)²`.

    Args:
        theta: Tensor of shape `[..., 2]`.

    Returns:
        Tensor of shape `[...]`.
    """
    x, y = theta[..., 0], theta[..., 1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def rosenbrock(theta, a=1.0, b=100.0):
    """Rosenbrock function, minimum 0 at `(a, a²)`.

    `f(x, y) = (a − x)² + b (y − x²)²`, with `a = 1`, `b = 100` as in the
    paper.

    Args:
        theta: Tensor of shape `[..., 2]`.
        a: Float. Defaults to `1.0`.
        b: Float. Defaults to `100.0`.

    Returns:
        Tensor of shape `[...]`.
    """
    x, y = theta[..., 0], theta[..., 1]
    return (a - x) ** 2 + b * (y - x**2) ** 2


def optimize(
    f, start, learning_rate, steps, num_runs=10, seed=0, direction="gaussian", jit_compile=True
):
    """Runs forward gradient descent and gradient descent on `f`.

    Plain descent with a constant learning rate (no decay), as in the
    paper's Section 5.1. All runs start at `start`; forward-gradient runs
    differ by their directions. Gradient descent is deterministic, so its
    runs coincide.

    Args:
        f: Function mapping `[..., 2]` to `[...]`, e.g. `beale`.
        start: Pair of floats, the starting point.
        learning_rate: Float.
        steps: Integer, number of iterations.
        num_runs: Integer, number of independent forward-gradient runs.
        seed: Integer seed of the directions.
        direction: Direction name or instance (see
            `keras_fwdgrad.directions`).
        jit_compile: Whether to XLA-compile the loop. Defaults to `True`.

    Returns:
        A dict with, for `"forward"` and `"backprop"`, an array of losses of
        shape `[num_runs, steps + 1]`, and under `"forward_path"` and
        `"backprop_path"` the trajectories, `[num_runs, steps + 1, 2]`.
    """
    direction = directions_module.get(direction)
    theta0 = np.tile(np.asarray(start, "float32"), (num_runs, 1))
    theta_f = tf.Variable(theta0)
    theta_b = tf.Variable(theta0)

    @tf.function(jit_compile=jit_compile)
    def run():
        losses_f = tf.TensorArray(tf.float32, size=steps + 1)
        losses_b = tf.TensorArray(tf.float32, size=steps + 1)
        path_f = tf.TensorArray(tf.float32, size=steps + 1)
        path_b = tf.TensorArray(tf.float32, size=steps + 1)
        for i in tf.range(steps):
            key = tf.stack([tf.constant(seed, tf.int64), tf.cast(i, tf.int64)])
            v = direction.sample([(num_runs, 2)], key)[0]
            # Each run's loss depends on its own row of `theta`, so the JVP
            # of the vector of losses gives each run its own ∇f·v.
            loss_f, d = jvp(lambda: f(theta_f), [theta_f], [v])
            with tf.GradientTape() as tape:
                loss_b = f(theta_b)
                total_b = tf.reduce_sum(loss_b)
            grad = tape.gradient(total_b, theta_b)
            losses_f = losses_f.write(i, loss_f)
            losses_b = losses_b.write(i, loss_b)
            path_f = path_f.write(i, theta_f.read_value())
            path_b = path_b.write(i, theta_b.read_value())
            theta_f.assign_sub(learning_rate * d[:, None] * v)
            theta_b.assign_sub(learning_rate * grad)
        losses_f = losses_f.write(steps, f(theta_f))
        losses_b = losses_b.write(steps, f(theta_b))
        path_f = path_f.write(steps, theta_f.read_value())
        path_b = path_b.write(steps, theta_b.read_value())
        return (
            tf.transpose(losses_f.stack()),
            tf.transpose(losses_b.stack()),
            tf.transpose(path_f.stack(), [1, 0, 2]),
            tf.transpose(path_b.stack(), [1, 0, 2]),
        )

    lf, lb, pf, pb = run()
    return {
        "forward": lf.numpy(),
        "backprop": lb.numpy(),
        "forward_path": pf.numpy(),
        "backprop_path": pb.numpy(),
    }
