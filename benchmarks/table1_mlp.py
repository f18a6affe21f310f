"""Table I's MLP rows (second paper) retrained at the paper's own settings,
for the paper's 50 epochs, with each meaning of "gradient clipping".

For each requested row (forward gradient or backprop × SGD / Nesterov /
Adam) trains the papers' MLP 784-1024-1024-10 on the MNIST training set
less the last 10 % (held out for validation, as the paper tuned on it),
batch 64, at Table I's learning rate, decay k (η_i = η0·e^(−ik)),
momentum and β's, and evaluates the full test set after the last epoch.
Forward-gradient rows cap the directional derivative at 1 (`jvp_clip=1`)
and are run with the clipping named by `--clipping`:

- `global`: `global_clipnorm=1`, the norm of all gradients together
  (PyTorch's `clip_grad_norm_`, which the paper's code uses);
- `variable`: Keras' `clipnorm=1`, each variable's gradient separately;
- `none`: no clipping.

Backprop rows are run without clipping. Every run records validation loss
after each epoch, the test loss and accuracy after the last, its seconds
and the commit it ran at (`benchmarks/results/table1_mlp.json`).

`--search` first searches each row's learning rate on a short budget
(`--search-epochs`, default 1, same data) over a grid of 3 points per
decade from a decade below to a decade above the paper's value (the
paper's value is on the grid), for each clipping, keeps the learning rate
with the lowest validation loss per (row, clipping), and then retrains that
one for `--epochs`. Decay, momentum and β's stay Table I's.

Usage:
    python benchmarks/table1_mlp.py --data-dir ../shared/data \
        [--rows forward-sgd,forward-nesterov,forward-adam,backprop-sgd,...] \
        [--clipping global,variable,none] [--epochs 50] [--train-size N] \
        [--search [--search-epochs 1]]
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402
from keras_fwdgrad.research import datasets  # noqa: E402
from keras_fwdgrad.research import learning  # noqa: E402
from keras_fwdgrad.research import optimizers  # noqa: E402

# Table I, MLP rows: learning rate, decay k, momentum, beta_1, beta_2,
# the paper's test loss after 50 epochs.
PAPER = {
    "forward-sgd": (0.000464, 1e-5, 0.0, 0.9, 0.999, 0.332),
    "backprop-sgd": (0.1, 0.0, 0.0, 0.9, 0.999, 0.000),
    "forward-nesterov": (0.000320, 1e-5, 0.367, 0.9, 0.999, 0.270),
    "backprop-nesterov": (0.1, 0.0, 0.5, 0.9, 0.999, 0.000),
    "forward-adam": (0.0005, 5e-5, 0.0, 0.99, 0.999, 0.283),
    "backprop-adam": (0.0001, 0.0, 0.0, 0.9, 0.999, 0.000),
}
CLIPPING = {"global": dict(global_clipnorm=1.0), "variable": dict(clipnorm=1.0), "none": {}}


def grid(paper_lr, points_per_decade=3, decades=1):
    """The search grid: `paper_lr · 10^(k/points_per_decade)`, |k| ≤ ..."""
    n = points_per_decade * decades
    return [paper_lr * 10 ** (k / points_per_decade) for k in range(-n, n + 1)]


def run(row, clipping, data, epochs, seed, learning_rate=None):
    gradient, optimizer_name = row.split("-")
    lr, decay, momentum, beta_1, beta_2, _ = PAPER[row]
    lr = lr if learning_rate is None else learning_rate
    keras.utils.set_random_seed(seed)
    base = architectures.mlp()
    clip = CLIPPING[clipping] if gradient == "forward" else {}
    optimizer = optimizers.make_optimizer(
        optimizer_name, lr, decay=decay, momentum=momentum, beta_1=beta_1, beta_2=beta_2, **clip
    )
    model = base
    if gradient == "forward":
        model = ForwardGradientModel(base, direction="gaussian", jvp_clip=1.0, seed=seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"], jit_compile=True)
    base.compile(loss=loss, metrics=["accuracy"], jit_compile=True)
    train, val, test = data
    start = time.perf_counter()
    history = model.fit(train, validation_data=val, epochs=epochs, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    test_loss, test_accuracy = base.evaluate(test, verbose=0)
    return {
        "row": row,
        "clipping": clipping if gradient == "forward" else "none",
        "paper": dict(
            zip(
                ("learning_rate", "decay", "momentum", "beta_1", "beta_2", "test_loss"), PAPER[row]
            )
        ),
        "learning_rate": lr,
        "epochs": epochs,
        "val_loss": [float(v) for v in history.history["val_loss"]],
        "test_loss": float(test_loss),
        "test_accuracy": float(test_accuracy),
        "seconds_with_validation": seconds,
        "seed": seed,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get(datasets.DATA_DIR_ENV))
    p.add_argument("--rows", default=",".join(PAPER))
    p.add_argument("--clipping", default="global")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--search", action="store_true", help="search the learning rate first")
    p.add_argument("--search-epochs", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/table1_mlp.json")
    args = p.parse_args()
    for name in args.clipping.split(","):
        if name not in CLIPPING:
            p.error(f"--clipping must name some of {sorted(CLIPPING)}; got {name!r}")
    data = datasets.make_datasets(
        "mnist",
        data_dir=args.data_dir,
        source="local",
        train_size=args.train_size,
        seed=args.seed,
        drop_remainder=True,
    )
    started_at = learning.code_version()  # the code this process runs
    results = learning.load_runs(args.out)
    train_size = args.train_size or "full less 10 % validation"
    for row in args.rows.split(","):
        clippings = args.clipping.split(",") if row.startswith("forward") else ["none"]
        for clipping in clippings:
            learning_rate, tag = None, ""
            if args.search:
                trials = []
                for lr in grid(PAPER[row][0]):
                    t = run(row, clipping, data, args.search_epochs, args.seed, learning_rate=lr)
                    print(
                        f"  search {row} {clipping} lr={lr:.3g}: val loss {t['val_loss'][-1]:.4f}"
                    )
                    trials.append(
                        {k: t[k] for k in ("learning_rate", "val_loss", "seconds_with_validation")}
                    )
                finite = [t for t in trials if t["val_loss"][-1] == t["val_loss"][-1]]
                best = min(finite, key=lambda t: t["val_loss"][-1]) if finite else trials[0]
                learning_rate, tag = best["learning_rate"], "/searched"
                results[f"search/{row}/{clipping}/epochs{args.search_epochs}/seed{args.seed}"] = {
                    "trials": trials,
                    "best_learning_rate": learning_rate,
                    "commit": started_at,
                    "train_size": train_size,
                }
                learning.save_runs(args.out, results)
            print(f"{row} clipping={clipping} lr={learning_rate}", flush=True)
            r = run(row, clipping, data, args.epochs, args.seed, learning_rate=learning_rate)
            r["commit"] = started_at
            r["train_size"] = train_size
            results[f"{row}/{r['clipping']}/epochs{args.epochs}/seed{args.seed}{tag}"] = r
            print(
                f"  test loss {r['test_loss']:.4f} (paper {r['paper']['test_loss']:.3f}), "
                f"test accuracy {r['test_accuracy']:.4f}, {r['seconds_with_validation']:.0f} s",
                flush=True,
            )
            learning.save_runs(args.out, results)


if __name__ == "__main__":
    main()
