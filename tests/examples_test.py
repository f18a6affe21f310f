"""Each example runs end to end with `--smoke` and writes JSON, CSV and PNG."""

import csv
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from compile_flags import runtime_env

from keras_fwdgrad.research import table1

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _run(script, out, *flags, mock_examples=None):
    """Runs `examples/<script> --smoke`; with `mock_examples`, on that many
    examples of tensorflow-datasets' mock data (for datasets without a
    bundled subset)."""
    env = runtime_env(TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("KERAS_FWDGRAD_DATA_DIR", None)  # Smoke runs use bundled data.
    argv = [os.path.join(EXAMPLES, script), "--smoke", "--out", str(out), *flags]
    if mock_examples is None:
        command = [sys.executable, *argv]
    else:
        command = [
            sys.executable,
            "-c",
            "import runpy, sys\n"
            "import tensorflow_datasets as tfds\n"
            f"sys.argv = {argv!r}\n"
            f"sys.path.insert(0, {EXAMPLES!r})\n"
            f"with tfds.testing.mock_data(num_examples={mock_examples}):\n"
            f"    runpy.run_path({argv[0]!r}, run_name='__main__')\n",
        ]
    subprocess.run(command, check=True, timeout=600, env=env)
    report = json.loads((out / "results.json").read_text())
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    pngs = sorted(p.name for p in out.glob("*.png"))
    return report, rows, pngs


def _check_classification(report, rows, pngs, num_configs, directions=("gaussian",)):
    assert report["budget"] == "smoke"
    costs = report["step_costs"]
    assert set(costs["methods"]) == {"base", "backprop"} | {f"forward-{d}" for d in directions}
    for name, c in costs["methods"].items():
        assert c["ms"] > 0 and c["peak_bytes"] > 0, name
    for d in directions:
        r = costs["ratios"][f"forward-{d}"]
        # Rf/Rb is, by definition, the forward step time over backprop's.
        expected = costs["methods"][f"forward-{d}"]["ms"] / costs["methods"]["backprop"]["ms"]
        assert r["Rf/Rb"] == pytest.approx(expected)
        assert r["Rf"] / r["Rb"] == pytest.approx(expected)
    assert len(report["configs"]) == num_configs and len(pngs) == num_configs
    assert len(rows) == num_configs * (len(directions) + 1)
    for row in rows:
        assert float(row["test_loss"]) > 0
        assert int(row["steps"]) > 0
    for config in report["configs"]:
        for run in config["runs"]:
            # The same number of iterations for every method.
            assert run["eval_steps"][-1] == config["runs"][0]["eval_steps"][-1]
            assert run["eval_times"] == sorted(run["eval_times"])


@pytest.mark.parametrize(
    "script, num_configs",
    [("mnist_logreg.py", 1), ("mnist_mlp.py", 2), ("mnist_cnn.py", 1)],
)
def test_mnist_example_smoke(script, num_configs, tmp_path):
    report, rows, pngs = _run(script, tmp_path / "out")
    _check_classification(report, rows, pngs, num_configs)


def test_mnist_mlp_smoke_two_directions_no_jit(tmp_path):
    report, rows, pngs = _run(
        "mnist_mlp.py",
        tmp_path / "out",
        "--direction",
        "gaussian",
        "rademacher",
        "--no-jit",
        "--optimizer",
        "adam",
    )
    assert report["jit_compile"] is False and report["optimizer"] == "adam"
    _check_classification(report, rows, pngs, 2, directions=("gaussian", "rademacher"))


def test_cifar10_vgg_smoke_with_mock_data(tmp_path):
    """CIFAR-10 has no bundled subset: the script runs on
    tensorflow-datasets' mock data."""
    report, rows, pngs = _run("cifar10_vgg.py", tmp_path / "out", mock_examples=160)
    _check_classification(report, rows, pngs, 1)


def test_test_functions_smoke(tmp_path):
    report, rows, pngs = _run("test_functions.py", tmp_path / "out")
    assert pngs == ["beale_gaussian.png", "rosenbrock_gaussian.png"]
    assert len(rows) == 4
    for row in rows:
        # Both methods descend from the same start in 100-200 steps.
        assert float(row["final_loss_mean"]) < float(row["initial_loss"])


def test_test_functions_rejects_other_optimizers(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(EXAMPLES, "test_functions.py"),
            "--smoke",
            "--optimizer",
            "adam",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "--optimizer sgd" in result.stderr


def test_depth_sweep_smoke(tmp_path):
    report, rows, pngs = _run("depth_sweep.py", tmp_path / "out")
    assert pngs == ["depth_sweep.png"]
    assert [int(r["depth"]) for r in rows] == [1, 2]
    for row in rows:
        assert float(row["Rf"]) > 1 and float(row["Rb"]) > 1
        # Each ratio is the mean over rounds of that round's ratio, from the
        # rounds the report keeps (a ratio of medians can differ by half
        # when another process shares the cores).
        m = report["step_costs"][row["depth"]]["methods"]
        base = np.asarray(m["base"]["ms_rounds"])
        back = np.asarray(m["backprop"]["ms_rounds"])
        fwd = np.asarray(m[f"forward-{row['direction']}"]["ms_rounds"])
        assert len(base) == len(back) == len(fwd) == 3
        assert float(row["Rf"]) == pytest.approx(np.mean(fwd / base), rel=1e-6)
        assert float(row["Rb"]) == pytest.approx(np.mean(back / base), rel=1e-6)
        assert float(row["Rf/Rb"]) == pytest.approx(np.mean(fwd / back), rel=1e-6)
        assert float(row["forward_ms"]) == pytest.approx(m[f"forward-{row['direction']}"]["ms"])
        assert float(row["backprop_ms"]) == pytest.approx(m["backprop"]["ms"])
    # Parameters of a bias-free MLP: 784·1024 + (d−1)·1024² + 1024·10.
    for row in rows:
        d = int(row["depth"])
        assert int(row["parameters"]) == 784 * 1024 + (d - 1) * 1024**2 + 1024 * 10


@pytest.mark.parametrize(
    "models",
    [
        # The MLP's six searches in the default tier; the CNN's run the same
        # code on another architecture, and double the time.
        ("mlp",),
        pytest.param(("mlp", "cnn"), marks=pytest.mark.heavy),
    ],
)
def test_tune_table1_smoke(tmp_path, models):
    out = tmp_path / "out"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("KERAS_FWDGRAD_DATA_DIR", None)
    command = [sys.executable, os.path.join(EXAMPLES, "tune_table1.py"), "--smoke"]
    command += ["--out", str(out), "--models", *models]
    subprocess.run(command, check=True, timeout=600, env=env)
    report = json.loads((out / "results.json").read_text())
    keys = [(r["model"], r["optimizer"], r["gradient"]) for r in report["rows"]]
    # Both gradient types tuned separately for every model and optimizer,
    # in the paper's row order.
    assert keys == [
        (m, o, g)
        for m in models
        for o in ("sgd", "nesterov", "adam")
        for g in ("forward", "backprop")
    ]
    for r in report["rows"]:
        assert r["trials"] == 2 and r["learning_rate"] in (1e-4, 1e-2)
        assert r["test_loss"] > 0
        paper = table1.row(r["model"], r["gradient"], r["optimizer"])
        assert (r["paper_learning_rate"], r["paper_test_loss"]) == (
            paper["learning_rate"],
            paper["test_loss"],
        )
    assert report["paper"] == [dict(r) for r in table1.ROWS]
    with open(out / "table1.csv") as f:
        assert len(list(csv.DictReader(f))) == 6 * len(models)
    assert (out / "table1.md").read_text().startswith("| gradient | model | dataset |")


def test_quickstart_trains_and_compares_with_backprop():
    """`examples/quickstart.py` runs top to bottom, prints both rows, and
    its forward gradient learns (fixed seeds, one epoch of the bundled
    10,000 digits)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "quickstart.py"), "--epochs", "1"],
        check=True,
        timeout=300,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    rows = {
        line.rsplit(None, 2)[0]: line.split()[-2:]
        for line in out.splitlines()
        if line.startswith(("forward gradient", "backprop"))
    }
    assert set(rows) == {"forward gradient", "backprop"}
    # Measured with seed 0: forward gradient 0.863, backprop 0.887. Chance
    # is 0.1; the papers' weight perturbation, which does not learn on this
    # budget, stays below 0.5, and a wrong estimate (zero, or the sign
    # flipped) near or below chance.
    forward_accuracy, forward_seconds = map(float, rows["forward gradient"])
    backprop_accuracy, backprop_seconds = map(float, rows["backprop"])
    assert forward_accuracy > 0.75
    assert backprop_accuracy > 0.8
    assert forward_seconds > 0 and backprop_seconds > 0


def test_mnist_learning_example_runs(tmp_path):
    """The main job prints a line per epoch and method while it trains, and
    backprop and activity perturbation learn (fixed seed, 2 epochs of 1,024
    bundled digits)."""
    env = runtime_env(TF_CPP_MIN_LOG_LEVEL="3")
    out = tmp_path / "learning.json"
    stdout = subprocess.run(
        [
            sys.executable,
            os.path.join(EXAMPLES, "mnist_learning.py"),
            "--epochs",
            "2",
            "--train-size",
            "1024",
            "--out",
            str(out),
        ],
        check=True,
        timeout=600,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    report = json.loads(out.read_text())
    assert set(report) == {"backprop", "papers' forward gradient", "activations + local losses"}
    for name, r in report.items():
        assert len(r["curve"]) == 2
        assert r["curve"][0]["seconds"] < r["curve"][1]["seconds"]
        assert r["median_step_seconds"] > 0
        lines = [line.split() for line in stdout.splitlines()]
        epochs = [line for line in lines if " ".join(line).startswith(f"{name} epoch ")]
        assert len(epochs) == 2 and "accuracy" in epochs[0], stdout
    best = {name: r["summary"]["best_test_accuracy"] for name, r in report.items()}
    # Measured with seed 0: backprop 0.803, activations + local losses 0.442,
    # papers' forward gradient 0.072 (chance is 0.1). A wrong activity
    # estimate stays near chance.
    assert best["backprop"] > 0.7
    assert best["activations + local losses"] > 0.35


def _help_probe(script):
    """Runs `examples/<script> --help` in a fresh interpreter: it prints
    its usage, with nothing on stderr, and TensorFlow is not imported."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, '--help']\n"
        f"sys.path.insert(0, {EXAMPLES!r})\n"
        "try:\n"
        f"    runpy.run_path({os.path.join(EXAMPLES, script)!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('TF_LOADED' if 'tensorflow' in sys.modules else 'TF_NOT_LOADED')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert "usage:" in done.stdout
    assert done.stdout.strip().endswith("TF_NOT_LOADED")
    assert done.stderr == ""


@pytest.mark.parametrize(
    "script",
    [
        "mnist_logreg.py",
        "mnist_mlp.py",
        "mnist_cnn.py",
        "cifar10_vgg.py",
        "depth_sweep.py",
        "test_functions.py",
        "tune_table1.py",
    ],
)
def test_help_answers_without_starting_tensorflow(script):
    """`--help` and a bad flag answer at once: TensorFlow (seconds to start,
    and log lines on stderr) is imported only when the example runs."""
    _help_probe(script)
    bad = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), "--optimizer", "rmsprop"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "invalid choice: 'rmsprop'" in bad.stderr


def test_finetune_lora_smoke_with_mock_data(tmp_path, monkeypatch):
    """`examples/finetune_lora.py --smoke` pre-trains, saves, and fine-tunes
    the five ways on tensorflow-datasets' mock CIFAR-10 (no bundled
    subset), and writes one row per method with its step memory;
    `--forward-epochs` and `--activity-epochs` give (d) and (e) their own
    numbers of epochs, `--cosine` each method a decaying learning rate."""
    import tensorflow_datasets as tfds

    monkeypatch.delenv("KERAS_FWDGRAD_DATA_DIR", raising=False)
    monkeypatch.syspath_prepend(EXAMPLES)
    module = importlib.import_module("finetune_lora")
    out = tmp_path / "out"
    with tfds.testing.mock_data(num_examples=200):
        # K = 2 for (d): its eight passes are most of the smoke's time.
        report = module.main(
            [
                "--smoke",
                "--num-directions",
                "2",
                "--forward-epochs",
                "2",
                "--activity-epochs",
                "3",
                "--cosine",
                "--out",
                str(out),
            ]
        )
    assert (out / "pretrained.keras").exists()
    runs = {r["method"]: r for r in report["runs"]}
    assert sorted(runs) == ["a", "b", "c", "d", "e"]
    # LoRA trains far fewer parameters than the whole model.
    for name in "bcde":
        assert runs[name]["trainable_parameters"] == runs["b"]["trainable_parameters"]
    assert runs["b"]["trainable_parameters"] < runs["a"]["trainable_parameters"] / 10
    assert [len(runs[name]["points"]) for name in "abcde"] == [1, 1, 1, 2, 3]
    settings = report["settings"]
    assert settings["cosine"] and settings["forward_epochs"] == 2
    assert settings["activity_epochs"] == 3
    for run in runs.values():
        assert 0 <= run["test_accuracy"] <= 1 and run["step_memory_mib"] > 0
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 5


def test_finetune_lora_help_and_bad_methods():
    """`--help` answers without starting TensorFlow; an unknown method or
    a number of epochs below 1 is a usage error saying what is allowed."""
    _help_probe("finetune_lora.py")
    script = os.path.join(EXAMPLES, "finetune_lora.py")
    for argv, message in [
        (["--methods", "a,z"], "--methods takes letters from"),
        (["--activity-epochs", "0"], "--activity-epochs must be a positive integer"),
        (["--forward-epochs", "-1"], "--forward-epochs must be a positive integer"),
    ]:
        bad = subprocess.run(
            [sys.executable, script, *argv], capture_output=True, text=True, timeout=60
        )
        assert bad.returncode == 2 and message in bad.stderr, (argv, bad.stderr)
