"""The backend-sensitive tests again, on JAX and on torch: those marked `backends`.

Keras picks its backend once per process, from `KERAS_BACKEND`, so each
backend's run is a pytest session of its own, selecting `-m backends`, forked
by that backend's fork server (tests/forkserver.py), like its own children.
The subset: exact resume of a run killed mid-epoch (Dropout,
BatchNormalization, shuffled data; and with steps_per_execution on JAX),
EarlyStopping across a kill and on an error, BudgetStop (steps_per_execution,
a real clock), TerminateOnNaN (all of it), preemption and save on exception
(all of it), the writers (the no-copy snapshot's stability, background writes)
and the fork server's canary. The ledger and the argument checks do not
depend on the backend and run on TensorFlow only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

import forkserver
import pytest
from conftest import LOCK_BASE, lock_base

TESTS = os.path.dirname(os.path.abspath(__file__))


def collected(*args):
    """The node ids a pytest session with `args` would run (TensorFlow collection)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    proc = forkserver.run([sys.executable, "-m", "pytest", "-q", "--collect-only",
                           "-p", "no:cacheprovider", "-p", "no:xdist", *args, TESTS],
                          capture_output=True, text=True, cwd=TESTS, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


@pytest.mark.slow
@pytest.mark.nested
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_subset_passes_on(backend, tmp_path, request):
    if importlib.util.find_spec(backend) is None:
        pytest.fail(f"{backend} is not installed: `pip install -e '.[test]'` installs it.")
    # The session is itself a child of the backend's fork server, and its
    # children come from the same server.
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           **forkserver.address(backend)}
    for name in [k for k in env if k.startswith("PYTEST_")]:
        env.pop(name)
    base = lock_base()
    if base is not None:  # the session's realtime tests wait for this one's, and the reverse
        env[LOCK_BASE] = base
    # Only the files that hold marked tests: collecting the others costs seconds.
    files = sorted({os.path.join(TESTS, line.split("::")[0].split("/")[-1])
                    for line in _selected_by_marker(request.session)})
    proc = forkserver.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-W", "ignore", f"--basetemp={tmp_path / 'pytest'}", "-m", "backends", *files],
        cwd=TESTS, env=env, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary
    assert "error" not in summary and int(re.search(r"(\d+) passed", summary).group(1)) >= 40, \
        summary  # the subset ran (torch skips the steps_per_execution tests), not a handful


def _selected_by_marker(session) -> list[str]:
    """The node ids `-m backends` selects: from this session when it collected every test
    file (the full suite does), else from a collecting child."""
    files = {name for name in os.listdir(TESTS)
             if name.startswith("test_") and name.endswith(".py")}
    if files <= {os.path.basename(str(item.path)) for item in session.items}:
        return [item.nodeid for item in session.items if item.get_closest_marker("backends")]
    return collected("-m", "backends")


def test_the_subset_is_what_the_marker_selects(request):
    selected = _selected_by_marker(request.session)
    files = {line.split("::")[0] for line in selected}
    assert {"test_terminate_on_nan.py", "test_preemption.py", "test_lean_write.py",
            "test_async_write.py", "test_exact_resume.py", "test_budget_stop.py",
            "test_early_stopping.py", "test_forkserver.py"} <= {os.path.basename(f)
                                                                  for f in files}
    assert any("mid-epoch-spe2" in line for line in selected)
    assert not any("numpy-shuffle-epoch" in line for line in selected)  # TensorFlow's only
    assert len(selected) >= 50
