"""Variables split across JAX processes: each process writes the pieces it holds.

With several `jax.distributed` processes, a `ModelParallel` layout can split a
variable over devices of different processes: some process holds only part of
it, and gathering it onto one host is what large models cannot afford. Such a
checkpoint is a main file (our state without the split variables, and the table
of their pieces; written by process 0 last: the commit) plus one shard file per
process beside it, `<main>.<uid>-p<i>.shard` (a keras-ckpt file: a CRC per piece).

`uid` is drawn by process 0 for each save, so a save never replaces the shard
files of a checkpoint still listed: until the main file is renamed into place
the new shard files belong to nothing (removed at the next train begin), and
the main file records each shard file's digest (a CRC of its piece index, which
holds every piece's CRC). A piece is a distinct slice of the variable
(`sharding.devices_indices_map`); the lowest-numbered process holding it writes it.

Reading: each process opens the shard files that hold pieces its devices
need, verifies them whole, and builds its arrays with
`jax.make_array_from_callback` from the overlapping pieces (so a resume may
use another split of the same variables).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from keras_ckpt import storage
from keras_ckpt.snapshot import Snapshot, StateMismatchError
from keras_ckpt.storage_format import non_finite

__all__ = ["split_keys", "capture", "write_own", "shard_name", "SHARD_NAME", "ShardFiles",
           "open_for", "check_table"]

# A shard file's name: a base name (never a path: a checkpoint names files beside itself only).
SHARD_NAME = re.compile(r"(?P<main>[^/\\]+)\.(?P<uid>[0-9a-f]{8})-p(?P<process>\d+)\.shard")


def _bounds(index: tuple, shape: tuple) -> list[list[int]]:
    """A device's index (slices) as `[start, stop]` per dimension."""
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, _ = s.indices(n) if isinstance(s, slice) else (s, s + 1, 1)
        out.append([int(start), int(stop)])
    return out


def _holders(value: Any) -> dict[tuple, set[int]]:
    """Every distinct piece of a global array (`((start, stop), ...)`) and the processes whose
    devices hold it: from the global sharding, the same on every process."""
    shape = tuple(value.shape)
    holders: dict[tuple, set[int]] = {}
    for device, index in value.sharding.devices_indices_map(shape).items():
        holders.setdefault(tuple(map(tuple, _bounds(index, shape))), set()).add(
            device.process_index)
    return holders


def _is_split(value: Any) -> bool:
    """Whether some process lacks part of the global array `value`."""
    if getattr(value, "sharding", None) is None or value.is_fully_replicated \
            or value.is_fully_addressable:
        return False
    holders = _holders(value)
    processes = set().union(*holders.values())
    return any(held != processes for held in holders.values())


def split_keys(groups: Mapping[str, list]) -> dict[str, Any]:
    """`{"model/00003": variable, ...}`: the variables some process holds only part of."""
    return {f"{group}/{i:05d}": v for group, variables in groups.items()
            for i, v in enumerate(variables) if _is_split(getattr(v, "value", None))}


def _pieces(value: Any) -> list[dict]:
    """Every distinct piece of a global array and the lowest process holding it (the same
    list on every process)."""
    return [{"index": [list(b) for b in key], "process": min(held)}
            for key, held in sorted(_holders(value).items())]


def capture(split: Mapping[str, Any], copy: bool = False) -> tuple[dict, dict[str, Any]]:
    """The table of the split variables' pieces, and their values.

    Args:
        split: `split_keys`'s result.
        copy: copy each global array on its devices (the snapshot outlives the next
            step: Keras's train step donates the variables' buffers to XLA); without,
            the arrays are valid until the next step only.

    Returns:
        `({key: {"shape", "dtype", "pieces"}}, {key: global array})`.
    """
    table, values = {}, {}
    for key, variable in split.items():
        value = values[key] = variable.value.copy() if copy else variable.value
        table[key] = {"shape": [int(d) for d in value.shape], "dtype": str(value.dtype),
                      "pieces": _pieces(value)}
    return table, values


def _own_pieces(snapshot: Snapshot, process: int) -> dict[str, np.ndarray]:
    """`{"<key>/<piece>": array}`: the pieces `process` writes, as host arrays."""
    own = {}
    for key, entry in snapshot.meta["shards"]["variables"].items():
        value = snapshot.split[key]
        held = {tuple(map(tuple, _bounds(s.index, tuple(value.shape)))): s
                for s in value.addressable_shards}
        for k, piece in enumerate(entry["pieces"]):
            if piece["process"] == process:
                own[f"{key}/{k}"] = np.asarray(held[tuple(map(tuple, piece["index"]))].data)
    return own


def shard_name(main: str, uid: int, process: int) -> str:
    """The shard file of `process` beside the checkpoint `main` (a path), for save `uid`."""
    return f"{main}.{uid:08x}-p{process}.shard"


