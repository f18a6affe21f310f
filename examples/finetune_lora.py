"""Fine-tuning a transformer with LoRA: backprop against forward gradients.

Pre-trains a small vision transformer (`architectures.vit`: patches of
4×4 pixels, so 64 tokens, width 64) by backprop on the CIFAR-10 classes
0-4 and saves it, then fine-tunes it on a new task, the classes 5-9 under
a new 5-class head, five ways:

  (a) backprop, all weights;
  (b) backprop, LoRA (rank 4 on the query and value projections of every
      attention layer, as KerasHub's `backbone.enable_lora`, and the head);
  (c) as (b), with rematerialization (built under
      `keras.RematScope(mode="full")`: each layer's activations are
      recomputed in the backward pass);
  (d) forward gradient (the papers' weight perturbation) on the LoRA
      variables, one random-sign direction per step (`--num-directions`
      and `--direction` change them);
  (e) activity perturbation on the LoRA variables: a block after every
      layer with trainable variables, one local loss per unit and token,
      random-sign tangents (`--activity-*` flags change them).

It prints one table: trainable parameters, test accuracy, training
seconds, seconds to a fixed test accuracy (`--target`), and the memory one
training step needs beyond its variables (`research.finetuning.step_memory`:
on JAX from XLA's buffer assignment of the compiled step, on TensorFlow
from the allocator's peak). Every optimizer is Adam (3e-4 for (a), 1e-3 for
(b) and (c), 3e-3 for (d), 2e-3 for (e); `--forward-learning-rate` and
`--activity-learning-rate` change those of (d) and (e)), constant or with
`--cosine` decaying to 0 over each method's epochs; no clipping.
`--epochs` changes every method's epochs, `--forward-epochs` and
`--activity-epochs` those of (d) and (e) alone (to compare at equal
wall-clock rather than equal epochs).

On TensorFlow, (c) runs eagerly: Keras rematerializes a layer with
`tf.recompute_grad`, which takes keyword arguments (`training=`) only
eagerly. On JAX every method runs compiled.

Budgets (2 CPU cores): `--smoke` about a minute (a few hundred images);
the default pre-trains for 8 epochs on the 25,000 training images of
classes 0-4 and fine-tunes each method for 5 epochs on those of 5-9 (about
30 minutes on JAX). Data: `--data-dir` with `cifar10_jpeg.npz`, else
tensorflow-datasets.

Usage:
    python examples/finetune_lora.py [--smoke] [--data-dir DIR] [--out DIR]
        [--methods a,b,c,d,e] [--num-directions K] [--target ACC] [--pretrained FILE]
        [--forward-learning-rate LR] [--activity-learning-rate LR]
        [--activity-local-losses auto|layers] [--activity-groups 1|channels]
        [--activity-patches 1|positions] [--activity-direction gaussian|rademacher]
        [--epochs N] [--forward-epochs N] [--activity-epochs N] [--cosine]
"""

import argparse
import os
import time

# The examples' environment defaults (backend, TensorFlow's allocator) are
# set by `common`, which imports nothing heavy.
import common

# Keras, NumPy and the library are imported when the example runs, so that
# `--help` answers at once (`_import`).
keras = np = ForwardGradientModel = architectures = finetuning = learning = None
LOSS = None

BUDGETS = {
    "smoke": dict(train=200, test=100, depth=1, pretrain_epochs=1, epochs=1, batch=50),
    "default": dict(train=None, test=2000, depth=4, pretrain_epochs=8, epochs=5, batch=64),
}
METHODS = {
    "a": "backprop, all weights",
    "b": "backprop, LoRA",
    "c": "backprop, LoRA, remat",
    "d": "forward gradient, LoRA",
    "e": "activity perturbation, LoRA",
}


