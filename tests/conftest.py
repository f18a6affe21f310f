import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

# The three ways Keras runs a step: eagerly, as a traced graph, and compiled
# with XLA.
MODES = ["eager", "graph", "xla"]


def compile_kwargs(mode):
    return {"run_eagerly": mode == "eager", "jit_compile": mode == "xla"}


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(1234)
    yield


# Whole files that start processes or train for many steps.
_SLOW_FILES = {
    "benchmarks_test.py",
    "distributed_test.py",
    "examples_test.py",
    "tuning_test.py",
}


def pytest_collection_modifyitems(config, items):
    """Marks the tests left out of the fast tier (`-m "not slow"`): whole
    files that start processes or train for many steps, the XLA variants
    of the per-architecture parametrizations (the eager and graph variants
    stay), and the `keras.applications` models."""
    for item in items:
        name = item.fspath.basename
        params = getattr(item, "callspec", None)
        params = params.params if params is not None else {}
        if (
            name in _SLOW_FILES
            or (params.get("mode") == "xla" and "case" in params)
            or "name" in params
        ):
            item.add_marker(pytest.mark.slow)
