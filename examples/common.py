"""What every example shares: flags, budgets, data, outputs.

Every example takes the same flags:

    --smoke | (default) | --full   budget: seconds / minutes on a CPU / papers
    --out DIR                      where results.json, results.csv, *.png go
    --seed N  --num-seeds N        seeds N, N+1, ... (mean ± std in figures)
    --data-dir DIR                 folder with mnist.npz / cifar10_jpeg.npz
    --optimizer {sgd,nesterov,adam}
    --direction NAME [NAME ...]    direction families of the forward gradient
    --jit / --no-jit               XLA-compile the training steps
    --epochs N                     override the budget's epochs
"""

import argparse
import csv
import importlib
import json
import os
import platform

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow's C++ start-up lines (oneDNN, CUDA probing) are not ours to show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow keeps allocator statistics on the CPU (the step memory measured
# here) only with its BFC allocator, its default only where oneDNN is on (not
# on every processor).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")


class deferred:
    """A module imported on first use, so that `--help` and argument errors
    answer at once instead of after TensorFlow's start-up (seconds)."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


keras = deferred("keras")
np = deferred("numpy")
tf = deferred("tensorflow")
datasets = deferred("keras_fwdgrad.research.datasets")
directions = deferred("keras_fwdgrad.directions")
experiments = deferred("keras_fwdgrad.research.experiments")
optimizers = deferred("keras_fwdgrad.optimizers")
plotting = deferred("keras_fwdgrad.research.plotting")
profiling = deferred("keras_fwdgrad.research.profiling")

OPTIMIZER_NAMES = ("sgd", "nesterov", "adam")  # optimizers.OPTIMIZERS
DATA_DIR_ENV = "KERAS_FWDGRAD_DATA_DIR"  # datasets.DATA_DIR_ENV


def loss():
    """The examples' loss: cross-entropy on logits."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _direction_name(value):
    """`--direction` values, checked against the registered families when
    parsed (not when `--help` is shown)."""
    available = directions.available()
    if value not in available:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {value!r} (choose from {', '.join(available)})"
        )
    return value


def parser(description, default_out, default_direction=("gaussian",), several_optimizers=False):
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--smoke", action="store_true", help="tiny run (10-90 s on 2 CPU cores; see above)"
    )
    budget.add_argument("--full", action="store_true", help="the papers' budget (GPU)")
    p.add_argument("--out", default=default_out, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--num-seeds", type=int, default=None, help="number of seeds")
    p.add_argument(
        "--data-dir",
        default=None,
        help=f"folder with mnist.npz / cifar10_jpeg.npz (or set {DATA_DIR_ENV})",
    )
    if several_optimizers:
        p.add_argument(
            "--optimizer",
            nargs="+",
            choices=OPTIMIZER_NAMES,
            default=list(OPTIMIZER_NAMES),
        )
    else:
        p.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="sgd")
    p.add_argument(
        "--direction",
        nargs="+",
        default=list(default_direction),
        type=_direction_name,
        metavar="NAME",
        help="direction families of the forward gradient "
        "(keras_fwdgrad.directions.available(); default: %(default)s)",
    )
    p.add_argument("--jit", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--epochs", type=int, default=None, help="override the budget")
    p.add_argument(
        "--jvp-clip",
        type=float,
        default=None,
        help="cap on |∇f·v| for every forward method (default: the experiment's own)",
    )
    return p


def budget_name(args):
    return "smoke" if args.smoke else "full" if args.full else "default"


def seeds(args, budget):
    n = args.num_seeds or budget["seeds"]
    return list(range(args.seed, args.seed + n))


def data_source(args, name):
    """Local copy when one is given, tensorflow-datasets for `--full` or
    CIFAR-10, else MNIST's bundled subset (offline)."""
    if args.data_dir or os.environ.get(datasets.DATA_DIR_ENV):
        return "local"
    if args.full or name != "mnist":
        return "auto"
    return "bundled"


def describe_data(args, name, source):
    if source == "local":
        return f"{name} from {args.data_dir or os.environ.get(datasets.DATA_DIR_ENV)}"
    if source == "bundled":
        return "MNIST subset bundled with keras-fwdgrad (10,000 train / 2,000 test)"
    return f"{name} from tensorflow-datasets"


def machine():
    gpus = tf.config.list_physical_devices("GPU")
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "gpus": [
            tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus
        ],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }
    return info


