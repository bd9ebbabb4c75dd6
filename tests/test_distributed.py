"""Distribution strategies: a killed run resumes to the end of an uninterrupted one.

Each run is a process of its own (tests/distributed_child.py), because the
devices (two logical CPUs for TensorFlow, two XLA host devices for JAX) must
exist before the backend starts. The processes are forked by the fork server
of the strategy's backend (tests/forkserver.py), which imported the backend
but started no runtime: the child makes its devices before the first op.
`tf.distribute.MultiWorkerMirroredStrategy` is in test_multi_worker.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys

import forkserver
import numpy as np
import pytest

from keras_ckpt import manager

CHILD = os.path.join(os.path.dirname(__file__), "distributed_child.py")
HAS_JAX = importlib.util.find_spec("jax") is not None
STRATEGIES = [
    "mirrored",
    pytest.param("data_parallel", marks=pytest.mark.skipif(not HAS_JAX, reason="needs jax")),
    pytest.param("model_parallel", marks=pytest.mark.skipif(not HAS_JAX, reason="needs jax")),
]


def run(strategy, directory, out, *args, killed=False):
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "XLA_FLAGS")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0",
               KERAS_BACKEND="tensorflow" if strategy == "mirrored" else "jax")
    proc = forkserver.run([sys.executable, CHILD, strategy, str(directory), str(out), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == (-signal.SIGKILL if killed else 0), proc.stderr[-3000:]
    if killed:
        return None
    with np.load(out) as data:
        arrays = {k: data[k] for k in data.files if k != "outcome"}
        return arrays, json.loads(data["outcome"].tobytes())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_killed_mid_epoch_and_resumed_equals_an_uninterrupted_run(tmp_path, strategy):
    straight, outcome_a = run(strategy, tmp_path / "a", tmp_path / "a.npz")
    run(strategy, tmp_path / "b", tmp_path / "b.npz", "--kill-step", "10", killed=True)
    newest = manager.list_checkpoints(tmp_path / "b")[-1]
    assert (newest.global_step, newest.epoch, newest.step) == (9, 1, 3)  # mid-epoch 2
    resumed, outcome_b = run(strategy, tmp_path / "b", tmp_path / "b.npz")
    assert outcome_b.pop("resumed_from") == [1, 3]
    assert outcome_a.pop("resumed_from") is None
    assert outcome_a == outcome_b  # history, iterations, and the variables' sharding
    assert straight.keys() == resumed.keys()
    for name in straight:
        np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)
    if strategy == "model_parallel":  # the kernel stayed split over the two devices
        assert "spec=P(None, 'model')" in outcome_b["sharding"], outcome_b["sharding"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_budget_stop_and_nan_stop_under_the_strategy(tmp_path, strategy):
    _, budget = run(strategy, tmp_path / "a", tmp_path / "a.npz", "--budget-steps", "7")
    reason, path = budget["budget"]
    assert reason == "max-duration"
    info = manager.list_checkpoints(tmp_path / "a")[-1]
    # BudgetStop recorded the checkpoint it had made at the stop, and that is
    # the newest one, at the step where training stopped.
    assert path is not None and info.path == path
    assert info.global_step == budget["iterations"]
    _, nan = run(strategy, tmp_path / "n", tmp_path / "n.npz", "--poison-step", "5")
    assert nan["nan_events"][0] == [0, 5]  # epoch 1, step 5
    saved = manager.list_checkpoints(tmp_path / "n")
    assert [c.global_step for c in saved] == [3]  # the step-3 save; nothing non-finite
