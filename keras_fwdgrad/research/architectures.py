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


def mnist_encoder(input_shape=(28, 28, 1), num_classes=10, width=64, blocks=2, heads=4):
    """A small post-normalization transformer encoder on MNIST rows as 28
    tokens: a `Dense` row projection and learned positions, then `blocks`
    of self-attention and a feed-forward layer (`2·width`, ReLU), each with
    a residual `Add` and `LayerNormalization`, then the mean over tokens
    and `Dense(num_classes)`."""
    inputs = keras.Input(input_shape)
    h = L.Reshape((input_shape[0], -1))(inputs)
    h = PositionEmbedding()(L.Dense(width)(h))
    for _ in range(blocks):
        attention = L.MultiHeadAttention(heads, width // heads)(h, h)
        h = L.LayerNormalization()(L.Add()([h, attention]))
        feed_forward = L.Dense(width)(L.Dense(2 * width, activation="relu")(h))
        h = L.LayerNormalization()(L.Add()([h, feed_forward]))
    outputs = L.Dense(num_classes)(L.GlobalAveragePooling1D()(h))
    return keras.Model(inputs, outputs, name="mnist_encoder")
