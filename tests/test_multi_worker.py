"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 (tests/multi_worker_child.py).

Only the chief writes into the checkpoint directory, both workers resume the
same state, stops decided on one worker (a budget on the chief's clock, a
signal that reached one worker) are taken by both at the same step, and a
killed worker leads to a resume that ends like an uninterrupted run. Keras
3.15's own `fit` needs two fixes under this strategy; the child applies them
(keras-team/keras#20585, docs/backends.md).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import two_processes
from conftest import make_model
from two_processes import assert_same, finish, free_ports, kill_both, run_both

from keras_ckpt import manager, multi_worker

CHILD = os.path.join(os.path.dirname(__file__), "multi_worker_child.py")


def launch(directory, out, *args):
    """Starts both workers (forked by the TensorFlow fork server: the child's TF_CONFIG, set
    before the strategy is made, is the one the strategy reads); returns them."""
    ports = ",".join(map(str, free_ports()))
    return two_processes.launch(CHILD, ports, directory, out, args, "tensorflow")


def run(directory, out, *args, statuses=(0, 0)):
    return run_both(launch(directory, out, *args), out, statuses)


def assert_trained_alike(a, b, outcome):
    """The workers' weights and optimizer state agree (not the drifting BatchNorm statistics)."""
    keys = [f"model/{i}" for i in outcome["trainable"]] + [k for k in a if k.startswith("opt")]
    assert len(keys) > 10
    assert_same({k: a[k] for k in keys}, {k: b[k] for k in keys})


@pytest.mark.slow
def test_a_killed_worker_resumes_to_the_end_of_an_uninterrupted_run(tmp_path):
    straight, outcome, straight_other, other_outcome = run(tmp_path / "a", tmp_path / "a")
    assert outcome == other_outcome and outcome["iterations"] == 18
    # Not the same state: Keras lets BatchNormalization's moving statistics
    # drift between workers (each sees its own part of the batch).
    assert any(not np.array_equal(straight[k], straight_other[k]) for k in straight)
    assert_trained_alike(straight, straight_other, outcome)

    # A worker that cannot see the chief's checkpoints: both refuse to start.
    procs = launch(tmp_path / "a", tmp_path / "x", "--worker1-directory", str(tmp_path / "w1"))
    logs = finish(procs, statuses=(1, 1))
    assert all("would resume from different states" in log for log in logs)
    assert "found no checkpoint, the chief one of global step 18" in logs[1]

    # Worker 1 dies after global step 10; the chief is stuck in the next
    # step's all-reduce until the job is ended, as a scheduler would.
    procs = launch(tmp_path / "b", tmp_path / "b", "--kill-step", "10")
    kill_both(procs)
    newest = manager.list_checkpoints(tmp_path / "b")[-1]
    assert (newest.global_step, newest.epoch, newest.step) == (9, 1, 3)

    resumed, resumed_outcome, other, other_outcome = run(tmp_path / "b", tmp_path / "b")
    assert resumed_outcome.pop("resumed_from") == other_outcome.pop("resumed_from") == [1, 3]
    assert outcome.pop("resumed_from") is None
    assert resumed_outcome == outcome == other_outcome  # history and iterations
    assert_same(straight, resumed)
    assert_same(straight_other, other)  # each worker got its own statistics back


@pytest.mark.slow
def test_a_budget_stop_on_the_chiefs_clock_is_taken_by_both_workers(tmp_path):
    # Worker 1's clock runs 10x faster: deciding alone, it would stop first.
    chief, outcome, other, other_outcome = run(tmp_path / "a", tmp_path / "a",
                                               "--budget-steps", "7", "--early-stopping")
    assert outcome["budget"] == other_outcome["budget"] == "daily-budget"
    # The chief's clock (1 s a step, 7.5 s allowed): step 7 or 8 (one step of
    # overshoot at most), where worker 1's own clock would have stopped at 1.
    assert outcome["iterations"] == other_outcome["iterations"] in (7, 8)
    # EarlyStopping gave both the best weights the chief wrote (statistics too).
    assert os.path.exists(tmp_path / "a" / "best.weights.h5")
    assert_same(chief, other)
    newest = manager.list_checkpoints(tmp_path / "a")[-1]
    assert newest.global_step == outcome["iterations"]  # saved where both stopped

    # Started again the same (simulated) day: the chief's ledger says the day's
    # budget is spent; both workers resume, train no step, and end with the
    # same best weights as before.
    again, again_outcome, other, other_outcome = run(tmp_path / "a", tmp_path / "b",
                                                     "--budget-steps", "7", "--early-stopping")
    assert again_outcome["budget"] == other_outcome["budget"] == "budget-spent-at-start"
    assert again_outcome["iterations"] == other_outcome["iterations"] == outcome["iterations"]
    assert_same(chief, again)


@pytest.mark.slow
def test_a_nan_stop_and_a_signal_to_one_worker_stop_both_at_the_same_step(tmp_path):
    chief, outcome, other, other_outcome = run(tmp_path / "n", tmp_path / "n",
                                               "--poison-step", "5")
    assert outcome["nan_events"] == other_outcome["nan_events"] == [[0, 5]]
    assert outcome["iterations"] == other_outcome["iterations"] == 5
    assert [c.global_step for c in manager.list_checkpoints(tmp_path / "n")] == [3]

    # SIGTERM reaches worker 1 only, from a callback after the checkpoint's
    # in step 4: it is seen at step 5's end; both save step 5 and exit 143
    # (the chief's background write committed before it exits).
    chief, outcome, other, other_outcome = run(tmp_path / "s", tmp_path / "s",
                                               "--signal-step", "4", "--async-write",
                                               statuses=(143, 143))
    assert outcome["preempted_by"] == other_outcome["preempted_by"] == "SIGTERM"
    assert outcome["iterations"] == other_outcome["iterations"] == 5
    assert_trained_alike(chief, other, outcome)
    assert manager.list_checkpoints(tmp_path / "s")[-1].global_step == 5


@pytest.mark.parametrize("task, cluster, chief", [
    (("worker", 0), {"worker": ["a", "b"]}, True),
    (("worker", 1), {"worker": ["a", "b"]}, False),
    (("chief", 0), {"chief": ["c"], "worker": ["a", "b"]}, True),
    (("worker", 0), {"chief": ["c"], "worker": ["a", "b"]}, False),
    (("evaluator", 0), {"worker": ["a", "b"], "evaluator": ["e"]}, False),
])
def test_the_chief_is_the_chief_task_or_worker_0_without_one(task, cluster, chief):
    assert multi_worker.is_chief(*task, cluster) is chief


def test_single_process_training_has_no_workers():
    model = make_model()
    assert multi_worker.workers_of(model) is None  # no strategy
    import tensorflow as tf

    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        mirrored = make_model()
    assert multi_worker.workers_of(mirrored) is None  # one machine


@pytest.mark.slow
def test_two_different_signals_on_two_workers_agree_on_one_of_them(tmp_path):
    # SIGINT reaches the chief and SIGTERM worker 1, at the same step: both stop
    # there for SIGTERM (the first of `preemption_signals` received) and exit 143,
    # not each with its own status (130 and 143), nor an average of the two.
    chief, outcome, other, other_outcome = run(tmp_path / "s", tmp_path / "s",
                                               "--signal-step", "4", "--sigint-chief-step", "4",
                                               statuses=(143, 143))
    assert outcome["preempted_by"] == other_outcome["preempted_by"] == "SIGTERM"
    assert outcome["iterations"] == other_outcome["iterations"] == 5
    assert manager.list_checkpoints(tmp_path / "s")[-1].global_step == 5

