"""Stock Keras optimizers with the papers' learning-rate decay.

Both papers decay the learning rate per iteration as η_i = η0·e^(−ik)
(first paper: k = 1e-4 for every experiment but the test functions; the
second paper tunes k per method, Table I). `make_optimizer` builds the
matching stock Keras optimizer, so forward gradient and backpropagation are
driven by exactly the same update rules.
"""

import math

import keras

OPTIMIZERS = ("sgd", "nesterov", "adam")


def decay_schedule(learning_rate, decay=0.0):
    """The schedule η_i = η0·e^(−i·decay), or the constant `learning_rate`.

    Args:
        learning_rate: Positive float, the initial learning rate η0.
        decay: Non-negative float, the per-iteration rate k. `0` gives a
            constant learning rate.

    Returns:
        A float, or a `keras.optimizers.schedules.ExponentialDecay`.
    """
    if not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ValueError(
            f"`learning_rate` must be a positive number. Received: learning_rate={learning_rate!r}"
        )
    if not isinstance(decay, (int, float)) or decay < 0:
        raise ValueError(f"`decay` must be a non-negative number. Received: decay={decay!r}")
    if not decay:
        return float(learning_rate)
    return keras.optimizers.schedules.ExponentialDecay(
        float(learning_rate), decay_steps=1, decay_rate=math.exp(-decay)
    )


def check_clipping(clipnorm, global_clipnorm):
    """Raises a `ValueError` if both `clipnorm` and `global_clipnorm` are
    given (Keras clips with one of them)."""
    if clipnorm is not None and global_clipnorm is not None:
        raise ValueError(
            "Pass at most one of `clipnorm` and `global_clipnorm`. Received: "
            f"clipnorm={clipnorm!r}, global_clipnorm={global_clipnorm!r}"
        )


def make_optimizer(
    name,
    learning_rate,
    decay=0.0,
    momentum=0.0,
    beta_1=0.9,
    beta_2=0.999,
    clipnorm=None,
    global_clipnorm=None,
):
    """Builds a stock Keras optimizer as the papers configure it.

    Args:
        name: `"sgd"` (plain SGD), `"nesterov"` (SGD with Nesterov
            momentum) or `"adam"`.
        learning_rate: Initial learning rate η0.
        decay: Per-iteration decay rate k of η_i = η0·e^(−ik). Defaults to
            `0` (constant).
        momentum: Momentum of `"nesterov"`; ignored otherwise. Defaults to
            `0`.
        beta_1: Adam's β1; ignored otherwise. Defaults to `0.9`.
        beta_2: Adam's β2; ignored otherwise. Defaults to `0.999`.
        clipnorm: Optional float, clip **each variable's** gradient (or
            forward gradient) to this norm (Keras' `clipnorm`).
        global_clipnorm: Optional float, clip the norm of all gradients
            together (Keras' `global_clipnorm`; PyTorch's
            `clip_grad_norm_`, which the second paper's code uses).
            At most one of `clipnorm` and `global_clipnorm`.

    Returns:
        A `keras.optimizers.SGD` or `keras.optimizers.Adam`.

    Example:

    ```python
    optimizer = keras_fwdgrad.optimizers.make_optimizer(
        "sgd", learning_rate=2e-4, decay=1e-4)
    ```
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"`name` must be one of {OPTIMIZERS}. Received: name={name!r}")
    check_clipping(clipnorm, global_clipnorm)
    lr = decay_schedule(learning_rate, decay)
    clip = dict(clipnorm=clipnorm, global_clipnorm=global_clipnorm)
    if name == "adam":
        return keras.optimizers.Adam(lr, beta_1=beta_1, beta_2=beta_2, **clip)
    if name == "nesterov":
        return keras.optimizers.SGD(lr, momentum=momentum, nesterov=True, **clip)
    return keras.optimizers.SGD(lr, **clip)
