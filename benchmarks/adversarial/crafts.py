"""Recipes for crafted hostile checkpoint files (used by `hostile.py`).

Every recipe starts from a real source checkpoint (`ck-02` of
`weights_default` or `keras_default`) and writes one hostile file. Where a
recipe edits the metadata JSON it re-encodes it the way keras-ckpt writes it
and stores a correct `meta_crc32`, so the checksum of the metadata passes and
only the hostile part is left to be caught. A `victim` is another valid
checkpoint (`*_async` `ck-02`, different arrays) that a link or a duplicate
member smuggles in; a `twin` is an exact copy of the source kept elsewhere.
"""

from __future__ import annotations

import json
import shutil
import zipfile
import zlib
from collections.abc import Callable

import h5py
import numpy as np

from keras_ckpt import dtypes, storage_format

GROUP = "keras_ckpt"
HUGE_SHAPE = (3_000_000, 1_000)  # float32: 12 GB, below this machine's memory limit check
BOMB_BYTES = 4 << 30
META_PAD = 300_000_000


def set_meta(group: h5py.Group, meta: dict | str) -> None:
    """Stores `meta` (a dict, or the exact text) with a correct checksum, as keras-ckpt does."""
    text = meta if isinstance(meta, str) else json.dumps(meta, separators=(",", ":"))
    storage_format.set_meta(group, text)


def set_meta_v1(group: h5py.Group, text: str) -> None:
    """Stores `text` as format 1 did: a variable-length string attribute."""
    if storage_format.META_DATASET in group:
        del group[storage_format.META_DATASET]
    group.attrs["format"], group.attrs["format_version"] = storage_format.FORMAT, 1
    group.attrs["meta"] = text
    group.attrs["meta_crc32"] = zlib.crc32(text.encode())


def _edit(path: str, fn: Callable[[h5py.File], None]) -> None:
    with h5py.File(path, "r+") as h5:
        fn(h5)


def _meta_text(h5: h5py.File) -> str:
    group = h5[GROUP]
    if storage_format.META_DATASET in group:
        return group[storage_format.META_DATASET][()].tobytes().decode()
    return group.attrs["meta"]


def _meta(h5: h5py.File) -> dict:
    return json.loads(_meta_text(h5))


# ------------------------------------------------------------------ links
def ext_link_group(src: str, dst: str, ctx: dict) -> None:
    """`/keras_ckpt` replaced by an HDF5 external link to the victim's `/keras_ckpt`."""
    shutil.copyfile(src, dst)

    def fn(h5: h5py.File) -> None:
        del h5[GROUP]
        h5[GROUP] = h5py.ExternalLink(ctx["victim"], "/" + GROUP)
    _edit(dst, fn)


def soft_link_group(src: str, dst: str, ctx: dict) -> None:
    """`/keras_ckpt` a soft link to `/shadow`, a copy of the victim's group in this file."""
    shutil.copyfile(src, dst)

    def fn(h5: h5py.File) -> None:
        with h5py.File(ctx["victim"], "r") as victim:
            victim.copy(victim[GROUP], h5, "shadow")
        del h5[GROUP]
        h5[GROUP] = h5py.SoftLink("/shadow")
    _edit(dst, fn)


def soft_link_cycle(src: str, dst: str, ctx: dict) -> None:
    """`/keras_ckpt` a soft link to itself (a cycle)."""
    shutil.copyfile(src, dst)

    def fn(h5: h5py.File) -> None:
        del h5[GROUP]
        h5[GROUP] = h5py.SoftLink("/" + GROUP)
    _edit(dst, fn)


def ext_link_arrays(src: str, dst: str, ctx: dict) -> None:
    """`/keras_ckpt/arrays` an external link to the same group of the twin (same arrays)."""
    shutil.copyfile(src, dst)

    def fn(h5: h5py.File) -> None:
        del h5[GROUP + "/arrays"]
        h5[GROUP + "/arrays"] = h5py.ExternalLink(ctx["twin"], f"/{GROUP}/arrays")
    _edit(dst, fn)


# ------------------------------------------------------------------ .keras archives
def _members(path: str) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        return [(i.filename, archive.read(i)) for i in archive.infolist()]


def _write_zip(dst: str, members: list[tuple[str, bytes]]) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": the point
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as archive:
            for name, body in members:
                archive.writestr(name, body)


def keras_dup_weights(src: str, dst: str, ctx: dict) -> None:
    """A `.keras` with two `model.weights.h5` members: the source's first, the victim's last."""
    victim = dict(_members(ctx["victim_keras"]))["model.weights.h5"]
    _write_zip(dst, [*_members(src), ("model.weights.h5", victim)])


def keras_dup_state(src: str, dst: str, ctx: dict) -> None:
    """A `.keras` with two `keras_ckpt.h5` members: the source's state first, the victim's last."""
    members = _members(src)
    ours = dict(members)["model.weights.h5"]
    victim = dict(_members(ctx["victim_keras"]))["model.weights.h5"]
    _write_zip(dst, [*members, ("keras_ckpt.h5", ours), ("keras_ckpt.h5", victim)])


def zip_bomb(src: str, dst: str, ctx: dict) -> None:
    """A `.keras` whose deflated `model.weights.h5` inflates to 4 GiB (the h5, then zeros)."""
    members = _members(src)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, body in members:
            if name != "model.weights.h5":
                archive.writestr(name, body, compress_type=zipfile.ZIP_STORED)
                continue
            with archive.open(name, "w", force_zip64=True) as out:
                out.write(body)
                zeros = bytes(64 << 20)
                left = BOMB_BYTES - len(body)
                while left > 0:
                    out.write(zeros[:left])
                    left -= len(zeros)


# ------------------------------------------------------------------ arrays and metadata
def _replace_array(h5: h5py.File, name: str, make: Callable[[h5py.Group, str], None]) -> dict:
    """Unlinks our dataset of array `name` and has `make` create another; returns the entry."""
    meta = _meta(h5)
    entry = meta["arrays"][name]
    arrays = h5[GROUP + "/arrays"]
    del arrays[entry["dataset"]]  # Keras's hard link to the old data stays
    make(arrays, entry["dataset"])
    return meta


def float64_dataset(src: str, dst: str, ctx: dict, declare: bool = True) -> None:
    """`model/00000` (a float32 kernel) stored as float64; index and checksums recomputed.

    `declare=True`: the index says `<f8` with the float64 array's CRC;
    `False`: it still says `<f4` (only the metadata checksum is recomputed).
    """
    shutil.copyfile(src, dst)

    def fn(h5: h5py.File) -> None:
        name = "model/00000"
        entry = _meta(h5)["arrays"][name]
        value = np.asarray(h5[GROUP + "/arrays"][entry["dataset"]]).astype(np.float64)
        meta = _replace_array(h5, name, lambda g, ds: g.create_dataset(ds, data=value))
        if declare:
            meta["arrays"][name].update(dtype="<f8", crc32=dtypes.crc(value))
        set_meta(h5[GROUP], meta)
    _edit(dst, fn)


def float64_declared_f4(src: str, dst: str, ctx: dict) -> None:
    """As `float64_dataset`, the index left saying `<f4`."""
    float64_dataset(src, dst, ctx, declare=False)


def huge_gzip_fill(src: str, dst: str, ctx: dict) -> None:
    """`model/00000` a gzip, chunked 12 GB float32 dataset never written (all fill value)."""
    shutil.copyfile(src, dst)

    def fn(h5: h5py.File) -> None:
        def make(group: h5py.Group, ds: str) -> None:
            group.create_dataset(ds, shape=HUGE_SHAPE, dtype="<f4", chunks=(4096, 1000),
                                 compression="gzip", fillvalue=np.float32(1.5))
        meta = _replace_array(h5, "model/00000", make)
        meta["arrays"]["model/00000"]["shape"] = list(HUGE_SHAPE)
        set_meta(h5[GROUP], meta)
    _edit(dst, fn)


