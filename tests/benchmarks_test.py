"""The benchmark script runs end to end on its smoke budget and writes the
table it documents. (Its figures are measurements, not test assertions.)"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from compile_flags import runtime_env

# Each test runs a benchmark script in a process of its own.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {
    "baseline",
    "gaussian",
    "rademacher",
    "lowrank_gaussian",
    "lowrank_rademacher",
    "fixed",
    "backprop",
}


def _two_class_mnist(folder, train, test):
    """An `.npz` in MNIST's layout (`folder/mnist.npz`, returned) of random
    28 x 28 images of two classes that differ by 150 grey levels, standing
    in for MNIST: `train` training and `test` test images."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=train + test).astype("uint8")
    x = (rng.integers(0, 60, size=(train + test, 28, 28)) + 150 * y[:, None, None]).astype("uint8")
    path = folder / "mnist.npz"
    np.savez(path, x_train=x[:train], y_train=y[:train], x_test=x[train:], y_test=y[train:])
    return path


def test_step_costs_smoke(tmp_path):
    env = runtime_env(TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "step_costs.py"),
            "--smoke",
            "--jit",
            "on",
            "--out",
            str(tmp_path),
        ],
        check=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    report = json.loads((tmp_path / "results.json").read_text())
    models = {r["model"] for r in report["rows"]}
    assert models == {"logistic regression", "MLP 784-1024-1024-10"}
    for model in models:
        rows = [r for r in report["rows"] if r["model"] == model]
        assert {r["method"] for r in rows} == METHODS
        # The ratios are the documented ones: R is step time over the base
        # (forward pass only) time, Rf/Rb step time over backprop's.
        backprop_ms = next(r["ms"] for r in rows if r["method"] == "backprop")
        for r in rows:
            assert r["ms"] > 0
            assert r["R"] == pytest.approx(r["ms"] / r["base_ms"], rel=1e-12)
            assert r["Rf/Rb"] == pytest.approx(r["ms"] / backprop_ms, rel=1e-12)
    # The cosine between an unbiased forward gradient and the gradient is in
    # (0, 1]; for 1.86 M parameters it is of order sqrt(2 / (π n)) ≈ 6e-4.
    assert {r["direction"] for r in report["cosine"]} == METHODS - {
        "baseline",
        "fixed",
        "backprop",
    }
    for r in report["cosine"]:
        assert 1e-5 < r["cos_mean"] < 1e-2
    assert {r["direction"] for r in report["sampling"]} == METHODS - {"fixed", "backprop"}
    assert (
        "| MLP 784-1024-1024-10 | on | lowrank_rademacher |"
        in (tmp_path / "results.md").read_text()
    )
    assert report["machine"]["cpus"] >= 1


def test_activity_step_time_smoke(tmp_path):
    """`benchmarks/activity_step_time.py` times each method against
    backprop with the optimizer asked for, and each round against
    backprop's round."""
    out = tmp_path / "activity.json"
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "activity_step_time.py"),
            "--models",
            "mlp",
            "--jit",
            "off",
            "--rounds",
            "1",
            "--steps",
            "2",
            "--methods",
            "activations_layers_signs",
            "--optimizer",
            "sgd",
            "--out",
            str(out),
        ],
        check=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        cwd=ROOT,
    )
    rows = json.loads(out.read_text())["results"]
    assert {r["method"] for r in rows} == {"backprop", "activations_layers_signs"}
    backprop_ms = next(r["ms_per_step"] for r in rows if r["method"] == "backprop")
    for r in rows:
        assert r["optimizer"] == "SGD"
        assert r["ms_per_step"] > 0
        assert r["vs_backprop"] == pytest.approx(r["ms_per_step"] / backprop_ms, rel=1e-12)
    # One round: the paired ratio is that round's ratio.
    backprop_round = next(r["round_medians_ms"] for r in rows if r["method"] == "backprop")
    for r in rows:
        expected = r["round_medians_ms"][0] / backprop_round[0]
        assert r["paired_vs_backprop"] == pytest.approx(expected, rel=1e-12)


