"""The architectures of the two papers, as Keras models.

All return logits (no softmax): compile them with
`SparseCategoricalCrossentropy(from_logits=True)`.
"""

import keras

L = keras.layers


def logistic_regression(input_shape=(28, 28, 1), num_classes=10):
    """Multinomial logistic regression (first paper, Section 5.3)."""
    return keras.Sequential(
        [keras.Input(input_shape), L.Flatten(), L.Dense(num_classes)],
        name="logistic_regression",
    )


def mlp(input_shape=(28, 28, 1), num_classes=10, width=1024):
    """The papers' MLP: dense 1024-1024-10 with ReLU (784-1024-1024-10)."""
    return keras.Sequential(
        [
            keras.Input(input_shape),
            L.Flatten(),
            L.Dense(width, activation="relu"),
            L.Dense(width, activation="relu"),
            L.Dense(num_classes),
        ],
        name="mlp",
    )


def mnist_cnn(input_shape=(28, 28, 1), num_classes=10):
    """The papers' MNIST CNN: four 3×3 convolutions of 64 channels with
    max-pooling after the 2nd and 4th, then dense 1024 and 10."""
    conv = lambda: L.Conv2D(64, 3, padding="same", activation="relu")  # noqa: E731
    return keras.Sequential(
        [
            keras.Input(input_shape),
            conv(),
            conv(),
            L.MaxPooling2D(2),
            conv(),
            conv(),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dense(1024, activation="relu"),
            L.Dense(num_classes),
        ],
        name="mnist_cnn",
    )


def cifar10_vgg(input_shape=(32, 32, 3), num_classes=10):
    """The second paper's VGG-style CIFAR-10 CNN: three blocks of two 3×3
    convolutions (64, 128, 256 channels), each followed by 2×2
    max-pooling, then dense 4096 and 10."""
    layers = [keras.Input(input_shape)]
    for channels in (64, 128, 256):
        layers += [
            L.Conv2D(channels, 3, padding="same", activation="relu"),
            L.Conv2D(channels, 3, padding="same", activation="relu"),
            L.MaxPooling2D(2),
        ]
    layers += [L.Flatten(), L.Dense(4096, activation="relu"), L.Dense(num_classes)]
    return keras.Sequential(layers, name="cifar10_vgg")


def cifar10_resnet(input_shape=(32, 32, 3), num_classes=10, widths=(16, 32, 64)):
    """A small residual CNN with batch normalization for CIFAR-10 (ResNet-8
    style): a 3×3 convolution, then one basic block per width (two 3×3
    convolutions with `BatchNormalization`, the second stage on stride 2,
    a 1×1 projection on the skip where the shape changes, `Add`, ReLU),
    then global average pooling and `Dense(num_classes)`."""
    inputs = keras.Input(input_shape)
    h = L.Conv2D(widths[0], 3, padding="same", use_bias=False)(inputs)
    h = L.ReLU()(L.BatchNormalization()(h))
    for stage, width in enumerate(widths):
        strides = 1 if stage == 0 else 2
        r = L.Conv2D(width, 3, strides=strides, padding="same", use_bias=False)(h)
        r = L.ReLU()(L.BatchNormalization()(r))
        r = L.BatchNormalization()(L.Conv2D(width, 3, padding="same", use_bias=False)(r))
        if strides != 1 or h.shape[-1] != width:
            h = L.Conv2D(width, 1, strides=strides, use_bias=False)(h)
            h = L.BatchNormalization()(h)
        h = L.ReLU()(L.Add()([h, r]))
    outputs = L.Dense(num_classes)(L.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, outputs, name="cifar10_resnet")


def deep_mlp(depth, width=1024, input_shape=(28, 28, 1), num_classes=10):
    """The first paper's depth sweep (Section 5.6): `depth` bias-free dense
    layers of `width` units with ReLU, then a bias-free output layer."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"`depth` must be a positive integer. Received: depth={depth!r}")
    layers = [keras.Input(input_shape), L.Flatten()]
    layers += [L.Dense(width, activation="relu", use_bias=False) for _ in range(depth)]
    layers.append(L.Dense(num_classes, use_bias=False))
    return keras.Sequential(layers, name=f"deep_mlp_{depth}")


@keras.saving.register_keras_serializable(package="keras_fwdgrad")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector per sequence position (`[length, width]`) to
    a `[batch, length, width]` input."""

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            shape=tuple(input_shape[1:]), initializer="random_normal", name="embeddings"
        )

    def call(self, x):
        return x + keras.ops.cast(self.embeddings, x.dtype)


