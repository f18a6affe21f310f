"""Step time under `fit()` of activity perturbation against backprop and
the papers' forward gradient, with and without XLA.

For each model (`--models`: the papers' MNIST MLP and CNN, the second
paper's CIFAR-10 VGG, the small CIFAR-10 ResNet) and each `jit_compile`
setting, builds one model per method (`--methods`: a subset, backprop
always), compiles it (its first steps reported apart), then times
`--rounds` interleaved rounds of `--steps` training steps each (method 1,
method 2, ..., then again) and reports the median step time and its ratio
to backprop's, all in one process, and the median over rounds of each
round's ratio to backprop's round (`paired_vs_backprop`: this machine's
slow spells then slow both sides of a ratio). Batch 64, Adam (or `--optimizer sgd`),
random data of the right shape (a step's cost does not depend on the
values).

Methods:
- `backprop`: the base model's own `fit`.
- `weights`: the papers' estimator (one Gaussian direction, layer rules).
- `activations`: `perturbation="activations"`, `local_losses="auto"`.
- `activations_layers`: `local_losses="layers"` (a block per perturbed
  layer: a layer's tangent travels through its own head only).
- `activations_one_loss_signs`: `local_losses=None` (the model's loss
  alone, every tangent travelling to the output) with random-sign
  tangents.
- `activations_groups32`: `local_losses="auto"` with
  `local_loss_groups=32`.
- `activations_layers_signs`: `activations_layers` with random-sign
  tangents (`direction="rademacher"`).
- `activations_channels_signs`: the setting that learns fastest,
  `local_losses="auto"`, `local_loss_groups="channels"`,
  `direction="rademacher"`.
- `activations_layer_patches_signs`: `local_losses="layers"`, one loss
  per channel and position, random signs (`research.methods.LAYER_LOCAL_OPTIONS`,
  the CNN and ResNet learning runs).
- `activations_layers_orthogonal3`: `local_losses="layers"` with three
  orthogonal Gaussian tangents per example and layer
  (`num_directions=3`, `orthogonal_directions=True`): three passes.

`--optimizer sgd` replaces Adam (the default) by plain SGD for every
method, whose update is one pass over the weights: the step is then
mostly the gradient or its estimate.

Runs on the backend `KERAS_BACKEND` names (TensorFlow by default). On JAX
`--jit off` runs the step op by op (Keras' `run_eagerly`-like path), so
only `--jit on` is a fair comparison there.

Usage:
    [KERAS_BACKEND=jax] python benchmarks/activity_step_time.py
        [--models mlp cnn vgg resnet] [--jit on off] [--rounds 5] [--steps 10]
        [--methods NAME ...] [--optimizer adam|sgd]
"""

import argparse
import json
import os
import platform

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402
from keras_fwdgrad.research.methods import LAYER_LOCAL_OPTIONS  # noqa: E402
from keras_fwdgrad.research.provenance import code_version  # noqa: E402
from keras_fwdgrad.research.measures import StepTimer  # noqa: E402

MODELS = {
    "mlp": (architectures.mlp, (28, 28, 1)),
    "cnn": (architectures.mnist_cnn, (28, 28, 1)),
    "vgg": (architectures.cifar10_vgg, (32, 32, 3)),
    "resnet": (architectures.cifar10_resnet, (32, 32, 3)),
}
METHODS = {
    "backprop": None,
    "weights": dict(),
    "activations": dict(perturbation="activations", local_losses="auto"),
    "activations_layers": dict(perturbation="activations", local_losses="layers"),
    "activations_one_loss_signs": dict(
        perturbation="activations", local_losses=None, direction="rademacher"
    ),
    "activations_groups32": dict(
        perturbation="activations", local_losses="auto", local_loss_groups=32
    ),
    "activations_layers_signs": dict(
        perturbation="activations", local_losses="layers", direction="rademacher"
    ),
    "activations_channels_signs": dict(
        perturbation="activations",
        local_losses="auto",
        local_loss_groups="channels",
        direction="rademacher",
    ),
    "activations_layer_patches_signs": LAYER_LOCAL_OPTIONS,
    "activations_layers_orthogonal3": dict(
        perturbation="activations",
        local_losses="layers",
        num_directions=3,
        orthogonal_directions=True,
    ),
}


def _backend_version():
    if keras.backend.backend() == "jax":
        import jax

        return f"jax {jax.__version__} ({jax.devices()[0].platform})"
    import tensorflow as tf

    return f"tensorflow {tf.__version__}"


def measure(model_name, jit, rounds, steps, methods=None, optimizer="adam"):
    build, shape = MODELS[model_name]
    methods = {
        name: args
        for name, args in METHODS.items()
        if methods is None or name == "backprop" or name in methods
    }
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64 * steps,) + shape).astype("float32")
    y = rng.integers(0, 10, size=(64 * steps,))
    models, first = {}, {}
    for name, wrapper_args in methods.items():
        keras.utils.set_random_seed(0)
        base = build()
        model = (
            base if wrapper_args is None else ForwardGradientModel(base, seed=0, **wrapper_args)
        )
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit,
        )
        timer = StepTimer(warmup_steps=2)
        model.fit(x[:128], y[:128], batch_size=64, epochs=1, verbose=0, callbacks=[timer])
        first[name] = float(sum(timer.warmup_times))
        models[name] = model
    medians = {name: [] for name in methods}
    for _ in range(rounds):
        for name, model in models.items():
            timer = StepTimer(warmup_steps=0)
            model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
            medians[name].append(timer.median_ms())
    backprop = float(np.median(medians["backprop"]))
    # Each round's ratio to backprop's round just before it: a slow spell
    # of the machine then slows both sides of a ratio.
    paired = {
        name: float(np.median(np.divide(medians[name], medians["backprop"]))) for name in methods
    }
    return [
        {
            "model": model_name,
            "jit_compile": jit,
            "optimizer": type(models[name].optimizer).__name__,
            "method": name,
            "ms_per_step": float(np.median(medians[name])),
            "vs_backprop": float(np.median(medians[name])) / backprop,
            "paired_vs_backprop": paired[name],
            "first_two_steps_s": first[name],
            "round_medians_ms": medians[name],
        }
        for name in methods
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "cnn"])
    p.add_argument("--jit", nargs="+", choices=["on", "off"], default=["on", "off"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--methods",
        nargs="+",
        choices=sorted(METHODS),
        default=None,
        help="only these methods (and backprop); default: all",
    )
    p.add_argument(
        "--optimizer",
        choices=["adam", "sgd"],
        default="adam",
        help="every method's optimizer (default: adam)",
    )
    p.add_argument(
        "--out",
        default=f"benchmarks/results/activity_step_time_{keras.backend.backend()}.json",
    )
    args = p.parse_args()
    rows = []
    for model_name in args.models:
        for jit in args.jit:
            new = measure(
                model_name, jit == "on", args.rounds, args.steps, args.methods, args.optimizer
            )
            rows += new
            print(
                f"{'model':<5} {'jit':<5} {'method':<22} {'ms/step':>9} {'vs backprop':>11} "
                f"{'paired':>7}"
            )
            for r in new:
                print(
                    f"{r['model']:<5} {str(r['jit_compile']):<5} {r['method']:<22} "
                    f"{r['ms_per_step']:>9.1f} {r['vs_backprop']:>11.2f} "
                    f"{r['paired_vs_backprop']:>7.2f}",
                    flush=True,
                )
    report = {
        "batch_size": 64,
        "optimizer": args.optimizer,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "backend": _backend_version(),
        "keras": keras.__version__,
        "commit": code_version(os.path.dirname(os.path.abspath(__file__))),
        "results": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
