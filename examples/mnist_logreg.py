"""Forward gradient vs backpropagation: logistic regression on MNIST.

First paper, Section 5.3 (Fig. 3): multinomial logistic regression, SGD
with learning rate 1e-4 and decay η_i = η0·e^(−ik), k = 1e-4, batch 64,
the same number of iterations for both methods. Reports the step costs
(base time, Rf, Rb, Rf/Rb, peak memory), the validation loss against
iterations and training time (figure), Tf/Tb, and test loss/accuracy.

Budgets:
- `--smoke`: 512 training images, 1 epoch, 1 seed (10 s on a 2-core CPU).
- default: 3 epochs, 3 seeds; all of MNIST with `--data-dir`, else the
  bundled 10,000-image subset (a few minutes on a 2-core CPU).
- `--full`: all of MNIST, 10 epochs, 5 seeds (the paper's figure shows
  five runs).

Usage:
    python examples/mnist_logreg.py --data-dir /path/to/data
"""

import common

architectures = common.deferred("keras_fwdgrad.research.architectures")

CONFIGS = [
    {
        "name": "lr 1e-4",
        "forward": {"learning_rate": 1e-4, "decay": 1e-4},
        "backprop": {"learning_rate": 1e-4, "decay": 1e-4},
    }
]
BUDGETS = {
    "smoke": dict(
        epochs=1,
        seeds=1,
        train_size=512,
        test_size=256,
        eval_every=4,
        profile_steps=5,
        profile_repeats=3,
    ),
    "default": dict(
        epochs=3, seeds=3, val_batches=20, eval_every=50, profile_steps=50, profile_repeats=7
    ),
    "full": dict(epochs=10, seeds=5, eval_every=100, profile_steps=100, profile_repeats=10),
}


def main(argv=None):
    args = common.parser(__doc__, "out/mnist_logreg").parse_args(argv)
    return common.run_classification(
        args,
        experiment="mnist_logreg",
        title="Logistic regression, MNIST",
        dataset="mnist",
        build_model=architectures.logistic_regression,
        configs=CONFIGS,
        budgets=BUDGETS,
    )


if __name__ == "__main__":
    main()
