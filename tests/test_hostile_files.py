"""Damaged and hostile files: each is refused with one error naming it, and nothing is loaded.

Whatever library fails underneath (zipfile, zlib, h5py, json), a file that is not
a whole keras-ckpt checkpoint raises `CorruptCheckpointError`; listing and resume
skip it and go on to older ones; `restore` changes nothing unless the whole state
verified. No link of any kind is followed.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
import zlib

import h5py
import keras
import numpy as np
import pytest
from conftest import make_model

import keras_ckpt
from keras_ckpt import manager, storage, storage_limits
from keras_ckpt.state import StateMismatchError
from keras_ckpt.storage import CorruptCheckpointError
from keras_ckpt.storage_format import set_meta


def fit(model, callbacks, epochs=2):
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    return model.fit(x, x[:, :1], batch_size=8, epochs=epochs, verbose=0, shuffle=False,
                     callbacks=callbacks)


def values(model):
    return [v.numpy().copy() for v in model.variables + model.optimizer.variables]


def assert_unchanged(model, before):
    for a, b in zip(before, values(model), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "w.weights.h5"
    model = make_model()
    fit(model, [keras_ckpt.ModelCheckpoint(str(path), save_weights_only=True)], epochs=1)
    return model, path


def edit_meta(path, change):
    """Changes a `.weights.h5` checkpoint's metadata, with a valid checksum."""
    meta = storage.read_meta(str(path))
    change(meta)
    with h5py.File(path, "a") as f:
        set_meta(f["keras_ckpt"], json.dumps(meta))


def test_a_newer_format_version_is_refused(saved):
    _, path = saved
    with h5py.File(path, "a") as f:
        f["keras_ckpt"].attrs["format_version"] = storage.FORMAT_VERSION + 1
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="Upgrade keras-ckpt"):
        storage.read(str(path))


@pytest.mark.parametrize("target", ["../../../etc/passwd", "/keras_ckpt", "a00000/../x"])
def test_array_names_that_point_elsewhere_are_refused(saved, target):
    _, path = saved

    def point(meta):
        next(iter(meta["arrays"].values()))["dataset"] = target

    edit_meta(path, point)
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="refusing"):
        storage.read(str(path))


def test_links_and_external_storage_to_other_files_are_refused(saved, tmp_path):
    model, path = saved
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.arange(8, dtype="float32").tobytes())
    before = sorted(os.listdir(tmp_path))
    with h5py.File(path, "a") as f:
        arrays = f["keras_ckpt/arrays"]
        del arrays["a00000"]
        arrays["a00000"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/data")
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="a00000|missing"):
        storage.read(str(path))

    fit(model, [keras_ckpt.ModelCheckpoint(str(path), save_weights_only=True)], epochs=1)
    with h5py.File(path, "a") as f:
        arrays = f["keras_ckpt/arrays"]
        shape, dtype = arrays["a00001"].shape, arrays["a00001"].dtype
        del arrays["a00001"]
        arrays.create_dataset("a00001", shape=shape, dtype=dtype,
                              external=[(str(outside), 0, int(np.prod(shape)) * 4)])
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="another file"):
        storage.read(str(path))
    assert sorted(os.listdir(tmp_path)) == before  # nothing written outside


def test_absurd_declared_sizes_are_refused_before_reading(saved):
    _, path = saved
    with h5py.File(path, "a") as f:
        arrays = f["keras_ckpt/arrays"]
        del arrays["a00000"]
        arrays.create_dataset("a00000", shape=(1 << 40,), dtype="float64", chunks=(1 << 16,))

    def declare(meta):
        entry = meta["arrays"]["model/00000"]
        entry["shape"], entry["dtype"] = [1 << 40], "<f8"

    edit_meta(path, declare)
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="memory"):
        storage.read(str(path))


def test_a_zip_bomb_member_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("keras_ckpt.h5", bytes(64 << 20))  # 64 MiB of zeros, 64 KiB packed
    assert os.path.getsize(path) < 1 << 20
    monkeypatch.setattr(storage_limits, "memory_limit", lambda: 32 << 20)  # a 32 MiB machine
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="more than"):
        storage.read(str(path))


