import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow keeps allocator statistics on the CPU (the step memory that
# examples, benchmarks and their tests measure) only with its BFC allocator,
# its default only where oneDNN is on (not on every processor).
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
# Under pytest-xdist each worker is a process of its own, and TensorFlow
# sizes its intra-op thread pool to every core: two workers on two cores
# ran four threads for two cores, and TensorFlow tests took 15-25 % longer
# than with the cores shared out (measured on 2 cores, two workers: the
# same 99 tests in 205 s and 223 s, against 165 s and 178 s with one
# intra-op thread each). So each worker gets its share of the cores;
# subprocesses that tests start inherit it. JAX's CPU client showed no
# such difference (`--xla_cpu_multi_thread_eigen=false`: 131 s either way).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

import compile_flags  # noqa: E402

# XLA programs compile faster in tests (see compile_flags.py).
compile_flags.use_fast_compile()

import keras  # noqa: E402
import pytest  # noqa: E402

# The three ways Keras runs a step: eagerly, as a traced graph, and compiled
# with XLA. Tests trace their own compiled functions without AutoGraph
# (`autograph=False`, or `keras_fwdgrad.backend.run`), as Keras traces a
# step: converting the code they call only costs tracing time.
MODES = ["eager", "graph", "xla"]

# The same for a parametrization over many architectures: each XLA variant
# compiles a program of its own, so those are left out of the fast tier
# (`-m "not slow"`); the eager and graph variants stay in it. Files that are
# slow as a whole say so with `pytestmark = pytest.mark.slow`.
ARCHITECTURE_MODES = ["eager", "graph", pytest.param("xla", marks=pytest.mark.slow)]


def backend_modes(modes):
    """`modes` without `"xla"` on JAX, where `"graph"` and `"xla"` are the
    same `jax.jit`: the same program would be tested twice."""
    if keras.backend.backend() != "jax":
        return list(modes)
    return [m for m in modes if getattr(m, "values", (m,))[0] != "xla"]


def tensorflow_runs_channels_first_convolutions():
    """Whether TensorFlow's own kernels run a channels-first `Conv2D`
    outside XLA here: on a CPU only with oneDNN, which TensorFlow turns on
    for some processors (plain Keras fails the same way without it).
    Always true on JAX."""
    if keras.backend.backend() != "tensorflow":
        return True
    import tensorflow as tf

    try:
        tf.nn.conv2d(tf.zeros((1, 1, 2, 2)), tf.zeros((1, 1, 1, 1)), 1, "VALID", "NCHW")
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False
    return True


def compile_kwargs(mode):
    return {"run_eagerly": mode == "eager", "jit_compile": mode == "xla"}


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    # Without Keras' `gc.collect()` (`free_memory=False`): TensorFlow keeps
    # the graphs of every traced step alive (checked on TensorFlow 2.21,
    # Keras 3.15: about 850 Python objects per `fit` of a Sequential, five
    # times as many with `ForwardGradientModel`), so a full collection
    # before each test grew to most of a second late in a run and was a
    # third of the suite's time. Python's own collector still runs.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)
    yield
