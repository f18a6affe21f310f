"""Forward gradient descent vs gradient descent on Beale and Rosenbrock.

First paper, Section 5.1 (Fig. 2): plain descent with a constant learning
rate, Beale at 0.01 and Rosenbrock (a = 1, b = 100) at 5e-4, ten
independent forward-gradient runs from one starting point. Plots the loss
per iteration and the trajectories over the function's contours, and
reports the final loss (mean ± std over runs) and distance to the minimum.

The paper's text does not give its iteration counts or starting points;
we start Beale at (1, 1) and Rosenbrock at (-0.5, 1.5).

Budgets:
- `--smoke`: 100 / 200 iterations, 3 runs (10 s on a 2-core CPU).
- default: 2,000 / 4,000 iterations, 10 runs (seconds).
- `--full`: 10,000 / 20,000 iterations, 10 runs.

`--optimizer` must be `sgd` (the paper uses plain descent) and
`--data-dir` is ignored.

Usage:
    python examples/test_functions.py --direction gaussian rademacher
"""

import os
import time

import common

np = common.deferred("numpy")
objectives = common.deferred("keras_fwdgrad.research.objectives")
plotting = common.deferred("keras_fwdgrad.research.plotting")

PROBLEMS = {
    "beale": dict(
        f="beale",
        lr=0.01,
        start=(1.0, 1.0),
        minimum="BEALE_MINIMUM",
        bounds=((-4.5, 4.5), (-4.5, 4.5)),
    ),
    "rosenbrock": dict(
        f="rosenbrock",
        lr=5e-4,
        start=(-0.5, 1.5),
        minimum="ROSENBROCK_MINIMUM",
        bounds=((-2.0, 2.0), (-1.0, 3.0)),
    ),
}
BUDGETS = {
    "smoke": dict(steps={"beale": 100, "rosenbrock": 200}, seeds=3),
    "default": dict(steps={"beale": 2000, "rosenbrock": 4000}, seeds=10),
    "full": dict(steps={"beale": 10000, "rosenbrock": 20000}, seeds=10),
}


def main(argv=None):
    p = common.parser(__doc__, "out/test_functions")
    args = p.parse_args(argv)
    if args.optimizer != "sgd":
        p.error("the test functions use plain gradient descent: --optimizer sgd")
    name = common.budget_name(args)
    budget = BUDGETS[name]
    runs = args.num_seeds or budget["seeds"]
    os.makedirs(args.out, exist_ok=True)
    report = {
        "experiment": "test_functions",
        "budget": name,
        "runs": runs,
        "seed": args.seed,
        "jit_compile": args.jit,
        "machine": common.machine(),
        "problems": {},
    }
    rows = []
    for problem, cfg in PROBLEMS.items():
        # Names in `objectives`, looked up now that TensorFlow may load.
        cfg = dict(
            cfg, f=getattr(objectives, cfg["f"]), minimum=getattr(objectives, cfg["minimum"])
        )
        steps = args.epochs or budget["steps"][problem]
        for direction in args.direction:
            start = time.perf_counter()
            result = objectives.optimize(
                cfg["f"],
                cfg["start"],
                cfg["lr"],
                steps,
                num_runs=runs,
                seed=args.seed,
                direction=direction,
                jit_compile=args.jit,
            )
            seconds = time.perf_counter() - start
            figure = os.path.join(args.out, f"{problem}_{direction}.png")
            plotting.plot_test_function(
                cfg["f"],
                result,
                figure,
                title=f"{problem}, lr {cfg['lr']:g}, {runs} forward-gradient runs ({direction})",
                bounds=cfg["bounds"],
                minimum=cfg["minimum"],
            )
            report["problems"][f"{problem}/{direction}"] = {
                "learning_rate": cfg["lr"],
                "start": cfg["start"],
                "steps": steps,
                "direction": direction,
                "seconds": seconds,
                "forward_loss": result["forward"],
                "backprop_loss": result["backprop"][0],
                "forward_final_point": result["forward_path"][:, -1],
                "figure": os.path.basename(figure),
            }
            for method in ("forward", "backprop"):
                final = result[method][:, -1]
                dist = np.linalg.norm(
                    result[f"{method}_path"][:, -1] - np.asarray(cfg["minimum"]), axis=-1
                )
                rows.append(
                    {
                        "problem": problem,
                        "method": "forward gradient"
                        if method == "forward"
                        else "gradient descent",
                        "direction": direction if method == "forward" else "-",
                        "learning_rate": cfg["lr"],
                        "steps": steps,
                        "runs": runs,
                        "initial_loss": float(result[method][0, 0]),
                        "final_loss_mean": float(final.mean()),
                        "final_loss_std": float(final.std()),
                        "distance_to_minimum": float(dist.mean()),
                    }
                )
    report["rows"] = rows
    common.write_outputs(args.out, report, rows)
    print(f"Test functions, budget={name}, {runs} runs")
    common.print_rows(
        rows,
        [
            "problem",
            "method",
            "direction",
            "learning_rate",
            "steps",
            "initial_loss",
            "final_loss_mean",
            "final_loss_std",
            "distance_to_minimum",
        ],
    )
    return report


if __name__ == "__main__":
    main()