def configure_method(config, gradient, optimizer, direction=None, **extra):
    """One `experiments.method` from a paper's per-gradient settings.

    The papers give SGD settings; for `nesterov` without a momentum we use
    0.9, for `adam` Keras' defaults, at the same learning rate.
    """
    settings = dict(config[gradient])
    if optimizer == "nesterov":
        settings.setdefault("momentum", 0.9)
    if optimizer != "nesterov":
        settings.pop("momentum", None)
    if optimizer != "adam":
        settings.pop("beta_1", None)
        settings.pop("beta_2", None)
    if gradient == "forward":
        if extra.get("jvp_clip") is not None:
            settings["jvp_clip"] = extra.pop("jvp_clip")
        extra.pop("jvp_clip", None)
        return experiments.method(
            "forward", optimizer=optimizer, direction=direction, **settings, **extra
        )
    settings.pop("jvp_clip", None)
    return experiments.method("backprop", optimizer=optimizer, **settings)


def run_classification(
    args, *, experiment, title, dataset, build_model, configs, budgets, compare=None
):
    """Profiles the step costs, trains every method, writes and prints.

    Args:
        args: Parsed flags.
        experiment: Short name (file names, JSON).
        title: Human-readable title of the figures and table.
        dataset: `"mnist"` or `"cifar10"`.
        build_model: Callable returning the Keras model.
        configs: List of dicts `{"name", "forward": {...}, "backprop":
            {...}}` with `learning_rate`, `decay` and optionally
            `jvp_clip`, `clipnorm`, `momentum`, `beta_1`, `beta_2`.
        budgets: Dict `smoke`/`default`/`full` of dicts with `epochs`,
            `seeds`, `train_size`, `test_size`, `val_batches`,
            `eval_every`, `profile_steps`, `profile_repeats`.
        compare: What trains and compares the methods of one config,
            called as `experiments.compare_training` is (the default).
    """
    compare = compare or experiments.compare_training
    name = budget_name(args)
    budget = dict(budgets[name])
    if args.epochs:
        budget["epochs"] = args.epochs
    source = data_source(args, dataset)
    train, val, test = datasets.make_datasets(
        dataset,
        batch_size=64,
        data_dir=args.data_dir,
        source=source,
        train_size=budget.get("train_size"),
        test_size=budget.get("test_size"),
        seed=args.seed,
        drop_remainder=True,  # One step shape: XLA compiles once.
    )
    if budget.get("val_batches"):
        val = val.take(budget["val_batches"]).cache()
    os.makedirs(args.out, exist_ok=True)
    run_seeds = seeds(args, budget)
    print(
        f"{title}: budget={name}, epochs={budget['epochs']}, seeds={run_seeds}, "
        f"optimizer={args.optimizer}, jit_compile={args.jit}, batch 64\n"
        f"data: {describe_data(args, dataset, source)}",
        flush=True,
    )

    # Step costs on one training batch (first paper's Rf, Rb, Rf/Rb).
    x, y = next(iter(train))
    costs = profiling.profile_step_costs(
        build_model,
        x,
        y,
        loss(),
        directions=args.direction,
        optimizer=lambda: optimizers.make_optimizer(args.optimizer, 1e-6),
        jit_compile=args.jit,
        steps=budget["profile_steps"],
        repeats=budget["profile_repeats"],
        seed=args.seed,
    )
    keras.backend.clear_session()

    report = {
        "experiment": experiment,
        "title": title,
        "budget": name,
        "epochs": budget["epochs"],
        "seeds": run_seeds,
        "optimizer": args.optimizer,
        "jit_compile": args.jit,
        "batch_size": 64,
        "data": describe_data(args, dataset, source),
        "machine": machine(),
        "step_costs": costs,
        "configs": [],
    }
    rows = []
    for config in configs:
        print(f"[{config['name']}]", flush=True)
        methods = [
            configure_method(
                config, "forward", args.optimizer, direction=d, jvp_clip=args.jvp_clip
            )
            for d in args.direction
        ] + [configure_method(config, "backprop", args.optimizer)]
        result = compare(
            build_model,
            train,
            val,
            loss(),
            methods,
            epochs=budget["epochs"],
            seeds=run_seeds,
            test=test,
            eval_every=budget["eval_every"],
            jit_compile=args.jit,
        )
        keras.backend.clear_session()
        figure = os.path.join(args.out, f"{experiment}_{_slug(config['name'])}.png")
        plotting.plot_loss_curves(
            result["summary"], figure, f"{title}, {config['name']} ({name} budget)"
        )
        report["configs"].append(
            {
                "name": config["name"],
                "methods": methods,
                "figure": os.path.basename(figure),
                **result,
            }
        )
        for spec in methods:
            s = result["summary"][spec["label"]]
            key = "backprop" if spec["gradient"] == "backprop" else f"forward-{spec['direction']}"
            c = costs["methods"][key]
            ratios = costs["ratios"].get(key, {})
            rows.append(
                {
                    "experiment": experiment,
                    "budget": name,
                    "config": config["name"],
                    "method": spec["label"],
                    "optimizer": spec["optimizer"],
                    "learning_rate": spec["learning_rate"],
                    "decay": spec["decay"],
                    "epochs": budget["epochs"],
                    "steps": s["eval_steps"][-1],
                    "seeds": len(run_seeds),
                    "test_loss": s["test_loss"],
                    "test_loss_std": s["test_loss_std"],
                    "test_accuracy": s["test_accuracy"],
                    "final_val_loss": s["final_val_loss"],
                    "fit_ms_per_step": s["ms_per_step"],
                    "base_ms": costs["methods"]["base"]["ms"],
                    "step_ms": c["ms"],
                    "R": c["R"],
                    "Rf/Rb": ratios.get("Rf/Rb"),
                    "Tb_s": s.get("Tb"),
                    "Tf_s": s.get("Tf"),
                    "Tf/Tb": _tf_tb(spec, s),
                    "peak_mb": None if c["peak_bytes"] is None else c["peak_bytes"] / 2**20,
                    "compile_s": c["compile_s"],
                }
            )
    report["rows"] = rows
    write_outputs(args.out, report, rows)
    print_costs(costs)
    print_rows(
        rows,
        ["config", "method", "learning_rate", "steps", "test_loss", "test_accuracy", "Tf/Tb"],
    )
    return report


