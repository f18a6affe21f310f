"""Models nobody on this project wrote, for the exactness tests and
`benchmarks/exactness.py`.

`CASES` maps a name to `(build, (x, y), loss)`: a builder of a fresh
model, one batch, and the loss to compile. `application(name)` builds a
`keras.applications` model at 32×32 pixels in float64 (float32 on JAX).
`KERAS_HUB_CASES` are KerasHub backbones in the same form. Every case
builds on TensorFlow and on JAX (`_RawOps` uses the backend's own ops).
"""

import contextlib

import keras
import numpy as np

from keras_fwdgrad import ForwardGradientModel
from keras_fwdgrad import testing

L = keras.layers
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 8


def random_inputs(*shape, seed=0):
    """A float32 batch of standard normals."""
    return np.random.default_rng(seed).normal(size=(BATCH,) + shape).astype("float32")


def random_labels(classes=10, seed=1):
    """A batch of integer class labels."""
    return np.random.default_rng(seed).integers(0, classes, size=(BATCH,))


def _seq(shape, layers):
    return lambda: keras.Sequential([keras.Input(shape), *layers()])


def _residual_overlapping_pool():
    inputs = keras.Input((12, 12, 3))
    h = L.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = L.MaxPooling2D(3, strides=2, padding="same")(h)
    r = L.Conv2D(8, 3, padding="same")(L.BatchNormalization()(h))
    h = L.Activation("relu")(L.Add()([h, r]))
    return keras.Model(inputs, L.Dense(10)(L.GlobalAveragePooling2D()(h)))


def _dense_concat():
    inputs = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    for _ in range(2):
        n = L.Conv2D(4, 3, padding="same", activation="relu")(L.BatchNormalization()(h))
        h = L.Concatenate()([h, n])
    h = L.AveragePooling2D(2)(h)
    return keras.Model(inputs, L.Dense(10)(L.Flatten()(h)))


def _transformer():
    tokens = keras.Input((6,), dtype="int32")
    positions = keras.ops.arange(6)
    h = L.Embedding(20, 8)(tokens) + L.Embedding(6, 8)(positions)
    a = L.MultiHeadAttention(num_heads=2, key_dim=4, dropout=0.1)(h, h)
    h = L.LayerNormalization()(L.Add()([h, a]))
    f = L.Dense(8)(L.Dense(16, activation="gelu")(h))
    h = L.LayerNormalization()(L.Add()([h, f]))
    pooled = L.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, L.Dense(10, activation="softmax")(pooled))


def _multiply_same_tensor():
    inputs = keras.Input((6,))
    h = L.Dense(8)(inputs)
    return keras.Model(inputs, L.Dense(10)(L.Multiply()([h, h])))


def _broadcasting_add():
    inputs = keras.Input((4, 6))
    h = L.Dense(8)(inputs)
    b = L.Dense(8)(L.GlobalAveragePooling1D(keepdims=True)(inputs))
    return keras.Model(inputs, L.Dense(10)(L.Flatten()(L.Add()([h, b]))))


def _two_inputs_two_outputs():
    a = keras.Input((5,), name="a")
    b = keras.Input((3,), name="b")
    h = L.Concatenate()([L.Dense(6, activation="relu")(a), L.Dense(6)(b)])
    return keras.Model(
        {"a": a, "b": b},
        {"cls": L.Dense(10, name="cls")(h), "reg": L.Dense(2, name="reg")(h)},
    )


class SubclassedClassifier(keras.Model):
    """No `build()`: its layers are created in `__init__` and built on the
    first call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = L.Dense(8, activation="relu")
        self.out = L.Dense(10)

    def call(self, x):
        return self.out(self.hidden(x))


class _RawOps(L.Layer):
    """Your own layer made of the backend's raw ops (TensorFlow or
    `jax.numpy`)."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 4), initializer="glorot_uniform")

    def call(self, x):
        if keras.backend.backend() == "jax":
            import jax.numpy as jnp

            h = jnp.einsum("bi,ij->bj", x, self.w.value)
            h = jnp.where(h > 0, h, 0.1 * h) + jnp.cumsum(h, axis=-1)
            return jnp.sort(h, axis=-1) + jnp.take(h, jnp.array([3, 2, 1, 0]), axis=-1)
        import tensorflow as tf

        h = tf.einsum("bi,ij->bj", x, self.w)
        h = tf.where(h > 0, h, 0.1 * h) + tf.math.cumsum(h, axis=-1)
        h = tf.sort(h, axis=-1) + tf.gather(h, [3, 2, 1, 0], axis=-1)
        return h


@contextlib.contextmanager
def dtype_policy(name):
    """Keras' global dtype policy set to `name` inside the block, and back
    to float32 after it."""
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy("float32")


def _mixed_precision_mlp():
    """An MLP whose layers compute in float16 (`mixed_float16`)."""
    return keras.Sequential(
        [
            keras.Input((20,)),
            L.Dense(16, activation="relu", dtype="mixed_float16"),
            L.Dense(10, activation="softmax", dtype="mixed_float16"),
        ]
    )


def _frozen_backbone():
    backbone = keras.Sequential([keras.Input((6,)), L.Dense(8, activation="relu")])
    backbone.trainable = False
    return keras.Sequential([keras.Input((6,)), backbone, L.Dense(10)])


# (builder, data, loss) of the mixed-precision model; build it inside
# `dtype_policy("mixed_float16")`, as Keras then wraps the optimizer in a
# `LossScaleOptimizer`.
MIXED_PRECISION = (
    _mixed_precision_mlp,
    (random_inputs(20), random_labels()),
    "sparse_categorical_crossentropy",
)

# name -> (builder, data, loss). Each runs on both paths in every mode.
CASES = {
    "softmax_sparse_crossentropy": (
        _seq((20,), lambda: [L.Dense(32, activation="relu"), L.Dense(10, activation="softmax")]),
        (random_inputs(20), random_labels()),
        "sparse_categorical_crossentropy",
    ),
    "softmax_layer_categorical": (
        _seq((20,), lambda: [L.Dense(10), L.Softmax()]),
        (random_inputs(20), np.eye(10, dtype="float32")[random_labels()]),
        "categorical_crossentropy",
    ),
    "sigmoid_binary_crossentropy": (
        _seq((20,), lambda: [L.Dense(8, activation="tanh"), L.Dense(1, activation="sigmoid")]),
        (random_inputs(20), (random_labels() % 2).astype("float32")[:, None]),
        keras.losses.BinaryCrossentropy(),
    ),
    "residual_overlapping_max_pool": (
        _residual_overlapping_pool,
        (random_inputs(12, 12, 3), random_labels()),
        SCCE,
    ),
    "dense_concatenating": (_dense_concat, (random_inputs(8, 8, 3), random_labels()), SCCE),
    "transformer_encoder": (
        _transformer,
        (np.random.default_rng(2).integers(0, 20, size=(BATCH, 6)), random_labels()),
        "sparse_categorical_crossentropy",
    ),
    "lstm": (
        _seq((5, 3), lambda: [L.LSTM(4), L.Dense(10)]),
        (random_inputs(5, 3), random_labels()),
        SCCE,
    ),
    "gru_simple_rnn": (
        _seq((5, 3), lambda: [L.GRU(4, return_sequences=True), L.SimpleRNN(3), L.Dense(10)]),
        (random_inputs(5, 3), random_labels()),
        SCCE,
    ),
    "bidirectional_lstm": (
        _seq((5, 3), lambda: [L.Bidirectional(L.LSTM(4)), L.Dense(10)]),
        (random_inputs(5, 3), random_labels()),
        SCCE,
    ),
    "conv_lstm2d": (
        _seq((3, 5, 5, 2), lambda: [L.ConvLSTM2D(2, 3), L.Flatten(), L.Dense(10)]),
        (random_inputs(3, 5, 5, 2), random_labels()),
        SCCE,
    ),
    "conv1d_causal_and_grouped": (
        _seq(
            (9, 4),
            lambda: [
                L.Conv1D(4, 3, padding="causal", dilation_rate=2),
                L.Conv1D(4, 3, groups=2, activation="relu"),
                L.Flatten(),
                L.Dense(10),
            ],
        ),
        (random_inputs(9, 4), random_labels()),
        SCCE,
    ),
    "conv2d_grouped": (
        _seq((6, 6, 4), lambda: [L.Conv2D(4, 3, groups=2), L.Flatten(), L.Dense(10)]),
        (random_inputs(6, 6, 4), random_labels()),
        SCCE,
    ),
    "conv3d_channels_first": (
        _seq(
            (2, 4, 4, 4),
            lambda: [
                L.Conv3D(3, 2, data_format="channels_first", activation="relu"),
                L.Conv3D(2, 2, data_format="channels_first"),
                L.Flatten(),
                L.Dense(10),
            ],
        ),
        (random_inputs(2, 4, 4, 4), random_labels()),
        SCCE,
    ),
    "separable_depthwise_transpose_upsampling": (
        _seq(
            (8, 8, 3),
            lambda: [
                L.SeparableConv2D(4, 3, padding="same", activation="relu"),
                L.DepthwiseConv2D(3, strides=2),
                L.Conv2DTranspose(4, 3, strides=2),
                L.UpSampling2D(2),
                L.GroupNormalization(groups=2),
                L.GlobalAveragePooling2D(),
                L.Dense(10),
            ],
        ),
        (random_inputs(8, 8, 3), random_labels()),
        SCCE,
    ),
    "multiply_same_tensor": (_multiply_same_tensor, (random_inputs(6), random_labels()), SCCE),
    "broadcasting_add": (_broadcasting_add, (random_inputs(4, 6), random_labels()), SCCE),
    "two_inputs_two_outputs_loss_dict": (
        _two_inputs_two_outputs,
        (
            {"a": random_inputs(5), "b": random_inputs(3, seed=3)},
            {"cls": random_labels(), "reg": random_inputs(2, seed=4)},
        ),
        {"cls": SCCE, "reg": "mse"},
    ),
    "subclassed_unbuilt": (SubclassedClassifier, (random_inputs(6), random_labels()), SCCE),
    "custom_layer_raw_ops": (
        _seq((6,), lambda: [_RawOps(), L.Dense(10)]),
        (random_inputs(6), random_labels()),
        SCCE,
    ),
    "frozen_backbone": (_frozen_backbone, (random_inputs(6), random_labels()), SCCE),
    "regularizers_and_constraints": (
        _seq(
            (6,),
            lambda: [
                L.Dense(
                    8,
                    activation="relu",
                    kernel_regularizer="l2",
                    bias_regularizer=keras.regularizers.L1(0.01),
                    kernel_constraint=keras.constraints.MaxNorm(100.0),
                ),
                L.Dropout(0.3, seed=1),
                L.Dense(10, activity_regularizer="l2"),
            ],
        ),
        (random_inputs(6), random_labels()),
        SCCE,
    ),
}


