"""Forward gradient vs backpropagation: logistic regression on MNIST.

First paper, Section 5.3 (Fig. 3): multinomial logistic regression, SGD
with learning rate 1e-4 and decay η_i = η0·e^(−ik), k = 1e-4, batch 64,
the same number of iterations for both methods. Reports the step costs
(base time, Rf, Rb, Rf/Rb, peak memory), the validation loss against
iterations and training time (figure), Tf/Tb, and test loss/accuracy.
The training itself, `compile()` and `fit()` per method and seed, is
`compare_training` below; `common.py` loads the data, measures the step
costs and writes the outputs.

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

keras = common.deferred("keras")
architectures = common.deferred("keras_fwdgrad.research.architectures")
experiments = common.deferred("keras_fwdgrad.research.experiments")
measures = common.deferred("keras_fwdgrad.research.measures")

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


def compare_training(
    build_model, train, val, loss, methods, epochs, seeds, test, eval_every, jit_compile
):
    """Trains every method on every seed with `fit()`, then compares them.

    For each seed, the methods run one after the other from identical
    initial weights and see the same batches, the same number of
    iterations. Validation loss is recorded every `eval_every` steps
    against iterations and training time; the summary has the mean ± std
    over seeds and the first paper's `Tf/Tb`. The other examples call
    `keras_fwdgrad.research.experiments.compare_training`, which does the
    same.
    """
    runs = []
    for seed in seeds:
        for spec in methods:
            keras.utils.set_random_seed(seed)
            # Backprop trains the model itself; a forward method wraps it in
            # a `ForwardGradientModel` with the spec's direction family.
            model = experiments.build_training_model(spec, build_model(), seed=seed)
            model.compile(
                optimizer=experiments.make_method_optimizer(spec),
                loss=loss,
                metrics=["accuracy"],
                jit_compile=jit_compile,
            )
            trace = measures.TrainingTrace(val, loss=loss, eval_every=eval_every)
            # `train` is a dataset that shuffles itself.
            model.fit(train, epochs=epochs, callbacks=[trace], shuffle=False, verbose=0)
            run = experiments.record_run(spec, seed, trace, model, test)
            runs.append(run)
            print(
                f"  seed {seed} {spec['label']:<22} steps {run['steps']:>6} "
                f"val loss {run['val_loss'][-1]:.4f} test loss {run['test_loss']:.4f} "
                f"{run['ms_per_step']:.2f} ms/step",
                flush=True,
            )
    labels = [spec["label"] for spec in methods]
    return {"runs": runs, "summary": experiments.summarize(runs, labels)}


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
        compare=compare_training,
    )


if __name__ == "__main__":
    main()
