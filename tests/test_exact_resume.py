"""The bar: a fit killed with SIGKILL and started again ends bitwise equal to an uninterrupted one.

Model with Dropout and BatchNormalization, Adam with a learning-rate schedule,
`keras.utils.set_random_seed` and op determinism; each run is a real process
(forked by the fork server, tests/forkserver.py). The uninterrupted run is the
session's shared reference for the same data, epochs and steps per execution
(`reference_run`), made without the killed run's save frequency.
"""

from __future__ import annotations

import os
import signal
import sys

import forkserver
import numpy as np
import pytest
from conftest import load_demo_result, needs_steps_per_execution


def run(directory, out, *args, expect_kill=False):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}
    command = [sys.executable, "-m", "keras_ckpt.demo_train", str(directory), str(out), *args]
    proc = forkserver.run(command, capture_output=True, text=True, env=env, timeout=300)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


def load(path):
    return load_demo_result(path)


@pytest.mark.slow
@pytest.mark.parametrize("args, kill", [
    (["--data", "numpy"], ["--kill-epoch", "1"]),
    (["--data", "tfdata"], ["--kill-epoch", "2"]),
    # A seeded `.shuffle(...)` reshuffling every epoch: its seeds are fast-forwarded.
    (["--data", "tfdata_plain"], ["--kill-epoch", "2"]),
    (["--data", "tfdata_plain", "--save-freq", "2"], ["--kill-step", "9"]),
    pytest.param(["--data", "numpy", "--save-freq", "2"], ["--kill-step", "9"],
                 marks=pytest.mark.backends),
    pytest.param(["--data", "numpy", "--save-freq", "4", "--spe", "2"], ["--kill-step", "11"],
                 marks=[needs_steps_per_execution, pytest.mark.backends]),
], ids=["numpy-shuffle-epoch", "tfdata-epochshuffle", "tfdata-shuffle-epoch",
        "tfdata-shuffle-mid-epoch", "mid-epoch", "mid-epoch-spe2"])
def test_killed_and_resumed_run_is_bitwise_equal(tmp_path, args, kill, reference_run):
    straight, history_a = reference_run(*args)
    run(tmp_path / "killed", tmp_path / "killed.npz", *args, *kill, expect_kill=True)
    assert not (tmp_path / "killed.npz").exists()
    run(tmp_path / "killed", tmp_path / "killed.npz", *args)
    resumed, history_b = load(tmp_path / "killed.npz")
    assert straight.keys() == resumed.keys()
    for name in straight:
        np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)
    assert history_a.pop("resumed_from") is None
    assert history_b.pop("resumed_from") is not None  # the second run did resume
    assert history_a == history_b
    assert history_b["epoch"] == [0, 1, 2, 3]