# JAX without `jax_enable_x64` has no float64.
APPLICATION_DTYPE = "float32" if keras.backend.backend() == "jax" else "float64"


def application(name):
    """A builder of `keras.applications.<name>` at 32×32 pixels, 10
    classes, default (softmax) head, in `APPLICATION_DTYPE` (float64, or
    float32 on JAX)."""

    def build():
        with dtype_policy(APPLICATION_DTYPE):
            return getattr(keras.applications, name)(
                input_shape=(32, 32, 3),
                weights=None,
                classes=10,
                **({"alpha": 0.35} if name == "MobileNetV2" else {}),
            )

    return build


def application_data():
    return random_inputs(32, 32, 3).astype(APPLICATION_DTYPE), random_labels()


# KerasHub backbones, tiny, with random weights, under a new 3-class head
# (logits): `KERAS_HUB_CASES` maps a name to `(build, (x, y), loss)` as
# `CASES` does. Decoder-only language models (GPT-2, Llama, Gemma) take
# token ids and a padding mask; two of the four sequences are padded.
# KerasHub is imported when a model is built.
HUB_TOKENS, HUB_VOCABULARY, HUB_CLASSES = 6, 40, 3
HUB_BATCH = 4


def _hub_text(backbone_name, **config):
    def build():
        import keras_hub

        backbone = getattr(keras_hub.models, backbone_name)(**config)
        inputs = backbone.input
        hidden = L.GlobalAveragePooling1D()(backbone(inputs))
        return keras.Model(inputs, L.Dense(HUB_CLASSES)(hidden))

    return build


def _hub_image(backbone_name, pooling, **config):
    def build():
        import keras_hub

        backbone = getattr(keras_hub.models, backbone_name)(image_shape=(16, 16, 3), **config)
        inputs = keras.Input((16, 16, 3))
        hidden = pooling()(backbone(inputs))
        return keras.Model(inputs, L.Dense(HUB_CLASSES)(hidden))

    return build


