"""Checks of `ForwardGradientModel`'s arguments and of the model it wraps,
shared by every backend: each raises a `ValueError` or `TypeError` naming
the argument and what it accepts."""

import numbers

import keras

from keras_fwdgrad import directions

ALL_REDUCE_MODES = ("directional_derivatives", "gradients")
PERTURBATIONS = ("weights", "activations")


def check_model(model):
    """Raises a `TypeError` unless `model` is a Keras model or layer."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            "`model` must be a Keras model or layer. "
            f"Received: model={model!r} of type {type(model)}"
        )


def checked_options(given):
    """Checks `ForwardGradientModel`'s forward options and returns them
    normalized (the direction as a `Direction`, numbers as Python ints and
    floats, layer names as a list).

    Args:
        given: A dict with every forward option (`keras_fwdgrad.options`)
            and `seed`.

    Returns:
        A dict with every forward option, `seed` left out.

    Raises:
        ValueError, TypeError: naming the first bad argument.
    """
    g = given
    check_all_reduce(g["all_reduce"])
    check_estimator_arguments(g["num_directions"], g["jvp_clip"], g["seed"], g["layer_rules"])
    check_activity_arguments(
        g["perturbation"],
        g["local_losses"],
        g["orthogonal_directions"],
        g["active_units_only"],
        g["local_loss_groups"],
        g["local_loss_patches"],
        g["local_head_units"],
    )
    out = {k: v for k, v in g.items() if k != "seed"}
    out["direction"] = directions.get(g["direction"])
    check_activity_direction(g["perturbation"], out["direction"], g["orthogonal_directions"])
    out["num_directions"] = int(g["num_directions"])
    out["jvp_clip"] = None if g["jvp_clip"] is None else float(g["jvp_clip"])
    if isinstance(g["local_losses"], (list, tuple)):
        out["local_losses"] = list(g["local_losses"])
    for name, word in (("local_loss_groups", "channels"), ("local_loss_patches", "positions")):
        out[name] = g[name] if g[name] == word else int(g[name])
    if g["local_head_units"] is not None:
        out["local_head_units"] = int(g["local_head_units"])
    return out


def check_all_reduce(all_reduce):
    if all_reduce not in ALL_REDUCE_MODES:
        raise ValueError(
            f"`all_reduce` must be one of {ALL_REDUCE_MODES}. Received: all_reduce={all_reduce!r}"
        )


def check_variables(model):
    """Raises unless `model` has trainable variables, all floating."""
    variables = model.trainable_variables
    if not variables:
        raise ValueError(
            "`model` has no trainable variables, so there is nothing to "
            f"train. Received: model={model.name!r}"
        )
    for v in variables:
        if not keras.backend.is_float_dtype(v.dtype):
            raise TypeError(
                "Every trainable variable of `model` must have a floating "
                f"dtype to be trained with forward gradients. Received: "
                f"variable {v.path!r} with dtype={v.dtype}"
            )


def symbolic_inputs(input_shape):
    """`keras.KerasTensor`s for a nested structure of shapes."""
    return _map_shapes(keras.KerasTensor, input_shape)


def _map_shapes(fn, shapes):
    """Maps `fn` over the shapes (tuples of ints or `None`) of a nested
    structure of shapes."""
    if isinstance(shapes, dict):
        return {k: _map_shapes(fn, v) for k, v in shapes.items()}
    if isinstance(shapes, (list, tuple)) and not all(
        d is None or isinstance(d, int) for d in shapes
    ):
        return type(shapes)(_map_shapes(fn, v) for v in shapes)
    return fn(tuple(shapes))


def check_estimator_arguments(num_directions, jvp_clip, seed, layer_rules):
    """Raises a `ValueError` or `TypeError` naming a bad argument."""
    if (
        isinstance(num_directions, bool)
        or not isinstance(num_directions, numbers.Integral)
        or num_directions < 1
    ):
        raise ValueError(
            "`num_directions` must be a positive integer. "
            f"Received: num_directions={num_directions!r}"
        )
    if jvp_clip is not None:
        if isinstance(jvp_clip, bool) or not isinstance(jvp_clip, numbers.Real):
            raise TypeError(
                f"`jvp_clip` must be a positive number or `None`. Received: jvp_clip={jvp_clip!r}"
            )
        if not jvp_clip > 0 or jvp_clip == float("inf"):
            raise ValueError(
                "`jvp_clip` must be a positive finite number or `None`. "
                f"Received: jvp_clip={jvp_clip!r}"
            )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"`seed` must be an integer or `None`. Received: seed={seed!r}")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise ValueError(f"`seed` must fit in a signed 64-bit integer. Received: seed={seed!r}")
    if not isinstance(layer_rules, bool):
        raise TypeError(f"`layer_rules` must be a bool. Received: layer_rules={layer_rules!r}")


def check_activity_direction(perturbation, direction, orthogonal_directions):
    """Raises a `ValueError` unless `direction` (a `Direction`) can draw
    the per-unit tangents of `perturbation="activations"`."""
    if perturbation != "activations":
        return
    if not directions.has_tangents(direction):
        raise ValueError(
            'With `perturbation="activations"`, `direction` must be a family with '
            'per-unit tangents (`"gaussian"`, `"rademacher"`, or a `Direction` '
            f"that implements `tangent()`). Received: direction={direction!r}"
        )
    if orthogonal_directions and not isinstance(direction, directions.Gaussian):
        raise ValueError(
            "`orthogonal_directions=True` makes Gaussian tangents orthogonal and "
            f'needs `direction="gaussian"`. Received: direction={direction!r}'
        )


def check_activity_arguments(
    perturbation,
    local_losses,
    orthogonal_directions,
    active_units_only,
    local_loss_groups=1,
    local_loss_patches=1,
    local_head_units=None,
):
    """Raises a `ValueError` or `TypeError` naming a bad argument."""
    if perturbation not in PERTURBATIONS:
        raise ValueError(
            f"`perturbation` must be one of {PERTURBATIONS}. "
            f"Received: perturbation={perturbation!r}"
        )
    if local_losses is not None:
        names_ok = isinstance(local_losses, (list, tuple)) and all(
            isinstance(n, str) for n in local_losses
        )
        if isinstance(local_losses, str) and local_losses not in ("auto", "layers"):
            raise ValueError(
                '`local_losses` must be `None`, `"auto"`, `"layers"` or a list of '
                f"layer names. Received: local_losses={local_losses!r}"
            )
        if not isinstance(local_losses, str) and not names_ok:
            raise TypeError(
                '`local_losses` must be `None`, `"auto"`, `"layers"` or a list of '
                f"layer names. Received: local_losses={local_losses!r}"
            )
        if names_ok and not local_losses:
            raise ValueError(
                "`local_losses` must name at least one layer (or be `None` for "
                f"the model's loss alone). Received: local_losses={local_losses!r}"
            )
        if names_ok and len(set(local_losses)) != len(local_losses):
            raise ValueError(
                "`local_losses` names a layer twice (a block ends once after a "
                f"layer). Received: local_losses={local_losses!r}"
            )
        if perturbation != "activations":
            raise ValueError(
                '`local_losses` requires `perturbation="activations"`. '
                f"Received: local_losses={local_losses!r} with "
                f"perturbation={perturbation!r}"
            )
    for name, value in (
        ("orthogonal_directions", orthogonal_directions),
        ("active_units_only", active_units_only),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool. Received: {name}={value!r}")
    if orthogonal_directions and perturbation != "activations":
        raise ValueError(
            '`orthogonal_directions=True` requires `perturbation="activations"`. '
            f"Received: perturbation={perturbation!r}"
        )
    for name, value, word in (
        ("local_loss_groups", local_loss_groups, "channels"),
        ("local_loss_patches", local_loss_patches, "positions"),
    ):
        if value != word and (
            not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1
        ):
            raise ValueError(
                f'`{name}` must be an integer of at least 1 or "{word}". '
                f"Received: {name}={value!r}"
            )
        if value != 1 and local_losses is None:
            raise ValueError(
                f"`{name}` other than 1 requires `local_losses`. "
                f"Received: {name}={value!r} with local_losses=None"
            )
    if local_head_units is not None:
        if (
            not isinstance(local_head_units, numbers.Integral)
            or isinstance(local_head_units, bool)
            or local_head_units < 1
        ):
            raise ValueError(
                "`local_head_units` must be `None` or an integer of at least 1. "
                f"Received: local_head_units={local_head_units!r}"
            )
        if local_losses is None:
            raise ValueError(
                "`local_head_units` requires `local_losses`. "
                f"Received: local_head_units={local_head_units!r} with local_losses=None"
            )