def _digest(arrays_meta: Mapping[str, Any]) -> int:
    return zlib.crc32(json.dumps(arrays_meta, sort_keys=True).encode())


def write_own(main: str, uid: int, process: int, snapshot: Snapshot, *, fsync: bool = True,
              compression: str | None = None) -> int:
    """Writes this process's pieces of `snapshot` (crash-safe); returns the file's digest.

    Raises:
        NonFiniteStateError: a piece holds NaN or infinity (nothing written).
        OSError: the write failed (nothing left).
    """
    path = shard_name(main, uid, process)
    variables = snapshot.meta["variables"]
    own = _own_pieces(snapshot, process)
    for name, piece in own.items():
        if (error := non_finite(name, piece, variables)) is not None:
            raise error
    meta = {"shard_of": os.path.basename(main), "process": process}
    storage.write(path, Snapshot(arrays=own, meta=meta), layout=storage.KerasPartFirst(None),
                  fsync=fsync, compression=compression)
    return _digest(storage.read_meta(path)["arrays"])


def check_table(meta: Mapping[str, Any]) -> set[str]:
    """The split variables' keys, after checking the table against the variables' entries.

    Raises:
        StateMismatchError: the table is malformed or disagrees with the entries.
    """
    table = meta.get("shards")
    if table is None:
        return set()
    bad = StateMismatchError("The checkpoint's table of split variables is malformed.")
    if not isinstance(table, dict) or not isinstance(table.get("variables"), dict) \
            or not isinstance(table.get("files"), list):
        raise bad
    for f in table["files"]:
        if not (isinstance(f, dict) and isinstance(f.get("name"), str)
                and SHARD_NAME.fullmatch(f["name"]) and isinstance(f.get("digest"), int)):
            raise bad
    for key, entry in table["variables"].items():
        match = re.fullmatch(r"(model|optimizer)/(\d{5})", str(key))
        if match is None or int(match.group(2)) >= len(meta["variables"][match.group(1)]):
            raise bad
        declared = meta["variables"][match.group(1)][int(match.group(2))]
        if not isinstance(entry, dict) or entry.get("shape") != declared["shape"] \
                or entry.get("dtype") != declared["dtype"] \
                or not isinstance(entry.get("pieces"), list):
            raise StateMismatchError(f"The checkpoint's pieces of {declared['path']} do not "
                                     "match its entry.")
        covered = 0
        for piece in entry["pieces"]:
            index = piece.get("index") if isinstance(piece, dict) else None
            if not (isinstance(index, list) and len(index) == len(declared["shape"])
                    and all(isinstance(b, list) and len(b) == 2 and _ints(*b)
                            and 0 <= b[0] < b[1] <= n
                            for b, n in zip(index, declared["shape"], strict=False))
                    and _ints(piece.get("process")) and piece["process"] >= 0):
                raise bad
            covered += int(np.prod([b[1] - b[0] for b in index]))
        indices = [p["index"] for p in entry["pieces"]]
        if covered != int(np.prod(declared["shape"])) or any(
                _overlap(a, b) for i, a in enumerate(indices) for b in indices[i + 1:]):
            # (disjoint pieces whose sizes add up to the whole cover each element once)
            raise StateMismatchError(f"The checkpoint's pieces of {declared['path']} do not "
                                     "tile it.")
    return set(table["variables"])