def test_malformed_metadata_is_refused_before_anything_is_applied(saved):
    model, path = saved
    before = [v.numpy().copy() for v in model.variables]

    def break_objects(meta):
        meta["objects"] = {"ModelCheckpoint": {"json": {}, "arrays": ["ghost"]}}

    edit_meta(path, break_objects)
    # A damaged or hostile file: the one error for those, naming the file.
    with pytest.raises(CorruptCheckpointError, match="w.weights.h5.*ghost"):
        keras_ckpt.restore(model, path)
    edit_meta(path, lambda meta: meta.update(rng={"python": 5}, objects={}))
    with pytest.raises(CorruptCheckpointError, match="RNG"):
        keras_ckpt.restore(model, path, rng=True)
    edit_meta(path, lambda meta: meta.update(variables=[1, 2]))
    with pytest.raises(CorruptCheckpointError, match="malformed"):
        keras_ckpt.restore(model, path)
    for a, v in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy())


def test_deeply_nested_json_is_a_clear_error(saved):
    _, path = saved
    with h5py.File(path, "a") as f:
        set_meta(f["keras_ckpt"], "[" * 100000 + "]" * 100000)
    with pytest.raises(keras_ckpt.CorruptCheckpointError, match="not valid JSON"):
        storage.read(str(path))


def test_a_plain_hdf5_file_and_a_different_model_are_refused(tmp_path, saved):
    model, path = saved
    plain = tmp_path / "plain.weights.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(storage.ForeignFileError):
        keras_ckpt.restore(model, plain)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    other.compile("adam", "mse")
    with pytest.raises(StateMismatchError, match="does not fit"):
        keras_ckpt.restore(other, path)


# ------------------------------------------------------------------ archives
@pytest.fixture
def archive(tmp_path):
    """A `.keras` checkpoint (Keras's archive, our state inside) and its model."""
    path = tmp_path / "m.keras"
    model = make_model()
    fit(model, [keras_ckpt.ModelCheckpoint(str(path))], epochs=1)
    return model, path


def rewrite(path, members):
    """Rewrites the archive at `path` with `members`: (name, bytes) pairs, stored."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as out:
        for name, data in members:
            out.writestr(name, data)


def members(path):
    with zipfile.ZipFile(path) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def flip_inside(path, member):
    """Flips one bit in the middle of `member`'s stored bytes (its zip CRC then fails)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        at = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


def test_listing_an_archive_reads_its_metadata_member_and_resume_checks_every_crc(archive):
    model, path = archive
    assert "keras_ckpt.json" in dict(members(path))
    flip_inside(path, "model.weights.h5")
    assert storage.read_meta(str(path))["progress"]["epoch"] == 0  # HDF5 never parsed
    with pytest.raises(CorruptCheckpointError, match="m.keras.*CRC"):
        storage.read(str(path))
    before = values(model)
    with pytest.raises(CorruptCheckpointError):
        keras_ckpt.restore(model, path)
    assert_unchanged(model, before)


def test_an_archive_without_the_metadata_member_is_crc_checked_before_hdf5_reads_it(archive):
    # As keras-ckpt wrote archives before the member existed. A damaged HDF5
    # member could make the HDF5 library loop forever: its bytes are checked first.
    _, path = archive
    rewrite(path, [(n, d) for n, d in members(path) if n != "keras_ckpt.json"])
    assert storage.read_meta(str(path))["progress"]["epoch"] == 0
    flip_inside(path, "model.weights.h5")
    with pytest.raises(CorruptCheckpointError, match="m.keras.*CRC"):
        storage.read_meta(str(path))
    infos = manager.list_checkpoints(path.parent, include_invalid=True)
    assert [i.error is not None for i in infos] == [True]