def test_code_version_names_the_commit_and_local_changes(tmp_path):
    from keras_fwdgrad.research import learning

    assert learning.code_version(str(tmp_path)) is None  # not a checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "a.py").write_text("1")
    (tmp_path / "results.json").write_text("1")
    subprocess.run(git + ["add", "a.py", "results.json"], cwd=tmp_path, check=True)
    subprocess.run(git + ["commit", "-qm", "a"], cwd=tmp_path, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert learning.code_version(str(tmp_path)) == head
    (tmp_path / "results.json").write_text("2")  # a result, not code
    assert learning.code_version(str(tmp_path)) == head
    (tmp_path / "a.py").write_text("2")
    assert learning.code_version(str(tmp_path)) == head + "+changes"
    # Asked from a folder of the checkout (as the benchmarks ask from
    # theirs), a change to code elsewhere in it counts too.
    (tmp_path / "benchmarks").mkdir()
    assert learning.code_version(str(tmp_path / "benchmarks")) == head + "+changes"


def test_evaluating_a_backprop_run_keeps_its_optimizer():
    """The learning benchmarks evaluate the wrapped model while its wrapper
    trains; for backprop the trained model is the wrapped one, and
    compiling it again for evaluation would train it with Keras' default
    RMSprop instead of the optimizer asked for."""
    import keras

    from keras_fwdgrad import ForwardGradientModel
    from keras_fwdgrad.research import learning

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    base.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss, metrics=["accuracy"])
    assert learning.evaluation_model(base, base, loss) is base
    assert isinstance(base.optimizer, keras.optimizers.SGD)
    assert float(base.optimizer.learning_rate) == 0.5
    model = ForwardGradientModel(base)
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss=loss)
    evaluate_with = learning.evaluation_model(base, model, loss)
    assert evaluate_with is base and isinstance(model.optimizer, keras.optimizers.Adam)
    assert evaluate_with.evaluate(np.ones((4, 3)), np.zeros(4), verbose=0)[1] >= 0.0
    with pytest.raises(ValueError, match="Compile"):
        fresh = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        learning.evaluation_model(fresh, fresh, loss)


def _run_on_jax(script, *args):
    """Runs `benchmarks/script` on the JAX backend as on the GPU machine,
    whose image has JAX but no TensorFlow: a module that raises
    `ImportError` stands in for TensorFlow, first on the path."""
    with tempfile.TemporaryDirectory() as blocked:
        with open(os.path.join(blocked, "tensorflow.py"), "w") as f:
            f.write(
                "raise ImportError(\"No module named 'tensorflow' (as on the GPU machine)\")\n"
            )
        path = [blocked, ROOT] + [
            p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
        ]
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "KERAS_BACKEND": "jax",
            "PYTHONPATH": os.pathsep.join(path),
        }
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
            check=True,
            timeout=600,
            env=env,
            cwd=ROOT,
        )


def test_jax_step_costs_smoke(tmp_path):
    """`benchmarks/jax_step_costs.py` (what `benchmarks/gpu.sh` runs first)
    on the JAX backend, on its smoke budget."""
    out = tmp_path / "jax_step_costs.json"
    _run_on_jax("jax_step_costs.py", "--smoke", "--out", str(out))
    report = json.loads(out.read_text())
    rows = report["ms_per_step"]["mlp/64"]
    assert set(rows) == {
        "backprop",
        "gaussian",
        "rademacher",
        "lowrank_gaussian",
        "lowrank_rademacher",
    }
    # Each ratio is the column's time over backprop's, in the same column.
    for r in rows.values():
        for how in ("scan", "fit"):
            assert r[how] > 0
            assert r[f"{how}_ratio"] == pytest.approx(r[how] / rows["backprop"][how], rel=1e-12)
    assert rows["backprop"]["scan_ratio"] == 1.0
    assert report["platform"] == "cpu"


def test_activity_step_time_on_jax(tmp_path):
    """`benchmarks/activity_step_time.py` (what `benchmarks/gpu.sh` runs
    second) on the JAX backend, compiled, on a machine without
    TensorFlow."""
    out = tmp_path / "activity.json"
    _run_on_jax(
        "activity_step_time.py",
        *("--models", "mlp", "--jit", "on", "--rounds", "1", "--steps", "2"),
        *("--methods", "activations_layer_patches_signs", "--out", str(out)),
    )
    report = json.loads(out.read_text())
    assert report["backend"].startswith("jax ")
    rows = report["results"]
    assert {r["method"] for r in rows} == {"backprop", "activations_layer_patches_signs"}
    assert all(r["jit_compile"] and r["ms_per_step"] > 0 for r in rows)


