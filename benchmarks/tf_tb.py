"""The first paper's Tf/Tb from an example's `results.json`, with what a
reader needs to judge it: where backprop's validation loss was lowest, and
how far each forward method stayed from it when it never got there.

For each configuration and method of the run (`examples/mnist_logreg.py`,
`mnist_mlp.py`, `mnist_cnn.py`, `cifar10_vgg.py`), from the validation
losses averaged over seeds:

- backprop's lowest validation loss, the iteration and training time
  (`Tb`) at which it came, the length of the run, and how much backprop's
  loss fell over the last 10 % of the iterations (near 0: the run was long
  enough for backprop to reach its lowest loss; the papers' schedule
  η_i = η0·e^(−ik) has then spent `1 − e^(−k·steps)` of its total step);
- per forward method: `Tf/Tb` when it reached that loss, else "not
  reached" with its own lowest validation loss and the gap, and the
  iteration and time at which backprop first got down to the forward
  method's lowest loss (how much of backprop's run the forward run was
  worth), and the first iteration at which its validation loss was not
  finite (a diverged run).

Usage:
    python benchmarks/tf_tb.py docs/results/mnist_mlp_long/results.json
"""

import json
import math
import sys


def rows(report):
    out = []
    for config in report["configs"]:
        summary = config["summary"]
        methods = {m["label"]: m for m in config["methods"]}
        bp = summary["backprop"]
        steps, losses = bp["eval_steps"], bp["mean_val_loss"]
        times = bp["mean_eval_times"]
        best = min(range(len(losses)), key=losses.__getitem__)
        tail = next(i for i, s in enumerate(steps) if s >= 0.9 * steps[-1])
        decay = methods["backprop"]["decay"]
        base = {
            "config": config["name"],
            "steps": steps[-1],
            "backprop_best_val_loss": losses[best],
            "backprop_best_step": steps[best],
            "Tb_s": times[best],
            "backprop_last_10pct_drop": losses[tail] - losses[-1],
            "schedule_spent": 1 - math.exp(-decay * steps[-1]) if decay else None,
        }
        for label, s in summary.items():
            if label == "backprop":
                continue
            finite = [v for v in s["mean_val_loss"] if math.isfinite(v)]
            f_best = min(finite)
            diverged = next(
                (steps[i] for i, v in enumerate(s["mean_val_loss"]) if not math.isfinite(v)), None
            )
            caught = next((i for i, v in enumerate(losses) if v <= f_best), None)
            out.append(
                {
                    **base,
                    "method": label,
                    "ms_per_step": s["ms_per_step"],
                    "backprop_ms_per_step": bp["ms_per_step"],
                    "Tf_s": s.get("Tf"),
                    "Tf/Tb": s.get("Tf/Tb"),
                    "forward_best_val_loss": f_best,
                    "gap": None if s.get("Tf") is not None else f_best - losses[best],
                    "backprop_step_at_forward_best": None if caught is None else steps[caught],
                    "backprop_time_at_forward_best": None if caught is None else times[caught],
                    "first_non_finite_step": diverged,
                }
            )
    return out


def main(argv):
    for path in argv:
        with open(path) as f:
            report = json.load(f)
        print(f"{path} (commit {report.get('commit')}, seeds {report['seeds']}):")
        for r in rows(report):
            result = (
                f"Tf/Tb {r['Tf/Tb']:.3f} (Tf {r['Tf_s']:.1f} s)"
                if r["Tf/Tb"] is not None
                else f"not reached: lowest {r['forward_best_val_loss']:.4f}, {r['gap']:.4f} above"
                f" (backprop there at step {r['backprop_step_at_forward_best']},"
                f" {r['backprop_time_at_forward_best']:.1f} s)"
            )
            if r["first_non_finite_step"] is not None:
                result += f", not finite from step {r['first_non_finite_step']}"
            spent = (
                ""
                if r["schedule_spent"] is None
                else f", schedule {r['schedule_spent']:.1%} spent"
            )
            print(
                f"  [{r['config']}] {r['method']}: {result}; backprop lowest "
                f"{r['backprop_best_val_loss']:.4f} at step {r['backprop_best_step']} of "
                f"{r['steps']} (Tb {r['Tb_s']:.1f} s), fell {r['backprop_last_10pct_drop']:.4f} "
                f"over the last 10 %{spent}; ms/step {r['ms_per_step']:.2f} vs backprop "
                f"{r['backprop_ms_per_step']:.2f}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
