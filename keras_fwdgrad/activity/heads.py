"""`LocalHead`, the small head that gives a block its local loss, and
the heads of a model's blocks."""

import keras

from keras_fwdgrad import _compat
from keras_fwdgrad import graph


@keras.saving.register_keras_serializable(package="keras_fwdgrad")
class LocalHead(keras.layers.Layer):
    """The small head that turns a block's output into a local loss.

    With `hidden_units`, a `Dense(hidden_units, activation="relu")` layer
    first maps each position of the block's output (the same weights at
    every position). Feature maps and sequences (rank above 2) are then
    averaged over their spatial axes (channels last), and a `Dense` layer
    maps them to the model's output size.

    Args:
        units: Integer, the model's output size.
        activation: The activation of the model's output layer, so that the
            compiled loss applies to the head as it is.
        hidden_units: Optional integer, the width of the hidden layer;
            `None` (default) for none.
        **kwargs: Passed to `keras.layers.Layer` (for example `name`).
    """

    def __init__(self, units, activation=None, hidden_units=None, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.hidden_units = None if hidden_units is None else int(hidden_units)
        self.hidden = None
        if self.hidden_units is not None:
            self.hidden = keras.layers.Dense(self.hidden_units, activation="relu", name="hidden")
        self.dense = keras.layers.Dense(self.units, activation=self.activation, name="dense")

    def build(self, input_shape):
        width = input_shape[-1]
        if self.hidden is not None:
            self.hidden.build(tuple(input_shape))
            width = self.hidden_units
        self.dense.build((input_shape[0], width))

    def pool(self, x):
        if len(x.shape) <= 2:
            return x
        axes = tuple(range(1, len(x.shape) - 1))
        if keras.backend.standardize_dtype(x.dtype) not in ("float32", "float64"):
            # `keras.ops.mean` sums lower precision in float32.
            return keras.ops.mean(x, axis=axes)
        # A sum, then a division of the small result: TensorFlow's forward
        # mode of a mean scales the whole tangent before summing it (two
        # passes over a block's output outside XLA), of a sum it only sums.
        shape = keras.ops.shape(x)
        count = 1
        for axis in axes:
            count = count * shape[axis]
        return keras.ops.sum(x, axis=axes) / keras.ops.cast(count, x.dtype)

    def call(self, inputs):
        if self.hidden is not None:
            inputs = self.hidden(inputs)
        return self.dense(self.pool(inputs))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "activation": keras.activations.serialize(self.activation),
                "hidden_units": self.hidden_units,
            }
        )
        return config


def output_activation(base):
    """The softmax or sigmoid that gives the model its output, which the
    heads apply too (so that the compiled loss applies to them as to the
    model): a `Softmax` layer, an `Activation` layer or a
    `keras.ops.softmax`/`sigmoid` call that the model ends with, else its
    last layer's own activation; `None` for any other."""
    last = graph.flat_operations(base)[-1]
    if isinstance(last, keras.layers.Softmax):
        return keras.activations.softmax
    activation = _compat.probability_op_activation(last)
    if activation is None:
        activation = getattr(graph.flat_layers(base)[-1], "activation", None)
    if activation in (keras.activations.softmax, keras.activations.sigmoid):
        return activation
    return None


def make_heads(base, ends, hidden_units=None):
    """One `LocalHead` per block end (`ends`: the layers of
    `block_end_layers`), built for the block's output (with a hidden
    layer of `hidden_units`, if given)."""
    output = keras.tree.flatten(base.outputs)[0]
    if ends and len(output.shape) != 2:
        raise ValueError(
            "`local_losses` trains each block through a head that predicts "
            "one output vector per example (it averages feature maps and "
            "sequences over their positions), so the model's output must "
            "have shape `(batch, units)`. Received: output of shape "
            f"{tuple(output.shape)}. For per-position outputs (sequence "
            "tagging, image-to-image) use `local_losses=None`."
        )
    units = output.shape[-1]
    activation = output_activation(base)
    heads = []
    for i, layer in enumerate(ends):
        name, shape = layer.name, tuple(graph.output_of(base, layer).shape)
        if len(shape) > 2 and keras.config.image_data_format() != "channels_last":
            raise ValueError(
                "`local_losses` heads pool channels-last feature maps. "
                f"Received: block output {name!r} of shape {shape} with "
                f"image_data_format={keras.config.image_data_format()!r}"
            )
        head = LocalHead(
            units, activation=activation, hidden_units=hidden_units, name=f"local_head_{i}"
        )
        head.build(shape)
        heads.append(head)
    return heads
