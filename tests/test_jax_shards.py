"""A variable split across two JAX processes (`ModelParallel` over both processes' devices).

No process holds the first Dense kernel (nor its Adam slots) whole: each writes
the columns it holds to its own shard file, process 0 commits the main file
after both did (jax_processes_child.py `--split-kernel`). Killed and resumed,
or stopped by a signal to one process and resumed, each process's part ends
bitwise like an uninterrupted run's; a damaged piece makes its checkpoint invalid
on both processes (an older one is resumed, with a warning), a missing shard
file makes it damaged in the listing; one process can restore the whole model
from the pieces.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import numpy as np
import pytest
import two_processes
from two_processes import assert_same, finish, free_ports, kill_both, read

from keras_ckpt import manager, storage

CHILD = os.path.join(os.path.dirname(__file__), "jax_processes_child.py")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                                reason="needs jax (`pip install -e '.[test]'`)")


def launch(directory, out, *args, layout="--split-kernel"):
    return two_processes.launch(CHILD, str(free_ports(1)[0]), directory, out,
                                [layout, *args], "jax")


def run(directory, out, *args, statuses=(0, 0), layout="--split-kernel"):
    """Both processes to their end: (arrays 0, outcome 0, arrays 1, outcome 1, logs)."""
    logs = finish(launch(directory, out, *args, layout=layout), statuses)
    (a0, o0), (a1, o1) = read(out, 0), read(out, 1)
    return a0, o0, a1, o1, logs


def shard_files(directory) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.shard")))


def check_written(directory, outcome_0, outcome_1) -> None:
    """Process 1 wrote its shard files only; every checkpoint has both of its shard files."""
    changes_1 = [c for c in outcome_1.pop("changes") if c not in ("makedirs .", "mkdir .")]
    assert changes_1 and all(c.endswith(".shard") or ".shard." in c for c in changes_1), changes_1
    assert outcome_0.pop("changes")
    checkpoints = manager.list_checkpoints(directory)
    expected = []
    for info in checkpoints:
        table = storage.read_meta(info.path)["shards"]
        assert [f["name"].rsplit("-", 1)[1] for f in table["files"]] == ["p0.shard", "p1.shard"]
        expected += [f["name"] for f in table["files"]]
    assert shard_files(directory) == sorted(expected)  # none left over, none missing


@pytest.mark.slow
def test_split_kernel_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path):
    straight_0, outcome, straight_1, outcome_1, logs = run(tmp_path / "a", tmp_path / "a")
    assert all("are split across the 2 JAX processes" in log for log in logs)
    assert not any("RNG states differ" in log for log in logs)  # (seeded alike)
    check_written(tmp_path / "a", outcome, outcome_1)
    assert outcome["iterations"] == 18 and outcome["history"] == outcome_1["history"]
    # Each process holds its own half of the kernel's columns (and of Adam's slots).
    kernel_0, kernel_1 = straight_0["model/0"], straight_1["model/0"]
    assert kernel_0.shape == kernel_1.shape == (1, 6, 8)
    assert not np.array_equal(kernel_0, kernel_1)

    procs = launch(tmp_path / "b", tmp_path / "b", "--kill-step", "10")
    kill_both(procs)
    newest = manager.list_checkpoints(tmp_path / "b")[-1]
    assert (newest.global_step, newest.epoch, newest.step) == (9, 1, 3)
    # A save killed between the shard files and the main file leaves shard files that no
    # checkpoint records: the next train begin removes them.
    orphan = tmp_path / "b" / f"{os.path.basename(newest.path)}.0badcafe-p1.shard"
    orphan.write_bytes(b"a shard file of a save that never committed")
    resumed_0, resumed, resumed_1, resumed_1_outcome, logs = run(tmp_path / "b", tmp_path / "b")
    assert not orphan.exists() and "0badcafe-p1.shard" in logs[0]
    assert resumed.pop("resumed_from") == resumed_1_outcome.pop("resumed_from") == [1, 3]
    check_written(tmp_path / "b", resumed, resumed_1_outcome)
    outcome.pop("resumed_from")
    assert resumed == outcome  # history and iterations
    assert_same(straight_0, resumed_0)
    assert_same(straight_1, resumed_1)


@pytest.mark.slow
def test_keras_files_and_a_last_file_with_a_split_kernel(tmp_path):
    """`.keras` checkpoints (the whole model) and `save_last`: the `last` file is written as
    a checkpoint of its own (its own shard files, not a link), replaced save after save;
    killed and resumed, each process's part ends bitwise like an uninterrupted run's."""
    straight_0, outcome, straight_1, outcome_1, _ = run(tmp_path / "a", tmp_path / "a",
                                                        "--keras-last")
    check_written(tmp_path / "a", outcome, outcome_1)
    last = storage.read_meta(str(tmp_path / "a" / "last.keras"))
    assert last["kind"] == "last" and last["progress"]["global_step"] == 18
    assert {f["name"] for f in last["shards"]["files"]} <= set(shard_files(tmp_path / "a"))
    assert len([n for n in shard_files(tmp_path / "a") if n.startswith("last.keras.")]) == 2
    kill_both(launch(tmp_path / "b", tmp_path / "b", "--kill-step", "10", "--keras-last"))
    resumed_0, resumed, resumed_1, resumed_1_outcome, _ = run(tmp_path / "b", tmp_path / "b",
                                                              "--keras-last")
    check_written(tmp_path / "b", resumed, resumed_1_outcome)
    assert resumed.pop("resumed_from") == [1, 3]
    outcome.pop("resumed_from")
    assert resumed == outcome
    assert_same(straight_0, resumed_0)
    assert_same(straight_1, resumed_1)


@pytest.mark.slow
def test_a_kernel_split_within_each_process_is_saved_whole_by_process_0(tmp_path):
    """Two devices a process, the kernel split over each process's two and the same on both
    processes: every process holds all of it, so process 0 writes it whole (a file Keras
    reads; no shard files), and both killed and resumed end bitwise like an uninterrupted run."""
    straight_0, outcome, straight_1, outcome_1, logs = run(tmp_path / "a", tmp_path / "a",
                                                           layout="--split-within")
    assert not any("split across" in log for log in logs)
    assert outcome.pop("changes") and outcome_1.pop("changes") == []  # process 0 alone
    assert shard_files(tmp_path / "a") == []
    assert straight_0["model/0"].shape == (2, 6, 8)  # this process's two devices' halves
    assert_same(straight_0, straight_1)  # the same on both processes
    kill_both(launch(tmp_path / "b", tmp_path / "b", "--kill-step", "10",
                     layout="--split-within"))
    resumed_0, resumed, resumed_1, _, _ = run(tmp_path / "b", tmp_path / "b",
                                              layout="--split-within")
    assert resumed.pop("resumed_from") == [1, 3]
    resumed.pop("changes")
    outcome.pop("resumed_from")
    assert resumed == outcome
    assert_same(straight_0, resumed_0)
    assert_same(straight_1, resumed_1)


@pytest.mark.slow
def test_a_signal_to_one_process_saves_both_parts_of_the_same_step(tmp_path):
    straight_0, outcome, straight_1, _, _ = run(tmp_path / "a", tmp_path / "a")
    _, stopped, _, stopped_1, _ = run(tmp_path / "s", tmp_path / "s", "--signal-step", "4",
                                      statuses=(143, 143))
    assert stopped["preempted_by"] == stopped_1["preempted_by"] == "SIGTERM"
    assert stopped["iterations"] == stopped_1["iterations"] == 5
    assert manager.list_checkpoints(tmp_path / "s")[-1].global_step == 5
    check_written(tmp_path / "s", stopped, stopped_1)

    # A byte of process 1's piece of step 5 flips: only process 1 reads that piece, and
    # both resume from step 3, bitwise like the uninterrupted run.
    newest = manager.list_checkpoints(tmp_path / "s")[-1].path
    flip_a_data_byte(tmp_path / "s" / storage.read_meta(newest)["shards"]["files"][1]["name"])
    from keras_ckpt import inspect  # `inspect` verifies every shard file, as resume would

    (row,) = [r for r in inspect.describe(str(tmp_path / "s")) if r["path"] == newest]
    assert not row["valid"] and "fails its checksum" in row["error"]
    resumed_0, resumed, resumed_1, _, logs = run(tmp_path / "s", tmp_path / "s2")
    assert resumed["resumed_from"] == [0, 3]
    assert "'model/00000/1' fails its checksum" in logs[1]
    assert "a shard file another process reads fails verification" in logs[0]
    assert resumed["history"] == outcome["history"]
    assert_same(straight_0, resumed_0)
    assert_same(straight_1, resumed_1)
    # `keras_ckpt.restore` of it in both processes: it raises in both (process 0's pieces
    # are sound, but process 1's are not), before either assigns anything.
    logs = finish(launch(tmp_path / "s", tmp_path / "r", "--restore", newest))
    assert "not restored: " in logs[1] and "'model/00000/1' fails its checksum" in logs[1]
    assert "not restored: " in logs[0], logs[0][-2000:]
    assert "a shard file another process reads fails verification" in logs[0]

    # A missing shard file: the listing marks its checkpoint damaged.
    first = manager.list_checkpoints(tmp_path / "s")[0].path
    os.remove(tmp_path / "s" / storage.read_meta(first)["shards"]["files"][0]["name"])
    damaged = {c.path: c.error for c in manager.list_checkpoints(tmp_path / "s",
                                                                  include_invalid=True)}
    assert "its shard file" in damaged[first] and "is missing" in damaged[first]


@pytest.mark.slow
def test_a_main_file_process_0_cannot_write_fails_the_save_on_both(tmp_path):
    """Process 0 alone writes the main file: when that fails (here its file-size limit lets
    its shard file through, not the main file), every process fails the save with it, at the
    same step (`on_save_error="raise"`: both raise; with "warn" both would undo it alike)."""
    logs = finish(launch(tmp_path / "f", tmp_path / "f", "--fail-main-step", "6"),
                  statuses=(1, 1))
    assert "OSError: [Errno 27] File too large" in logs[0], logs[0][-3000:]
    assert "OSError: process 0 could not write the main file" in logs[1], logs[1][-3000:]
    assert "c-01-6.weights.h5" in logs[1]
    (kept,) = manager.list_checkpoints(tmp_path / "f")  # step 3's; nothing of step 6 is left
    assert kept.global_step == 3
    assert shard_files(tmp_path / "f") == sorted(
        f["name"] for f in storage.read_meta(kept.path)["shards"]["files"])


def flip_a_data_byte(path) -> None:
    import h5py

    with h5py.File(path, "r") as f:
        arrays = f["keras_ckpt/arrays"]
        dataset = arrays[sorted(arrays)[0]]
        offset = dataset.id.get_offset()
    with open(path, "r+b") as f:
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0x40]))


RESTORE = """
import sys
sys.path.insert(0, sys.argv[3])
import numpy as np, keras, child_setup, keras_ckpt
model = child_setup.small_model()
keras_ckpt.restore(model, sys.argv[1])
np.savez(sys.argv[2], *[keras.ops.convert_to_numpy(v) for v in model.variables])

