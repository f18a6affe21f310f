"""Table I's rows (second paper) retrained at the paper's own settings, with
each meaning of "gradient clipping", with and without the cap on the
directional derivative.

For each requested row (forward gradient or backprop × SGD / Nesterov /
Adam) of the model named by `--model` (the papers' MLP 784-1024-1024-10 or
CNN on MNIST, the second paper's VGG-style CNN on CIFAR-10), trains on the
training set less the last 10 % (held out for validation, as the paper
tuned on it), batch 64, at Table I's learning rate, decay k
(η_i = η0·e^(−ik)), momentum and β's, and evaluates the full test set after
the last epoch. Table I's epochs are 50 (MNIST) and 100 (CIFAR-10);
`--epochs` sets the budget (default 50). Forward-gradient rows use the
paper's Gaussian directions, cap the directional derivative at
`--jvp-clip` (default 1, the paper's; `none` for no cap) and are run with
the clipping named by `--clipping`:

- `global`: `global_clipnorm=1`, the norm of all gradients together
  (PyTorch's `clip_grad_norm_`, which the paper's code uses);
- `variable`: Keras' `clipnorm=1`, each variable's gradient separately;
- `none`: no clipping.

Backprop rows are run without clipping. Every run records validation loss
after each epoch, the training loss every `--log-every` steps (the running
mean over the epoch so far, as Keras reports it), the first step at which
it is not finite (the run then stops: a diverged run), the test loss and
accuracy after the last epoch, its seconds and the commit it ran at
(`benchmarks/results/table1_<model>.json`).

`--search` first searches each row's learning rate on a short budget
(`--search-epochs`, default 1, same data) over a grid of 3 points per
decade from a decade below to a decade above the paper's value (the
paper's value is on the grid), for each clipping, keeps the learning rate
with the lowest validation loss per (row, clipping), and then retrains that
one for `--epochs`. Decay, momentum and β's stay Table I's.

Usage:
    python benchmarks/table1.py --data-dir ../shared/data [--model mlp|cnn|vgg] \
        [--rows forward-sgd,forward-nesterov,forward-adam,backprop-sgd,...] \
        [--clipping global,variable,none] [--jvp-clip 1|none] [--epochs 50] \
        [--train-size N] [--search [--search-epochs 1]]
"""

import argparse
import math
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402
from keras_fwdgrad.research import datasets  # noqa: E402
from keras_fwdgrad.research import learning  # noqa: E402
from keras_fwdgrad import optimizers  # noqa: E402
from keras_fwdgrad.research import table1  # noqa: E402

MODELS = {  # dataset, builder in `architectures`
    "mlp": ("mnist", "mlp"),
    "cnn": ("mnist", "mnist_cnn"),
    "vgg": ("cifar10", "cifar10_vgg"),
}
CLIPPING = {"global": dict(global_clipnorm=1.0), "variable": dict(clipnorm=1.0), "none": {}}


def grid(paper_lr, points_per_decade=3, decades=1):
    """The search grid: `paper_lr · 10^(k/points_per_decade)`, |k| ≤ ..."""
    n = points_per_decade * decades
    return [paper_lr * 10 ** (k / points_per_decade) for k in range(-n, n + 1)]


class LossLog(keras.callbacks.Callback):
    """The training loss every `every` steps and the first step at which it
    is not finite (then training stops)."""

    def __init__(self, every):
        super().__init__()
        self.every = every
        self.step = 0
        self.losses = []
        self.first_non_finite_step = None

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        loss = float(logs["loss"])
        if not math.isfinite(loss) and self.first_non_finite_step is None:
            self.first_non_finite_step = self.step
            self.losses.append((self.step, loss))
            self.model.stop_training = True
        elif self.step % self.every == 0:
            self.losses.append((self.step, loss))


def run(
    model_name, row, clipping, data, epochs, seed, learning_rate=None, jvp_clip=1.0, log_every=100
):
    gradient, optimizer_name = row.split("-")
    paper = table1.row(model_name, gradient, optimizer_name)
    lr = paper["learning_rate"] if learning_rate is None else learning_rate
    keras.utils.set_random_seed(seed)
    base = getattr(architectures, MODELS[model_name][1])()
    clip = CLIPPING[clipping] if gradient == "forward" else {}
    optimizer = optimizers.make_optimizer(
        optimizer_name,
        lr,
        decay=paper["decay"],
        momentum=paper["momentum"],
        beta_1=paper["beta_1"],
        beta_2=paper["beta_2"],
        **clip,
    )
    model = base
    if gradient == "forward":
        model = ForwardGradientModel(base, direction="gaussian", jvp_clip=jvp_clip, seed=seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"], jit_compile=True)
    evaluate_with = learning.evaluation_model(base, model, loss)
    train, val, test = data
    log = LossLog(log_every)
    start = time.perf_counter()
    history = model.fit(
        train, validation_data=val, epochs=epochs, shuffle=False, verbose=0, callbacks=[log]
    )
    seconds = time.perf_counter() - start
    test_loss, test_accuracy = evaluate_with.evaluate(test, verbose=0)
    return {
        "model": model_name,
        "row": row,
        "clipping": clipping if gradient == "forward" else "none",
        "jvp_clip": jvp_clip if gradient == "forward" else None,
        "paper": {
            k: paper[k]
            for k in ("learning_rate", "decay", "momentum", "beta_1", "beta_2", "test_loss")
        },
        "learning_rate": lr,
        "epochs": epochs,
        "steps": log.step,
        "first_non_finite_step": log.first_non_finite_step,
        "train_loss": log.losses,
        "val_loss": [float(v) for v in history.history.get("val_loss", [])],
        "test_loss": float(test_loss),
        "test_accuracy": float(test_accuracy),
        "seconds_with_validation": seconds,
        "seed": seed,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get(datasets.DATA_DIR_ENV))
    p.add_argument("--model", choices=sorted(MODELS), default="mlp")
    p.add_argument("--rows", default=None, help="default: every row of the model")
    p.add_argument("--clipping", default="global")
    p.add_argument("--jvp-clip", default="1", help="cap on |∇f·v| (a number, or none)")
    p.add_argument("--log-every", type=int, default=100, help="steps between training losses")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--search", action="store_true", help="search the learning rate first")
    p.add_argument("--search-epochs", type=int, default=1)
    p.add_argument("--out", default=None, help="default: benchmarks/results/table1_<model>.json")
    args = p.parse_args()
    for name in args.clipping.split(","):
        if name not in CLIPPING:
            p.error(f"--clipping must name some of {sorted(CLIPPING)}; got {name!r}")
    paper = {f"{r['gradient']}-{r['optimizer']}": r for r in table1.rows(args.model)}
    rows = args.rows.split(",") if args.rows else list(paper)
    for row in rows:
        if row not in paper:
            p.error(f"--rows must name some of {sorted(paper)}; got {row!r}")
    try:
        jvp_clip = None if args.jvp_clip == "none" else float(args.jvp_clip)
    except ValueError:
        p.error(f"--jvp-clip must be a positive number or none; got {args.jvp_clip!r}")
    if jvp_clip is not None and not jvp_clip > 0:
        p.error(f"--jvp-clip must be a positive number or none; got {args.jvp_clip!r}")
    out = args.out or f"benchmarks/results/table1_{args.model}.json"
    data = datasets.make_datasets(
        MODELS[args.model][0],
        data_dir=args.data_dir,
        source="local",
        train_size=args.train_size,
        seed=args.seed,
        drop_remainder=True,
    )
    started_at = learning.code_version()  # the code this process runs
    results = learning.load_runs(out)
    train_size = args.train_size or "full less 10 % validation"
    # Runs with the paper's cap keep the keys they had before `--jvp-clip`.
    cap = "" if jvp_clip == 1.0 else f"/jvp_clip{args.jvp_clip}"
    settings = dict(jvp_clip=jvp_clip, log_every=args.log_every)
    for row in rows:
        clippings = args.clipping.split(",") if row.startswith("forward") else ["none"]
        for clipping in clippings:
            learning_rate, tag = None, ""
            row_cap = cap if row.startswith("forward") else ""
            if args.search:
                trials = []
                for lr in grid(paper[row]["learning_rate"]):
                    t = run(
                        args.model,
                        row,
                        clipping,
                        data,
                        args.search_epochs,
                        args.seed,
                        learning_rate=lr,
                        **settings,
                    )
                    print(
                        f"  search {row} {clipping} lr={lr:.3g}: val loss {t['val_loss'][-1]:.4f}"
                    )
                    trials.append(
                        {k: t[k] for k in ("learning_rate", "val_loss", "seconds_with_validation")}
                    )
                finite = [t for t in trials if t["val_loss"][-1] == t["val_loss"][-1]]
                best = min(finite, key=lambda t: t["val_loss"][-1]) if finite else trials[0]
                learning_rate, tag = best["learning_rate"], "/searched"
                results[
                    f"search/{row}/{clipping}{row_cap}/epochs{args.search_epochs}/seed{args.seed}"
                ] = {
                    "trials": trials,
                    "best_learning_rate": learning_rate,
                    "commit": started_at,
                    "train_size": train_size,
                }
                learning.save_runs(out, results)
            print(f"{args.model} {row} clipping={clipping} lr={learning_rate}", flush=True)
            r = run(
                args.model,
                row,
                clipping,
                data,
                args.epochs,
                args.seed,
                learning_rate=learning_rate,
                **settings,
            )
            r["commit"] = started_at
            r["train_size"] = train_size
            key = f"{row}/{r['clipping']}{row_cap}/epochs{args.epochs}/seed{args.seed}{tag}"
            results[key] = r
            print(
                f"  test loss {r['test_loss']:.4f} (paper {r['paper']['test_loss']:.3f}), "
                f"test accuracy {r['test_accuracy']:.4f}, {r['seconds_with_validation']:.0f} s"
                + (
                    f", not finite from step {r['first_non_finite_step']}"
                    if r["first_non_finite_step"]
                    else ""
                ),
                flush=True,
            )
            learning.save_runs(out, results)


if __name__ == "__main__":
    main()
