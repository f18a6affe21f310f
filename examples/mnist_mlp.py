"""Forward gradient vs backpropagation on the papers' MNIST MLP.

Trains the MLP 784-1024-1024-10 (Baydin et al. 2022, Section 5.4; Rike and
Førland, Section III-A) with forward gradients, once per direction family,
and with backpropagation, from the same initial weights, with the
optimizer's learning rates tuned separately for each method (second paper,
Table I). Prints a side-by-side table (test loss, accuracy, ms/step under
`fit`, Rf/Rb = forward step time / backprop step time) and writes it as
JSON.

Budgets:
- `--smoke`: 1,000 training digits, 1 epoch (seconds; used by the tests).
- default: the 10,000/2,000-digit MNIST subset shipped with keras-fwdgrad,
  3 epochs (a few minutes on a 2-core CPU).
- `--full`: all of MNIST (tensorflow-datasets, or `--data-dir`), 50 epochs
  as in the second paper (a GPU is advisable).

Usage:
    python examples/mnist_mlp.py
    python examples/mnist_mlp.py --optimizer adam --directions gaussian
    python examples/mnist_mlp.py --full --data-dir /path/to/data
"""

import argparse
import json
import math
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad import architectures  # noqa: E402
from keras_fwdgrad import datasets  # noqa: E402
from keras_fwdgrad.metrics import StepTimer  # noqa: E402

# Table I of the second paper, MLP on MNIST: learning rate, per-iteration
# exponential decay k (η_i = η0·e^(−ik)), and optimizer settings.
TABLE_I_MLP = {
    "sgd": {
        "forward": {"learning_rate": 4.64e-4, "decay": 1e-5},
        "backprop": {"learning_rate": 0.1, "decay": 0.0},
    },
    "nesterov": {
        "forward": {"learning_rate": 3.2e-4, "decay": 1e-5, "momentum": 0.367},
        "backprop": {"learning_rate": 0.1, "decay": 0.0, "momentum": 0.5},
    },
    "adam": {
        "forward": {"learning_rate": 5e-4, "decay": 5e-5, "beta_1": 0.99, "beta_2": 0.999},
        "backprop": {"learning_rate": 1e-4, "decay": 0.0, "beta_1": 0.9, "beta_2": 0.999},
    },
}


def make_optimizer(kind, learning_rate, decay=0.0, clipnorm=None, **kwargs):
    """Builds a stock Keras optimizer with the papers' decay η0·e^(−ik)."""
    lr = learning_rate
    if decay:
        lr = keras.optimizers.schedules.ExponentialDecay(
            learning_rate, decay_steps=1, decay_rate=math.exp(-decay)
        )
    if kind == "adam":
        return keras.optimizers.Adam(lr, clipnorm=clipnorm, **kwargs)
    if kind == "nesterov":
        return keras.optimizers.SGD(lr, nesterov=True, clipnorm=clipnorm, **kwargs)
    return keras.optimizers.SGD(lr, clipnorm=clipnorm)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--smoke", action="store_true", help="tiny run (seconds)")
    budget.add_argument("--full", action="store_true", help="the papers' budget")
    p.add_argument("--out", default="out/mnist_mlp", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="folder with mnist.npz")
    p.add_argument("--optimizer", choices=sorted(TABLE_I_MLP), default="sgd")
    p.add_argument("--directions", nargs="+", default=["gaussian", "rademacher"])
    p.add_argument("--jit", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--jvp-clip", type=float, default=1.0,
                   help="cap on |∇f·v| (second paper: 1); 0 disables")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    if args.full:
        budget, epochs, source, train_size = "full", 50, "auto", None
    elif args.smoke:
        budget, epochs, source, train_size = "smoke", 1, "bundled", 1000
    else:
        budget, epochs, source, train_size = "default", 3, "bundled", None
    if args.data_dir or os.environ.get(datasets.DATA_DIR_ENV):
        source = "auto" if args.full else source
    epochs = args.epochs or epochs
    train, val, test = datasets.make_datasets(
        "mnist",
        batch_size=64,
        data_dir=args.data_dir,
        source=source,
        train_size=train_size,
        test_size=500 if args.smoke else None,
        seed=args.seed,
    )
    settings = TABLE_I_MLP[args.optimizer]
    runs = [("forward", d) for d in args.directions] + [("backprop", None)]
    results = []
    for method, direction in runs:
        keras.utils.set_random_seed(args.seed)  # Same initial weights.
        base = architectures.mlp()
        if method == "forward":
            model = ForwardGradientModel(
                base,
                direction=direction,
                jvp_clip=args.jvp_clip or None,
                seed=args.seed,
            )
        else:
            model = base
        model.compile(
            optimizer=make_optimizer(args.optimizer, **settings[method]),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=args.jit,
        )
        timer = StepTimer()
        history = model.fit(
            train, validation_data=val, epochs=epochs, verbose=0, callbacks=[timer]
        )
        test_loss, test_acc = model.evaluate(test, verbose=0)
        results.append(
            {
                "method": method,
                "direction": direction,
                "optimizer": args.optimizer,
                **settings[method],
                "test_loss": float(test_loss),
                "test_accuracy": float(test_acc),
                "ms_per_step": timer.median_ms(),
                "compile_s": float(sum(timer.warmup_times)),
                "steps": len(timer.times) + len(timer.warmup_times),
                "val_loss": [float(v) for v in history.history["val_loss"]],
            }
        )
    backprop_ms = results[-1]["ms_per_step"]
    for r in results:
        r["Rf/Rb"] = r["ms_per_step"] / backprop_ms
    report = {
        "experiment": "mnist_mlp",
        "budget": budget,
        "epochs": epochs,
        "jit_compile": args.jit,
        "batch_size": 64,
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=2)

    print(f"MNIST MLP 784-1024-1024-10, {args.optimizer}, budget={budget}, "
          f"epochs={epochs}, batch 64, jit_compile={args.jit}")
    header = f"{'method':<10} {'direction':<11} {'lr':>9} {'test loss':>9} {'acc':>6} {'ms/step':>8} {'Rf/Rb':>6}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['method']:<10} {r['direction'] or '-':<11} {r['learning_rate']:>9.3g} "
            f"{r['test_loss']:>9.4f} {r['test_accuracy']:>6.3f} "
            f"{r['ms_per_step']:>8.2f} {r['Rf/Rb']:>6.2f}"
        )
    print(f"Results written to {os.path.join(args.out, 'results.json')}")
    return report


if __name__ == "__main__":
    main()
