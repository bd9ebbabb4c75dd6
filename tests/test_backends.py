"""The resume, budget, NaN, preemption and writing tests again, on JAX and on torch.

Keras picks its backend once per process, from `KERAS_BACKEND`, so each
backend's run is a pytest process of its own. The subset: exact resume of a
run killed mid-epoch (Dropout, BatchNormalization, shuffled data; and with
steps_per_execution on JAX), EarlyStopping across a kill and on an error,
BudgetStop (steps_per_execution, a real clock), TerminateOnNaN (all of it),
preemption and save on exception (all of it), and the writers (the no-copy
snapshot's stability, background writes). The ledger and the argument checks
do not depend on the backend and run on TensorFlow only.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
RESUME = "test_exact_resume.py::test_killed_and_resumed_run_is_bitwise_equal"
SUBSET = [
    f"{RESUME}[mid-epoch]",
    f"{RESUME}[mid-epoch-spe2]",
    "test_terminate_on_nan.py",
    "test_preemption.py",
    "test_lean_write.py",
    "test_async_write.py",
    "test_budget_stop.py::test_with_steps_per_execution_the_stop_overshoots_by_at_most_one_execution",
    "test_budget_stop.py::test_real_time_run_stops_within_one_step_of_the_limit",
    "test_early_stopping.py::test_killed_run_stops_at_the_same_epoch_with_the_same_weights[memory]",
    "test_early_stopping.py::test_restore_best_on_an_exception_only_when_asked",
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_subset_passes_on(backend, tmp_path):
    if importlib.util.find_spec(backend) is None:
        pytest.fail(f"{backend} is not installed: `pip install -e '.[test]'` installs it.")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
         f"--basetemp={tmp_path / 'pytest'}", *SUBSET],
        cwd=TESTS, env=env, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary
