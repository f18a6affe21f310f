"""Forward gradient vs backpropagation: the MLP 784-1024-1024-10 on MNIST.

First paper, Section 5.4 (Fig. 4): two experiments, learning rates 2e-5
and 2e-4, SGD with decay η_i = η0·e^(−ik), k = 1e-4, batch 64, the same
number of iterations for both methods. Reports the step costs (base time,
Rf, Rb, Rf/Rb, peak memory), validation loss against iterations and
training time (one figure per learning rate), Tf/Tb, and test
loss/accuracy.

The second paper's separately tuned learning rates for this model are in
`keras_fwdgrad.research.table1` (Table I); `examples/tune_table1.py`
searches them again.

Budgets:
- `--smoke`: 512 training images, 1 epoch, 1 seed (22 s on a 2-core CPU).
- default: 2 epochs, 3 seeds; all of MNIST with `--data-dir`, else the
  bundled 10,000-image subset (minutes on a 2-core CPU).
- `--full`: all of MNIST, 10 epochs, 5 seeds (the paper's figure shows
  five runs).

Usage:
    python examples/mnist_mlp.py --data-dir /path/to/data
    python examples/mnist_mlp.py --direction gaussian rademacher
"""

import common

architectures = common.deferred("keras_fwdgrad.research.architectures")

CONFIGS = [
    {
        "name": f"lr {lr:g}",
        "forward": {"learning_rate": lr, "decay": 1e-4},
        "backprop": {"learning_rate": lr, "decay": 1e-4},
    }
    for lr in (2e-5, 2e-4)
]
BUDGETS = {
    "smoke": dict(
        epochs=1,
        seeds=1,
        train_size=512,
        test_size=256,
        eval_every=4,
        profile_steps=3,
        profile_repeats=3,
    ),
    "default": dict(
        epochs=2, seeds=3, val_batches=20, eval_every=50, profile_steps=20, profile_repeats=7
    ),
    "full": dict(epochs=10, seeds=5, eval_every=100, profile_steps=50, profile_repeats=10),
}


def main(argv=None):
    args = common.parser(__doc__, "out/mnist_mlp").parse_args(argv)
    return common.run_classification(
        args,
        experiment="mnist_mlp",
        title="MLP 784-1024-1024-10, MNIST",
        dataset="mnist",
        build_model=architectures.mlp,
        configs=CONFIGS,
        budgets=BUDGETS,
    )


if __name__ == "__main__":
    main()