def _tf_tb(spec, summary):
    if spec["gradient"] == "backprop":
        return None
    if summary.get("Tf/Tb") is None:
        return "not reached"
    return summary["Tf/Tb"]


def _slug(text):
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def code_version():
    """The commit the examples run from (`+changes` when its tracked code,
    `.py` and `.toml` files, differs from it), or `None` outside a git
    checkout."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/*.py", ":/*.toml"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if dirty else "")


# The code this process runs, read when it starts (a commit made while it
# runs does not describe it).
_STARTED_AT = code_version()


def write_outputs(out, report, rows):
    os.makedirs(out, exist_ok=True)
    report.setdefault("commit", _STARTED_AT)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(_jsonable(report), f, indent=1)
    if rows:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(os.path.join(out, "results.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(_jsonable(rows))
    print(f"Wrote {os.path.join(out, 'results.json')} and results.csv", flush=True)


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_rows(rows, columns):
    table = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


def print_costs(costs):
    print(
        f"Step costs on one batch of {costs['batch_size']} ({costs['parameters']:,} "
        f"parameters, jit_compile={costs['jit_compile']}, medians of "
        f"{costs['repeats']} interleaved rounds x {costs['steps']} steps):"
    )
    rows = []
    for name, c in costs["methods"].items():
        ratios = costs["ratios"].get(name, {})
        rows.append(
            {
                "method": name,
                "ms": c["ms"],
                "R": c["R"],
                "Rf/Rb": ratios.get("Rf/Rb"),
                "peak_mb": None if c["peak_bytes"] is None else c["peak_bytes"] / 2**20,
                "compile_s": c["compile_s"],
            }
        )
    print_rows(rows, ["method", "ms", "R", "Rf/Rb", "peak_mb", "compile_s"])