def _hub_tokens():
    rng = np.random.default_rng(0)
    padding = np.ones((HUB_BATCH, HUB_TOKENS), "int32")
    padding[2:, 4:] = 0
    x = {
        "token_ids": rng.integers(1, HUB_VOCABULARY, (HUB_BATCH, HUB_TOKENS)).astype("int32"),
        "padding_mask": padding,
    }
    return x, _hub_labels()


def _hub_images():
    x = np.random.default_rng(0).normal(size=(HUB_BATCH, 16, 16, 3)).astype("float32")
    return x, _hub_labels()


def _hub_labels():
    return np.random.default_rng(1).integers(0, HUB_CLASSES, HUB_BATCH)


_DECODER = dict(vocabulary_size=HUB_VOCABULARY, num_layers=2, hidden_dim=8, intermediate_dim=16)
KERAS_HUB_CASES = {
    "gpt2": (
        _hub_text(
            "GPT2Backbone", num_heads=2, max_sequence_length=HUB_TOKENS, dropout=0.0, **_DECODER
        ),
        _hub_tokens(),
        SCCE,
    ),
    "llama": (
        _hub_text("LlamaBackbone", num_query_heads=2, num_key_value_heads=1, **_DECODER),
        _hub_tokens(),
        SCCE,
    ),
    "gemma": (
        _hub_text(
            "GemmaBackbone", num_query_heads=2, num_key_value_heads=1, head_dim=4, **_DECODER
        ),
        _hub_tokens(),
        SCCE,
    ),
    "vit": (
        _hub_image(
            "ViTBackbone",
            L.GlobalAveragePooling1D,
            patch_size=8,
            num_layers=2,
            num_heads=2,
            hidden_dim=8,
            mlp_dim=16,
            dropout_rate=0.0,
            attention_dropout=0.0,
        ),
        _hub_images(),
        SCCE,
    ),
    # KerasHub's ResNet wants 64 filters in its first stack.
    "resnet": (
        _hub_image(
            "ResNetBackbone",
            L.GlobalAveragePooling2D,
            input_conv_filters=[64],
            input_conv_kernel_sizes=[3],
            stackwise_num_filters=[64],
            stackwise_num_blocks=[1],
            stackwise_num_strides=[1],
            block_type="basic_block",
            use_pre_activation=False,
        ),
        _hub_images(),
        SCCE,
    ),
}


def check_directional_derivative(build, data, loss, mode, layer_rules, reference_mode=None):
    """`(d, reference, relative_error)` for a fresh model from `build`."""
    keras.utils.set_random_seed(7)
    x, y = data
    report = testing.check_exactness(
        build(), x, y, loss, mode=mode, layer_rules=layer_rules, reference_mode=reference_mode
    )
    return report["directional_derivative"], report["reference"], report["relative_error"]


def check_fit_steps(build, data, loss, mode, layer_rules=True, lr=0.01, steps=2):
    """Runs `steps` SGD steps through `fit` (`train_on_batch`) and returns
    the largest deviation of each update from `-lr·g`, `g = (∇f·v)·v` by
    the tape at the weights before that step (zero for variables the loss
    does not use), relative to the largest `|lr·g|`."""
    keras.utils.set_random_seed(7)
    base = build()
    x, y = data
    direction = testing.FixedDirection()
    wrapper = ForwardGradientModel(base, direction=direction, layer_rules=layer_rules, seed=0)
    wrapper.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=loss,
        run_eagerly=mode == "eager",
        jit_compile=mode == "xla",
    )
    if not base.built:
        base(keras.tree.map_structure(lambda t: t[:1], x))
    v = direction.numpy_sample([tuple(w.shape) for w in base.trainable_variables])
    worst = 0.0
    for _ in range(steps):
        before = [np.array(w.value, "float64") for w in base.trainable_variables]
        state = [np.array(w.value) for w in base.non_trainable_variables]
        _, grads = testing.tape_gradients(wrapper, x, y, mode)
        for w, value in zip(base.non_trainable_variables, state):
            w.assign(value)
        d = sum(float(np.sum(g * t)) for g, t in zip(grads, v) if g is not None)
        expected = [
            np.zeros_like(w) if g is None else -lr * d * t for w, g, t in zip(before, grads, v)
        ]
        wrapper.train_on_batch(x, y)
        after = [np.array(w.value, "float64") for w in base.trainable_variables]
        scale = max(float(np.max(np.abs(e))) for e in expected)
        for b, a, e in zip(before, after, expected):
            worst = max(worst, float(np.max(np.abs((a - b) - e))) / scale)
    return worst
