"""Fine-tuning with LoRA, and the peak memory of one training step.

- `enable_lora(model, rank)` freezes a transformer and gives the query and
  value projections of each `MultiHeadAttention` LoRA factors of `rank`,
  as KerasHub's `backbone.enable_lora(rank)` does, leaving the classifier
  head trainable.
- `step_memory(model, x, y)` measures what one training step of a compiled
  model (`ForwardGradientModel` or plain `keras.Model`) needs beyond its
  variables: on JAX from XLA's buffer assignment of the compiled step
  (`jax.jit(model.train_step).lower(...).compile().memory_analysis()`), on
  TensorFlow from the allocator's peak (`profiling.step_bytes`).
"""

import keras
import numpy as np


def _layers(model):
    """The layers of `model` and of the layers nested in it that list
    theirs in `layers` (models, `architectures.EncoderBlock`)."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(getattr(layer, "layers", None), list):
            found.extend(_layers(layer))
    return found


def enable_lora(model, rank, head="head"):
    """Makes `model` a LoRA fine-tuning model, in place.

    Every layer is frozen but the layer named `head`; the query and value
    projections (`EinsumDense`) of every `keras.layers.MultiHeadAttention`
    get `enable_lora(rank)`: their kernels are frozen and two factors of
    rank `rank` are trained, their biases stay trainable (KerasHub's
    `backbone.enable_lora` makes the same choice).

    Args:
        model: A built Keras model with `MultiHeadAttention` layers.
        rank: Positive integer, the rank of the LoRA factors.
        head: Name of the layer to keep fully trainable, or `None`.
            Defaults to `"head"`.

    Returns:
        The number of trainable parameters after the change.

    Raises:
        ValueError: if `model` has no `MultiHeadAttention` layer, or no layer
            named `head`.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive integer. Received: rank={rank!r}")
    layers = _layers(model)
    attention = [layer for layer in layers if isinstance(layer, keras.layers.MultiHeadAttention)]
    if not attention:
        raise ValueError(
            f"`model` has no MultiHeadAttention layer to give LoRA factors. "
            f"Received: model={model.name!r}"
        )
    if head is not None and head not in [layer.name for layer in model.layers]:
        raise ValueError(f"`model` has no layer named {head!r}. Received: head={head!r}")
    for layer in layers:
        # A container stays trainable, or nothing inside it would be.
        if not isinstance(getattr(layer, "layers", None), list):
            layer.trainable = layer.name == head
    for layer in attention:
        layer.trainable = True
        layer.key_dense.trainable = False
        layer.output_dense.trainable = False
        layer.query_dense.enable_lora(rank)
        layer.value_dense.enable_lora(rank)
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def _jax_step_memory(model, x, y):
    import jax

    from keras_fwdgrad.backend.jax.distribution import train_state

    state = train_state(model)
    stats = (
        jax.jit(model.train_step, donate_argnums=0).lower(state, (x, y)).compile()
    ).memory_analysis()
    return {
        "step_bytes": int(stats.temp_size_in_bytes),
        "argument_bytes": int(stats.argument_size_in_bytes),
        "source": "XLA buffer assignment (temp_size_in_bytes)",
    }


def _tensorflow_step_memory(model, x, y):
    from keras_fwdgrad.research import profiling

    model.train_on_batch(x, y)  # Traces and compiles outside the measurement.
    device = profiling.memory_device()
    step = profiling.step_bytes(lambda: model.train_on_batch(x, y), device)
    if step is None:
        raise RuntimeError(
            f"TensorFlow keeps no allocator statistics on {device}. On a CPU "
            "set the environment variable TF_CPU_ALLOCATOR_USE_BFC=true "
            "before TensorFlow starts."
        )
    return {
        "step_bytes": int(step),
        "argument_bytes": profiling._state_bytes(model),
        "source": f"TensorFlow allocator peak on {device}",
    }


def step_memory(model, x, y):
    """Memory one training step of `model` on the batch `(x, y)` needs
    beyond the variables and optimizer slots it is given.

    On JAX this is the temporary buffer of XLA's buffer assignment for the
    jitted `model.train_step` (every activation, tangent and gradient the
    step holds at once; exact and deterministic, and nothing runs). On
    TensorFlow it is the allocator's peak during a `train_on_batch` call
    beyond what was allocated before it (the smallest over several
    allocator states, `profiling.step_bytes`); the steps run, so the
    model's weights change: measure after training, or on a copy.

    Args:
        model: A compiled `keras.Model` or `ForwardGradientModel`.
        x: One input batch.
        y: Its targets.

    Returns:
        A dict: `"step_bytes"`, `"argument_bytes"` (the variables, slots and
        batch the step is given) and `"source"` (how it was measured).
    """
    if getattr(model, "optimizer", None) is None:
        raise ValueError("`model` must be compiled before its step memory is measured.")
    if not model.built:
        model.build(keras.tree.map_structure(lambda t: tuple(t.shape), x))
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    if keras.backend.backend() == "jax":
        return _jax_step_memory(model, x, y)
    return _tensorflow_step_memory(model, x, y)
