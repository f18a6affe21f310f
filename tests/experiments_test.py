"""Tests of the measurement helpers: optimizers with the papers' decay,
`TrainingTrace`, `Tf/Tb`, `compare_training` and `profile_step_costs`."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_fwdgrad.research import experiments
from keras_fwdgrad.research import measures
from keras_fwdgrad import optimizers
from keras_fwdgrad.research import profiling

L = keras.layers
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model():
    return keras.Sequential([keras.Input((6,)), L.Dense(8, activation="tanh"), L.Dense(3)])


def _dataset(n=320, batch=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(6, 3)), axis=1)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)


# --- optimizers ---------------------------------------------------------


def test_decay_schedule_follows_eta0_exp_minus_ik():
    schedule = optimizers.decay_schedule(2e-4, 1e-4)
    # Keras stores e^(-k) in float32 (relative rounding up to 2^-24 ≈ 6e-8)
    # and raises it to the i-th power: relative error up to i·6e-8.
    for i in (0, 1, 1000, 25000):
        np.testing.assert_allclose(
            float(schedule(i)), 2e-4 * math.exp(-i * 1e-4), rtol=1e-6 + i * 6e-8
        )
    assert optimizers.decay_schedule(0.1, 0.0) == 0.1


@pytest.mark.parametrize(
    "name, cls, nesterov",
    [
        ("sgd", keras.optimizers.SGD, False),
        ("nesterov", keras.optimizers.SGD, True),
        ("adam", keras.optimizers.Adam, None),
    ],
)
def test_make_optimizer_builds_stock_optimizers(name, cls, nesterov):
    opt = optimizers.make_optimizer(
        name, 1e-3, momentum=0.5, beta_1=0.8, beta_2=0.99, clipnorm=1.0
    )
    assert type(opt) is cls
    assert opt.clipnorm == 1.0
    if name == "nesterov":
        assert opt.nesterov and opt.momentum == 0.5
    if name == "sgd":
        assert not opt.nesterov and opt.momentum == 0.0
    if name == "adam":
        assert (opt.beta_1, opt.beta_2) == (0.8, 0.99)


@pytest.mark.parametrize(
    "clip, expected",
    [
        # Per variable: each gradient to norm 1.
        (dict(clipnorm=1.0), ([-1.0, 0.0], [0.0, -1.0])),
        # Global (the second paper's): the joint norm 5 to 1.
        (dict(global_clipnorm=1.0), ([-0.6, 0.0], [0.0, -0.8])),
    ],
)
def test_make_optimizer_clips_per_variable_or_globally(clip, expected):
    opt = optimizers.make_optimizer("sgd", 1.0, **clip)
    a, b = keras.Variable([0.0, 0.0]), keras.Variable([0.0, 0.0])
    opt.apply([np.array([3.0, 0.0], "float32"), np.array([0.0, 4.0], "float32")], [a, b])
    np.testing.assert_allclose(a.numpy(), expected[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b.numpy(), expected[1], rtol=1e-6, atol=1e-7)


def test_make_optimizer_errors():
    with pytest.raises(ValueError, match="`name` must be one of"):
        optimizers.make_optimizer("rmsprop", 1e-3)
    with pytest.raises(ValueError, match="`learning_rate` must be a positive"):
        optimizers.make_optimizer("sgd", 0.0)
    with pytest.raises(ValueError, match="`decay` must be a non-negative"):
        optimizers.make_optimizer("sgd", 1e-3, decay=-1.0)
    with pytest.raises(ValueError, match="at most one of `clipnorm` and `global_clipnorm`"):
        optimizers.make_optimizer("sgd", 1e-3, clipnorm=1.0, global_clipnorm=1.0)


# --- Tf/Tb and TrainingTrace ------------------------------------------


def test_tf_over_tb_worked_example():
    # Backprop is lowest (0.5) at t=3; forward first reaches 0.5 at t=1.5.
    r = measures.tf_over_tb(
        [0, 1, 1.5, 2], [2.0, 0.9, 0.5, 0.4], [0, 1, 2, 3, 4], [2, 1, 0.7, 0.5, 0.6]
    )
    assert r == {"Tb": 3.0, "Tf": 1.5, "Tf/Tb": 0.5}
    r = measures.tf_over_tb([0, 1], [2.0, 0.9], [0, 1, 2], [2, 1, 0.5])
    assert r["Tf"] is None and r["Tf/Tb"] is None
    # Backprop never improves on its first loss: no ratio rather than 0/0.
    assert measures.tf_over_tb([0, 1], [2.0, 0.9], [0, 1], [1.0, 2.0])["Tf/Tb"] is None


def test_training_trace_schedule_and_clock():
    model = _model()
    model.compile(optimizer="sgd", loss=SCCE)
    data = _dataset()
    trace = measures.TrainingTrace(data.take(2), eval_every=4, warmup_steps=2)
    model.fit(data, epochs=2, callbacks=[trace], verbose=0)
    assert len(trace.step_times) == 20
    # Before training, every 4 steps, and after the last step.
    assert trace.eval_steps == [0, 4, 8, 12, 16, 20]
    times = trace.eval_times()
    assert times[0] == 0.0 and np.all(np.diff(times) > 0)
    # Warm-up steps are counted at the median of the others.
    rest = np.median(trace.step_times[2:])
    np.testing.assert_allclose(trace.elapsed()[1], 2 * rest)
    np.testing.assert_allclose(trace.elapsed()[-1], 2 * rest + sum(trace.step_times[2:]))
    # The recorded loss is the mean loss over the validation batches.
    expected = float(model.evaluate(data.take(2), verbose=0))
    np.testing.assert_allclose(trace.val_losses[-1], expected, rtol=1e-5)


def test_training_trace_says_when_compile_time_is_included():
    """A run no longer than its warm-up has no compiled step to measure by:
    its times include compilation, and the summary and figure say so."""
    model = _model()
    model.compile(optimizer="sgd", loss=SCCE)
    data = _dataset(n=64)  # 2 steps.
    short = measures.TrainingTrace(data.take(1), eval_every=4, warmup_steps=2)
    model.fit(data, epochs=1, callbacks=[short], verbose=0)
    assert not short.compile_excluded
    np.testing.assert_allclose(short.elapsed()[-1], sum(short.step_times))
    long = measures.TrainingTrace(data.take(1), eval_every=4, warmup_steps=1)
    model.fit(data, epochs=1, callbacks=[long], verbose=0)
    assert long.compile_excluded


def test_loss_figure_labels_the_clock_and_plain_log_ticks(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from keras_fwdgrad.research import plotting

    def summary(excluded):
        curve = {
            "eval_steps": [0, 10, 20],
            "mean_val_loss": [2.62, 2.55, 2.48],
            "std_val_loss": [0.0, 0.0, 0.0],
            "mean_eval_times": [0.0, 1.0, 2.0],
            "compile_excluded": excluded,
        }
        return {"backprop": curve, "forward (gaussian)": dict(curve)}

    labels = {}
    for excluded in (True, False):
        opened = []
        real_close = plt.close
        plt.close = lambda fig=None: opened.append(fig)  # Keep the figure.
        try:
            plotting.plot_loss_curves(summary(excluded), str(tmp_path / f"{excluded}.png"))
        finally:
            plt.close = real_close
        fig = opened[0]
        fig.canvas.draw()
        axes = fig.axes
        labels[excluded] = axes[1].get_xlabel()
        ticks = [t.get_text() for t in axes[0].get_yticklabels(minor=True) if t.get_text()]
        ticks += [t.get_text() for t in axes[0].get_yticklabels() if t.get_text()]
        assert ticks and all("10^" not in t and "times" not in t for t in ticks), ticks
        assert "2.5" in ticks or "2.6" in ticks
        real_close(fig)
    assert labels[True] == "training time (s, compile excluded)"
    assert "compile included" in labels[False]


def test_training_trace_rejects_bad_eval_every():
    with pytest.raises(ValueError, match="`eval_every` must be a positive integer"):
        measures.TrainingTrace(None, eval_every=0)


# --- compare_training ---------------------------------------------------


def test_method_labels_and_errors():
    assert (
        experiments.method("forward", 1e-3, direction="rademacher")["label"]
        == "forward (rademacher)"
    )
    assert experiments.method("backprop", 1e-3)["label"] == "backprop"
    with pytest.raises(ValueError, match="`gradient` must be one of"):
        experiments.method("reverse", 1e-3)
    with pytest.raises(ValueError, match="`optimizer` must be one of"):
        experiments.method("forward", 1e-3, optimizer="lbfgs")


def test_compare_training_runs_every_method_on_every_seed():
    data = _dataset()
    methods = [
        experiments.method("forward", 0.05, decay=1e-4, direction="rademacher"),
        experiments.method("backprop", 0.05, decay=1e-4),
    ]
    result = experiments.compare_training(
        _model,
        data,
        data.take(2),
        SCCE,
        methods,
        epochs=1,
        seeds=(0, 1),
        test=data.take(2),
        eval_every=3,
        jit_compile=False,
        verbose=False,
    )
    runs = result["runs"]
    assert [(r["label"], r["seed"]) for r in runs] == [
        ("forward (rademacher)", 0),
        ("backprop", 0),
        ("forward (rademacher)", 1),
        ("backprop", 1),
    ]
    for r in runs:
        assert r["steps"] == 10 and r["eval_steps"] == [0, 3, 6, 9, 10]
    # Same initial weights for both methods of a seed: same first loss.
    assert runs[0]["val_loss"][0] == pytest.approx(runs[1]["val_loss"][0], rel=1e-6)
    assert runs[0]["val_loss"][0] != pytest.approx(runs[2]["val_loss"][0], rel=1e-3)
    s = result["summary"]
    np.testing.assert_allclose(
        s["backprop"]["mean_val_loss"], np.mean([runs[1]["val_loss"], runs[3]["val_loss"]], axis=0)
    )
    assert s["backprop"]["test_loss"] == pytest.approx(
        np.mean([runs[1]["test_loss"], runs[3]["test_loss"]])
    )
    assert "Tf/Tb" in s["forward (rademacher)"] and "Tf/Tb" not in s["backprop"]


def test_summarize_tf_tb_from_mean_curves():
    def run(label, seed, losses, times):
        return {
            "label": label,
            "seed": seed,
            "eval_steps": [0, 1, 2],
            "val_loss": losses,
            "eval_times": times,
            "ms_per_step": 1.0,
            "compile_s": 0.0,
            "skipped_steps": 0,
        }

    runs = [
        run("backprop", 0, [2.0, 1.0, 0.4], [0.0, 1.0, 2.0]),
        run("backprop", 1, [2.0, 1.0, 0.6], [0.0, 1.0, 2.0]),  # mean best 0.5 at t=2
        run("forward (gaussian)", 0, [2.0, 0.5, 0.3], [0.0, 0.5, 1.0]),
        run("forward (gaussian)", 1, [2.0, 0.5, 0.5], [0.0, 0.5, 1.0]),  # mean 0.5 at t=0.5
    ]
    s = experiments.summarize(runs)["forward (gaussian)"]
    assert (s["Tb"], s["Tf"], s["Tf/Tb"]) == (2.0, 0.5, 0.25)


# --- profile_step_costs -----------------------------------------------


def test_profile_step_costs_measures_and_ratios():
    x = np.random.default_rng(0).normal(size=(32, 6)).astype("float32")
    y = np.arange(32) % 3
    costs = profiling.profile_step_costs(
        _model, x, y, SCCE, directions=("gaussian", "rademacher"), steps=2, repeats=3, warmup=1
    )
    m = costs["methods"]
    assert set(m) == {"base", "forward-gaussian", "forward-rademacher", "backprop"}
    params = 6 * 8 + 8 + 8 * 3 + 3
    assert costs["parameters"] == params
    for name, c in m.items():
        assert len(c["ms_rounds"]) == 3 and c["ms"] == np.median(c["ms_rounds"])
        assert c["R"] == pytest.approx(c["ms"] / m["base"]["ms"])
        # Variables (4 bytes per float) are part of every method's state.
        assert c["state_bytes"] >= 4 * params
        assert c["peak_bytes"] == c["state_bytes"] + c["step_bytes"]
    for name in ("forward-gaussian", "forward-rademacher"):
        r = costs["ratios"][name]
        assert r["Rf/Rb"] == pytest.approx(m[name]["ms"] / m["backprop"]["ms"])
        assert r["Rb"] == m["backprop"]["R"]


@pytest.mark.parametrize("hole, holes", [(1.5, 1), (1.27, 3)])
def test_step_bytes_ignores_allocator_fragmentation(hole, holes):
    """The step's peak is the 4 MiB product it requests, not the larger
    free chunk the allocator may hand it whole."""
    size = 4 * 2**20  # A 1024 x 1024 float32 product, the step's only temporary.

    @tf.function(jit_compile=True)
    def step(x):
        a = x + tf.cast(tf.range(1024)[:, tf.newaxis], tf.float32)
        return tf.reduce_sum(tf.square(tf.matmul(a, a, transpose_b=True)))

    x = tf.ones([1024, 1])
    call = lambda: step(x).numpy()  # noqa: E731
    call()

    def naive():
        before = tf.config.experimental.get_memory_info("CPU:0")
        tf.config.experimental.reset_memory_stats("CPU:0")
        call()
        after = tf.config.experimental.get_memory_info("CPU:0")
        return after["peak"] - before["current"]

    # `holes` free chunks, each `hole` times the request, between live
    # tensors: the allocator does not split a chunk less than twice the
    # request, and hands the smallest free chunk that fits.
    def tensor(fraction):
        return tf.random.uniform([int(fraction * size) // 4])

    live, free = [tensor(hole)], []
    for _ in range(holes):
        free.append(tensor(hole))
        live.append(tensor(hole))
    del free
    single = naive()
    measured = profiling.step_bytes(call, "CPU:0")
    # 64 KiB of slack for the step's scalar output and the allocator's
    # rounding; a measurement landing in a hole would be >= hole x size.
    assert size <= measured <= size + 2**16, (measured, single)
    assert measured <= single
    del live


def test_profile_step_costs_errors():
    with pytest.raises(ValueError, match="`repeats` must be a positive integer"):
        profiling.profile_step_costs(_model, np.zeros((2, 6)), np.zeros(2), SCCE, repeats=0)
    with pytest.raises(TypeError, match="`build_model` must be a function"):
        profiling.profile_step_costs(_model(), np.zeros((2, 6)), np.zeros(2), SCCE)
