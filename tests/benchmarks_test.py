"""The benchmark script runs end to end on its smoke budget and writes the
table it documents. (Its figures are measurements, not test assertions.)"""

import json
import os
import subprocess
import sys

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


def test_step_costs_smoke(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
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
        for r in rows:
            assert r["ms"] > 0 and r["R"] > 0 and r["Rf/Rb"] > 0
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
