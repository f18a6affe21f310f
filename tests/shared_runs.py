"""Tests that train in processes of their own: expensive runs computed
once per test session (even when pytest-xdist spreads their tests over
workers), free ports, and processes that are always cleaned up."""

import json
import os
import socket
import subprocess

import filelock


def once(name, tmp_path_factory, make):
    """`make(folder)`'s JSON result, computed once per test session: under
    pytest-xdist the workers share it through a file in their common
    temporary folder, so that a test moved to the other worker does not
    train the configurations again (it waits for the first one instead)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    result = shared / f"{name}.json"
    with filelock.FileLock(str(result) + ".lock"):
        if not result.exists():
            folder = shared / name
            folder.mkdir(exist_ok=True)
            result.write_text(json.dumps(make(folder)))
        return json.loads(result.read_text())


def free_ports(n):
    """`n` distinct free TCP ports on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_together(commands, envs, timeout=300):
    """Runs one process per command at the same time, each with its
    environment in `envs` (stdout discarded, stderr kept): waits for each
    (at most `timeout` seconds) and asserts that it exited with 0, showing
    the end of its stderr; whatever happens, none is left running."""
    procs = []
    try:
        for command, env in zip(commands, envs, strict=True):
            procs.append(
                subprocess.Popen(
                    command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
            )
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err.decode()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
