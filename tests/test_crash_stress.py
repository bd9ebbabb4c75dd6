"""Random SIGKILLs, inside the writer too: every resume finds a valid checkpoint, runs end bitwise.

The same harness as `benchmarks/crash_stress.py` (200 kills there), with 5 kills;
here its training processes are forked by the fork server (tests/forkserver.py).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile

import forkserver
import pytest

HARNESS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "crash_stress.py")


@pytest.mark.slow
def test_five_random_kills_leave_no_corrupt_file_and_the_run_ends_bitwise_equal(tmp_path):
    spec = importlib.util.spec_from_file_location("crash_stress", HARNESS)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)

    def start(directory, out, *extra):  # the harness's own _start, through the fork server
        err = tempfile.TemporaryFile(mode="w+")
        child = forkserver.Popen(
            [sys.executable, "-m", "keras_ckpt.demo_train", directory, out, *harness.TRAIN_ARGS,
             "--announce", *extra],
            stdout=subprocess.PIPE, stderr=err, text=True, env=harness._env())
        child.err_file = err
        return child

    harness._start = start
    summary = harness.run_stress(kills=5, per_episode=5, seed=3, workdir=str(tmp_path))
    assert summary["kills"] == 5
    assert summary["corrupt_loads"] == 0
    assert summary["missing_checkpoint_after_kill"] == 0
    assert summary["episodes"] >= 1 and summary["episodes_different"] == 0
    assert summary["episodes_bitwise_equal"] == summary["episodes"]