@pytest.mark.parametrize("twice", ["model.weights.h5", "keras_ckpt.json"])
def test_an_archive_holding_a_member_twice_is_refused(archive, twice):
    model, path = archive
    stored = members(path)
    other = make_model()
    fit(other, [keras_ckpt.ModelCheckpoint(str(path.parent / "o.keras"))], epochs=2)
    extra = dict(members(path.parent / "o.keras"))[twice]
    with pytest.warns(UserWarning, match="Duplicate name"):
        rewrite(path, [*stored, (twice, extra)])
    for read in (storage.read_meta, storage.read):
        with pytest.raises(CorruptCheckpointError, match=f"two members named '{twice}'"):
            read(str(path))
    before = values(model)
    with pytest.raises(CorruptCheckpointError):
        keras_ckpt.restore(model, path)
    assert_unchanged(model, before)


def test_a_metadata_member_that_disagrees_with_the_state_is_refused(archive, tmp_path):
    _, path = archive
    other = tmp_path / "o.keras"
    fit(make_model(), [keras_ckpt.ModelCheckpoint(str(other))], epochs=2)
    swapped = dict(members(other))["keras_ckpt.json"]
    rewrite(path, [(n, swapped if n == "keras_ckpt.json" else d) for n, d in members(path)])
    with pytest.raises(CorruptCheckpointError, match="disagrees"):
        storage.read(str(path))


# ------------------------------------------------------------------ links at any level
def _link_group(path, other):
    with h5py.File(path, "a") as f:
        del f["keras_ckpt"]
        f["keras_ckpt"] = h5py.ExternalLink(str(other), "/keras_ckpt")


def _soft_group(path, other):
    with h5py.File(path, "a") as f:
        f.move("keras_ckpt", "elsewhere")
        f["keras_ckpt"] = h5py.SoftLink("/elsewhere")


def _link_arrays(path, other):
    with h5py.File(path, "a") as f:
        del f["keras_ckpt/arrays"]
        f["keras_ckpt/arrays"] = h5py.ExternalLink(str(other), "/keras_ckpt/arrays")


@pytest.mark.parametrize("make", [_link_group, _soft_group, _link_arrays],
                         ids=["external-group", "soft-group", "external-arrays"])
def test_a_link_in_place_of_the_state_is_refused_not_followed(tmp_path, make):
    model = make_model()
    run = tmp_path / "run"
    fit(model, [keras_ckpt.ModelCheckpoint(str(run / "c-{epoch}.weights.h5"),
                                           save_weights_only=True)], epochs=2)
    newer, other = run / "c-2.weights.h5", tmp_path / "other.weights.h5"
    shutil.copy(run / "c-1.weights.h5", other)
    make(newer, other)  # a valid checkpoint: following the link would load it silently
    reads = (storage.read,) if make is _link_arrays else (storage.read_meta, storage.read)
    for read in reads:  # (listing reads no array: the arrays' link is not reached)
        with pytest.raises(CorruptCheckpointError, match="c-2.weights.h5.*link"):
            read(str(newer))
    before = values(model)
    with pytest.raises(CorruptCheckpointError, match="link"):
        keras_ckpt.restore(model, newer)
    assert_unchanged(model, before)
    with pytest.warns(UserWarning, match="c-2.weights.h5"):
        info, _ = manager.latest_checkpoint(run)
    assert os.path.basename(info.path) == "c-1.weights.h5"


# ------------------------------------------------------------------ arrays and metadata
def test_an_array_of_another_dtype_than_its_variable_is_refused_not_cast(saved):
    model, path = saved
    meta = storage.read_meta(str(path))
    with h5py.File(path, "a") as f:
        group = f["keras_ckpt"]
        entry = meta["arrays"]["model/00000"]
        data = group["arrays"][entry["dataset"]]
        wide = data[()].astype("float64")
        del group["arrays"][entry["dataset"]]
        group["arrays"][entry["dataset"]] = wide
        entry["dtype"], entry["crc32"] = wide.dtype.str, zlib.crc32(wide.tobytes())
        set_meta(group, json.dumps(meta))
    assert storage.read(str(path)).arrays["model/00000"].dtype == np.float64  # well-formed
    before = values(model)
    with pytest.raises(CorruptCheckpointError, match="float64.*declares.*float32"):
        keras_ckpt.restore(model, path)
    assert_unchanged(model, before)