class ShardFiles:
    """The shard files of one checkpoint, read by the process applying it.

    Args:
        path: the checkpoint's main file.
        table: its metadata's `shards` entry (checked by `check_table`).
    """

    def __init__(self, path: str, table: Mapping[str, Any]) -> None:
        self.path, self.table = path, table
        self._stack: contextlib.ExitStack | None = None
        self._open: dict[int, Snapshot] = {}

    def open(self, variables: Mapping[str, Any] | None, state_bytes: int | None = None
             ) -> None:
        """Opens and verifies whole every shard file this process needs (once).

        Args:
            variables: the variables the pieces go into, by their key in the
                checkpoint (`group/index` in the saved order: a model may list
                them in another order). A split variable not among them needs
                every piece; None (`inspect`): every file.
            state_bytes: the most a shard file may hold.

        Raises:
            CorruptCheckpointError: one is missing, damaged or not the one the
                checkpoint recorded (its name in the message).
        """
        if self._stack is not None:
            return
        needed = set(range(len(self.table["files"]))) if variables is None else set()
        for key, entry in self.table["variables"].items() if variables is not None else ():
            shape = tuple(entry["shape"])
            for index in _local_indices(variables.get(key), shape):
                want = _bounds(index, shape)
                needed |= {p["process"] for p in entry["pieces"] if _overlap(want, p["index"])}
        self._stack = contextlib.ExitStack()  # (only now: a failure above opened nothing)
        directory = os.path.dirname(self.path)
        try:
            if not needed <= set(range(len(self.table["files"]))):
                raise storage.CorruptCheckpointError(
                    f"{self.path}: its table of split variables names a process with no "
                    "shard file.")
            for process, record in enumerate(self.table["files"]):
                name = os.path.join(directory, record["name"])
                if not os.path.isfile(name):
                    raise storage.CorruptCheckpointError(
                        f"{name}: the shard file of {self.path} is missing.")
                # Every file's index (cheap); the pieces of those this process needs, whole.
                if _digest(storage.read_meta(name, state_bytes=state_bytes)["arrays"]) \
                        != record["digest"]:
                    raise storage.CorruptCheckpointError(
                        f"{name}: not the shard file {self.path} recorded (its digest "
                        "differs).")
                if process in needed:
                    self._open[process] = self._stack.enter_context(
                        storage.read_lazily(name, state_bytes))
            self._check_pieces(needed)
        except BaseException:
            self.close()
            raise

    def _check_pieces(self, opened: set[int]) -> None:
        """Every piece in the opened files is there with its slice's shape and the variable's
        dtype (no silent broadcast of a smaller array)."""
        for key, entry in self.table["variables"].items():
            for k, piece in enumerate(entry["pieces"]):
                if piece["process"] not in opened:
                    continue
                arrays, name = self._open[piece["process"]].arrays, f"{key}/{k}"
                shape = [b - a for a, b in piece["index"]]
                found = arrays.spec(name) if name in arrays else None
                if found is None or (list(found[0]), str(found[1])) != (shape, entry["dtype"]):
                    file = self.table["files"][piece["process"]]["name"]
                    raise storage.CorruptCheckpointError(
                        f"{os.path.join(os.path.dirname(self.path), file)}: the piece {name} "
                        f"is missing or not a {tuple(shape)} {entry['dtype']} array.")

    def close(self) -> None:
        """Closes the shard files (once; `open` may open them again)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
        self._open.clear()

    def array_for(self, key: str, variable: Any) -> Any:
        """The variable's saved value as a global array with its current sharding."""
        import jax

        entry = self.table["variables"][key]
        shape = tuple(entry["shape"])
        made: dict[tuple, np.ndarray] = {}

        def local(index: tuple) -> np.ndarray:
            want = _bounds(index, shape)
            key_ = tuple(map(tuple, want))
            if key_ not in made:
                out = None
                for k, piece in enumerate(entry["pieces"]):
                    part = _overlap(want, piece["index"])
                    if part is None:
                        continue
                    source = self._open[piece["process"]].arrays[f"{key}/{k}"]
                    if out is None:  # (the dtype checked against the entry when opened)
                        out = np.empty([b - a for a, b in want], source.dtype)
                    out[tuple(slice(a - w[0], b - w[0]) for (a, b), w in zip(part, want,
                                                                              strict=True))] = \
                        source[tuple(slice(a - p[0], b - p[0]) for (a, b), p in
                                     zip(part, piece["index"], strict=True))]
                if out is None:  # (check_table: the pieces tile the variable)
                    raise storage.CorruptCheckpointError(f"{self.path}: no piece of {key}.")
                made[key_] = out
            return made[key_]

        sharding = getattr(getattr(variable, "value", None), "sharding", None)
        if sharding is None:  # not JAX: the whole array, from every process's pieces
            return local(tuple(slice(0, n) for n in shape))
        return jax.make_array_from_callback(shape, sharding, local)


def open_for(snapshot: Snapshot, variables: Mapping[str, Any], state_bytes: int | None = None
             ) -> ShardFiles | None:
    """The opened, verified shard files of a checkpoint read from a file (None: it has none).

    `variables`: see `ShardFiles.open`. The caller closes them
    (`snapshot.shard_files.close()`) when the state is applied.
    """
    if "shards" not in snapshot.meta or snapshot.split is not None:
        return None  # (none, or a snapshot in memory: it holds the arrays)
    if snapshot.shard_files is None:
        if snapshot.source is None:
            raise StateMismatchError("The state has variables split across processes but "
                                     "no file to read their pieces from.")
        snapshot.shard_files = ShardFiles(snapshot.source, snapshot.meta["shards"])
    snapshot.shard_files.open(variables, state_bytes)
    return snapshot.shard_files


def _local_indices(variable: Any, shape: tuple) -> list:
    """The indices this process's devices hold of `variable` (all of it off JAX or None)."""
    sharding = getattr(getattr(variable, "value", None), "sharding", None)
    if sharding is None:
        return [tuple(slice(0, n) for n in shape)]
    return list(sharding.addressable_devices_indices_map(shape).values())


def _ints(*values: Any) -> bool:
    return all(type(v) is int for v in values)  # (not a bool, a float or a string)


def _overlap(a: list, b: list) -> list | None:
    part = [[max(x0, y0), min(x1, y1)] for (x0, x1), (y0, y1) in zip(a, b, strict=True)]
    return part if all(lo < hi for lo, hi in part) else None
