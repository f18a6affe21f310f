"""Forward gradient vs backpropagation: the VGG-style CNN on CIFAR-10.

Second paper, Section III-B (Fig. 1, last rows of Table I): three blocks of
two 3×3 convolutions (64, 128, 256 channels), each block followed by 2×2
max-pooling, dense 4096 and 10; SGD with each method's own tuned settings
from Table I (forward: η0 = 4.33e-4, k = 1e-6, directional derivative
capped at 1; backprop: η0 = 1e-2, k = 1e-4), batch 64, the same number of
iterations for both. Reports the step costs (base time, Rf, Rb, Rf/Rb,
peak memory), validation loss against iterations and time (figure), Tf/Tb,
and test loss/accuracy.

Data: `--data-dir` (or KERAS_FWDGRAD_DATA_DIR) with `cifar10_jpeg.npz` or
`cifar10.npz`, else tensorflow-datasets.

Budgets:
- `--smoke`: 128 training images, 1 epoch, 1 seed (74 s on a 2-core CPU,
  most of it XLA compilation of the 18 M-parameter model; without local
  data, tensorflow-datasets first retries its download for minutes).
- default: 4,000 training images, 1 epoch, 1 seed (a reduced budget: a
  step of this model takes about a second on a 2-core CPU).
- `--full`: all of CIFAR-10, 100 epochs (Table I), 3 seeds (GPU).

Usage:
    python examples/cifar10_vgg.py --data-dir /path/to/data
"""

import common

architectures = common.deferred("keras_fwdgrad.research.architectures")

CONFIGS = [
    {
        "name": "Table I",
        "forward": {"learning_rate": 4.33e-4, "decay": 1e-6, "jvp_clip": 1.0},
        "backprop": {"learning_rate": 1e-2, "decay": 1e-4},
    }
]
BUDGETS = {
    "smoke": dict(
        epochs=1,
        seeds=1,
        train_size=128,
        test_size=64,
        eval_every=1,
        val_batches=1,
        profile_steps=1,
        profile_repeats=3,
    ),
    "default": dict(
        epochs=1,
        seeds=1,
        train_size=4000,
        test_size=1000,
        val_batches=4,
        eval_every=4,
        profile_steps=3,
        profile_repeats=5,
    ),
    "full": dict(epochs=100, seeds=3, eval_every=200, profile_steps=20, profile_repeats=10),
}


def main(argv=None):
    args = common.parser(__doc__, "out/cifar10_vgg").parse_args(argv)
    return common.run_classification(
        args,
        experiment="cifar10_vgg",
        title="VGG-style CNN, CIFAR-10",
        dataset="cifar10",
        build_model=architectures.cifar10_vgg,
        configs=CONFIGS,
        budgets=BUDGETS,
    )


if __name__ == "__main__":
    main()
