"""Which code a measurement ran: the git commit, read without TensorFlow
(the GPU benchmarks run where only JAX is installed)."""

import os
import subprocess


def code_version(path=None):
    """The commit of the git checkout that holds `path` (default: the
    current directory), with `+changes` when its tracked code (`.py`,
    `.toml`) differs from it (results and documents written meanwhile do
    not count); `None` outside a checkout. Read it when a run starts: a commit made
    while it runs does not describe it. (`examples/common.py` keeps its
    own copy, since its `--help` must not import TensorFlow.)"""
    cwd = path or os.getcwd()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/*.py", ":/*.toml"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if dirty else "")
