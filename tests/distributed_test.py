"""Forward-gradient training under `tf.distribute.MirroredStrategy` on two
logical CPU devices. TensorFlow's devices must be configured before they
are first used, so each configuration runs `distributed_script.py` in a
process of its own."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import shared_runs

# Each configuration trains in a process of its own.
pytestmark = pytest.mark.slow

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_script.py")


def _run(mode, tmp_path):
    out = tmp_path / f"{mode}.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_CONFIG", None)
    subprocess.run([sys.executable, SCRIPT, mode, str(out)], check=True, timeout=600, env=env)
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return shared_runs.once(
        "distributed", tmp_path_factory, lambda tmp: (_run("mirrored", tmp), _run("single", tmp))
    )


def test_two_replicas(runs):
    mirrored, single = runs
    assert mirrored["replicas"] == 2 and single["replicas"] == 1


@pytest.mark.parametrize(
    "key",
    [
        "forward/sgd/directional_derivatives",
        "forward/adam/directional_derivatives",
        "forward/sgd/gradients",
        "backprop/sgd/None",
    ],
)
def test_mirrored_weights_match_single_device(runs, key):
    """Same seed, data and global batch (64, i.e. 32 per replica), 6 steps,
    K = 2 directions: the weights equal the single-device run's.

    Tolerance: the replicas sum the batch in another order. The directional
    derivative is a sum of 64 terms with cancellation, so its float32
    relative error reaches about 1e-4; Adam turns that into at most
    lr · 1e-4 = 1e-6 per step, 6e-6 after 6 steps: atol 1e-5. A replica out
    of sync, or a derivative counted twice, moves weights by about lr =
    1e-2 per step, a thousand times more."""
    mirrored, single = runs
    a, b = mirrored["results"][key], single["results"][key]
    for wa, wb in zip(a["weights"], b["weights"]):
        np.testing.assert_allclose(np.array(wa), np.array(wb), rtol=0, atol=1e-5)
    if key.startswith("forward"):
        # Both replicas drew the same directions: one counter, 6 steps.
        assert a["direction_step"] == 6 and a["skipped"] == 0


def test_forward_all_reduces_k_scalars_not_the_gradient(runs):
    mirrored, _ = runs
    r = mirrored["results"]
    params = r["backprop/sgd/None"]["params"]
    # Backprop all-reduces one value per parameter.
    assert r["backprop/sgd/None"]["reduced_per_replica"] == params
    # Forward gradient: the K = 2 directional derivatives, nothing else.
    for key in ("forward/sgd/directional_derivatives", "forward/adam/directional_derivatives"):
        assert r[key]["reduced_per_replica"] == 2
        assert r[key]["bytes_per_step"] == 2 * 4
    # The fallback all-reduces the forward gradient and a finiteness flag.
    assert r["forward/sgd/gradients"]["reduced_per_replica"] == params + 1
    assert r["forward/sgd/gradients"]["bytes_per_step"] == 4 * params + 4


@pytest.fixture(scope="session")
def worker_runs(tmp_path_factory):
    """Two `MultiWorkerMirroredStrategy` workers on 127.0.0.1, one process
    each, forward-gradient configurations only (Keras 3.15 cannot `fit` a
    plain model under this strategy; see docs/distributed.md)."""
    return shared_runs.once("workers", tmp_path_factory, _run_workers)


def _run_workers(tmp):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in shared_runs.free_ports(2)]}
    commands, envs = [], []
    for index in range(2):
        envs.append(
            {
                **os.environ,
                "TF_CPP_MIN_LOG_LEVEL": "3",
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                ),
            }
        )
        commands.append(
            [sys.executable, SCRIPT, "worker", str(tmp / f"worker{index}.json"), "forward"]
        )
    shared_runs.run_together(commands, envs)
    return [json.loads((tmp / f"worker{i}.json").read_text()) for i in range(2)]


@pytest.mark.parametrize(
    "key",
    [
        "forward/sgd/directional_derivatives",
        "forward/adam/directional_derivatives",
        "forward/sgd/gradients",
    ],
)
def test_two_workers_stay_in_sync_and_match_single_process(worker_runs, runs, key):
    """Two worker processes (global batch 64, 32 each), 6 steps: their
    weights are identical, and equal the single-process run's to the
    tolerance derived above (atol 1e-5)."""
    w0, w1 = (w["results"][key] for w in worker_runs)
    single = runs[1]["results"][key]
    assert worker_runs[0]["replicas"] == 2
    for a, b, c in zip(w0["weights"], w1["weights"], single["weights"]):
        np.testing.assert_array_equal(np.array(a), np.array(b))
        np.testing.assert_allclose(np.array(a), np.array(c), rtol=0, atol=1e-5)
    assert w0["direction_step"] == 6 and w0["skipped"] == 0
    # Each worker all-reduces the K = 2 derivatives per step, not the
    # gradient (the fallback: 195 parameters and the finiteness flag).
    expected = 196 if key.endswith("gradients") else 2
    assert w0["reduced_per_replica"] == expected


def test_activity_perturbation_all_reduces_the_gradient(runs):
    """With `perturbation="activations"` each replica's tangents belong to
    its own examples, so replicas all-reduce the gradient (and the
    finiteness flag), heads included, and the model trains."""
    mirrored, single = runs
    r = mirrored["results"]["activations/sgd/gradients"]
    params = r["params"]
    assert params == single["results"]["activations/sgd/gradients"]["params"]
    # The base model's 195 parameters and one head (16 * 3 + 3).
    assert params == 195 + 51
    assert r["reduced_per_replica"] == params + 1
    assert r["bytes_per_step"] == 4 * params + 4
    assert np.isfinite(r["loss"])


def test_weight_regularizers_count_once_on_two_replicas(runs):
    """Keras divides the regularization losses by the number of replicas
    and sums the replicas' gradients; activity perturbation adds each
    regularizer's exact gradient to its estimate, so on each of two
    replicas it adds half (it added all of it, a step of 0.8 where backprop
    takes 0.9). One SGD step on zero inputs moves the kernel by the
    regularizer alone: by 0.9, with one replica and two."""
    for run in runs:
        for method, ratios in run["regularizer_steps"].items():
            np.testing.assert_allclose(ratios, 0.9, rtol=1e-5, err_msg=method)


def test_optimizer_is_left_as_made(runs):
    """Bypassing the optimizer's gradient all-reduce lasts only while the
    update is traced: no method of the optimizer stays overridden."""
    mirrored, _ = runs
    for key, result in mirrored["results"].items():
        if key.startswith("forward/"):
            assert result["shadowed_optimizer_methods"] == [], key