def test_all_reduce_bytes_on_jax(tmp_path):
    """`benchmarks/all_reduce_bytes.py` on JAX's 4 virtual devices, MLP
    only, one round: the bytes read from each compiled step equal
    `all_reduce_bytes_per_step()`, K = 1 derivative and the loss (4 + 4 B)
    and a flag against the whole gradient for backprop."""
    out = tmp_path / "all_reduce_bytes.json"
    _run_on_jax("all_reduce_bytes.py", "--rounds", "1", "--models", "mlp", "--out", str(out))
    rows = {(r["method"], r["devices"]): r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == [(m, n) for m in ("backprop", "forward") for n in (1, 2, 4)]
    for n in (1, 2, 4):
        forward, backprop = rows["forward", n], rows["backprop", n]
        assert forward["bytes_per_step"] == forward["all_reduce_bytes_per_step"]
        assert forward["bytes_per_step"] == (0 if n == 1 else 4 + 4 + 1)
        assert backprop["bytes_per_step"] == (0 if n == 1 else 4 + 4 * 1_863_690)
        assert forward["ms_per_step"] > 0 and backprop["ms_per_step"] > 0


def test_mnist_mlp_budget_on_jax(tmp_path):
    """`benchmarks/mnist_mlp_budget.py` (what `benchmarks/gpu.sh` runs
    second) reads an `.npz` and trains every method on the JAX backend;
    random images of two classes stand in for MNIST."""
    path = _two_class_mnist(tmp_path, 192, 64)
    out = tmp_path / "budget.json"
    _run_on_jax("mnist_mlp_budget.py", "--mnist", str(path), "--epochs", "2", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["backend"] == "jax"
    assert set(report["runs"]) == {"backprop", "forward_adam", "forward_lowrank", "activations"}
    for curve in report["runs"].values():
        assert [c["epoch"] for c in curve] == [1, 2]
        assert all(np.isfinite(c["test_loss"]) for c in curve)
    # Backprop separates two classes that differ by 150 grey levels.
    assert report["runs"]["backprop"][-1]["test_accuracy"] > 0.9


def test_mixed_precision_smoke(tmp_path):
    """`benchmarks/mixed_precision.py` trains the MLP under each policy from
    an `.npz`; random images of two classes that differ by 150 grey levels
    stand in for MNIST, and every policy separates them."""
    path = _two_class_mnist(tmp_path, 512, 128)
    out = tmp_path / "mixed.json"
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "mixed_precision.py"),
            "--data-dir",
            str(path),
            "--seeds",
            "0",
            "--train-size",
            "512",
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--out",
            str(out),
        ],
        check=True,
        timeout=600,
        env=runtime_env(TF_CPP_MIN_LOG_LEVEL="3"),
        cwd=ROOT,
    )
    report = json.loads(out.read_text())
    runs = {r["policy"]: r for r in report["runs"]}
    assert set(runs) == {"float32", "mixed_float16", "mixed_bfloat16"}
    for r in runs.values():
        assert r["skipped_steps"] == 0 and np.isfinite(r["final_loss"]), r
        assert r["test_accuracy"] > 0.9, r


