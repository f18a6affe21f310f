"""One process of `jax_distribution_test.py`'s multi-process run, or its
one-process reference.

Usage:
    python jax_processes_script.py OUT.json                    # reference
    python jax_processes_script.py OUT.json PORT ID PROCESSES  # one process

Each process joins the others through `keras.distribution.initialize`
(coordinator on 127.0.0.1:PORT), trains a small MLP (8-16-4) for 3 steps
of a global batch of 32 under `DataParallel` over every process's device,
feeding its own share of each batch, and writes its weights.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ.pop("XLA_FLAGS", None)

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402

OUT = sys.argv[1]
BATCH, STEPS = 32, 3
processes, process_id = 1, 0
if len(sys.argv) > 2:
    port, process_id, processes = (int(a) for a in sys.argv[2:5])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(
        job_addresses=f"127.0.0.1:{port}", num_processes=processes, process_id=process_id
    )
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    # Each process feeds its own share of every batch (NumPy arrays; Keras
    # shards only a `tf.data.Dataset` itself).
    distribution.auto_shard_dataset = False
    keras.distribution.set_distribution(distribution)

rng = np.random.default_rng(0)
x = rng.normal(size=(STEPS, BATCH, 8)).astype("float32")
y = (np.arange(STEPS * BATCH) % 4).reshape(STEPS, BATCH).astype("int64")
# This process's share of every global batch.
share = BATCH // processes
rows = slice(process_id * share, (process_id + 1) * share)
x, y = x[:, rows].reshape(-1, 8), y[:, rows].reshape(-1)

keras.utils.set_random_seed(0)
base = keras.Sequential(
    [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(4)]
)
model = ForwardGradientModel(base, num_directions=2, seed=7, jvp_clip=0.05)
model.compile(
    optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
model.fit(x, y, batch_size=share, epochs=1, verbose=0, shuffle=False)
weights = [np.asarray(jax.device_get(v.value)).tolist() for v in model.trainable_variables]
with open(OUT, "w") as f:
    json.dump(
        {
            "processes": jax.process_count(),
            "devices": len(jax.devices()),
            "direction_step": int(model.direction_step.value),
            "weights": weights,
        },
        f,
    )
