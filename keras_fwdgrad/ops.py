"""Pure functions for forward-mode directional derivatives and forward
gradients.

These functions hold the maths of the method and nothing else, so they can
be tested and reused without a training loop. `ForwardGradientModel` puts
them together.
"""

import re

import keras

from keras_fwdgrad import backend
from keras_fwdgrad.tangents import to_dense

if backend.name() == "tensorflow":
    import tensorflow as tf

    from keras_fwdgrad.backend.tensorflow import forward_mode_fixes

_HINT = (
    "TensorFlow computes forward-mode derivatives from the registered "
    "gradient of each op, and this op has none it can use. Replace the "
    "layer by one built from differentiable ops, or wrap its computation "
    "in `tf.custom_gradient` with a gradient built from differentiable ops."
)


def _backing_variable(variable):
    """Returns the `tf.Variable` behind a Keras variable.

    `tf.autodiff.ForwardAccumulator` must watch the backing `tf.Variable`:
    a Keras variable reports its dtype as a string and is rejected.
    """
    if isinstance(variable, keras.Variable):
        return variable.value
    return variable


def _op_name_from(error):
    match = re.search(r"[Oo]peration\s+['\"]?([^'\"\s,]+)", str(error))
    if match:
        return match.group(1)
    match = re.search(r"entry for:?\s*['\"]?([^'\"\s,]+)", str(error))
    return match.group(1) if match else None


def jvp(fn, variables, tangents):
    """Runs `fn()` once and returns its outputs and their JVP.

    On TensorFlow, `fn` is evaluated under a `tf.autodiff.ForwardAccumulator`
    that watches `variables` with `tangents`; on JAX, through `jax.jvp` with
    the variables' values as primals (a `keras.StatelessScope` maps the
    variables to them). Either way the directional derivative comes out of
    the same single forward pass as the outputs, and no gradient tape or
    backward pass is used. On TensorFlow, the Keras ops whose forward-mode
    derivative TensorFlow gets wrong run through exact equivalents
    meanwhile (`keras_fwdgrad.backend.tensorflow.forward_mode_fixes.exact_keras_ops`).

    Args:
        fn: Callable with no arguments returning a tensor or a nested
            structure of tensors. It reads `variables`.
        variables: List of Keras or TensorFlow variables.
        tangents: List of tensors, one per variable, same shapes and dtypes.

    Returns:
        A tuple `(outputs, jvps)`: the outputs of `fn()` and, with the same
        structure, the derivatives of each output along `tangents`. Outputs
        that do not depend on `variables` get a zero derivative.

    Raises:
        ValueError: if TensorFlow cannot compute the forward-mode derivative
            of an op in `fn`. The message names the op.
    """
    if backend.name() == "jax":
        return backend.module().jvp(fn, variables, tangents)
    primals = [_backing_variable(v) for v in variables]
    try:
        with forward_mode_fixes.exact_keras_ops():
            with tf.autodiff.ForwardAccumulator(primals, tangents) as acc:
                outputs = fn()
    except (LookupError, NotImplementedError, TypeError) as e:
        if isinstance(e, TypeError) and "gradient" not in str(e).lower():
            raise
        op = _op_name_from(e)
        where = f" in op `{op}`" if op else ""
        raise ValueError(
            f"Cannot compute a forward-mode derivative{where}. {_HINT} Original error: {e}"
        ) from e
    jvps = tf.nest.map_structure(
        lambda o: acc.jvp(o, unconnected_gradients=tf.UnconnectedGradients.ZERO),
        outputs,
    )
    return outputs, jvps


def clip_directional_derivative(d, jvp_clip=None):
    """Clamps directional derivatives to `[-jvp_clip, jvp_clip]`.

    Args:
        d: Tensor of directional derivatives.
        jvp_clip: Positive float, or `None` for no clipping.

    Returns:
        The clamped tensor (`d` itself when `jvp_clip` is `None`).
    """
    if jvp_clip is None:
        return d
    return keras.ops.clip(d, -jvp_clip, jvp_clip)


def forward_gradient(directional_derivatives, directions):
    """Forms the forward gradient from K directions and their derivatives.

    `g = (1/K) Σ_k d_k v_k`, where `d_k = ∇f·v_k`. With `E[v] = 0` and
    `E[v vᵀ] = I`, `E[g] = ∇f`.

    Args:
        directional_derivatives: List of K scalar tensors `d_k`.
        directions: List of K directions, each a list of tensors or
            `keras_fwdgrad.tangents.Factored` or `PackedSigns` (one per
            variable).

    Returns:
        A list of tensors, one per variable: the forward gradient.
    """
    num_directions = len(directions)
    if num_directions != len(directional_derivatives):
        raise ValueError(
            "`directional_derivatives` and `directions` must have the same "
            f"length. Received: {len(directional_derivatives)} and "
            f"{num_directions}"
        )
    grads = None
    for d, v in zip(directional_derivatives, directions):
        terms = [to_dense(t, scale=d) for t in v]
        grads = terms if grads is None else [g + t for g, t in zip(grads, terms)]
    if num_directions > 1:
        grads = [g / num_directions for g in grads]
    return grads