def parse(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny run (about a minute)")
    p.add_argument("--data-dir", default=None, help="folder with cifar10_jpeg.npz")
    p.add_argument("--out", default="results/finetune_lora", help="output folder")
    p.add_argument("--methods", default="a,b,c,d,e", help="comma-separated, from a-e")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default: %(default)s)")
    p.add_argument("--num-directions", type=int, default=1, help="K of (d) (default: %(default)s)")
    p.add_argument(
        "--direction", default="rademacher", help="direction family of (d) (default: %(default)s)"
    )
    p.add_argument(
        "--forward-learning-rate",
        type=float,
        default=3e-3,
        help="Adam's learning rate for (d) (default: %(default)s)",
    )
    p.add_argument(
        "--activity-learning-rate",
        type=float,
        default=2e-3,
        help="Adam's learning rate for (e) (default: %(default)s)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="fine-tuning epochs of every method (default: the budget's, 5)",
    )
    p.add_argument(
        "--cosine",
        action="store_true",
        help="every method's learning rate decays to 0 over its epochs (cosine)",
    )
    p.add_argument(
        "--forward-epochs",
        type=int,
        default=None,
        help="fine-tuning epochs of (d) (default: those of the other methods)",
    )
    p.add_argument(
        "--activity-epochs",
        type=int,
        default=None,
        help="fine-tuning epochs of (e) (default: those of the other methods)",
    )
    p.add_argument(
        "--activity-direction",
        default="rademacher",
        choices=["gaussian", "rademacher"],
        help="tangents of (e) (default: %(default)s)",
    )
    p.add_argument(
        "--activity-local-losses",
        default="layers",
        choices=["auto", "layers"],
        help="local_losses of (e) (default: %(default)s)",
    )
    p.add_argument(
        "--activity-groups",
        default="channels",
        choices=["1", "channels"],
        help="local_loss_groups of (e) (default: %(default)s)",
    )
    p.add_argument(
        "--activity-patches",
        default="positions",
        choices=["1", "positions"],
        help="local_loss_patches of (e) (default: %(default)s)",
    )
    p.add_argument(
        "--target", type=float, default=0.5, help="test accuracy to time (default: %(default)s)"
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="a model saved by an earlier run (its pretrained.keras): skip pre-training",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for flag in ("epochs", "forward_epochs", "activity_epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be a positive integer; received {value}")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods takes letters from {sorted(METHODS)}; received {unknown}")
    args.methods = methods
    return args


def epochs(args, budget, name):
    """The fine-tuning epochs of method `name`."""
    every = args.epochs or budget["epochs"]
    own = {"d": args.forward_epochs, "e": args.activity_epochs}.get(name)
    return own or every


def split(arrays, classes):
    """The images of `classes`, relabelled `0 … len(classes) - 1`."""
    out = {}
    for part in ("train", "test"):
        keep = np.isin(arrays[f"y_{part}"], classes)
        out[f"x_{part}"] = arrays[f"x_{part}"][keep]
        out[f"y_{part}"] = np.searchsorted(classes, arrays[f"y_{part}"][keep]).astype("int32")
    return out


def build(budget, weights=None, remat=False, seed=0):
    """The ViT with a new head: `weights` (the pre-trained model's) for
    every layer but the head."""
    keras.utils.set_random_seed(seed)
    scope = keras.RematScope(mode="full") if remat else keras.RematScope(mode=None)
    with scope:
        model = architectures.vit(depth=budget["depth"], num_classes=5)
    if weights is not None:
        # Layer by layer in order: the architecture is the same, but Keras
        # names layers it creates later differently.
        if len(weights) != len(model.layers):
            raise ValueError(
                f"The pre-trained model has {len(weights)} layers, this one "
                f"{len(model.layers)}: they must be built alike."
            )
        for layer, values in zip(model.layers, weights):
            if layer.name != "head":
                layer.set_weights(values)
    return model


def accuracy_model(base, run_eagerly=False):
    """`base` compiled for `evaluate` (loss and accuracy)."""
    base.compile(loss=LOSS, metrics=["accuracy"], run_eagerly=run_eagerly)
    return base


def run_method(name, args, budget, data, weights):
    remat = name == "c"
    base = build(budget, weights, remat=remat, seed=args.seed + 1)
    if name == "a":
        trainable = int(sum(np.prod(v.shape) for v in base.trainable_variables))
    else:
        trainable = finetuning.enable_lora(base, args.rank)
    eager = remat and keras.backend.backend() == "tensorflow"
    evaluate_with = accuracy_model(base, run_eagerly=eager)
    rate = {"a": 3e-4, "d": args.forward_learning_rate, "e": args.activity_learning_rate}
    rate = rate.get(name, 1e-3)
    if args.cosine:
        steps = -(-len(data["y_train"]) // budget["batch"]) * epochs(args, budget, name)
        rate = keras.optimizers.schedules.CosineDecay(rate, decay_steps=steps)
    optimizer = keras.optimizers.Adam(rate)
    if name == "d":
        model = ForwardGradientModel(
            base, direction=args.direction, num_directions=args.num_directions, seed=args.seed
        )
    elif name == "e":
        model = ForwardGradientModel(
            base,
            perturbation="activations",
            local_losses=args.activity_local_losses,
            local_loss_groups=1 if args.activity_groups == "1" else "channels",
            local_loss_patches=1 if args.activity_patches == "1" else "positions",
            direction=args.activity_direction,
            seed=args.seed,
        )
    else:
        model = keras.Model(base.input, base.output)
    model.compile(optimizer=optimizer, loss=LOSS, run_eagerly=eager)
    curve = learning.TestCurve(data["x_test"], data["y_test"], evaluate_with, verbose=True)
    print(f"({name}) {METHODS[name]}: {trainable:,} trainable parameters", flush=True)
    model.fit(
        data["x_train"],
        data["y_train"],
        batch_size=budget["batch"],
        epochs=epochs(args, budget, name),
        callbacks=[curve],
        verbose=0,
    )
    summary = learning.summarize(curve.points, targets=(args.target,))
    batch = budget["batch"]
    memory = finetuning.step_memory(model, data["x_train"][:batch], data["y_train"][:batch])
    return {
        "method": name,
        "description": METHODS[name],
        "trainable_parameters": trainable,
        "test_accuracy": summary["final_test_accuracy"],
        "best_test_accuracy": summary["best_test_accuracy"],
        "seconds": curve.points[-1]["seconds"],
        "seconds_to_target": summary[f"seconds_to_{round(args.target * 100)}"],
        "step_memory_mib": round(memory["step_bytes"] / 2**20, 2),
        "memory_source": memory["source"],
        "points": curve.points,
    }


def _import():
    global keras, np, ForwardGradientModel, architectures, finetuning, learning, LOSS
    import keras
    import numpy as np

    from keras_fwdgrad import ForwardGradientModel
    from keras_fwdgrad.research import architectures
    from keras_fwdgrad.research import finetuning
    from keras_fwdgrad.research import learning

    LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def main(argv=None):
    args = parse(argv)
    _import()
    budget = BUDGETS["smoke" if args.smoke else "default"]
    source = "local" if args.data_dir else "auto"
    arrays = learning.normalized_arrays("cifar10", data_dir=args.data_dir, source=source)
    first, second = split(arrays, [0, 1, 2, 3, 4]), split(arrays, [5, 6, 7, 8, 9])
    rng = np.random.default_rng(args.seed)
    for data in (first, second):
        # CIFAR-10's test set is sorted by class: shuffle before cutting.
        for part, size in (("train", budget["train"]), ("test", budget["test"])):
            order = rng.permutation(len(data[f"y_{part}"]))[:size]
            data[f"x_{part}"] = data[f"x_{part}"][order]
            data[f"y_{part}"] = data[f"y_{part}"][order]

    start = time.perf_counter()
    if args.pretrained:
        pretrained = keras.models.load_model(args.pretrained)
        pretrained.compile(loss=LOSS, metrics=["accuracy"])
    else:
        pretrained = build(budget, seed=args.seed)
        pretrained.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])
        pretrained.fit(
            first["x_train"],
            first["y_train"],
            batch_size=budget["batch"],
            epochs=budget["pretrain_epochs"],
            verbose=0,
        )
    _, pretrain_accuracy = pretrained.evaluate(first["x_test"], first["y_test"], verbose=0)
    os.makedirs(args.out, exist_ok=True)
    pretrained.save(os.path.join(args.out, "pretrained.keras"))
    print(
        f"Pre-trained on classes 0-4: test accuracy {pretrain_accuracy:.3f} "
        f"({time.perf_counter() - start:.0f} s); saved to {args.out}/pretrained.keras",
        flush=True,
    )
    weights = [layer.get_weights() for layer in pretrained.layers]

    rows = [run_method(name, args, budget, second, weights) for name in args.methods]
    columns = [
        "method",
        "description",
        "trainable_parameters",
        "test_accuracy",
        "seconds",
        "seconds_to_target",
        "step_memory_mib",
    ]
    print(f"\nFine-tuning on classes 5-9 (target {args.target:.0%}, {keras.backend.backend()}):")
    common.print_rows(rows, columns)
    report = {
        "budget": "smoke" if args.smoke else "default",
        "backend": keras.backend.backend(),
        "settings": {
            **budget,
            "rank": args.rank,
            "num_directions": args.num_directions,
            "forward_learning_rate": args.forward_learning_rate,
            "activity_learning_rate": args.activity_learning_rate,
            "epochs": epochs(args, budget, "a"),
            "forward_epochs": epochs(args, budget, "d"),
            "activity_epochs": epochs(args, budget, "e"),
            "cosine": args.cosine,
        },
        "direction": args.direction,
        "activity": {
            "local_losses": args.activity_local_losses,
            "groups": args.activity_groups,
            "patches": args.activity_patches,
            "direction": args.activity_direction,
        },
        "target": args.target,
        "pretrain_test_accuracy": float(pretrain_accuracy),
        "machine": common.machine(),
        "runs": rows,
    }
    common.write_outputs(
        args.out, report, [{k: r[k] for k in columns + ["memory_source"]} for r in rows]
    )
    return report


if __name__ == "__main__":
    main()
