"""Forward-gradient training under `keras.distribution` on JAX, with 4
virtual CPU devices. JAX's devices are fixed when it starts, so the
configurations train in `jax_distribution_script.py`, in a process of its
own (on either backend's test run)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import shared_runs

# The configurations train in a process of their own.
pytestmark = pytest.mark.slow

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jax_distribution_script.py")
ITEMSIZE = 4


def _train(folder):
    out = folder / "results.json"
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, SCRIPT, str(out)], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def results(tmp_path_factory):
    return shared_runs.once("jax_distribution", tmp_path_factory, _train)


def _assert_same_weights(a, b):
    # Tolerance: the replicas sum the batch in another order. The loss and
    # directional derivatives are means of 32 terms, 3 steps: float32
    # rounding of order 1e-7 relative, amplified by momentum.
    for u, v in zip(a["weights"], b["weights"]):
        np.testing.assert_allclose(np.array(u), np.array(v), rtol=1e-5, atol=1e-6)


def test_four_devices(results):
    assert results["devices"] == 4


@pytest.mark.parametrize("distribution", ["data", "model"])
def test_distributed_weights_match_single_device(results, distribution):
    """Same seed, data and global batch (32), 3 steps: every direction
    family with K = 2 (with and without `jvp_clip`), and Adam, give the
    single-device weights under `DataParallel` (4 replicas) and under
    `ModelParallel` (2 × 2, both kernels sharded over "model")."""
    checked = 0
    for key, runs in results["configurations"].items():
        if distribution not in runs:
            continue
        single = runs["single"]
        _assert_same_weights(runs[distribution], single)
        if "direction_step" in single:
            assert runs[distribution]["direction_step"] == single["direction_step"] == 3
        checked += 1
    assert checked >= (8 if distribution == "data" else 6)


def test_model_parallel_shards_the_kernels(results):
    runs = results["configurations"]["gaussian/k2"]

    # A trailing dimension left unsharded may be omitted from a spec.
    def spec(s):
        return (s + [None, None])[:2]

    assert spec(runs["model"]["shardings"][0]) == [None, "model"]
    assert spec(runs["model"]["shardings"][2]) == ["model", None]
    assert spec(runs["data"]["shardings"][0]) == [None, None]
    assert runs["single"]["shardings"][0] is None


@pytest.mark.parametrize("distribution", ["data", "model"])
def test_a_nan_batch_is_skipped_by_every_replica(results, distribution):
    """The second batch holds a NaN in one example (on one replica): every
    replica skips the step, and the weights equal the single-device run's,
    which skipped it too."""
    runs = results["configurations"]["nan_guard"]
    assert runs[distribution]["skipped"] == runs["single"]["skipped"] == 1
    _assert_same_weights(runs[distribution], runs["single"])
    assert all(np.all(np.isfinite(np.array(w))) for w in runs[distribution]["weights"])


@pytest.mark.parametrize("distribution", ["data", "model"])
def test_save_and_resume_under_a_distribution(results, distribution):
    """Saved after 2 steps, loaded under the same distribution, trained 1
    more: the weights of 3 steps in one run, the direction stream
    continues, and the loaded variables keep their layouts."""
    resumed = results["resumed"][distribution]
    reference = results["configurations"]["gaussian/k2"][distribution]
    _assert_same_weights(resumed, reference)
    assert resumed["direction_step"] == 3
    assert resumed["shardings"] == reference["shardings"]


def test_forward_gradient_all_reduces_the_loss_and_k_derivatives(results):
    """The compiled step of the papers' MLP under `DataParallel`: the
    forward gradient all-reduces the loss and K = 2 directional derivatives
    (`f32[]`, `f32[2]`) and a finiteness flag; nothing is gathered.
    Backprop all-reduces the loss and the whole gradient."""
    forward = results["papers_mlp"]["forward"]
    ops = {c["op"] for c in forward["collectives"]}
    assert ops == {"all-reduce"}
    shapes = sorted(s for c in forward["collectives"] for s in c["shapes"])
    assert shapes == ["f32[2]", "f32[]", "pred[]"]
    assert forward["all_reduce_bytes_per_step"] == ITEMSIZE * (1 + 2) + 1
    backprop = results["papers_mlp"]["backprop"]
    reduced = sum(c["bytes"] for c in backprop["collectives"] if c["op"] == "all-reduce")
    assert reduced >= ITEMSIZE * forward["parameters"]


def test_activity_perturbation_all_reduces_the_gradient(results):
    """Activity perturbation's estimate is formed per layer from each
    replica's examples: the replicas all-reduce it, as backprop does."""
    runs = results["configurations"]["activations"]
    _assert_same_weights(runs["data"], runs["single"])
    activity = results["papers_mlp"]["activations"]
    assert activity["all_reduce_bytes_per_step"] >= ITEMSIZE * activity["parameters"]