def mnist_encoder(
    input_shape=(28, 28, 1), num_classes=10, width=64, blocks=2, heads=4, keras_hub_blocks=False
):
    """A small post-normalization transformer encoder on MNIST rows as 28
    tokens: a `Dense` row projection and learned positions, then `blocks`
    of self-attention and a feed-forward layer (`2·width`, ReLU), each with
    a residual `Add` and `LayerNormalization`, then the mean over tokens
    and `Dense(num_classes)`.

    With `keras_hub_blocks=True` each block is one
    `keras_hub.layers.TransformerEncoder` layer (the same block, with
    KerasHub's defaults: layer normalization epsilon 1e-5), as KerasHub's
    backbones build them; needs KerasHub (`pip install -e ".[finetune]"`).
    """
    inputs = keras.Input(input_shape)
    h = L.Reshape((input_shape[0], -1))(inputs)
    h = PositionEmbedding()(L.Dense(width)(h))
    for _ in range(blocks):
        if keras_hub_blocks:
            import keras_hub

            h = keras_hub.layers.TransformerEncoder(2 * width, heads)(h)
            continue
        attention = L.MultiHeadAttention(heads, width // heads)(h, h)
        h = L.LayerNormalization()(L.Add()([h, attention]))
        feed_forward = L.Dense(width)(L.Dense(2 * width, activation="relu")(h))
        h = L.LayerNormalization()(L.Add()([h, feed_forward]))
    outputs = L.Dense(num_classes)(L.GlobalAveragePooling1D()(h))
    return keras.Model(inputs, outputs, name="mnist_encoder")


@keras.saving.register_keras_serializable(package="keras_fwdgrad")
class EncoderBlock(keras.layers.Layer):
    """One pre-normalization transformer block as a single layer:
    `LayerNormalization`, self-attention and a residual `Add`, then
    `LayerNormalization`, a GELU feed-forward layer and a residual `Add`.

    `vit(block_layers=True)` builds from it, so that a model created under
    `keras.RematScope(mode="full")` rematerializes whole blocks (backprop
    then stores only each block's input).

    Args:
        width: Integer, the token width.
        heads: Integer, the number of attention heads.
        mlp_width: Integer, the width of the feed-forward layer.
    """

    def __init__(self, width, heads, mlp_width, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads, self.mlp_width = width, heads, mlp_width
        # Under a `RematScope` the block is rematerialized as one; its
        # layers are not rematerialized again inside it (TensorFlow's
        # `recompute_grad` takes keyword arguments only when eager).
        with keras.RematScope(mode=None):
            self.norm_1 = L.LayerNormalization(epsilon=1e-6)
            self.attention = L.MultiHeadAttention(heads, width // heads)
            self.norm_2 = L.LayerNormalization(epsilon=1e-6)
            self.hidden = L.Dense(mlp_width, activation="gelu")
            self.projection = L.Dense(width)

    @property
    def layers(self):
        """The block's layers, in call order."""
        return [self.norm_1, self.attention, self.norm_2, self.hidden, self.projection]

    def build(self, input_shape):
        self.norm_1.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.norm_2.build(input_shape)
        self.hidden.build(input_shape)
        self.projection.build(tuple(input_shape[:-1]) + (self.mlp_width,))

    def call(self, x, training=None):
        a = self.norm_1(x)
        x = x + self.attention(a, a, training=training)
        return x + self.projection(self.hidden(self.norm_2(x)))

    def get_config(self):
        return {
            **super().get_config(),
            "width": self.width,
            "heads": self.heads,
            "mlp_width": self.mlp_width,
        }


def vit(
    input_shape=(32, 32, 3),
    num_classes=10,
    patch_size=4,
    width=64,
    depth=4,
    heads=4,
    mlp_width=128,
    block_layers=False,
    name="vit",
):
    """A small pre-normalization vision transformer: `patch_size`² patches
    embedded by a strided `Conv2D` (`(32 / patch_size)²` tokens on CIFAR-10)
    with learned positions, then `depth` blocks of `LayerNormalization`,
    self-attention (`heads` heads) and a residual `Add`, and
    `LayerNormalization`, a GELU feed-forward layer (`mlp_width`) and a
    residual `Add`; then a final normalization, the mean over tokens and
    `Dense(num_classes)` named `"head"`.

    With `block_layers=False` (default) every block is spelled out as
    layers of the functional model (what activity perturbation's
    `local_losses="auto"` splits into blocks); with `True` each block is
    one `EncoderBlock` layer (what `keras.RematScope` rematerializes as a
    whole)."""
    for arg, value in dict(depth=depth, width=width, heads=heads, patch_size=patch_size).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{arg}` must be a positive integer. Received: {arg}={value!r}")
    if width % heads:
        raise ValueError(
            f"`width` must be a multiple of `heads`. Received: width={width}, heads={heads}"
        )
    inputs = keras.Input(input_shape)
    h = L.Conv2D(width, patch_size, strides=patch_size, name="patches")(inputs)
    h = PositionEmbedding()(L.Reshape((-1, width))(h))
    for i in range(depth):
        if block_layers:
            h = EncoderBlock(width, heads, mlp_width, name=f"block_{i}")(h)
            continue
        a = L.LayerNormalization(epsilon=1e-6)(h)
        a = L.MultiHeadAttention(heads, width // heads, name=f"attention_{i}")(a, a)
        h = L.Add()([h, a])
        f = L.LayerNormalization(epsilon=1e-6)(h)
        f = L.Dense(width)(L.Dense(mlp_width, activation="gelu")(f))
        h = L.Add()([h, f])
    h = L.GlobalAveragePooling1D()(L.LayerNormalization(epsilon=1e-6)(h))
    return keras.Model(inputs, L.Dense(num_classes, name="head")(h), name=name)