WRONG_TYPES = {
    "epoch-text": lambda m: m["progress"].update(epoch="0"),
    "progress-number": lambda m: m.update(progress=5),
    "global-step-text": lambda m: m["progress"].update(global_step="x"),
    "loss-list": lambda m: m.update(loss=[1.0]),
    "written-at-text": lambda m: m.update(written_at="now"),
    "kind-number": lambda m: m.update(kind=7),
    "complete-text": lambda m: m["progress"].update(epoch_complete="yes"),
    "history-number": lambda m: m["progress"].update(history=7),
    "history-values-list": lambda m: m["progress"].update(history={"values": [1]}),
}


@pytest.mark.parametrize("change", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_metadata_of_the_wrong_types_is_one_error_and_resume_falls_back(tmp_path, change,
                                                                         capsys):
    directory = tmp_path / "run"
    fit(make_model(), [keras_ckpt.ModelCheckpoint(str(directory / "c-{epoch}.weights.h5"),
                                                      save_weights_only=True)])
    edit_meta(directory / "c-2.weights.h5", change)
    with pytest.raises(CorruptCheckpointError, match="c-2.weights.h5"):
        manager.info_from_meta(str(directory / "c-2.weights.h5"),
                               storage.read_meta(str(directory / "c-2.weights.h5")))
    infos = manager.list_checkpoints(directory, include_invalid=True)
    assert [i.error is None for i in infos] == [False, True]
    model = make_model()
    fit(model, [], epochs=1)
    before = values(model)
    with pytest.raises(CorruptCheckpointError, match="c-2.weights.h5"):
        keras_ckpt.restore(model, directory / "c-2.weights.h5")
    assert_unchanged(model, before)
    with pytest.warns(UserWarning, match="c-2.weights.h5"):
        info, _ = manager.latest_checkpoint(directory)
    assert os.path.basename(info.path) == "c-1.weights.h5"
    from keras_ckpt.inspect import run_inspect

    assert run_inspect(str(directory)) == 0 and run_inspect(str(directory), as_json=True) == 0
    assert "corrupt" in capsys.readouterr().out


def test_a_state_malformed_behind_a_valid_checksum_makes_resume_fall_back(tmp_path):
    directory = tmp_path / "run"
    fit(make_model(), [keras_ckpt.ModelCheckpoint(str(directory / "c-{epoch}.weights.h5"),
                                                      save_weights_only=True)])
    edit_meta(directory / "c-2.weights.h5",
              lambda m: m["variables"]["model"][0].update(shape=[99]))
    resumed = make_model()
    checkpoint = keras_ckpt.ModelCheckpoint(str(directory / "c-{epoch}.weights.h5"),
                                            save_weights_only=True, resume=True)
    with pytest.warns(UserWarning, match="c-2.weights.h5"):
        fit(resumed, [checkpoint], epochs=3)
    assert os.path.basename(checkpoint.resumed_from.path) == "c-1.weights.h5"


def test_an_unbuilt_optimizer_that_does_not_fit_leaves_the_model_unchanged(saved):
    _, path = saved
    model = make_model()  # compiled with Adam, its optimizer not built yet
    model.compile(keras.optimizers.Adam(amsgrad=True), "mse")  # more slots than saved
    before = [v.numpy().copy() for v in model.variables]
    with pytest.raises(StateMismatchError, match="optimizer"):
        keras_ckpt.restore(model, path)
    for a, v in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy())


# ------------------------------------------------------------------ inspect
def test_inspect_calls_corrupt_what_resume_would_reject_and_prints_a_nan_loss(tmp_path,
                                                                              capsys):
    from keras_ckpt.inspect import run_inspect

    run = tmp_path / "run"
    fit(make_model(), [keras_ckpt.ModelCheckpoint(str(run / "c-{epoch}.weights.h5"),
                                                  save_weights_only=True)])
    with h5py.File(run / "c-2.weights.h5", "r") as f:
        offset = f["keras_ckpt/arrays/a00000"].id.get_offset()
    with open(run / "c-2.weights.h5", "r+b") as f:  # one flipped bit in an array's data
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))
    edit_meta(run / "c-1.weights.h5", lambda m: m.update(loss="nan"))

    def rows(**kwargs):
        assert run_inspect(str(run), as_json=True, **kwargs) == 0
        return {os.path.basename(r["path"]): r for r in json.loads(capsys.readouterr().out)}

    verified = rows()
    assert not verified["c-2.weights.h5"]["valid"]
    assert "checksum" in verified["c-2.weights.h5"]["error"]
    assert verified["c-1.weights.h5"]["valid"] and verified["c-1.weights.h5"]["loss"] == "nan"
    assert rows(verify=False)["c-2.weights.h5"]["valid"]  # --meta-only: the metadata is whole


