"""Train forward gradient and backpropagation side by side and compare them.

`compare_training` trains one model per method and seed with `fit()`, the
same number of iterations for every method, records validation loss
against iterations and against training time (`metrics.TrainingTrace`),
evaluates on the test split, and summarizes: mean ± std of the losses over
seeds and the first paper's `Tf/Tb`.

A method is a dict, made with `method()`:

```python
methods = [
    keras_fwdgrad.research.experiments.method("forward", learning_rate=2e-4, decay=1e-4),
    keras_fwdgrad.research.experiments.method("backprop", learning_rate=2e-4, decay=1e-4),
]
```
"""

import keras
import numpy as np

from keras_fwdgrad import optimizers
from keras_fwdgrad import options
from keras_fwdgrad.model import ForwardGradientModel
from keras_fwdgrad.research import measures

GRADIENTS = ("forward", "backprop")


# The optimizer settings a method may carry beside the learning rate, the
# decay and the clipping.
OPTIMIZER_SETTINGS = ("momentum", "beta_1", "beta_2")


def method(
    gradient,
    learning_rate,
    optimizer="sgd",
    decay=0.0,
    clipnorm=None,
    global_clipnorm=None,
    **kwargs,
):
    """Describes one training method for `compare_training`.

    Args:
        gradient: `"forward"` or `"backprop"`.
        learning_rate: Initial learning rate η0.
        optimizer: `"sgd"`, `"nesterov"` or `"adam"`. Defaults to `"sgd"`.
        decay: Per-iteration decay k of η_i = η0·e^(−ik). Defaults to `0`.
        clipnorm: Optional clipping of each variable's gradient to this
            norm (Keras' `clipnorm`).
        global_clipnorm: Optional clipping of all gradients together to
            this norm (Keras' `global_clipnorm`). At most one of the two.
        **kwargs: The optimizer's `momentum`, `beta_1` and `beta_2`, and
            any forward option of `ForwardGradientModel`
            (`keras_fwdgrad.options.names()`: `direction`,
            `num_directions`, `jvp_clip`, `perturbation`, `local_losses`,
            ...). A forward method records every forward option, with
            `ForwardGradientModel`'s default where none is given; a
            backprop method ignores them.

    Returns:
        A dict with the settings and a `"label"` such as
        `"forward (gaussian)"` or `"backprop"`.
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"`gradient` must be one of {GRADIENTS}. Received: gradient={gradient!r}")
    if optimizer not in optimizers.OPTIMIZERS:
        raise ValueError(
            f"`optimizer` must be one of {optimizers.OPTIMIZERS}. "
            f"Received: optimizer={optimizer!r}"
        )
    options.check_names(kwargs, "`method()`", also=OPTIMIZER_SETTINGS)
    forward_options, optimizer_kwargs = options.split(kwargs)
    optimizers.decay_schedule(learning_rate, decay)  # Validates both.
    spec = {
        "gradient": gradient,
        "optimizer": optimizer,
        "learning_rate": float(learning_rate),
        "decay": float(decay),
        "clipnorm": clipnorm,
        "global_clipnorm": global_clipnorm,
        **optimizer_kwargs,
    }
    if gradient == "forward":
        spec.update(options.defaults())
        spec.update(forward_options)
        spec["label"] = f"forward ({spec['direction']})"
    else:
        spec["label"] = "backprop"
    return spec


def build_training_model(spec, base, seed=None):
    """Wraps `base` as `spec` says and compiles nothing.

    Returns `base` itself for backprop, a `ForwardGradientModel` with the
    forward options of `spec` (the model's defaults for those it lacks)
    otherwise.
    """
    if spec["gradient"] == "backprop":
        return base
    forward_options, _ = options.split(spec)
    return ForwardGradientModel(base, seed=seed, **forward_options)


def make_method_optimizer(spec):
    """The stock Keras optimizer `spec` describes."""
    kwargs = {k: spec[k] for k in ("momentum", "beta_1", "beta_2") if k in spec}
    return optimizers.make_optimizer(
        spec["optimizer"],
        spec["learning_rate"],
        decay=spec["decay"],
        clipnorm=spec["clipnorm"],
        global_clipnorm=spec.get("global_clipnorm"),
        **kwargs,
    )


def compare_training(
    build_model,
    train,
    validation,
    loss,
    methods,
    epochs=1,
    seeds=(0,),
    test=None,
    metrics=("accuracy",),
    eval_every=50,
    jit_compile=True,
    steps_per_epoch=None,
    verbose=True,
):
    """Trains every method on every seed and compares them.

    For each seed, the methods run one after the other from identical
    initial weights (`keras.utils.set_random_seed(seed)` before
    `build_model()`) and see the same batches.

    Args:
        build_model: Callable returning a fresh Keras model (logits out).
        train: Training `tf.data.Dataset` of `(x, y)` batches.
        validation: Validation dataset, evaluated every `eval_every` steps.
        loss: Loss for `compile()` and for the validation curve.
        methods: List of dicts from `method()`.
        epochs: Integer. Defaults to `1`.
        seeds: Seeds to repeat the comparison with. Defaults to `(0,)`.
        test: Optional test dataset, evaluated once after training.
        metrics: Metrics for `compile()`. Defaults to `("accuracy",)`.
        eval_every: Steps between validation evaluations. Defaults to 50.
        jit_compile: Whether to XLA-compile the steps. Defaults to `True`.
        steps_per_epoch: Optional cap on the steps of each epoch.
        verbose: Whether to print one line per run. Defaults to `True`.

    Returns:
        A dict with `"runs"` (one dict per method and seed: `label`,
        `seed`, `eval_steps`, `eval_times`, `val_loss`, `test_loss`,
        `test_accuracy`, `ms_per_step`, `compile_s`, `skipped_steps`) and
        `"summary"` (see `summarize`).
    """
    if not methods:
        raise ValueError("`methods` must list at least one method.")
    labels = [m["label"] for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Method labels must be unique. Received: {labels}")
    runs = []
    for seed in seeds:
        for spec in methods:
            keras.utils.set_random_seed(seed)
            model = build_training_model(spec, build_model(), seed=seed)
            model.compile(
                optimizer=make_method_optimizer(spec),
                loss=loss,
                metrics=list(metrics),
                jit_compile=jit_compile,
            )
            trace = measures.TrainingTrace(validation, loss=loss, eval_every=eval_every)
            model.fit(
                train,
                epochs=epochs,
                steps_per_epoch=steps_per_epoch,
                callbacks=[trace],
                shuffle=False,  # `train` is a dataset: it shuffles itself.
                verbose=0,
            )
            run = record_run(spec, seed, trace, model, test)
            runs.append(run)
            if verbose:
                print(
                    f"  seed {seed} {spec['label']:<22} steps {run['steps']:>6} "
                    f"val loss {run['val_loss'][-1]:.4f} "
                    f"test loss {run.get('test_loss', float('nan')):.4f} "
                    f"{run['ms_per_step']:.2f} ms/step",
                    flush=True,
                )
    return {"runs": runs, "summary": summarize(runs, labels)}


def record_run(spec, seed, trace, model, test=None):
    """One run's record for `summarize`: the validation curve and step
    times of `trace`, the skipped steps and, with `test`, the test loss
    and accuracy.

    Args:
        spec: The method (from `method()`).
        seed: The run's seed.
        trace: The run's `measures.TrainingTrace`.
        model: The trained model (a `ForwardGradientModel` for forward
            methods).
        test: Optional test dataset, evaluated once.

    Returns:
        A dict: `label`, `seed`, `steps`, `eval_steps`, `eval_times`,
        `val_loss`, `ms_per_step`, `compile_s`, `compile_excluded`,
        `skipped_steps`, and with `test` `test_loss` (and `test_accuracy`
        when the model has that metric).
    """
    run = {
        "label": spec["label"],
        "seed": int(seed),
        "steps": len(trace.step_times),
        "eval_steps": list(trace.eval_steps),
        "eval_times": trace.eval_times(),
        "val_loss": [float(v) for v in trace.val_losses],
        "ms_per_step": 1000.0 * trace.median_step_s(),
        "compile_s": trace.compile_s,
        "compile_excluded": trace.compile_excluded,
        "skipped_steps": int(model.skipped_steps.numpy()) if spec["gradient"] == "forward" else 0,
    }
    if test is not None:
        values = model.evaluate(test, verbose=0, return_dict=True)
        run["test_loss"] = float(values["loss"])
        if "accuracy" in values:
            run["test_accuracy"] = float(values["accuracy"])
    return run


def _mean_std(values):
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if values.size == 0:
        return None, None
    return float(values.mean()), float(values.std())


def summarize(runs, labels=None):
    """Mean ± std over seeds, and `Tf/Tb` against backprop.

    `Tb` is the training time at which backprop's validation loss, averaged
    over seeds, is lowest; `Tf` the time at which a forward method's
    averaged validation loss first reaches it (first paper, Section 5.2).
    Times are averaged over seeds at each evaluation point.

    Args:
        runs: The `"runs"` of `compare_training`.
        labels: Order of the methods. Defaults to their first appearance.

    Returns:
        A dict mapping each label to `test_loss`, `test_loss_std`,
        `test_accuracy`, `final_val_loss`, `ms_per_step`, `compile_s`,
        `compile_excluded` (whether the times leave compilation out; not
        when a run was no longer than its warm-up), `eval_steps`, `mean_val_loss`, `std_val_loss`, `mean_eval_times`,
        and, for forward methods when backprop ran, `Tb`, `Tf`, `Tf/Tb`.
    """
    if labels is None:
        labels = list(dict.fromkeys(r["label"] for r in runs))
    summary = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        n = min(len(r["val_loss"]) for r in mine)
        curves = np.array([r["val_loss"][:n] for r in mine])
        times = np.array([r["eval_times"][:n] for r in mine])
        s = {
            "seeds": [r["seed"] for r in mine],
            "eval_steps": mine[0]["eval_steps"][:n],
            "mean_val_loss": curves.mean(0).tolist(),
            "std_val_loss": curves.std(0).tolist(),
            "mean_eval_times": times.mean(0).tolist(),
            "final_val_loss": float(curves[:, -1].mean()),
            "ms_per_step": float(np.median([r["ms_per_step"] for r in mine])),
            "compile_s": float(np.median([r["compile_s"] for r in mine])),
            "compile_excluded": all(r.get("compile_excluded", True) for r in mine),
            "skipped_steps": int(sum(r["skipped_steps"] for r in mine)),
        }
        s["test_loss"], s["test_loss_std"] = _mean_std(r.get("test_loss") for r in mine)
        s["test_accuracy"], s["test_accuracy_std"] = _mean_std(
            r.get("test_accuracy") for r in mine
        )
        summary[label] = s
    if "backprop" in summary:
        b = summary["backprop"]
        for label, s in summary.items():
            if label != "backprop":
                s.update(
                    measures.tf_over_tb(
                        s["mean_eval_times"],
                        s["mean_val_loss"],
                        b["mean_eval_times"],
                        b["mean_val_loss"],
                    )
                )
    return summary
