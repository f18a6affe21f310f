"""Direction distributions for forward gradients.

A forward gradient `g = (∇f·v) v` is an unbiased estimate of `∇f` whenever
the direction `v` satisfies `E[v] = 0` and `E[v vᵀ] = I`. This module holds
the distributions `ForwardGradientModel(direction=...)` accepts, a registry
of their names, and the base class to write your own.

All sampling is *stateless*: a direction is a pure function of a seed (a
`[2]`-shaped integer tensor). The model derives that seed from its own
`seed` and a step counter, so the same seed replays the same training run,
a saved model continues the same stream, and every replica of a distributed
run draws the identical direction without communicating.

Sampling sits on the hot path of every training step (the paper's MLP has
1.86 M parameters, so a step needs 1.86 M random numbers). Every shipped
distribution therefore draws one flat vector for all variables in a single
random op and splits it, rather than one op per variable.
"""

import math

import keras
import tensorflow as tf

_REGISTRY = {}


def register(name):
    """Registers a `Direction` subclass under `name`.

    Once registered, `ForwardGradientModel(direction=name)` builds it with
    no arguments and `available()` lists it. The class should also be
    registered with `keras.saving.register_keras_serializable` so models
    using it can be saved.

    Args:
        name: String, the name `direction=` accepts.

    Returns:
        A class decorator.

    Example:

    ```python
    @keras_fwdgrad.directions.register("uniform")
    @keras.saving.register_keras_serializable(package="my_package")
    class Uniform(keras_fwdgrad.directions.Direction):
        def sample(self, shapes, seed, dtype="float32"):
            n = sum(math.prod(s) for s in shapes)
            # Uniform on [-sqrt(3), sqrt(3)] has mean 0 and variance 1.
            a = math.sqrt(3.0)
            flat = tf.random.stateless_uniform([n], seed, -a, a, dtype=dtype)
            return keras_fwdgrad.directions.split_flat(flat, shapes)
    ```
    """
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"`name` must be a non-empty string. Received: name={name!r}"
        )

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, Direction)):
            raise TypeError(
                "Only subclasses of `keras_fwdgrad.directions.Direction` can "
                f"be registered. Received: {cls!r}"
            )
        _REGISTRY[name] = cls
        return cls

    return decorator


def available():
    """Returns the sorted names that `direction=` accepts."""
    return sorted(_REGISTRY)


def get(identifier):
    """Returns a `Direction` instance for `identifier`.

    Args:
        identifier: A registered name (see `available()`), a `Direction`
            instance (returned as is), or a config dict produced by
            `keras.saving.serialize_keras_object`.

    Returns:
        A `Direction` instance.

    Raises:
        ValueError: if `identifier` is an unknown name.
        TypeError: if `identifier` is of another type.
    """
    if isinstance(identifier, Direction):
        return identifier
    if isinstance(identifier, str):
        if identifier not in _REGISTRY:
            raise ValueError(
                "`direction` must be one of "
                f"{available()} or a `keras_fwdgrad.directions.Direction` "
                f"instance. Received: direction={identifier!r}"
            )
        return _REGISTRY[identifier]()
    if isinstance(identifier, dict):
        obj = keras.saving.deserialize_keras_object(identifier)
        if isinstance(obj, Direction):
            return obj
    raise TypeError(
        "`direction` must be a string (one of "
        f"{available()}) or a `keras_fwdgrad.directions.Direction` instance. "
        f"Received: direction={identifier!r} of type {type(identifier)}"
    )


def split_flat(flat, shapes):
    """Splits a flat vector into tensors of the given shapes.

    Args:
        flat: 1-D tensor with `sum(prod(shape))` elements.
        shapes: List of shapes (tuples of ints).

    Returns:
        A list of tensors, one per shape.
    """
    sizes = [math.prod(s) for s in shapes]
    if len(sizes) == 1:
        return [tf.reshape(flat, shapes[0])]
    parts = tf.split(flat, sizes)
    return [tf.reshape(p, s) for p, s in zip(parts, shapes)]


class Direction:
    """Base class of direction distributions.

    A subclass implements `sample()`, which returns one direction `v` (one
    tensor per trainable variable) as a pure function of `seed`. For the
    forward gradient to be unbiased, the distribution must satisfy
    `E[v] = 0` and `E[v vᵀ] = I` over the concatenation of all variables:
    zero-mean components with unit variance that are pairwise uncorrelated.

    Pass an instance as `ForwardGradientModel(direction=MyDirection())`, or
    register a name for it with `keras_fwdgrad.directions.register`. Add
    `keras.saving.register_keras_serializable` to save models that use it,
    and override `get_config` if its `__init__` takes arguments.
    """

    def sample(self, shapes, seed, dtype="float32"):
        """Draws one direction.

        Args:
            shapes: List of static shapes (tuples of ints), one per variable.
            seed: Integer tensor of shape `[2]`, a stateless RNG seed.
            dtype: Floating dtype of the returned tensors.

        Returns:
            A list of tensors with the given shapes and dtype.
        """
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}()"


@register("gaussian")
@keras.saving.register_keras_serializable(package="keras_fwdgrad")
class Gaussian(Direction):
    """Standard normal directions, `v ~ N(0, I)` (the first paper's choice).

    Components are independent `N(0, 1)`, so `E[v] = 0` and `E[v vᵀ] = I`.
    All variables are drawn with one counter-based (Philox) stateless op.

    Reference:
    - [Baydin et al., 2022](https://arxiv.org/abs/2202.08587), Section 3.4.
    """

    def sample(self, shapes, seed, dtype="float32"):
        n = sum(math.prod(s) for s in shapes)
        flat = tf.random.stateless_normal(
            [n], seed=seed, dtype=dtype, alg="philox"
        )
        return split_flat(flat, shapes)


@register("rademacher")
@keras.saving.register_keras_serializable(package="keras_fwdgrad")
class Rademacher(Direction):
    """Random-sign directions: each component is `+1` or `-1` with
    probability 1/2, independently.

    `E[v_i] = 0`, `E[v_i²] = 1` and `E[v_i v_j] = E[v_i] E[v_j] = 0` for
    `i ≠ j`, so `E[v vᵀ] = I`. Among all such distributions it gives the
    forward gradient the lowest variance (`E[v_i⁴] = 1` is minimal).

    Signs come 32 at a time from the bits of one counter-based random
    32-bit word, so a step needs 32 times fewer random numbers than a
    Gaussian direction of the same size.
    """

    def sample(self, shapes, seed, dtype="float32"):
        n = sum(math.prod(s) for s in shapes)
        num_words = -(-n // 32)
        words = tf.random.stateless_uniform(
            [num_words, 1],
            seed=seed,
            minval=None,
            maxval=None,
            dtype=tf.int32,
            alg="philox",
        )
        shifts = tf.range(32, dtype=tf.int32)[tf.newaxis, :]
        bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(words, shifts), 1)
        bits = tf.reshape(bits, [-1])[:n]
        # Maps a bit b in {0, 1} to 2b - 1 in {-1, +1}.
        flat = tf.cast(2 * bits - 1, dtype)
        return split_flat(flat, shapes)