# ------------------------------------------------------------------ reads bounded by the model
def peak_bytes_of(call) -> int:
    """Peak Python/NumPy memory `call()` allocated (it is expected to raise)."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match="model's state can"):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_file_declaring_more_than_the_model_needs_is_refused_before_reading(saved):
    # 48 KiB on disk; its gzip-chunked array of fill values would be 2 GiB in memory.
    model, path = saved
    with h5py.File(path, "a") as f:
        arrays = f["keras_ckpt/arrays"]
        del arrays["a00000"]
        arrays.create_dataset("a00000", shape=(1 << 28,), dtype="float64", chunks=(1 << 20,),
                              compression="gzip", fillvalue=1.0)

    def declare(meta):
        meta["arrays"]["model/00000"].update(shape=[1 << 28], dtype="<f8")

    edit_meta(path, declare)
    assert os.path.getsize(path) < 1 << 20
    before = values(model)
    assert peak_bytes_of(lambda: keras_ckpt.restore(model, path)) < 16 << 20
    assert_unchanged(model, before)


def test_a_file_far_larger_than_the_model_is_refused_unread(saved):
    model, path = saved  # a tiny model; an 80 MB metadata string
    edit_meta(path, lambda meta: meta.update(padding="x" * (80 << 20)))
    assert peak_bytes_of(lambda: keras_ckpt.restore(model, path)) < 16 << 20
    with pytest.warns(UserWarning, match="model's state can"):
        checkpoint = keras_ckpt.ModelCheckpoint(str(path), save_weights_only=True,
                                                resume=True, if_none_valid="start_fresh")
        fit(model, [checkpoint], epochs=1)
    assert checkpoint.resumed_from is None


def test_an_archive_member_inflating_past_the_model_is_refused_unread(archive):
    model, path = archive
    stored = members(path)
    with zipfile.ZipFile(path, "w") as out:
        for name, data in stored:
            if name == "model.weights.h5":  # 128 MiB of zeros, 128 KiB packed
                out.writestr(name, bytes(128 << 20), compress_type=zipfile.ZIP_DEFLATED)
            elif name != "keras_ckpt.json":
                out.writestr(name, data)
    assert os.path.getsize(path) < 1 << 20
    assert peak_bytes_of(lambda: keras_ckpt.restore(model, path)) < 16 << 20


# ------------------------------------------------------------------ HDF5's global heap
GLOBAL_HEAP_CHILD = r"""
import sys
import keras_ckpt
from keras_ckpt import storage
for read in (storage.read_meta, storage.read):
    try:
        read(sys.argv[1])
        print(read.__name__, "ok")
    except keras_ckpt.CorruptCheckpointError as e:
        print(read.__name__, "CorruptCheckpointError")
"""


@pytest.mark.slow
def test_a_damaged_global_heap_cannot_make_a_read_hang(saved, tmp_path):
    # HDF5 loops forever on some damaged global-heap collections (where variable-
    # length strings live): keras-ckpt's metadata and format are no longer kept there.
    import subprocess
    import sys

    import forkserver

    _, path = saved
    blob = bytearray(path.read_bytes())
    heap = blob.find(b"GCOL")
    assert heap > 0  # Keras's part keeps its strings there
    blob[heap + 25] ^= 1  # the first heap object's size (a case that hung reads forever)
    damaged = tmp_path / "heap.weights.h5"
    damaged.write_bytes(bytes(blob))
    try:
        done = forkserver.run([sys.executable, "-c", GLOBAL_HEAP_CHILD, str(damaged)],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a read hung on a damaged global heap")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["read_meta", "ok", "read", "ok"]  # Keras's part: not read


def as_format_1(path, pad=0):
    """Rewrites a checkpoint's metadata as format 1 stored it (a heap string), padded."""
    text = json.dumps(storage.read_meta(str(path))) + " " * pad
    with h5py.File(path, "a") as f:
        group = f["keras_ckpt"]
        if "meta" in group:
            del group["meta"]
        group.attrs["format"], group.attrs["format_version"] = "keras-ckpt", 1
        group.attrs["meta"], group.attrs["meta_crc32"] = text, zlib.crc32(text.encode())