def test_table1_rows_of_the_cnn(tmp_path):
    """`benchmarks/table1.py` trains Table I's rows of the model it is
    given, with the directional derivative capped or not, and records the
    training loss and where it stopped being finite; random images of two
    classes stand in for MNIST."""
    _two_class_mnist(tmp_path, 384, 64)
    out = tmp_path / "table1_cnn.json"
    env = runtime_env(TF_CPP_MIN_LOG_LEVEL="3")
    common = [sys.executable, os.path.join(ROOT, "benchmarks", "table1.py"), "--data-dir"]
    common += [str(tmp_path), "--model", "cnn", "--epochs", "2", "--log-every", "2"]
    common += ["--out", str(out)]
    for extra in (["--rows", "forward-sgd,backprop-sgd"], ["--rows", "forward-adam"]):
        cap = ["--jvp-clip", "none"] if extra[1] == "forward-adam" else []
        subprocess.run(common + extra + cap, check=True, timeout=600, env=env, cwd=ROOT)
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {
        "forward-sgd/global/epochs2/seed0",
        "backprop-sgd/none/epochs2/seed0",
        "forward-adam/global/jvp_clipnone/epochs2/seed0",
    }
    # 10 % held out for validation, the last partial batch dropped.
    steps = 2 * (384 - 384 // 10) // 64
    for r in runs.values():
        assert r["model"] == "cnn" and r["steps"] == steps
        assert r["first_non_finite_step"] is None
        assert [s for s, _ in r["train_loss"]] == list(range(2, steps + 1, 2))
        assert len(r["val_loss"]) == 2 and np.isfinite(r["test_loss"])
    assert runs["forward-sgd/global/epochs2/seed0"]["jvp_clip"] == 1.0
    assert runs["forward-adam/global/jvp_clipnone/epochs2/seed0"]["jvp_clip"] is None
    assert runs["forward-sgd/global/epochs2/seed0"]["paper"]["learning_rate"] == 0.000398
    # Backprop at Table I's SGD rate (0.1) separates two classes that
    # differ by 150 grey levels.
    assert runs["backprop-sgd/none/epochs2/seed0"]["test_accuracy"] > 0.9


def test_tf_tb_report_finds_backprops_lowest_loss_and_the_gap():
    """`benchmarks/tf_tb.py` reads an example's results: backprop's lowest
    mean validation loss, where it came, how much it fell over the last
    10 % of the run, and per forward method Tf/Tb or the gap."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "tf_tb", os.path.join(ROOT, "benchmarks", "tf_tb.py")
    )
    tf_tb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tf_tb)
    steps = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    backprop = [2.3, 2.0, 1.8, 1.6, 1.5, 1.4, 1.35, 1.3, 1.29, 1.3, 1.31]
    summary = {
        "backprop": {
            "eval_steps": steps,
            "mean_val_loss": backprop,
            "mean_eval_times": [0.1 * s for s in steps],
            "ms_per_step": 100.0,
        },
        "forward (a)": {
            "mean_val_loss": [2.3, 1.9, 1.5, 1.28] + [1.2] * 7,
            "ms_per_step": 50.0,
            "Tf": 3.0,
            "Tf/Tb": 3.0 / 8.0,
        },
        "forward (b)": {"mean_val_loss": [2.3] * 9 + [1.5, float("nan")], "ms_per_step": 50.0},
    }
    methods = [{"label": "backprop", "decay": 1e-2}, {"label": "forward (a)"}]
    report = {"configs": [{"name": "c", "summary": summary, "methods": methods}]}
    rows = {r["method"]: r for r in tf_tb.rows(report)}
    assert set(rows) == {"forward (a)", "forward (b)"}
    for r in rows.values():
        assert r["backprop_best_val_loss"] == 1.29 and r["backprop_best_step"] == 80
        assert r["Tb_s"] == 8.0 and r["steps"] == 100
        assert np.isclose(r["backprop_last_10pct_drop"], 1.3 - 1.31)
        assert np.isclose(r["schedule_spent"], 1 - np.exp(-1.0))
    assert rows["forward (a)"]["Tf/Tb"] == 0.375 and rows["forward (a)"]["gap"] is None
    assert rows["forward (b)"]["Tf/Tb"] is None
    assert np.isclose(rows["forward (b)"]["gap"], 1.5 - 1.29)
    # Backprop first got down to 1.5 (forward (b)'s lowest) at step 40.
    assert rows["forward (b)"]["backprop_step_at_forward_best"] == 40
    assert rows["forward (b)"]["backprop_time_at_forward_best"] == 4.0
    assert rows["forward (b)"]["first_non_finite_step"] == 100
    assert rows["forward (a)"]["first_non_finite_step"] is None


def test_finetune_memory_smoke_on_jax(tmp_path):
    """`benchmarks/finetune.py --smoke` on JAX: every method at every
    configuration of the sweeps, measured from the compiled step."""
    out = tmp_path / "finetune_memory.json"
    _run_on_jax("finetune.py", "--smoke", "--out", str(out))
    report = json.loads(out.read_text())
    assert report["versions"]["backend"] == "jax" and report["commit"]
    methods = set(report["methods"])
    assert methods == {
        "backprop",
        "remat_layers",
        "remat_blocks",
        "forward_k1",
        "forward_k8",
        "activity",
        "activity_layers",
    }
    for sweep in report["sweeps"]:
        rows = [r for r in report["rows"] if r["sweep"] == sweep]
        assert {r["method"] for r in rows} == methods
        assert all(r["step_mib"] > 0 and r["mode"] == "compiled" for r in rows)
