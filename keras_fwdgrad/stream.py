"""The direction stream: the K directions of a training step, a pure
function of the model's `seed` and its step counter, on every backend."""

from keras_fwdgrad import backend
from keras_fwdgrad import tangents


def sample(model, step, k=0, structured=False):
    """Direction `k` of training step `step` of `model`.

    Args:
        model: A `ForwardGradientModel`.
        step: Integer tensor, the value of `model.direction_step`.
        k: Index of the direction within the step (`num_directions`).
        structured: Whether to return compact tangents (`Factored`,
            `PackedSigns`) where the family has them.

    Returns:
        One tangent per trainable variable, aligned with
        `model.trainable_variables`, in each variable's dtype.
    """
    variables = model.trainable_variables
    seed = backend.step_seed(model.seed, step)
    if model.num_directions > 1:
        seed = backend.fold_in(seed, k)
    shapes = [tuple(v.shape) for v in variables]
    dtype = variables[0].dtype
    draw = model.direction.sample_structured if structured else model.direction.sample
    v = draw(shapes, seed, dtype=dtype)
    return [tangents.cast(t, var.dtype) for t, var in zip(v, variables)]
