"""Faults and bad input: full disks, a directory in use, damaged and hostile files, bad args."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import forkserver
import numpy as np
import pytest
from conftest import make_model

import keras_ckpt
from keras_ckpt import manager

HERE = os.path.dirname(__file__)


def fit(model, callbacks, epochs=2):
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    return model.fit(x, x[:, :1], batch_size=8, epochs=epochs, verbose=0, shuffle=False,
                     callbacks=callbacks)


# ------------------------------------------------------------------ failed writes
# Two ways to fail writes: a real full filesystem (a 600 KiB tmpfs in a user
# and mount namespace of the child's own) and a file-size limit (RLIMIT_FSIZE,
# EFBIG, like a quota). Both run wherever they can; a machine without user
# namespaces skips the filesystem variant and says so in the test summary.
MECHANISMS = ["filesystem", "rlimit"]


def run_diskfull_child(tmp_path, policy, mechanism, variant=".keras"):
    """Runs tests/diskfull_child.py (forked); returns what it saw.

    A checkpoint of the child's model is about 230 KiB: on the tmpfs one or
    two fit, the rest fail; under the file-size limit, the first epoch's.
    `variant`: the file format, and " async" for the background writer.
    """
    option = ["--tmpfs", "600k"] if mechanism == "filesystem" else [
        "--fsize-after-epoch", "100000"]
    ext, *background = variant.split()
    proc = forkserver.run([sys.executable, f"{HERE}/diskfull_child.py", str(tmp_path), policy,
                           *option, "--ext", ext, *(["--async"] if background else [])],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 3 and proc.stdout.startswith("NO-NAMESPACE"):
        pytest.skip("no user+mount namespaces on this machine "
                    f"({proc.stdout.split(' ', 1)[1].strip()}): the full-filesystem variant "
                    "cannot run here; the file-size-limit variant [rlimit] still runs")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Exception ignored" not in proc.stderr, proc.stderr[-3000:]  # h5py's, at exit
    return json.loads(lines[-1][len("RESULT "):]), ext


# Both formats (`.weights.h5` is written by h5py straight to the file: its own
# write path once crashed the process on a full disk), sync and async.
VARIANTS = [".keras", ".weights.h5", ".keras async", ".weights.h5 async"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_a_full_disk_warns_keeps_training_and_keeps_the_last_checkpoint(tmp_path, mechanism,
                                                                        variant):
    result, ext = run_diskfull_child(tmp_path, "warn", mechanism, variant)
    errno = "No space left" if mechanism == "filesystem" else "File too large"
    assert result["raised"] is None and result["epochs_trained"] == 6
    saved = len(result["valid"])  # how many fit depends on the filesystem's size
    assert 1 <= saved <= 3 and len(result["save_errors"]) == 6 - saved
    assert errno in result["save_errors"][-1]
    assert result["warnings"] == result["save_errors"]  # each one also a Python warning
    # Only complete checkpoints, each read and verified after the failures; no
    # temporary junk and no lock file left.
    assert result["valid"] == [[f"ckpt-{e + 1:02d}{ext}", e] for e in range(saved)]
    assert result["files"] == [name for name, _ in result["valid"]]


@pytest.mark.slow
@pytest.mark.parametrize("variant", [".keras", ".weights.h5"])
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_a_full_disk_with_on_save_error_raise_stops_with_the_error(tmp_path, mechanism,
                                                                   variant):
    result, ext = run_diskfull_child(tmp_path, "raise", mechanism, variant)
    errno = "No space left" if mechanism == "filesystem" else "File too large"
    saved = len(result["valid"])
    assert result["raised"] and saved >= 1 and result["epochs_trained"] == saved + 1
    assert errno in result["raised"]
    assert result["valid"] == [[f"ckpt-{e + 1:02d}{ext}", e] for e in range(saved)]
    assert result["files"] == [name for name, _ in result["valid"]]


# ------------------------------------------------------------------ one run per directory
def test_a_second_process_gets_a_clear_error_and_a_killed_holder_leaves_no_lock(tmp_path):
    holder = forkserver.Popen(
        [sys.executable, "-c",
         "import sys; from keras_ckpt import dirlock; dirlock.acquire(sys.argv[1], 'x'); "
         "print('locked', flush=True); sys.stdin.readline()", str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        model = make_model()
        with pytest.raises(keras_ckpt.DirectoryInUseError, match=f"pid {holder.pid} on"):
            fit(model, [keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"))])
        assert int(model.optimizer.iterations.numpy()) == 0  # refused before any step
        fit(make_model(), [keras_ckpt.ModelCheckpoint(str(tmp_path / "s.keras"), lock=False)],
            epochs=1)  # the opt-out
    finally:
        holder.kill()
        holder.wait()
    # The holder died without unlocking: the kernel released its lock.
    fit(make_model(), [keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"))], epochs=1)
    assert sorted(os.listdir(tmp_path)) == ["c.keras", "s.keras"]


def test_two_checkpoints_of_one_run_share_a_directory(tmp_path):
    every = keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"))
    best = keras_ckpt.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="loss",
                                      save_best_only=True)
    fit(make_model(), [every, best])
    assert sorted(os.listdir(tmp_path)) == ["best.keras", "e1.keras", "e2.keras"]


# ------------------------------------------------------------------ damaged checkpoints
def damage(path, at=0.5):
    data = bytearray(open(path, "rb").read())
    data[int(len(data) * at)] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_resume_falls_back_past_a_damaged_file_and_says_which(tmp_path):
    fit(make_model(), [keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"))], epochs=3)
    damage(tmp_path / "e3.keras")
    with open(tmp_path / "e2.keras", "r+b") as f:  # truncated
        f.truncate(os.path.getsize(tmp_path / "e2.keras") // 2)
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), resume=True)
    with pytest.warns(UserWarning) as caught:
        fit(make_model(), [checkpoint], epochs=3)
    text = " ".join(str(w.message) for w in caught)
    assert "e3.keras" in text and "e2.keras" in text
    assert checkpoint.resumed_from.path.endswith("e1.keras")
    assert "replacing" in text  # the damaged files are replaced by new saves, and it says so


def test_no_valid_checkpoint_is_an_error_unless_starting_fresh_is_allowed(tmp_path):
    fit(make_model(), [keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"))], epochs=2)
    for name in ("e1.keras", "e2.keras"):
        damage(tmp_path / name)
    before = {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path)}
    model = make_model()
    with pytest.raises(keras_ckpt.CorruptCheckpointError,
                       match=r"holds 2 checkpoint file\(s\).*e1.keras: it fails verification"
                             r".*e2.keras: it fails verification.*start_fresh"):
        with pytest.warns(UserWarning):
            fit(model, [keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"),
                                                   resume=True)])
    assert int(model.optimizer.iterations.numpy()) == 0
    assert {n: open(tmp_path / n, "rb").read() for n in os.listdir(tmp_path)} == before
    fresh = keras_ckpt.ModelCheckpoint(str(tmp_path / "f{epoch}.keras"), resume=True,
                                       if_none_valid="start_fresh")
    with pytest.warns(UserWarning, match="starting from scratch"):
        fit(make_model(), [fresh], epochs=1)
    assert fresh.resumed_from is None and os.path.exists(tmp_path / "f1.keras")
    assert open(tmp_path / "e1.keras", "rb").read() == before["e1.keras"]


def test_leftover_temporary_files_of_dead_processes_are_removed_with_a_warning(tmp_path):
    (tmp_path / ".c.keras.tmp-999999-abcd.keras").write_bytes(b"partial")
    with pytest.warns(UserWarning, match=r"removed \.c\.keras\.tmp-999999"):
        fit(make_model(), [keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"))], epochs=1)
    assert os.listdir(tmp_path) == ["c.keras"]


# ------------------------------------------------------------------ every argument
BAD_ARGUMENTS = [
    # ModelCheckpoint
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "monitor": 3}, TypeError, "`monitor`"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "verbose": -1}, ValueError, "`verbose`"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "save_best_only": "yes"}, TypeError,
     "`save_best_only`"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.weights.h5", "save_weights_only": 1}, TypeError,
     "`save_weights_only`"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "initial_value_threshold": "low"},
     TypeError, "`initial_value_threshold`"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "save_last": None}, TypeError,
     "`save_last`"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "clock": 5}, TypeError, "`clock`"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "fsync": "no"}, TypeError, "`fsync`"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "preemption": "later"}, ValueError,
     "`preemption` must be one of"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "preemption_signals": ["SIGNOPE"]},
     ValueError, "`preemption_signals`.*valid: "),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "preemption_signals": ["SIGKILL"]},
     ValueError, "cannot be caught"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "preemption_signals": "SIGTERM"},
     TypeError, "`preemption_signals` must be a list"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "nosuchfs://bucket/c.keras"}, ValueError,
     "no file system for nosuchfs:// is installed"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "save_on_exception": 1}, TypeError,
     "`save_on_exception`"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "on_save_error": "ignore"}, ValueError,
     "`on_save_error` must be one of"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "if_none_valid": "hope"}, ValueError,
     "`if_none_valid` must be one of"),
    (keras_ckpt.ModelCheckpoint, {"filepath": "c.keras", "lock": "on"}, TypeError, "`lock`"),
    # EarlyStopping
    (keras_ckpt.EarlyStopping, {"monitor": None}, TypeError, "`monitor`"),
    (keras_ckpt.EarlyStopping, {"min_delta": "x"}, TypeError, "`min_delta`"),
    (keras_ckpt.EarlyStopping, {"patience": -1}, ValueError, "`patience`"),
    (keras_ckpt.EarlyStopping, {"patience": 1.5}, TypeError, "`patience`"),
    (keras_ckpt.EarlyStopping, {"verbose": "loud"}, TypeError, "`verbose`"),
    (keras_ckpt.EarlyStopping, {"baseline": "x"}, TypeError, "`baseline`"),
    (keras_ckpt.EarlyStopping, {"restore_best_weights": "yes"}, TypeError,
     "`restore_best_weights`"),
    (keras_ckpt.EarlyStopping, {"start_from_epoch": -2}, ValueError, "`start_from_epoch`"),
    (keras_ckpt.EarlyStopping, {"min_delta_mode": "percent"}, ValueError, "`min_delta_mode`"),
    (keras_ckpt.EarlyStopping, {"check_finite": 0}, TypeError, "`check_finite`"),
    (keras_ckpt.EarlyStopping, {"stopping_threshold": "x"}, TypeError, "`stopping_threshold`"),
    (keras_ckpt.EarlyStopping, {"divergence_threshold": float("nan")}, ValueError,
     "`divergence_threshold`"),
    (keras_ckpt.EarlyStopping, {"restore_on_interrupt": 1}, TypeError, "`restore_on_interrupt`"),
    (keras_ckpt.EarlyStopping, {"restore_best_weights": True, "best_weights_path": "b.h5"},
     ValueError, "`best_weights_path`"),
    # BudgetStop
    (keras_ckpt.BudgetStop, {"max_duration": -5}, ValueError, "`max_duration`"),
    (keras_ckpt.BudgetStop, {"daily_budget": "1h"}, TypeError, "`daily_budget`"),
    (keras_ckpt.BudgetStop, {"daily_budget": 60, "timezone": "Mars/Base"}, ValueError,
     "`timezone`"),
    (keras_ckpt.BudgetStop, {"daily_budget": 60, "reset_hour": 24}, ValueError, "`reset_hour`"),
    (keras_ckpt.BudgetStop, {"daily_budget": 60, "price_per_hour": 0}, ValueError,
     "`price_per_hour`"),
    (keras_ckpt.BudgetStop, {"daily_budget": 60, "devices": 0}, ValueError, "`devices`"),
    (keras_ckpt.BudgetStop, {"daily_cost_limit": -1, "price_per_hour": 1}, ValueError,
     "`daily_cost_limit`"),
    (keras_ckpt.BudgetStop, {"run_cost_limit": "x", "price_per_hour": 1}, TypeError,
     "`run_cost_limit`"),
    (keras_ckpt.BudgetStop, {"daily_budget": 60, "ledger": 5}, TypeError, "`ledger`"),
    (keras_ckpt.BudgetStop, {"daily_budget": 60, "sync_interval": 0}, ValueError,
     "`sync_interval`"),
    (keras_ckpt.BudgetStop, {"daily_budget": 60, "raise_if_exhausted": "y"}, TypeError,
     "`raise_if_exhausted`"),
    (keras_ckpt.BudgetStop, {"daily_budget": 60, "clock": 1.0}, TypeError, "`clock`"),
    (keras_ckpt.BudgetStop, {"daily_budget": 60, "verbose": -1}, ValueError, "`verbose`"),
    # TerminateOnNaN
    (keras_ckpt.TerminateOnNaN, {"raise_error": "y"}, TypeError, "`raise_error`"),
    (keras_ckpt.TerminateOnNaN, {"action": "explode"}, ValueError, "`action` must be one of"),
    (keras_ckpt.TerminateOnNaN, {"check_weights": "batch"}, ValueError, "`check_weights`"),
    (keras_ckpt.TerminateOnNaN, {"rollback_from": "disk"}, ValueError, "`rollback_from`"),
    (keras_ckpt.TerminateOnNaN, {"action": "rollback", "snapshot_every": 0}, ValueError,
     "`snapshot_every`"),
    (keras_ckpt.TerminateOnNaN, {"action": "rollback", "lr_factor": 2}, ValueError,
     "`lr_factor`"),
    (keras_ckpt.TerminateOnNaN, {"max_retries": -1}, ValueError, "`max_retries`"),
    (keras_ckpt.TerminateOnNaN, {"verbose": 0.5}, TypeError, "`verbose`"),
    # retention policies and the data helper
    (keras_ckpt.KeepLast, {"n": 0}, ValueError, "`n`"),
    (keras_ckpt.KeepBest, {"k": 1, "monitor": 5}, TypeError, "`monitor`"),
    (keras_ckpt.KeepBest, {"k": 1, "mode": "auto"}, ValueError, "`mode`"),
    (keras_ckpt.KeepEvery, {"epochs": 0}, ValueError, "`epochs`"),
    (keras_ckpt.KeepEvery, {"interval": -1}, ValueError, "`interval`"),
]


@pytest.mark.parametrize("cls, kwargs, error, match", BAD_ARGUMENTS,
                         ids=[f"{c.__name__}-{next(iter(k if len(k) == 1 else list(k)[1:]))}"
                              for c, k, _, _ in BAD_ARGUMENTS])
def test_every_public_argument_is_checked_at_construction(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_an_unknown_mode_is_checked_at_construction_and_falls_back_as_keras_does():
    # Keras warns and uses "auto" (its own tests expect that of a drop-in: issue 17).
    with pytest.warns(UserWarning, match="mode 'up' is unknown, fallback to auto mode"):
        stop = keras_ckpt.EarlyStopping(mode="up")
    assert stop.mode == "auto"


def test_data_helper_arguments_are_checked():
    from keras_ckpt.data import EpochShuffle
    for kwargs, error, name in [({"buffer_size": 0, "seed": 1}, ValueError, "buffer_size"),
                                ({"buffer_size": 8, "seed": -1}, ValueError, "seed"),
                                ({"buffer_size": 8, "seed": 1, "name": ""}, TypeError, "name")]:
        with pytest.raises(error, match=f"`{name}`"):
            EpochShuffle(**kwargs)
    assert manager.list_checkpoints("/nonexistent") == []


def test_an_argument_keras_3_removed_names_its_replacement():
    with pytest.raises(TypeError, match=r"`period`, which Keras 3 removed; use save_freq"):
        keras_ckpt.ModelCheckpoint("c.keras", period=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        keras_ckpt.ModelCheckpoint("c.keras", colour="red")


# ------------------------------------------------------------------ retention
def undeletable(path) -> str | None:
    """Makes `path` impossible to delete, for real: immutable (root, `chattr +i`) or
    in a directory without write permission (anyone else). Returns how, or None."""
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        return "chattr +i" if done.returncode == 0 else None
    os.chmod(os.path.dirname(path), 0o555)
    return "a read-only directory"


def deletable(path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        os.chmod(os.path.dirname(path), 0o755)


def test_retention_that_cannot_delete_a_file_warns_once_and_keeps_applying(tmp_path):
    # One directory per checkpoint, so that a read-only one blocks deleting its file only.
    template = str(tmp_path / "e{epoch}" / "m.weights.h5")
    fit(make_model(), [keras_ckpt.ModelCheckpoint(template, save_weights_only=True)], epochs=1)
    stuck = str(tmp_path / "e1" / "m.weights.h5")
    how = undeletable(stuck)
    if how is None:
        pytest.fail("this machine can make no file undeletable (chattr +i failed as root)")
    try:
        checkpoint = keras_ckpt.ModelCheckpoint(template, save_weights_only=True, resume=True,
                                                retention=[keras_ckpt.KeepLast(2)])
        with pytest.warns(UserWarning, match="retention cannot delete .*e1.m.weights.h5") as w:
            fit(make_model(), [checkpoint], epochs=8)
        assert sum("retention cannot delete" in str(x.message) for x in w) == 1, how
        assert checkpoint.save_errors == []  # every save was written and is valid
        names = sorted(os.path.relpath(c.path, tmp_path)
                       for c in manager.list_checkpoints(tmp_path / "e8"))
        assert names == ["e8/m.weights.h5"]
        left = sorted(d for d in os.listdir(tmp_path) if os.listdir(tmp_path / d))
        assert left == ["e1", "e7", "e8"]  # the stuck one, and the last two kept
        assert checkpoint.last_saved_path == str(tmp_path / "e8" / "m.weights.h5")
    finally:
        deletable(stuck)