model = child_setup.reordered_model()  # the same variables in another order
keras_ckpt.restore(model, sys.argv[1])
np.savez(sys.argv[2] + ".reordered.npz",
         **{v.path: keras.ops.convert_to_numpy(v) for v in model.variables})
"""


def test_one_process_restores_the_whole_model_from_the_pieces(tmp_path):
    """One JAX process without `jax.distributed`: `restore` joins the pieces. (Retention
    keeps the newest checkpoint: the shard files of the others go with them.)"""
    import subprocess
    import sys

    import forkserver

    part_0, outcome, part_1, outcome_1, _ = run(tmp_path / "a", tmp_path / "a", "--epochs", "1",
                                                "--keep-last", "1")
    check_written(tmp_path / "a", outcome, outcome_1)
    (newest,) = manager.list_checkpoints(tmp_path / "a")
    assert len(shard_files(tmp_path / "a")) == 2
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONHASHSEED": "0"}
    done = forkserver.run([sys.executable, "-c", RESTORE, newest.path, str(tmp_path / "r.npz"),
                           os.path.dirname(__file__)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=two_processes.TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:]
    with np.load(tmp_path / "r.npz") as restored:
        values = [restored[f"arr_{i}"] for i in range(len(restored.files))]
    # The kernel's columns 0-7 were process 0's, 8-15 process 1's.
    np.testing.assert_array_equal(values[0], np.concatenate([part_0["model/0"][0],
                                                             part_1["model/0"][0]], axis=1))
    for i in range(1, len(values)):
        np.testing.assert_array_equal(values[i], part_0[f"model/{i}"])
    # A model listing the same variables in another order: each gets its own pieces.
    with np.load(tmp_path / "r.npz.reordered.npz") as reordered:
        assert reordered["sequential/dense/kernel"].shape == (6, 16)
        np.testing.assert_array_equal(reordered["sequential/dense/kernel"], values[0])
        np.testing.assert_array_equal(reordered["sequential/head/kernel"], values[-2])


def test_a_url_directory_refuses_a_split_variable_at_train_begin(tmp_path):
    """Shard files need a directory every process writes into: not a URL's local mirror."""
    logs = finish(launch(tmp_path / "u", tmp_path / "u", "--url"), statuses=(1, 1))
    refused = ("NotImplementedError: ModelCheckpoint: the variable 'sequential/dense/kernel' is "
               "split across the 2 JAX processes")
    for log in logs:
        assert refused in log and "it writes to a URL directory" in log, log[-2000:]


def test_early_stopping_restore_best_refuses_a_split_variable_at_train_begin(tmp_path):
    logs = finish(launch(tmp_path / "m", tmp_path / "m", "--restore-best"), statuses=(1, 1))
    refused = ("NotImplementedError: EarlyStopping(restore_best_weights=True): the variable "
               "'sequential/dense/kernel' is split across the 2 JAX processes")
    for log in logs:
        assert refused in log, log[-2000:]


def test_terminate_on_nan_rolls_a_split_variable_back_from_memory(tmp_path):
    """The in-memory snapshot copies each split variable's global array on its devices. A NaN
    at step 5 of every epoch rolls both processes back to the epoch's start, so only step 6
    of each epoch counts: each process's part ends bitwise like a run on batch 6 alone."""
    rolled_0, outcome, rolled_1, outcome_1, _ = run(tmp_path / "n", tmp_path / "n",
                                                    "--poison-step", "5", "--rollback")
    assert outcome["nan_events"] == outcome_1["nan_events"] == [[0, 5], [1, 5], [2, 5]]
    assert outcome["iterations"] == outcome_1["iterations"] == 3
    alone_0, _, alone_1, _, _ = run(tmp_path / "r", tmp_path / "r", "--only-step", "6")
    assert_same(rolled_0, alone_0)
    assert_same(rolled_1, alone_1)