def test_a_format_1_checkpoint_still_reads(saved):
    # Written before format 2: the metadata a variable-length string attribute.
    _, path = saved
    meta = storage.read_meta(str(path))
    as_format_1(path)
    assert storage.read(str(path)).meta["progress"] == meta["progress"]
    with h5py.File(path, "a") as f:  # format 2 claimed, a heap string given: refused unread
        f["keras_ckpt"].attrs["format_version"] = 2
    with pytest.raises(CorruptCheckpointError, match="format attribute"):
        storage.read_meta(str(path))


def test_an_archive_member_inflating_past_its_own_index_is_refused_without_a_model(archive):
    # inspect and storage.read have no model: the archive's own metadata member says
    # how much its state member can hold.
    _, path = archive
    stored = members(path)
    with zipfile.ZipFile(path, "w") as out:
        for name, data in stored:
            if name == "model.weights.h5":  # the real member, then 128 MiB of zeros
                out.writestr(name, data + bytes(128 << 20), compress_type=zipfile.ZIP_DEFLATED)
            else:
                out.writestr(name, data)
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match="archive's own index declares"):
            storage.read(str(path))
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


def test_a_format_1_string_larger_than_the_cap_is_refused_without_a_model(saved, monkeypatch):
    # HDF5 reports a heap string's descriptor, not its size: the bytes no
    # dataset holds bound it, so listing and inspect never read it whole.
    import tracemalloc

    model, path = saved
    as_format_1(path)
    assert storage.read_meta(str(path))["progress"]["epoch"] == 0  # format 1 still reads
    monkeypatch.setattr(storage, "_MAX_META_BYTES", 4 << 20)
    as_format_1(path, pad=8 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError, match=r"w\.weights\.h5: the metadata may take"):
            storage.read_meta(str(path))
        [info] = manager.list_checkpoints(path.parent, include_invalid=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "may take" in info.error and peak < 2 << 20


def test_resume_lists_nothing_larger_than_the_model_could_write(tmp_path):
    # A format-1 file (its metadata a heap string, read whole before it can be
    # checked): 80 MB of it beside a tiny model's checkpoints is never read.
    import tracemalloc

    run = tmp_path / "run"
    fit(make_model(), [keras_ckpt.ModelCheckpoint(str(run / "c-{epoch}.weights.h5"),
                                                  save_weights_only=True)])
    newer = run / "c-2.weights.h5"
    as_format_1(newer, pad=80 << 20)
    model = make_model()
    checkpoint = keras_ckpt.ModelCheckpoint(str(run / "c-{epoch}.weights.h5"),
                                            save_weights_only=True, resume=True)
    tracemalloc.start()
    try:
        with pytest.warns(UserWarning, match="c-2.weights.h5.*model's state can take"):
            fit(model, [checkpoint], epochs=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert os.path.basename(checkpoint.resumed_from.path) == "c-1.weights.h5"
    assert peak < 40 << 20


def test_a_checkpoint_written_in_place_after_it_was_verified_is_refused_not_read(saved):
    """A lazy read hands out each array after the whole file was verified; another program
    rewriting the file in place meanwhile (`cp` over it) must not slip unverified bytes in."""
    _, path = saved
    with storage.read_lazily(str(path)) as snapshot:
        name = next(iter(snapshot.arrays))
        assert snapshot.arrays[name].size  # read again from the verified file
        with open(path, "r+b") as f:
            f.truncate(4096)  # HDF5 would read zeros past the end, silently
        with pytest.raises(keras_ckpt.CorruptCheckpointError, match="written in place"):
            snapshot.arrays[name]
