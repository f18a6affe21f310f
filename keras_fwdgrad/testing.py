"""Check that the forward gradient is exact on your own model.

`check_exactness` compares the directional derivative `d = ∇f·v` that
`ForwardGradientModel` computes in forward mode with `∇f·v` from the
backend's reverse mode (`tf.GradientTape` on TensorFlow, `jax.grad` on
JAX) on the same weights, the same non-trainable state (so dropout draws
the same masks and BatchNormalization uses the same batch statistics) and
the same compiled loss, in the execution mode you train in.

Example:

```python
from keras_fwdgrad import testing

report = testing.check_exactness(
    model, x_batch, y_batch, loss="sparse_categorical_crossentropy",
    mode="xla",
)
assert report["relative_error"] < 1e-4, report
```
"""

import keras
import numpy as np

from keras_fwdgrad import _compat
from keras_fwdgrad import backend
from keras_fwdgrad import directions
from keras_fwdgrad.model import ForwardGradientModel

MODES = ("eager", "graph", "xla")


@keras.saving.register_keras_serializable(package="keras_fwdgrad")
class FixedDirection(directions.Direction):
    """The same Gaussian direction at every step, for exactness checks.

    Each variable's component is drawn once from NumPy, keyed by `seed`
    and the variable's position, so a check can rebuild `v` with
    `numpy_sample`. It is not a way to train: the estimate is biased.

    Args:
        seed: Integer. Defaults to `0`.
    """

    def __init__(self, seed=0):
        self.seed = seed

    def numpy_sample(self, shapes):
        """The direction as NumPy float32 arrays, one per shape."""
        return [
            np.random.default_rng([self.seed, i]).standard_normal(s).astype("float32")
            for i, s in enumerate(shapes)
        ]

    def sample(self, shapes, seed, dtype="float32"):
        return [keras.ops.convert_to_tensor(v, dtype=dtype) for v in self.numpy_sample(shapes)]

    def get_config(self):
        return {"seed": self.seed}


def _check_mode(mode, name="mode"):
    if mode not in MODES:
        raise ValueError(f"`{name}` must be one of {MODES}. Received: {name}={mode!r}")


def _random_layers(model):
    """The names of the layers of `model` that draw random numbers: each
    `keras.random.SeedGenerator` names its state variable
    `seed_generator_state` (Keras 3.15.1)."""

    def draws(layer):
        return any(v.name == "seed_generator_state" for v in layer.non_trainable_variables)

    names = sorted({layer.name for layer in _compat.all_layers(model) if draws(layer)})
    return names or ([model.name] if draws(model) else [])


def _build(wrapper, x, y):
    """Builds the model from the first batch, as `fit` does, and the
    optimizer: their variables must exist before a compiled call reads
    them."""
    if not (wrapper.built and wrapper.model.built):
        wrapper.forward_gradient(x, y)
    if not wrapper.optimizer.built:
        wrapper.optimizer.build(wrapper.trainable_variables)


def _snapshot(model):
    return [np.array(v.value) for v in model.non_trainable_variables]


def _restore(model, values):
    for v, value in zip(model.non_trainable_variables, values):
        v.assign(value)


def tape_gradients(wrapper, x, y, mode="eager"):
    """The loss of one training-mode forward pass of `wrapper.model` and its
    gradients by the backend's reverse mode (`tf.GradientTape` on
    TensorFlow, `jax.grad` on JAX), in `mode`.

    Args:
        wrapper: A compiled `ForwardGradientModel` (its compiled loss is
            used).
        x: Input batch.
        y: Target batch.
        mode: `"eager"`, `"graph"` or `"xla"` (on JAX, `"graph"` and
            `"xla"` both run under `jax.jit`).

    Returns:
        `(loss, grads)`: a float and a list of float64 NumPy arrays, one per
        trainable variable of `wrapper.model` (on TensorFlow `None` where
        the loss does not depend on the variable; `jax.grad` gives zeros).
    """
    _check_mode(mode)
    _build(wrapper, x, y)
    loss, grads = backend.run(lambda: wrapper._reference_gradient(x, y), mode)
    return float(loss), [None if g is None else np.asarray(g, "float64") for g in grads]


def check_exactness(
    model,
    x,
    y,
    loss,
    mode="graph",
    layer_rules=True,
    direction=None,
    seed=0,
    reference_mode=None,
):
    """Compares the forward-mode directional derivative with the tape's.

    The model's trainable weights are not changed; its non-trainable state
    (BatchNormalization statistics, dropout seeds) is restored.

    Args:
        model: The Keras model you would wrap in `ForwardGradientModel`.
        x: One input batch.
        y: Its targets.
        loss: The loss you would compile with.
        mode: `"eager"`, `"graph"` (`tf.function`, traced without
            AutoGraph as Keras traces a step) or `"xla"`
            (`jit_compile=True`); on JAX, `"graph"` and `"xla"` both run
            under `jax.jit`. Defaults to `"graph"`.
        layer_rules: Passed to `ForwardGradientModel`. Defaults to `True`.
        direction: Passed to `ForwardGradientModel`. Defaults to `None`, a
            `FixedDirection`.
        seed: Seed of the direction. Defaults to `0`.
        reference_mode: The mode the tape's reference runs in. Defaults
            to `None`, the same as `mode`. `"eager"` saves compiling the
            reverse pass of a large model once more; it needs a model
            without layers that draw random numbers (dropout), since
            TensorFlow draws other numbers under XLA than outside it.

    Returns:
        A dict with `"directional_derivative"` (forward mode),
        `"reference"` (the tape's `∇f·v`), `"relative_error"`, and
        `"loss"` and `"reference_loss"`.

    Raises:
        ValueError: for an unknown `mode` or `reference_mode`, a
            `reference_mode` other than `mode` for a model with random
            layers, and whatever
            `ForwardGradientModel` raises for the model (for example an op
            without a derivative).
    """
    _check_mode(mode)
    if reference_mode is None:
        reference_mode = mode
    _check_mode(reference_mode, "reference_mode")
    if reference_mode != mode:
        random_layers = _random_layers(model)
        if random_layers:
            raise ValueError(
                f"`reference_mode` must be `mode` ({mode!r}) for a model with "
                f"layers that draw random numbers ({', '.join(random_layers)}): "
                "their draws differ between modes. Received: "
                f"reference_mode={reference_mode!r}"
            )
    if direction is None:
        direction = FixedDirection(seed)
    wrapper = ForwardGradientModel(model, direction=direction, layer_rules=layer_rules, seed=seed)
    wrapper.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    _build(wrapper, x, y)
    v = [np.asarray(t, "float64") for t in wrapper.current_directions()[0]]
    state = _snapshot(model)
    loss_value, grads = backend.run(lambda: wrapper.forward_gradient(x, y), mode)
    _restore(model, state)
    reference_loss, reference_grads = tape_gradients(wrapper, x, y, reference_mode)
    _restore(model, state)
    # `g = d·v` for the variables the loss uses, zero for the others.
    num = den = 0.0
    for g, t in zip(grads, v):
        g = np.asarray(g, "float64")
        if np.any(g != 0):
            num += float(np.sum(g * t))
            den += float(np.sum(t**2))
    d = num / den if den else 0.0
    reference = sum(float(np.sum(g * t)) for g, t in zip(reference_grads, v) if g is not None)
    return {
        "directional_derivative": d,
        "reference": reference,
        "relative_error": abs(d - reference) / max(abs(reference), 1e-30),
        "loss": float(loss_value),
        "reference_loss": reference_loss,
    }
