"""Saves whose state has variables split across JAX processes (see `keras_ckpt.shards`).

Every process writes the pieces it holds to its own shard file; the processes
agree that all of them did (one collective); process 0 then writes the main
file, which records each shard file's digest: its rename is the commit. A
failure anywhere is a failure everywhere (the same step, no checkpoint), and
what was written for it is removed.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

import numpy as np

from keras_ckpt import shard_listing, shards, storage
from keras_ckpt.storage_format import non_finite
from keras_ckpt.warn import warn

__all__ = ["announce", "commit"]


def announce(split: list[str], workers: Any) -> None:
    """Says at train begin how the checkpoints of a model with split variables are written."""
    if split:
        warn(f"ModelCheckpoint: {len(split)} variable(s) ({split[0]!r}, ...) are split "
             f"across the {workers.count} JAX processes: each checkpoint is a main file plus "
             "one .shard file per process beside it, written without gathering them. "
             "Keras's load_weights cannot read such a file; keras_ckpt.restore and "
             "resume=True can. These saves are synchronous (async_write does not apply).")


def _elsewhere(digests: list[float]) -> Exception:
    """The error for a shard file another process could not write."""
    for process, digest in enumerate(digests):
        if digest == -2:
            return storage.NonFiniteStateError(
                f"a piece of a split variable held by process {process} holds NaN or "
                "infinite values")
    process = next(p for p, d in enumerate(digests) if d < 0)
    return OSError(f"process {process} could not write its shard file")


def commit(saver: Any, regular: str | None, write_last: bool, snapshot: Any, meta: dict,
           ) -> None:
    """Writes `snapshot` as a sharded checkpoint to `regular` and/or the `last` file.

    Every process calls it, in the same order (it is a collective).

    Raises:
        OSError: a process could not write, any error it met (nothing of the failing
            target is left; a regular file committed before a failing `last` file stays,
            a complete checkpoint).
        NonFiniteStateError: a piece holds NaN or infinity (nothing written).
    """
    owner, options = saver.owner, saver.options
    workers, directory = owner.workers, owner.files
    started = time.monotonic()
    targets = ([(regular, "regular")] if regular is not None else []) + (
        [(directory.last_path, "last")] if write_last else [])
    written = []
    for path, kind in targets:
        uid = int(workers.from_chief(float(secrets.randbits(32)) if workers.is_chief else 0.0))
        mine = shards.shard_name(path, uid, workers.task_id)
        error: Exception | None = None
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            digest = float(shards.write_own(path, uid, workers.task_id, snapshot,
                                            fsync=options.fsync,
                                            compression=options.compression))
        except storage.NonFiniteStateError as e:
            error, digest = e, -2.0
        except Exception as e:  # (any: the others wait for this process's digest)
            error, digest = _as_os_error(e, mine), -1.0
        digests = workers.values(digest)
        if any(d < 0 for d in digests):
            if error is None:
                shard_listing.remove_files([mine])
            raise error or _elsewhere(digests)
        failed = _write_main(saver, path, kind, snapshot, meta, uid, digests) \
            if workers.is_chief else None
        # Process 0 alone wrote: every process fails with it, as it did (and undoes alike).
        code = workers.from_chief(0.0 if failed is None else 2.0 if isinstance(
            failed, storage.NonFiniteStateError) else 1.0)
        if code:
            raise _as_os_error(failed, path) if failed is not None else \
                _non_finite(snapshot) if code == 2 else \
                OSError(f"process 0 could not write the main file {path}")
        written.append(path)
    if workers.is_chief:
        saver.committed(written, started)


def _write_main(saver: Any, path: str, kind: str, snapshot: Any, meta: dict, uid: int,
                digests: list[float]) -> BaseException | None:
    """Process 0 writes the main file recording every shard file (its rename is the commit);
    the error, if it failed (the shard files of this save removed)."""
    new = [shards.shard_name(path, uid, p) for p in range(len(digests))]
    table = {**snapshot.meta["shards"],
             "files": [{"name": os.path.basename(name), "digest": int(d)}
                       for name, d in zip(new, digests, strict=True)]}
    old = shard_listing.files_of(path) if os.path.exists(path) else []
    try:
        saver._write(path, snapshot, {**meta, "kind": kind, "shards": table},
                     storage.KerasPartFirst(None))
    except BaseException as e:  # (any: the others wait for this process's word)
        # (not the shard files of a main file in place: its directory's fsync failed)
        shard_listing.remove_files([p for p in new if p not in shard_listing.files_of(path)])
        return e
    shard_listing.remove_files([p for p in old if p not in new])
    return None


def _as_os_error(error: BaseException, path: str) -> BaseException:
    """`error` as every process fails a save: a refusal or an `OSError` (what the saver
    handles alike everywhere), or an interrupt as it is."""
    if isinstance(error, (OSError, storage.NonFiniteStateError)) or \
            not isinstance(error, Exception):
        return error
    wrapped = OSError(f"{path}: {type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


def _non_finite(snapshot: Any) -> storage.NonFiniteStateError:
    """What process 0 refused to write: a variable not split, so the same here."""
    variables = snapshot.meta["variables"]
    for name in snapshot.arrays:
        if (error := non_finite(name, np.asarray(snapshot.arrays[name]), variables)) is not None:
            return error
    return storage.NonFiniteStateError("process 0 found NaN or infinite values in the state")
