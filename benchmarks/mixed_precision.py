"""Activity perturbation under mixed precision against float32.

Trains an MNIST MLP (784-256-256-10, the output layer a float32 softmax
as Keras advises for mixed precision) with `perturbation="activations"`,
`local_losses="layers"` and Adam (no clipping) under each dtype policy, in
one process, and records the test accuracy, the final training loss and
the steps the NaN guard skipped. Every policy starts from the same weights
(one seed per run).

Usage:
    python benchmarks/mixed_precision.py --data-dir ../shared/data \
        [--policies float32,mixed_float16,mixed_bfloat16] [--seeds 0,1] \
        [--train-size 20000] [--epochs 3]
"""

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import datasets  # noqa: E402
from keras_fwdgrad.research import learning  # noqa: E402


def mlp():
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10, activation="softmax", dtype="float32"),
        ]
    )


def run(policy, seed, data, epochs, batch_size, learning_rate):
    """One run: `(test accuracy, final training loss, skipped steps, seconds)`."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(seed)
        model = ForwardGradientModel(
            mlp(), perturbation="activations", local_losses="layers", seed=seed
        )
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        start = time.perf_counter()
        history = model.fit(
            data["x_train"], data["y_train"], batch_size=batch_size, epochs=epochs, verbose=0
        ).history
        seconds = time.perf_counter() - start
        _, accuracy = model.evaluate(data["x_test"], data["y_test"], verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return float(accuracy), float(history["loss"][-1]), sum(history["skipped_steps"]), seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get(datasets.DATA_DIR_ENV))
    p.add_argument("--policies", default="float32,mixed_float16,mixed_bfloat16")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--out", default=None, help="a JSON file for the results")
    args = p.parse_args(argv)

    data = learning.normalized_arrays(
        "mnist", args.data_dir, train_size=args.train_size, test_size=args.test_size
    )
    for split in ("x_train", "x_test"):
        data[split] = data[split].reshape(len(data[split]), -1)
    results = []
    print(f"{keras.backend.backend()}: policy, seed, test accuracy, final loss, skipped, seconds")
    for policy in args.policies.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            accuracy, loss, skipped, seconds = run(
                policy, seed, data, args.epochs, args.batch_size, args.learning_rate
            )
            print(f"{policy:16s} {seed} {accuracy:.4f} {loss:.3f} {skipped:.0f} {seconds:.0f}")
            results.append(
                dict(
                    policy=policy,
                    seed=seed,
                    test_accuracy=accuracy,
                    final_loss=loss,
                    skipped_steps=skipped,
                    seconds=seconds,
                )
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                dict(
                    backend=keras.backend.backend(),
                    commit=learning.code_version(),
                    settings=vars(args),
                    runs=results,
                ),
                f,
                indent=1,
            )
    return results


if __name__ == "__main__":
    main()
