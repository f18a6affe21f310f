"""Each example runs end to end with `--smoke` and writes its results."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["mnist_mlp.py"])
def test_example_smoke(script, tmp_path):
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), "--smoke", "--out", str(out)],
        check=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    report = json.loads((out / "results.json").read_text())
    methods = [r["method"] for r in report["results"]]
    assert methods == ["forward", "forward", "backprop"]
    for r in report["results"]:
        assert r["ms_per_step"] > 0 and r["test_loss"] > 0
