"""Figures in the style of the first paper (needs matplotlib).

Install with `pip install "keras-fwdgrad[examples]"`. Every function writes
a PNG and returns its path.
"""

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "Plotting needs matplotlib: pip install 'keras-fwdgrad[examples]'"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain(x):
    if 1 <= x < 1e6 and x == round(x):
        return f"{x:.0f}"
    return f"{x:.3g}"


def _log_axis(ax, which):
    """A log-scale axis with plain decimal tick labels ("2.6", "0.3", "100"),
    not mantissa-exponent ones ("2.63×10⁰"). Matplotlib's choice of which
    ticks to label (minor ones only over a narrow range) is kept."""
    from matplotlib import ticker

    class Plain(ticker.LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            return _plain(x)

    getattr(ax, f"set_{which}scale")("log")
    axis = ax.yaxis if which == "y" else ax.xaxis
    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False))


def plot_loss_curves(summary, path, title=""):
    """Validation loss per iteration and per training time, mean ± std.

    Args:
        summary: The `"summary"` of `experiments.compare_training`.
        path: Output PNG path.
        title: Figure title.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, s in summary.items():
        mean = np.asarray(s["mean_val_loss"])
        std = np.asarray(s["std_val_loss"])
        for ax, xs in zip(axes, (s["eval_steps"], s["mean_eval_times"])):
            (line,) = ax.plot(xs, mean, label=label)
            ax.fill_between(xs, mean - std, mean + std, alpha=0.25, color=line.get_color())
        if label != "backprop" and s.get("Tb") is not None:
            axes[1].axvline(s["Tb"], color="gray", ls=":", lw=1)
            if s.get("Tf") is not None:
                axes[1].axvline(s["Tf"], color=line.get_color(), ls=":", lw=1)
    axes[0].set_xlabel("iteration")
    excluded = all(s.get("compile_excluded", True) for s in summary.values())
    axes[1].set_xlabel(
        "training time (s, compile excluded)"
        if excluded
        else "training time (s, compile included: runs no longer than the warm-up)"
    )
    for ax in axes:
        ax.set_ylabel("validation loss")
        _log_axis(ax, "y")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_test_function(f, result, path, title="", bounds=((-4.5, 4.5), (-4.5, 4.5)), minimum=None):
    """Loss per iteration and trajectories over a contour plot.

    Args:
        f: The test function (NumPy-compatible, takes `[x, y]`).
        result: The dict returned by `objectives.optimize`.
        path: Output PNG path.
        title: Figure title.
        bounds: `((xmin, xmax), (ymin, ymax))` of the contour plot.
        minimum: Optional `(x, y)` of the global minimum, marked with a star.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, color in (("forward", "C0"), ("backprop", "C1")):
        losses = np.asarray(result[name])
        label = "forward gradient" if name == "forward" else "gradient descent"
        for i, run in enumerate(losses):
            axes[0].plot(run, color=color, alpha=0.5, lw=0.8, label=label if i == 0 else None)
        for i, path_ in enumerate(np.asarray(result[f"{name}_path"])):
            axes[1].plot(path_[:, 0], path_[:, 1], color=color, alpha=0.6, lw=0.8)
    _log_axis(axes[0], "y")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("f")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    (x0, x1), (y0, y1) = bounds
    gx, gy = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
    gz = np.asarray(f(np.stack([gx, gy], axis=-1)))
    axes[1].contour(gx, gy, np.log1p(gz), levels=30, cmap="viridis", linewidths=0.6)
    if minimum is not None:
        axes[1].plot(*minimum, "r*", ms=12)
    axes[1].set_xlim(x0, x1)
    axes[1].set_ylim(y0, y1)
    axes[1].set_xlabel("x")
    axes[1].set_ylabel("y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_depth_sweep(rows, path, title=""):
    """Rf, Rb, Rf/Rb and peak memory against depth (first paper, Fig. 6).

    Args:
        rows: Dicts with `depth` and, per method, `Rf`, `Rb`, `Rf/Rb` (and
            optional `*_std`), `forward_peak_mb`, `backprop_peak_mb`.
        path: Output PNG path.
        title: Figure title.
    """
    plt = _pyplot()
    depth = [r["depth"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, ax in (("Rf", axes[0]), ("Rb", axes[0]), ("Rf/Rb", axes[1])):
        mean = np.array([r[key] for r in rows])
        std = np.array([r.get(f"{key}_std", 0.0) for r in rows])
        (line,) = ax.plot(depth, mean, marker="o", label=key)
        ax.fill_between(depth, mean - std, mean + std, alpha=0.25, color=line.get_color())
    axes[1].axhline(1.0, color="gray", ls=":")
    for key in ("forward_peak_mb", "backprop_peak_mb"):
        axes[2].plot(depth, [r[key] for r in rows], marker="o", label=key.split("_")[0])
    axes[2].set_ylabel("peak memory (MB)")
    axes[0].set_ylabel("time / base time")
    axes[1].set_ylabel("Rf/Rb")
    for ax in axes:
        ax.set_xlabel("layers")
        _log_axis(ax, "x")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
