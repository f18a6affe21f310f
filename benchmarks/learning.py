"""Learning against epochs and wall-clock seconds: backprop, the papers'
forward gradient, and activity perturbation with local losses.

Trains the papers' MNIST MLP (784-1024-1024-10, batch 64, full 60,000
training images) with each method in one process, one after the other,
evaluates the 10,000 test images after every epoch, and records test
accuracy and loss against epochs and against training seconds (evaluation
excluded). Reports, per method: best and final test accuracy, the
training seconds to 90 %, 95 % and 97 % test accuracy (or how far the
best accuracy stayed below), and Tf/Tb: that time divided by backprop's
time to the same accuracy (the first paper's Tf/Tb, with an accuracy
target in place of a loss). Every optimizer is Adam with a cosine decay over
the method's epochs and no clipping unless the table says so
(`global_clipnorm`, the norm over all variables).

`--model cnn` (the papers' MNIST CNN), `--model vgg` (the second
paper's CIFAR-10 VGG), `--model resnet` (a small residual CNN with batch
normalization on CIFAR-10, `architectures.cifar10_resnet`; `--model
resnet_wide` with 32, 64 and 128 channels) and `--model
encoder` (a 2-block transformer encoder on MNIST rows as 28 tokens,
`architectures.mnist_encoder`; `--model encoder_keras_hub` with each block
one `keras_hub.layers.TransformerEncoder`) run the same measurement; `--epochs`, `--train-size`
and `--test-size` set a reduced budget for them on a CPU.

Usage:
    python benchmarks/learning.py --data-dir ../shared/data \
        [--methods backprop,weights,activations_k1,...] [--seeds 0,1] \
        [--model mlp|cnn|vgg|resnet|resnet_wide|encoder|encoder_keras_hub] [--epochs N] [--train-size N] [--test-size N]
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402
from keras_fwdgrad.research import datasets  # noqa: E402
from keras_fwdgrad.research import learning  # noqa: E402
from keras_fwdgrad.research.methods import LAYER_LOCAL_OPTIONS  # noqa: E402

TARGETS = learning.TARGETS


# name: (wrapper arguments or None for backprop, Adam settings, epochs).
METHODS = {
    "backprop": (None, dict(learning_rate=1e-3), 10),
    # The papers' estimator at the best plain settings found for it
    # (Adam 5e-4, beta_1 0.99, directional derivative capped at 1).
    "weights": (dict(jvp_clip=1.0), dict(learning_rate=5e-4, beta_1=0.99), 10),
    "activations_k1": (
        dict(perturbation="activations", local_losses="auto"),
        dict(learning_rate=1e-4),
        10,
    ),
    "activations_k4": (
        dict(perturbation="activations", local_losses="auto", num_directions=4),
        dict(learning_rate=3e-4),
        5,
    ),
    "activations_k4_orthogonal": (
        dict(
            perturbation="activations",
            local_losses="auto",
            num_directions=4,
            orthogonal_directions=True,
        ),
        dict(learning_rate=3e-4),
        5,
    ),
    "activations_k1_groups32": (
        dict(perturbation="activations", local_losses="auto", local_loss_groups=32),
        dict(learning_rate=1e-3),
        10,
    ),
    "activations_channel_groups": (
        dict(perturbation="activations", local_losses="auto", local_loss_groups="channels"),
        dict(learning_rate=1e-3),
        10,
    ),
    "activations_layer_groups": (
        dict(perturbation="activations", local_losses="layers", local_loss_groups="channels"),
        dict(learning_rate=3e-4),
        10,
    ),
    "activations_patches": (
        dict(
            perturbation="activations",
            local_losses="auto",
            local_loss_groups="channels",
            local_loss_patches="positions",
        ),
        dict(learning_rate=1e-3),
        10,
    ),
    "activations_layer_patches": (
        dict(
            perturbation="activations",
            local_losses="layers",
            local_loss_groups="channels",
            local_loss_patches="positions",
        ),
        dict(learning_rate=1e-3),
        10,
    ),
    # The same with random-sign tangents: with one loss per unit, u² = 1
    # and each unit's estimate is its exact local gradient.
    "activations_channel_groups_signs": (
        dict(
            perturbation="activations",
            local_losses="auto",
            local_loss_groups="channels",
            direction="rademacher",
        ),
        dict(learning_rate=1e-3),
        10,
    ),
    "activations_patches_signs": (
        dict(
            perturbation="activations",
            local_losses="auto",
            local_loss_groups="channels",
            local_loss_patches="positions",
            direction="rademacher",
        ),
        dict(learning_rate=1e-3),
        10,
    ),
    "activations_layer_patches_signs": (
        LAYER_LOCAL_OPTIONS,
        dict(learning_rate=1e-3),
        10,
    ),
    # The same at a larger learning rate (the ResNet).
    "activations_layer_patches_signs_lr3e-3": (
        LAYER_LOCAL_OPTIONS,
        dict(learning_rate=3e-3),
        10,
    ),
    # The same with heads that map each position through a hidden ReLU
    # layer before the mean (sequence and feature-map blocks).
    "activations_layer_patches_signs_hidden_heads": (
        dict(LAYER_LOCAL_OPTIONS, local_head_units=64),
        dict(learning_rate=1e-2),
        10,
    ),
    "activations_layer_patches_signs_heads256": (
        dict(LAYER_LOCAL_OPTIONS, local_head_units=256),
        dict(learning_rate=1e-2),
        10,
    ),
    "activations_one_loss": (
        dict(perturbation="activations"),
        dict(learning_rate=1e-3),
        10,
    ),
    "activations_k4_all_units": (
        dict(
            perturbation="activations",
            local_losses="auto",
            num_directions=4,
            active_units_only=False,
        ),
        dict(learning_rate=3e-4),
        5,
    ),
}


def run(
    name,
    data,
    seed,
    epochs_scale,
    model_name="mlp",
    epochs=None,
    learning_rate=None,
    batch_size=64,
    jit_compile=True,
):
    wrapper_args, adam, default_epochs = METHODS[name]
    adam = dict(adam)
    if learning_rate:
        adam["learning_rate"] = learning_rate
    epochs = epochs or max(1, int(round(default_epochs * epochs_scale)))
    keras.utils.set_random_seed(seed)
    base = {
        "mlp": architectures.mlp,
        "cnn": architectures.mnist_cnn,
        "vgg": architectures.cifar10_vgg,
        "resnet": architectures.cifar10_resnet,
        "resnet_wide": lambda: architectures.cifar10_resnet(widths=(32, 64, 128)),
        "encoder": architectures.mnist_encoder,
        "encoder_keras_hub": lambda: architectures.mnist_encoder(keras_hub_blocks=True),
    }[model_name]()
    steps = len(data["x_train"]) // batch_size
    schedule = keras.optimizers.schedules.CosineDecay(
        adam.pop("learning_rate"), decay_steps=epochs * steps
    )
    optimizer = keras.optimizers.Adam(schedule, **adam)
    model = base if wrapper_args is None else ForwardGradientModel(base, seed=seed, **wrapper_args)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"], jit_compile=jit_compile)
    evaluate_with = learning.evaluation_model(base, model, loss, jit_compile)
    curve = learning.TestCurve(data["x_test"], data["y_test"], evaluate_with)
    model.fit(
        data["x_train"],
        data["y_train"],
        batch_size=batch_size,
        epochs=epochs,
        shuffle=True,
        verbose=0,
        callbacks=[curve],
    )
    return curve.points, curve.median_step_seconds()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get(datasets.DATA_DIR_ENV))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs-scale", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=None, help="the same for every method")
    p.add_argument(
        "--model",
        choices=("mlp", "cnn", "vgg", "resnet", "resnet_wide", "encoder", "encoder_keras_hub"),
        default="mlp",
    )
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=None, help="overrides every method's")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument(
        "--jit-compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="XLA (default); --no-jit-compile to train without it",
    )
    p.add_argument("--out", default="benchmarks/results/learning/mnist_mlp.json")
    args = p.parse_args()

    dataset = "cifar10" if args.model in ("vgg", "resnet", "resnet_wide") else "mnist"
    data = learning.normalized_arrays(
        dataset, args.data_dir, train_size=args.train_size, test_size=args.test_size
    )
    n = len(data["x_train"])
    started_at = learning.code_version()  # the code this process runs
    results = learning.load_runs(args.out)
    for name in args.methods.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            print(f"{name} seed {seed}", flush=True)
            points, step = run(
                name,
                data,
                seed,
                args.epochs_scale,
                args.model,
                args.epochs,
                args.learning_rate,
                args.batch_size,
                args.jit_compile,
            )
            lr = args.learning_rate or METHODS[name][1]["learning_rate"]
            batch = "" if args.batch_size == 64 else f"/batch{args.batch_size}"
            batch += f"/epochs{args.epochs}" if args.epochs else ""
            batch += "" if args.jit_compile else "/nojit"
            results[f"{name}/lr{lr:g}{batch}/seed{seed}"] = {
                "method": name,
                "seed": seed,
                "commit": started_at,
                "settings": {
                    "model": args.model,
                    "train_size": n,
                    "batch_size": args.batch_size,
                    "wrapper": METHODS[name][0],
                    "adam": {**METHODS[name][1], "learning_rate": lr},
                    "epochs": len(points),
                    "clipping": "none",
                    "jit_compile": args.jit_compile,
                },
                "curve": points,
                "median_step_seconds": step,
                "summary": learning.summarize(points),
            }
            learning.save_runs(args.out, results)
    backprop = [r for r in results.values() if r["method"] == "backprop"]
    print(f"\n{'run':40s} {'best':>6s} {'final':>6s}  t90 / t95 / t97 (s)  Tf/Tb at 90/95/97")
    for key, r in results.items():
        s = r["summary"]
        times = [s[f"seconds_to_{round(t * 100)}"] for t in TARGETS]
        ratios = []
        for t, mine in zip(TARGETS, times):
            ref = [b["summary"][f"seconds_to_{round(t * 100)}"] for b in backprop]
            ref = [v for v in ref if v]
            ratios.append(
                f"{mine / np.median(ref):.2f}"
                if mine and ref and r["method"] != "backprop"
                else "-"
            )
        print(
            f"{key:40s} {s['best_test_accuracy']:6.4f} {s['final_test_accuracy']:6.4f}  "
            + " / ".join("-" if t is None else f"{t:.0f}" for t in times)
            + "  "
            + " / ".join(ratios)
        )


if __name__ == "__main__":
    main()
