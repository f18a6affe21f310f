"""Expensive runs (subprocesses that train) computed once per test
session, even when pytest-xdist spreads their tests over workers."""

import json
import os

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
