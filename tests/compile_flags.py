"""How test processes compile XLA programs.

Tests check values, not speed, and most of their XLA programs run once or
twice: compiling is most of their cost. So the test processes (and the
subprocesses they start, which inherit the environment) compile XLA's CPU
programs at LLVM optimization level 0: the same HLO programs, compiled
about a third faster on JAX and a seventh faster for TensorFlow's
`jit_compile=True` on a 2-core CPU, and run slower. A subprocess that
trains for many steps (the examples' and benchmarks' smoke runs) runs
with `runtime_env()`, XLA's default level. `XLA_FLAGS` set before the
tests start is left as it is.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def use_fast_compile():
    """Sets `XLA_FLAGS` for this process, unless it is set already; call it
    before TensorFlow or JAX starts."""
    os.environ.setdefault("XLA_FLAGS", FAST_COMPILE)


def runtime_env(**extra):
    """A copy of the environment for a subprocess that runs many steps:
    without the tests' `XLA_FLAGS` (a value set before the tests stays),
    plus `extra`."""
    env = {**os.environ, **extra}
    if env.get("XLA_FLAGS") == FAST_COMPILE:
        del env["XLA_FLAGS"]
    return env