def test_errors(results):
    errors = results["errors"]
    for key in ("indivisible_batch", "indivisible_last_batch"):
        assert errors[key]["type"] == "ValueError"
        assert "multiples of 4" in errors[key]["message"]
    assert "batch_size=30" in errors["indivisible_batch"]["message"]
    assert "last batch: 2" in errors["indivisible_last_batch"]["message"]
    assert "num_replicas=2" in errors["num_replicas"]["message"]
    assert results["single_device_bytes"] == 0
    # A model built before `set_distribution`: its variables live on one
    # device, which the distributed step cannot use.
    outside = errors["built_outside"]
    assert outside["type"] == "ValueError"
    assert "lives on devices [0]" in outside["message"]
    assert "after `keras.distribution.set_distribution" in outside["message"]


def test_two_processes_match_one(tmp_path):
    """Two processes on this machine join through
    `keras.distribution.initialize` (coordinator on 127.0.0.1), train 3
    steps under `DataParallel`, each feeding half of every global batch of
    32: both end with the same weights, equal to one process's (rtol 1e-5).
    Bounded in time; every process is killed on the way out."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    script = os.path.join(os.path.dirname(SCRIPT), "jax_processes_script.py")
    (port,) = shared_runs.free_ports(1)
    commands = [
        [sys.executable, script, str(tmp_path / f"p{index}.json"), str(port), str(index), "2"]
        for index in range(2)
    ]
    # The one-process reference runs beside them.
    commands.append([sys.executable, script, str(tmp_path / "one.json")])
    shared_runs.run_together(commands, [env] * 3)
    p0, p1, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("p0", "p1", "one"))
    assert p0["processes"] == p1["processes"] == 2 and p0["devices"] == 2
    assert one["processes"] == 1
    for a, b, c in zip(p0["weights"], p1["weights"], one["weights"]):
        np.testing.assert_array_equal(np.array(a), np.array(b))
        np.testing.assert_allclose(np.array(a), np.array(c), rtol=1e-5, atol=1e-6)
    assert p0["direction_step"] == one["direction_step"] == 3


HLO = """
  %all-reduce.1 = pred[] all-reduce(%is-finite), channel_id=2, replica_groups=[1,4]<=[4]
  %all-reduce.3 = (f32[], f32[2]{0}) all-reduce(%a, %b), channel_id=1, to_apply=%region_53
  %fusion.2 = f32[16,8]{1,0} fusion(%p0), kind=kLoop, calls=%fused_computation
  %all-reduce.5 = (f32[], f32[16,8]{1,0}, /*index=2*/bf16[4]{0}) all-reduce(%c, %d, %e)
  %all-gather-start = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%f), dimensions={0}
"""


def test_parse_collectives_reads_ops_shapes_and_bytes():
    from keras_fwdgrad.backend.jax.distribution import parse_collectives

    found = parse_collectives(HLO)
    assert [c["op"] for c in found] == ["all-reduce", "all-reduce", "all-reduce", "all-gather"]
    assert found[0] == {"op": "all-reduce", "shapes": ["pred[]"], "bytes": 1}
    assert found[1]["shapes"] == ["f32[]", "f32[2]"] and found[1]["bytes"] == 12
    assert found[2]["shapes"] == ["f32[]", "f32[16,8]", "bf16[4]"]
    assert found[2]["bytes"] == 4 + 4 * 128 + 2 * 4
