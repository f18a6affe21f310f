"""What local losses reach with exact local gradients: the ceiling of
activity perturbation with local losses on a model.

Builds the blocks and heads `ForwardGradientModel(perturbation=
"activations", local_losses=...)` builds (a `LocalHead` per block but the
last, `tf.stop_gradient` between blocks), but trains each block on its
own loss with its exact gradient (backprop inside the block), Adam with
cosine decay, batch 64. With random-sign tangents and one local loss per
unit (`local_loss_groups="channels"`, `local_loss_patches="positions"`)
activity perturbation computes exactly this gradient. Evaluated like `benchmarks/learning.py` (test
accuracy after every epoch against training seconds), so a forward-gradient
run and this one differ only in the estimate: the gap between them is the
estimator's noise; the gap between this one and backprop is what training
blocks greedily from small heads costs.

Usage:
    python benchmarks/local_loss_ceiling.py --data-dir ../shared/data \
        [--model mlp|cnn|vgg|encoder] [--local-losses layers|auto] [--epochs N] \
        [--train-size N] [--test-size N] [--local-head-units N] [--no-jit-compile]
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

from keras_fwdgrad import ForwardGradientModel  # noqa: E402
from keras_fwdgrad import activity  # noqa: E402
from keras_fwdgrad import graph  # noqa: E402
from keras_fwdgrad.research import architectures  # noqa: E402
from keras_fwdgrad.research import datasets  # noqa: E402
from keras_fwdgrad.research import learning  # noqa: E402

MODELS = {
    "mlp": architectures.mlp,
    "cnn": architectures.mnist_cnn,
    "vgg": architectures.cifar10_vgg,
    "encoder": architectures.mnist_encoder,
}


def greedy_model(base, local_losses, local_head_units=None):
    """`(training model, heads)`: a functional model with the outputs of
    `base` and of one head per block, blocks separated by
    `stop_gradient`, for a `Sequential` or functional `base`."""
    wrapper = ForwardGradientModel(
        base,
        perturbation="activations",
        local_losses=local_losses,
        local_head_units=local_head_units,
    )
    ends = activity.block_ends(base, local_losses)
    heads = wrapper.local_heads
    outputs = []

    def call(layer, args, kwargs):
        y = layer(*args, **kwargs)
        if getattr(layer, "name", None) in ends and len(outputs) < len(ends):
            outputs.append(heads[len(outputs)](y))
            y = keras.ops.stop_gradient(y)
        return y

    inputs = keras.Input(base.input_shape[1:])
    x = graph.run(base, inputs, call)
    return keras.Model(inputs, [x] + outputs), heads


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get(datasets.DATA_DIR_ENV))
    p.add_argument("--model", choices=sorted(MODELS), default="cnn")
    p.add_argument("--local-losses", choices=("layers", "auto"), default="layers")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-head-units", type=int, default=None)
    p.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default="benchmarks/results/learning/local_loss_ceiling.json")
    args = p.parse_args()

    started_at = learning.code_version()
    dataset = "cifar10" if args.model == "vgg" else "mnist"
    data = learning.normalized_arrays(
        dataset, args.data_dir, train_size=args.train_size, test_size=args.test_size
    )
    keras.utils.set_random_seed(args.seed)
    base = MODELS[args.model]()
    model, heads = greedy_model(base, args.local_losses, args.local_head_units)
    steps = len(data["x_train"]) // 64
    schedule = keras.optimizers.schedules.CosineDecay(
        args.learning_rate, decay_steps=args.epochs * steps
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=[loss] * (1 + len(heads)),
        jit_compile=args.jit_compile,
    )
    base.compile(loss=loss, metrics=["accuracy"], jit_compile=args.jit_compile)
    curve = learning.TestCurve(data["x_test"], data["y_test"], base)
    model.fit(
        data["x_train"],
        [data["y_train"]] * (1 + len(heads)),
        batch_size=64,
        epochs=args.epochs,
        shuffle=True,
        verbose=0,
        callbacks=[curve],
    )
    results = learning.load_runs(args.out)
    head = f"/head_units{args.local_head_units}" if args.local_head_units else ""
    name = f"{args.model}/{args.local_losses}{head}/lr{args.learning_rate:g}/seed{args.seed}"
    results[name] = {
        "method": (
            f"exact local gradients, local_losses={args.local_losses!r}, "
            f"local_head_units={args.local_head_units!r}"
        ),
        "seed": args.seed,
        "commit": started_at,
        "settings": {
            "model": args.model,
            "train_size": len(data["x_train"]),
            "test_size": len(data["x_test"]),
            "batch_size": 64,
            "adam": {"learning_rate": args.learning_rate},
            "epochs": args.epochs,
            "clipping": "none",
            "jit_compile": args.jit_compile,
            "local_head_units": args.local_head_units,
        },
        "curve": curve.points,
        "median_step_seconds": curve.median_step_seconds(),
        "summary": learning.summarize(curve.points),
    }
    learning.save_runs(args.out, results)
    print(name, results[name]["summary"])


if __name__ == "__main__":
    main()
