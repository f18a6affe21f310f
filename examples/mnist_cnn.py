"""Forward gradient vs backpropagation: the CNN of the papers on MNIST.

First paper, Section 5.5 (Fig. 5): four 3×3 convolutions of 64 channels
with 2×2 max-pooling after the 2nd and 4th, dense 1024 and 10; SGD with
learning rate 2e-4 and decay η_i = η0·e^(−ik), k = 1e-4, batch 64, the
same number of iterations for both methods. Reports the step costs (base
time, Rf, Rb, Rf/Rb, peak memory), validation loss against iterations and
training time (figure), Tf/Tb, and test loss/accuracy.

Budgets:
- `--smoke`: 256 training images, 1 epoch, 1 seed (29 s on a 2-core CPU).
- default: 10,000 training images, 1 epoch, 2 seeds (a few minutes on a
  2-core CPU; a reduced budget: the CNN is ~20× the MLP's compute).
- `--full`: all of MNIST, 10 epochs, 5 seeds (a GPU is advisable).

Usage:
    python examples/mnist_cnn.py --data-dir /path/to/data
"""

import common

architectures = common.deferred("keras_fwdgrad.research.architectures")

CONFIGS = [
    {
        "name": "lr 2e-4",
        "forward": {"learning_rate": 2e-4, "decay": 1e-4},
        "backprop": {"learning_rate": 2e-4, "decay": 1e-4},
    }
]
BUDGETS = {
    "smoke": dict(
        epochs=1,
        seeds=1,
        train_size=256,
        test_size=128,
        eval_every=2,
        profile_steps=2,
        profile_repeats=3,
    ),
    "default": dict(
        epochs=1,
        seeds=2,
        train_size=10000,
        test_size=2000,
        val_batches=5,
        eval_every=10,
        profile_steps=5,
        profile_repeats=5,
    ),
    "full": dict(epochs=10, seeds=5, eval_every=100, profile_steps=20, profile_repeats=10),
}


def main(argv=None):
    args = common.parser(__doc__, "out/mnist_cnn").parse_args(argv)
    return common.run_classification(
        args,
        experiment="mnist_cnn",
        title="CNN, MNIST",
        dataset="mnist",
        build_model=architectures.mnist_cnn,
        configs=CONFIGS,
        budgets=BUDGETS,
    )


if __name__ == "__main__":
    main()
