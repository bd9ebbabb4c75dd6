"""Several JAX processes: two `jax.distributed` processes on 127.0.0.1 (jax_processes_child.py).

Keras's `DataParallel` spans both processes' devices and each process runs
the same `fit`. Process 0 alone writes into the checkpoint directory (files,
lock, ledger); a stop decided on one process (a signal that reached it, a
budget on process 0's clock, a NaN) is taken by both at the same step; both killed
and resumed end bitwise like an uninterrupted run. A variable split across the
processes: tests/test_jax_shards.py.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import two_processes
from two_processes import assert_same, finish, free_ports, kill_both, run_both

from keras_ckpt import manager

CHILD = os.path.join(os.path.dirname(__file__), "jax_processes_child.py")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                                reason="needs jax (`pip install -e '.[test]'`)")


def launch(directory, out, *args):
    """Starts both processes (forked by the JAX fork server); returns them."""
    return two_processes.launch(CHILD, str(free_ports(1)[0]), directory, out, args, "jax")


def run(directory, out, *args, statuses=(0, 0)):
    return run_both(launch(directory, out, *args), out, statuses)


@pytest.mark.slow
def test_both_killed_and_resumed_end_like_an_uninterrupted_run(tmp_path):
    straight, outcome, straight_1, outcome_1 = run(tmp_path / "a", tmp_path / "a")
    assert outcome == outcome_1 and outcome["iterations"] == 18
    assert_same(straight, straight_1)  # one global state, the same on both processes

    # Process 1 dies after global step 10; process 0 is stuck in the next step's
    # collective until the job is ended, as a scheduler would end it.
    procs = launch(tmp_path / "b", tmp_path / "b", "--kill-step", "10")
    kill_both(procs)
    newest = manager.list_checkpoints(tmp_path / "b")[-1]
    assert (newest.global_step, newest.epoch, newest.step) == (9, 1, 3)

    resumed, resumed_outcome, resumed_1, resumed_outcome_1 = run(tmp_path / "b", tmp_path / "b")
    assert resumed_outcome.pop("resumed_from") == resumed_outcome_1.pop("resumed_from") == [1, 3]
    outcome.pop("resumed_from")
    assert resumed_outcome == outcome == resumed_outcome_1  # history and iterations
    assert_same(straight, resumed)
    assert_same(straight, resumed_1)


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_at_the_same_step_and_the_resume_is_exact(tmp_path):
    straight, outcome, _, _ = run(tmp_path / "a", tmp_path / "a")
    # SIGTERM reaches process 1 only, from a callback after the checkpoint's in
    # step 4: seen at step 5's end; both stop there, process 0 saves it, both exit 143.
    first, stopped, second, stopped_1 = run(tmp_path / "s", tmp_path / "s",
                                            "--signal-step", "4", statuses=(143, 143))
    assert stopped["preempted_by"] == stopped_1["preempted_by"] == "SIGTERM"
    assert stopped["iterations"] == stopped_1["iterations"] == 5
    assert_same(first, second)
    assert manager.list_checkpoints(tmp_path / "s")[-1].global_step == 5

    resumed, resumed_outcome, _, _ = run(tmp_path / "s", tmp_path / "s2")
    assert resumed_outcome["resumed_from"] is not None
    assert resumed_outcome["history"] == outcome["history"]
    assert_same(straight, resumed)


@pytest.mark.slow
def test_a_budget_stop_on_process_0s_clock_is_taken_by_both(tmp_path):
    # Process 1's clock runs 10x faster: deciding alone, it would stop first.
    first, outcome, second, outcome_1 = run(tmp_path / "a", tmp_path / "a",
                                            "--budget-steps", "7")
    assert outcome["budget"] == outcome_1["budget"] == "daily-budget"
    assert outcome["iterations"] == outcome_1["iterations"] in (7, 8)
    assert_same(first, second)
    assert os.path.exists(tmp_path / "a" / "ledger.json")  # process 0's (process 1 wrote none)
    assert manager.list_checkpoints(tmp_path / "a")[-1].global_step == outcome["iterations"]


@pytest.mark.slow
def test_a_nan_stop_is_taken_by_both_at_the_same_step_and_never_saved(tmp_path):
    first, outcome, second, outcome_1 = run(tmp_path / "n", tmp_path / "n", "--poison-step", "5")
    assert outcome["nan_events"] == outcome_1["nan_events"] == [[0, 5]]
    assert outcome["iterations"] == outcome_1["iterations"] == 5
    assert_same(first, second)
    assert [c.global_step for c in manager.list_checkpoints(tmp_path / "n")] == [3]


@pytest.mark.slow
def test_rng_states_that_differ_between_processes_are_told_at_save_and_at_resume(tmp_path):
    """Each process seeds NumPy differently: a checkpoint holds process 0's states, which a
    resume gives both, so the resumed run is not the uninterrupted one: said when saving
    and at the resume's train begin, not silently."""
    logs = kill_both(launch(tmp_path / "d", tmp_path / "d", "--seed-per-process",
                            "--kill-step", "10"))
    assert "RNG states differ at this save" in logs[0].replace("\n", " ")
    assert manager.storage.read_meta(
        manager.list_checkpoints(tmp_path / "d")[-1].path)["rng_differs_across_processes"]
    logs = finish(launch(tmp_path / "d", tmp_path / "d", "--seed-per-process"))
    for log in logs:
        assert "RNG states differed when this checkpoint was written" in log.replace("\n", " ")