def _meta_edit(edit: Callable[[dict], None]) -> Callable[[str, str, dict], None]:
    def recipe(src: str, dst: str, ctx: dict) -> None:
        shutil.copyfile(src, dst)

        def fn(h5: h5py.File) -> None:
            meta = _meta(h5)
            edit(meta)
            set_meta(h5[GROUP], meta)
        _edit(dst, fn)
    recipe.__doc__ = edit.__doc__
    return recipe


def _epoch_str(meta: dict) -> None:
    """Metadata `progress.epoch` a string ("1"), checksum valid."""
    meta["progress"]["epoch"] = str(meta["progress"]["epoch"])


def _arrays_lists(meta: dict) -> None:
    """Every `arrays` index entry a list [dataset, shape, dtype, crc32], checksum valid."""
    meta["arrays"] = {k: [v["dataset"], v["shape"], v["dtype"], v["crc32"]]
                      for k, v in meta["arrays"].items()}


def _history_num(meta: dict) -> None:
    """Metadata `progress.history` a number (7), checksum valid."""
    meta["progress"]["history"] = 7


def _mixed(meta: dict) -> None:
    """Many fields of the wrong type: global_step "2", written_at "now", loss [1], kind 5,
    monitor {}, epoch_complete "yes", step null, variables.optimizer "x"; checksum valid."""
    meta["progress"].update(global_step="2", epoch_complete="yes", step=None)
    meta.update(written_at="now", loss=[1], kind=5, monitor={})
    meta["variables"]["optimizer"] = "x"


def meta_300mb(src: str, dst: str, ctx: dict) -> None:
    """Metadata of 300 MB (the JSON + 300 MB of spaces, checksum valid), as format 2 stores it."""
    shutil.copyfile(src, dst)

    def fn(h5: h5py.File) -> None:
        set_meta(h5[GROUP], _meta_text(h5) + " " * META_PAD)
    _edit(dst, fn)


def meta_300mb_v1(src: str, dst: str, ctx: dict) -> None:
    """The same as format 1 stored it: a 300 MB variable-length string attribute."""
    shutil.copyfile(src, dst)

    def fn(h5: h5py.File) -> None:
        set_meta_v1(h5[GROUP], _meta_text(h5) + " " * META_PAD)
    _edit(dst, fn)


# name: (source extension, recipe)
RECIPES: dict[str, tuple[str, Callable[[str, str, dict], None]]] = {
    "ext_link_group": (".weights.h5", ext_link_group),
    "soft_link_group": (".weights.h5", soft_link_group),
    "soft_link_cycle": (".weights.h5", soft_link_cycle),
    "ext_link_arrays": (".weights.h5", ext_link_arrays),
    "keras_dup_weights": (".keras", keras_dup_weights),
    "keras_dup_state": (".keras", keras_dup_state),
    "float64_dataset": (".weights.h5", float64_dataset),
    "float64_declared_f4": (".weights.h5", float64_declared_f4),
    "meta_epoch_str": (".weights.h5", _meta_edit(_epoch_str)),
    "meta_arrays_lists": (".weights.h5", _meta_edit(_arrays_lists)),
    "meta_history_num": (".weights.h5", _meta_edit(_history_num)),
    "meta_mixed_types": (".weights.h5", _meta_edit(_mixed)),
    "meta_300mb": (".weights.h5", meta_300mb),
    "meta_300mb_v1": (".weights.h5", meta_300mb_v1),
    "huge_gzip_fill": (".weights.h5", huge_gzip_fill),
    "zip_bomb": (".keras", zip_bomb),
}


def describe(name: str) -> str:
    """The first line of a recipe's docstring."""
    return (RECIPES[name][1].__doc__ or "").strip().splitlines()[0]