def _table(names, pieces=((0, 2),)) -> dict:
    """A main file's metadata: a 2x2 variable in pieces of columns `pieces`."""
    entry = {"shape": [2, 2], "dtype": "float32",
             "pieces": [{"index": [[0, 2], list(p)], "process": 0} for p in pieces]}
    return {"variables": {"model": [{"path": "d/k", "shape": [2, 2], "dtype": "float32"}],
                          "optimizer": [], "metrics": []},
            "shards": {"variables": {"model/00000": entry},
                       "files": [{"name": n, "digest": 1} for n in names]}}


def test_a_checkpoint_names_shard_files_beside_itself_only(tmp_path):
    """A checkpoint is data from a stranger: its table names base names only, its pieces
    tile each variable (disjoint, nothing left out), and retention deletes only shard files
    named after the checkpoint."""
    from keras_ckpt import shard_listing, shards
    from keras_ckpt.snapshot import Snapshot, StateMismatchError

    assert shards.check_table(_table(["c.h5.0000abcd-p0.shard"])) == {"model/00000"}
    for bad in (_table(["../c.h5.0000abcd-p0.shard"]), _table(["/tmp/c.h5.0000abcd-p0.shard"]),
                _table(["c.h5.0000abcd-p0.shard"], pieces=((0, 1),)),
                _table(["c.h5.0000abcd-p0.shard"], pieces=((0, 1), (0, 1))),  # twice, a gap
                _table(["c.h5.0000abcd-p0.shard"], pieces=(("0", "2"),)),  # not numbers
                _table(["c.h5.0000abcd-p0.shard"], pieces=((0.0, 2.0),))):  # not integers
        with pytest.raises(StateMismatchError):
            shards.check_table(bad)
    # The listing: a malformed list of files is a damaged checkpoint, not a crash.
    for files in ("c.h5.0000abcd-p0.shard", [1], [{"name": 7}]):
        with pytest.raises(storage.CorruptCheckpointError, match="c.h5: its table"):
            shard_listing.check_present(str(tmp_path / "c.h5"), {"shards": {"files": files}})
    # A main file whose table names another checkpoint's shard files: not deleted with it.
    other = tmp_path / "b.h5.0000abcd-p0.shard"
    other.write_bytes(b"b's")
    main = str(tmp_path / "a.h5")
    storage.write(main, Snapshot(arrays={}, meta={}), layout=storage.KerasPartFirst(None),
                  meta={"shards": _table([other.name])["shards"]})
    assert shard_listing.files_of(main) == []
    storage.write(main, Snapshot(arrays={}, meta={}), layout=storage.KerasPartFirst(None),
                  meta={"shards": _table(["a.h5.0000abcd-p0.shard"])["shards"]})
    assert shard_listing.files_of(main) == [str(tmp_path / "a.h5.0000abcd-p0.shard")]
    assert shard_listing.orphans(str(tmp_path)) == [str(other)]  # (b.h5 does not exist)
    # A damaged checkpoint is left on disk, and so are its shard files.
    (tmp_path / "b.h5").write_bytes(b"not a checkpoint any more")
    assert shard_listing.orphans(str(tmp_path)) == []
    # A checkpoint renamed (`mv old.h5 kept.h5`) still reads its shard files: not orphans.
    renamed = tmp_path / "old.h5.0000beef-p0.shard"
    renamed.write_bytes(b"old's")
    storage.write(str(tmp_path / "kept.h5"), Snapshot(arrays={}, meta={}),
                  layout=storage.KerasPartFirst(None),
                  meta={"shards": _table([renamed.name])["shards"]})
    assert shard_listing.orphans(str(tmp_path)) == []
    os.remove(tmp_path / "kept.h5")
    assert shard_listing.orphans(str(tmp_path)) == [str(renamed)]


def test_every_process_fails_a_sharded_save_with_the_same_class_of_error():
    """What one process meets writing its part of a save reaches the others as an OSError or
    a refusal (the saver handles those alike everywhere; any other class would end one
    process's fit and leave the others waiting in a collective); a non-finite piece is named
    in bfloat16 too, as the main file's check names it."""
    import ml_dtypes

    from keras_ckpt.callbacks.model_checkpoint import sharded
    from keras_ckpt.storage_format import NonFiniteStateError, non_finite

    odd = ValueError("h5py says no")
    wrapped = sharded._as_os_error(odd, "c.h5")
    assert isinstance(wrapped, OSError) and "c.h5: ValueError: h5py says no" in str(wrapped)
    assert wrapped.__cause__ is odd
    refused = NonFiniteStateError("nan", "d/k")
    assert sharded._as_os_error(refused, "c.h5") is refused
    interrupt = KeyboardInterrupt()
    assert sharded._as_os_error(interrupt, "c.h5") is interrupt
    variables = {"model": [{"path": "d/k"}]}
    piece = np.array([1.0, np.nan], ml_dtypes.bfloat16)
    assert non_finite("model/00000/1", piece, variables).variable == "d/k"
    assert non_finite("model/00000/1", piece[:1], variables) is None
