"""Bytes each replica all-reduces per training step, measured.

Splits the CPU into two logical devices, trains one step of the papers' MLP
and MNIST CNN under `tf.distribute.MirroredStrategy` with forward gradient
(K = 1) and with backprop, and records every `ReplicaContext.all_reduce`
the traced step makes. Prints the bytes per replica per step next to
`ForwardGradientModel.all_reduce_bytes_per_step()`.

Usage:
    python benchmarks/all_reduce_bytes.py
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402

REPLICAS = 2
recorded = []
_all_reduce = tf.distribute.ReplicaContext.all_reduce


def _recording_all_reduce(self, reduce_op, value, options=None):
    recorded.append(sum(int(np.prod(t.shape)) * t.dtype.size for t in tf.nest.flatten(value)))
    return _all_reduce(self, reduce_op, value, options)


def main():
    tf.distribute.ReplicaContext.all_reduce = _recording_all_reduce
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(REPLICAS)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 64)
    print(f"{'model':<6} {'method':<9} {'bytes/step':>12} {'all_reduce_bytes_per_step()':>28}")
    for name, build in [("mlp", architectures.mlp), ("cnn", architectures.mnist_cnn)]:
        for method in ("forward", "backprop"):
            with strategy.scope():
                base = build()
                model = ForwardGradientModel(base, seed=0) if method == "forward" else base
                model.compile(
                    optimizer=keras.optimizers.SGD(1e-3),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                )
            recorded.clear()
            model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(64), verbose=0)
            expected = model.all_reduce_bytes_per_step() if method == "forward" else "-"
            print(f"{name:<6} {method:<9} {sum(recorded) // REPLICAS:>12,} {expected!s:>28}")


if __name__ == "__main__":
    main()
