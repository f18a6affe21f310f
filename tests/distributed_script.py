"""Runs in its own process for `distributed_test.py` (TensorFlow's devices
must be configured before anything else touches them).

Usage:
    python distributed_script.py mirrored OUT.json
    python distributed_script.py worker OUT.json   # with TF_CONFIG set
    python distributed_script.py single OUT.json   # reference, one device
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

MODE, OUT = sys.argv[1], sys.argv[2]
if MODE == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402

GLOBAL_BATCH, STEPS = 64, 6

# Record what replicas all-reduce while the step is traced.
reduced_sizes = []
_all_reduce = tf.distribute.ReplicaContext.all_reduce


def recording_all_reduce(self, reduce_op, value, options=None):
    reduced_sizes.append(sum(int(np.prod(t.shape)) for t in tf.nest.flatten(value)))
    return _all_reduce(self, reduce_op, value, options)


tf.distribute.ReplicaContext.all_reduce = recording_all_reduce


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 8)).astype("float32")
    y = (np.arange(GLOBAL_BATCH * STEPS) % 3).astype("int64")
    return x, y


def build(method, optimizer, all_reduce):
    keras.utils.set_random_seed(0)
    base = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)]
    )
    opt = (
        keras.optimizers.SGD(0.05, momentum=0.9)
        if optimizer == "sgd"
        else keras.optimizers.Adam(1e-2)
    )
    if method == "backprop":
        model = base
    elif method == "activations":
        model = ForwardGradientModel(
            base, perturbation="activations", local_losses="auto", num_directions=2, seed=7
        )
    else:
        model = ForwardGradientModel(
            base, direction="gaussian", num_directions=2, seed=7, all_reduce=all_reduce
        )
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    return model


def local_replicas(strategy):
    try:
        return len(strategy.extended.worker_devices)
    except (AttributeError, RuntimeError):  # The default strategy.
        return 1


def run(strategy):
    x, y = data()
    results = {}
    for method, optimizer, all_reduce in [
        ("forward", "sgd", "directional_derivatives"),
        ("forward", "adam", "directional_derivatives"),
        ("forward", "sgd", "gradients"),
        ("backprop", "sgd", None),
        ("activations", "sgd", "gradients"),
    ]:
        key = f"{method}/{optimizer}/{all_reduce}"
        if len(sys.argv) > 3 and not key.startswith(sys.argv[3]):
            continue
        with strategy.scope():
            model = build(method, optimizer, all_reduce)
        reduced_sizes.clear()
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
        model.fit(dataset, epochs=1, verbose=0)
        results[key] = {
            "weights": [np.asarray(w).tolist() for w in model.get_weights()],
            # Values all-reduced per replica while tracing the step.
            # (`worker_devices` are this process's replicas.)
            "reduced_per_replica": sum(reduced_sizes) // local_replicas(strategy),
            "reduce_calls": len(reduced_sizes),
            "bytes_per_step": (
                None if method == "backprop" else model.all_reduce_bytes_per_step()
            ),
            "loss": float(model.evaluate(dataset, verbose=0)),
            "params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        }
        if method == "forward":
            # The optimizer is left as the user made it: no method of its
            # class is shadowed on the instance after training.
            results[key]["shadowed_optimizer_methods"] = sorted(
                name
                for name, value in vars(model.optimizer).items()
                if callable(value) and hasattr(type(model.optimizer), name)
            )
            results[key]["skipped"] = int(model.skipped_steps.numpy())
            results[key]["direction_step"] = int(model.direction_step.numpy())
    return results


def regularizer_steps(strategy):
    """The kernel after one SGD step (lr 0.1) on zero inputs under
    `L2(0.5)`, over the kernel before: only the regularizer moves it, by
    `1 - 0.1 * 2 * 0.5 = 0.9`, on any number of replicas."""
    x = np.zeros((GLOBAL_BATCH, 8), "float32")
    y = np.zeros((GLOBAL_BATCH,), "int64")
    ratios = {}
    for method in ("backprop", "activations"):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            base = keras.Sequential(
                [
                    keras.Input((8,)),
                    keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(0.5)),
                ]
            )
            before = np.array(base.layers[0].kernel)
            model = (
                base
                if method == "backprop"
                else ForwardGradientModel(base, perturbation="activations", seed=7)
            )
            model.compile(
                optimizer=keras.optimizers.SGD(0.1),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=False,
            )
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0, shuffle=False)
        ratios[method] = (np.array(base.layers[0].kernel) / before).ravel().tolist()
    return ratios


if MODE == "mirrored":
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
elif MODE == "worker":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
else:
    strategy = tf.distribute.get_strategy()
out = {"replicas": strategy.num_replicas_in_sync, "results": run(strategy)}
if len(sys.argv) <= 3:
    out["regularizer_steps"] = regularizer_steps(strategy)
with open(OUT, "w") as f:
    json.dump(out, f)
