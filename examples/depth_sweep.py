"""Step cost and memory against depth: MLPs of 1 to 100 layers.

First paper, Section 5.6 (Fig. 6): bias-free MLPs with `depth` hidden
layers of width 1024 on MNIST-shaped input, batch 64. For each depth,
measures the base time (forward pass + loss), Rf, Rb, Rf/Rb (mean ± std
over interleaved rounds, each round one independent measurement), and the
peak memory of a forward-gradient and of a backpropagation step. Timing
does not depend on the data's values, so a fixed random batch is used.

Budgets:
- `--smoke`: depths 1 and 2, 3 rounds of 5 steps (9 s on a 2-core CPU).
- default: depths 1, 2, 4, 8, 16, 32, 7 rounds (minutes on a 2-core CPU).
- `--full`: depths 1, 2, 3, 5, 10, 20, 50, 100, 10 rounds (the paper's
  range and its ten runs).

`--direction` may list several families; the figure uses the first.
`--batch-size` changes the batch (for example 1024, where activations,
which backprop keeps for its backward pass, dominate the memory) and
`--rounds` / `--steps` the timing budget.

Usage:
    python examples/depth_sweep.py
    python examples/depth_sweep.py --full --direction gaussian rademacher
"""

import functools
import os

import common

keras = common.deferred("keras")
np = common.deferred("numpy")
architectures = common.deferred("keras_fwdgrad.research.architectures")
optimizers = common.deferred("keras_fwdgrad.optimizers")
plotting = common.deferred("keras_fwdgrad.research.plotting")
profiling = common.deferred("keras_fwdgrad.research.profiling")

BUDGETS = {
    "smoke": dict(depths=[1, 2], rounds=3, steps=5),
    "default": dict(depths=[1, 2, 4, 8, 16, 32], rounds=7, steps=5),
    "full": dict(depths=[1, 2, 3, 5, 10, 20, 50, 100], rounds=10, steps=10),
}


def main(argv=None):
    p = common.parser(__doc__, "out/depth_sweep")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="override the budget")
    p.add_argument("--batch-size", type=int, default=64, help="default: 64 (the paper's)")
    p.add_argument("--rounds", type=int, default=None, help="override the budget")
    p.add_argument("--steps", type=int, default=None, help="steps per round; override")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be a positive integer; got {args.batch_size}")
    name = common.budget_name(args)
    budget = dict(BUDGETS[name])
    budget.update({k: getattr(args, k) for k in ("rounds", "steps") if getattr(args, k)})
    depths = args.depths or budget["depths"]
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(args.batch_size, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=(args.batch_size,))
    os.makedirs(args.out, exist_ok=True)
    rows, raw = [], {}
    print(
        f"Depth sweep, budget={name}, depths={depths}, optimizer={args.optimizer}, "
        f"jit_compile={args.jit}, batch {args.batch_size}, {budget['rounds']} rounds",
        flush=True,
    )
    for depth in depths:
        costs = profiling.profile_step_costs(
            functools.partial(architectures.deep_mlp, depth),
            x,
            y,
            common.loss(),
            directions=args.direction,
            optimizer=lambda: optimizers.make_optimizer(args.optimizer, 1e-6),
            jit_compile=args.jit,
            steps=budget["steps"],
            repeats=budget["rounds"],
            seed=args.seed,
        )
        keras.backend.clear_session()
        raw[depth] = costs
        m = costs["methods"]
        base = np.asarray(m["base"]["ms_rounds"])
        back = np.asarray(m["backprop"]["ms_rounds"])
        for direction in args.direction:
            fwd = np.asarray(m[f"forward-{direction}"]["ms_rounds"])
            mb = lambda c: None if c["peak_bytes"] is None else c["peak_bytes"] / 2**20  # noqa: E731
            row = {
                "depth": depth,
                "direction": direction,
                "parameters": costs["parameters"],
                "base_ms": m["base"]["ms"],
                "Rf": float(np.mean(fwd / base)),
                "Rf_std": float(np.std(fwd / base)),
                "Rb": float(np.mean(back / base)),
                "Rb_std": float(np.std(back / base)),
                "Rf/Rb": float(np.mean(fwd / back)),
                "Rf/Rb_std": float(np.std(fwd / back)),
                "forward_ms": m[f"forward-{direction}"]["ms"],
                "backprop_ms": m["backprop"]["ms"],
                "forward_peak_mb": mb(m[f"forward-{direction}"]),
                "backprop_peak_mb": mb(m["backprop"]),
            }
            row["memory_ratio"] = (
                None
                if row["forward_peak_mb"] is None
                else row["forward_peak_mb"] / row["backprop_peak_mb"]
            )
            rows.append(row)
            print(
                f"  depth {depth:>3} {direction:<11} Rf {row['Rf']:.2f}  Rb {row['Rb']:.2f}  "
                f"Rf/Rb {row['Rf/Rb']:.2f}",
                flush=True,
            )
    figure = os.path.join(args.out, "depth_sweep.png")
    first = [r for r in rows if r["direction"] == args.direction[0]]
    plotting.plot_depth_sweep(
        first,
        figure,
        f"MLP width 1024, batch {args.batch_size}, forward ({args.direction[0]}) vs backprop",
    )
    report = {
        "experiment": "depth_sweep",
        "budget": name,
        "optimizer": args.optimizer,
        "jit_compile": args.jit,
        "batch_size": args.batch_size,
        "machine": common.machine(),
        "rows": rows,
        "step_costs": {str(k): v for k, v in raw.items()},
        "figure": os.path.basename(figure),
    }
    common.write_outputs(args.out, report, rows)
    common.print_rows(
        rows,
        [
            "depth",
            "direction",
            "parameters",
            "base_ms",
            "Rf",
            "Rb",
            "Rf/Rb",
            "forward_peak_mb",
            "backprop_peak_mb",
            "memory_ratio",
        ],
    )
    return report


if __name__ == "__main__":
    main()
