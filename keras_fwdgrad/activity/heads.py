"""`LocalHead`, the small head that gives a block its local loss, and
the heads of a model's blocks."""

import keras

from keras_fwdgrad import graph


@keras.saving.register_keras_serializable(package="keras_fwdgrad")
class LocalHead(keras.layers.Layer):
    """The small head that turns a block's output into a local loss.

    Feature maps (rank above 2) are averaged over their spatial axes
    (channels last), then a `Dense` layer maps them to the model's output
    size.

    Args:
        units: Integer, the model's output size.
        activation: The activation of the model's output layer, so that the
            compiled loss applies to the head as it is.
        **kwargs: Passed to `keras.layers.Layer` (for example `name`).
    """

    def __init__(self, units, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.dense = keras.layers.Dense(self.units, activation=self.activation, name="dense")

    def build(self, input_shape):
        self.dense.build((input_shape[0], input_shape[-1]))

    def pool(self, x):
        if len(x.shape) > 2:
            x = keras.ops.mean(x, axis=tuple(range(1, len(x.shape) - 1)))
        return x

    def call(self, inputs):
        return self.dense(self.pool(inputs))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "units": self.units,
                "activation": keras.activations.serialize(self.activation),
            }
        )
        return config


def make_heads(base, ends):
    """One `LocalHead` per block end, built for the block's output."""
    layers = {layer.name: layer for layer in graph.flat_layers(base)}
    output = keras.tree.flatten(base.outputs)[0]
    units = output.shape[-1]
    last = graph.flat_layers(base)[-1]
    activation = getattr(last, "activation", None)
    if activation not in (keras.activations.softmax, keras.activations.sigmoid):
        activation = None
    heads = []
    for i, name in enumerate(ends):
        shape = tuple(layers[name].output.shape)
        if len(shape) > 2 and keras.config.image_data_format() != "channels_last":
            raise ValueError(
                "`local_losses` heads pool channels-last feature maps. "
                f"Received: block output {name!r} of shape {shape} with "
                f"image_data_format={keras.config.image_data_format()!r}"
            )
        head = LocalHead(units, activation=activation, name=f"local_head_{i}")
        head.build(shape)
        heads.append(head)
    return heads
