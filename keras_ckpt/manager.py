"""A checkpoint directory: list it, find the latest valid or the best, apply retention.

Also the functional API for code that does not use the callback:
`list_checkpoints`, `latest_checkpoint`, `best_checkpoint` and `restore`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from keras_ckpt import shard_listing, storage
from keras_ckpt import state as state_lib
from keras_ckpt.jsonsafe import decode_float
from keras_ckpt.rng import rng_tuples
from keras_ckpt.state_checks import check_progress, check_snapshot
from keras_ckpt.warn import warn

__all__ = ["CheckpointInfo", "list_checkpoints", "latest_checkpoint", "best_checkpoint",
           "template_regex", "read_infos", "latest_valid", "read_verified",
           "read_verified_lazily", "candidate_paths", "in_order", "info_of"]


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What the metadata of one checkpoint file says, and whether it is readable.

    Attributes:
        path: the file.
        epoch: the 0-based epoch it was written in (None when unreadable).
        step: steps done in that epoch.
        epoch_complete: True for an end-of-epoch save.
        global_step: training steps since the run began.
        monitor, monitor_value: the monitored quantity and its value then.
        loss: the training loss then (None if not logged).
        written_at: POSIX time of the write.
        kind: `"regular"` or `"last"`.
        size: bytes on disk.
        error: why the file is not a valid checkpoint, or None.
    """

    path: str
    epoch: int | None = None
    step: int | None = None
    epoch_complete: bool = False
    global_step: int = -1
    monitor: str | None = None
    monitor_value: float | None = None
    loss: float | None = None
    written_at: float = 0.0
    kind: str = "regular"  # "regular", "last", or "foreign" for files we did not write
    size: int = 0
    error: str | None = None

    @property
    def valid(self) -> bool:
        """True when the metadata was readable (arrays are verified on load)."""
        return self.error is None

    @property
    def finite(self) -> bool:
        """True when the recorded loss and monitored value are finite (or absent)."""
        return all(v is None or math.isfinite(v) for v in (self.loss, self.monitor_value))

    @property
    def resume_point(self) -> tuple[int, int]:
        """(epoch, steps done in it) at which training continues from this checkpoint."""
        if self.epoch_complete:
            return self.epoch + 1, 0
        return self.epoch, self.step


def _typed(path: str, value: Any, types: tuple, what: str) -> Any:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise storage.CorruptCheckpointError(
            f"{path}: the metadata's {what} is {value!r}, not of the type keras-ckpt writes.")
    return value


def info_from_meta(path: str, meta: Mapping[str, Any], size: int = 0) -> CheckpointInfo:
    """Builds a `CheckpointInfo` from a checkpoint's metadata.

    Raises:
        CorruptCheckpointError: a field has another type than keras-ckpt writes.
    """
    progress = _typed(path, meta.get("progress", {}), (dict,), "progress")
    try:
        check_progress(progress)
    except state_lib.StateMismatchError as e:
        raise storage.CorruptCheckpointError(f"{path}: {e}") from None
    none_int, number = (int, type(None)), (int, float, str, type(None))
    try:
        monitor_value = decode_float(_typed(path, meta.get("monitor_value"), number,
                                            "monitored value"))
        loss = decode_float(_typed(path, meta.get("loss"), number, "loss"))
    except (TypeError, ValueError):
        raise storage.CorruptCheckpointError(
            f"{path}: the metadata's loss or monitored value is not a number.") from None
    written_at = float(_typed(path, meta.get("written_at", 0.0), (int, float), "time written"))
    return CheckpointInfo(
        path=path,
        epoch=_typed(path, progress.get("epoch"), none_int, "epoch"),
        step=_typed(path, progress.get("step"), none_int, "step"),
        epoch_complete=_typed(path, progress.get("epoch_complete", False), (bool,),
                              "epoch_complete"),
        global_step=_typed(path, progress.get("global_step", -1), (int,), "global step"),
        monitor=_typed(path, meta.get("monitor"), (str, type(None)), "monitor"),
        monitor_value=monitor_value,
        loss=loss,
        written_at=written_at if math.isfinite(written_at) else 0.0,
        kind=_typed(path, meta.get("kind", "regular"), (str,), "kind"),
        size=size,
    )


def read_verified(path: str, verify: bool = True,
                  state_bytes: int | None = None) -> state_lib.Snapshot:
    """`storage.read`, and the state's structure checked (`state_checks.check_snapshot`).

    `state_bytes`: see `storage.read` (`state_checks.state_bytes_bound(model)`).

    Raises:
        CorruptCheckpointError: the file is damaged, foreign or its state malformed.
    """
    return _checked(path, storage.read(path, verify=verify, state_bytes=state_bytes))


@contextlib.contextmanager
def read_verified_lazily(path: str, state_bytes: int | None = None
                         ) -> Iterator[state_lib.Snapshot]:
    """`read_verified` whose arrays are read when asked for (`storage.read_lazily`)."""
    with storage.read_lazily(path, state_bytes=state_bytes) as snapshot:
        yield _checked(path, snapshot)


def _checked(path: str, snapshot: state_lib.Snapshot) -> state_lib.Snapshot:
    try:
        check_snapshot(snapshot)
        if snapshot.meta.get("rng") is not None:
            rng_tuples(snapshot.meta["rng"], snapshot.arrays)
    except state_lib.StateMismatchError as e:
        raise storage.CorruptCheckpointError(f"{path}: {e}") from None
    info_from_meta(path, snapshot.meta)  # what listing checks, checked here too
    return snapshot


def candidate_paths(directory: str) -> list[str]:
    """The files of `directory` that may be checkpoints (by extension, not hidden)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(
        os.path.join(directory, n) for n in names
        if not n.startswith(".") and storage.extension(n)
        and os.path.isfile(os.path.join(directory, n))
    )


def list_checkpoints(directory: str | os.PathLike, include_invalid: bool = False
                     ) -> list[CheckpointInfo]:
    """Lists the keras-ckpt checkpoints in `directory`, oldest first.

    Reads metadata only. Temporary files of writes in progress are never
    listed. Files that are not keras-ckpt checkpoints, or whose metadata cannot
    be read, are left out unless `include_invalid`, where they come first,
    with `error` set.

    Args:
        directory: the checkpoint directory.
        include_invalid: include unreadable and foreign files.

    Returns:
        A list of `CheckpointInfo`, ordered by global step, then time written.

    Example:
    >>> list_checkpoints("/nonexistent")
    []
    """
    return read_infos(candidate_paths(os.fspath(directory)), include_invalid)


_LAST_NAMES = ("last.keras", "last.weights.h5", "last.h5")


def read_infos(paths: Iterable[str], include_invalid: bool = False,
               state_bytes: int | None = None) -> list[CheckpointInfo]:
    """`info_of` each file, ordered as listings order (`state_bytes`: see `storage.read_meta`)."""
    infos = [info_of(path, os.path.getsize(path),
                     lambda path=path: storage.read_meta(path, state_bytes=state_bytes))
             for path in paths]
    return in_order(c for c in infos if include_invalid or c.error is None)


def info_of(path: str, size: int, read_meta: Callable[[], Mapping[str, Any]]) -> CheckpointInfo:
    """The `CheckpointInfo` of the file `path` from `read_meta()`; its `error` if unreadable.

    A file named `last.keras` / `last.weights.h5` is the `save_last` copy of the
    newest state (often a hard link to a regular file): its kind is "last".
    """
    try:
        meta = read_meta()
        info = info_from_meta(path, meta, size)
        shard_listing.check_present(path, meta)
    except storage.ForeignFileError as e:
        return CheckpointInfo(path=path, size=size, error=str(e), kind="foreign")
    except storage.CorruptCheckpointError as e:
        return CheckpointInfo(path=path, size=size, error=str(e))
    if os.path.basename(path) in _LAST_NAMES and info.kind != "last":
        info = dataclasses.replace(info, kind="last")
    return info


def in_order(infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    """`infos` as listings order them: unreadable first, then oldest to newest."""
    return sorted(infos, key=lambda c: (c.error is None, c.global_step, c.written_at, c.path))


def latest_checkpoint(directory: str | os.PathLike, *, verify: bool = True
                      ) -> tuple[CheckpointInfo, state_lib.Snapshot] | None:
    """Finds and reads the newest valid, finite checkpoint in `directory`.

    Checkpoints are tried newest first; one that fails verification is
    skipped with a warning that names it, and so is every damaged file in the
    directory. Nothing is deleted. Files keras-ckpt did not write are ignored.

    Returns:
        `(info, snapshot)`, or None when the directory holds no valid checkpoint.
    """
    return latest_valid(list_checkpoints(directory, include_invalid=True), verify=verify)


def latest_valid(infos: Sequence[CheckpointInfo], *, verify: bool = True,
                 state_bytes: int | None = None,
                 fits: Callable[[state_lib.Snapshot], Any] | None = None,
                 fetch: Callable[[CheckpointInfo], None] | None = None,
                 lazy: contextlib.ExitStack | None = None
                 ) -> tuple[CheckpointInfo, state_lib.Snapshot] | None:
    """Reads the newest valid, finite checkpoint of `infos` (see `latest_checkpoint`).

    `state_bytes`: the most a checkpoint's arrays may take (see `storage.read`).
    `fits`: raises `StateMismatchError` for a snapshot of another model. Such
    a checkpoint is passed over for an older one that fits, with a warning
    naming it; when none fits, the newest one's mismatch is raised (a changed
    model is an error, never a silent fresh start). `fetch(info)`: called
    before a checkpoint is read (a remote one is downloaded then). `lazy`:
    the snapshot's arrays are read when asked for (`read_verified_lazily`),
    its file open until `lazy` closes.
    """
    for info in infos:
        if info.error is not None and info.kind != "foreign":
            warn(f"Skipping a damaged checkpoint (left on disk): {info.error}")
    mismatches: list[state_lib.StateMismatchError] = []
    for info in reversed([c for c in infos if c.error is None]):
        if not info.finite:
            continue
        if fetch is not None:
            fetch(info)
        own = contextlib.ExitStack()
        try:
            snapshot = own.enter_context(read_verified_lazily(info.path, state_bytes)) \
                if lazy is not None and verify else \
                read_verified(info.path, verify=verify, state_bytes=state_bytes)
        except storage.CorruptCheckpointError as e:
            warn(f"Skipping a checkpoint that fails verification (left on disk): {e}")
            continue
        try:
            if fits is not None:
                fits(snapshot)
        except state_lib.StateMismatchError as e:
            own.close()
            mismatches.append(state_lib.StateMismatchError(f"{info.path}: {e}"))
            continue
        except storage.CorruptCheckpointError as e:  # (its shard files)
            own.close()
            warn(f"Skipping a checkpoint that fails verification (left on disk): {e}")
            continue
        for e in mismatches:
            warn(f"Skipping a checkpoint written for another model (left on disk): {e}")
        if lazy is not None:
            lazy.enter_context(own.pop_all())
        return info, snapshot
    if mismatches:
        raise mismatches[0]
    return None


def best_checkpoint(directory: str | os.PathLike, monitor: str | None = None,
                    mode: str = "min") -> CheckpointInfo | None:
    """The checkpoint with the best finite recorded value of `monitor`.

    Args:
        directory: the checkpoint directory.
        monitor: the quantity; by default whichever the checkpoints recorded.
        mode: `"min"` or `"max"`.

    Returns:
        Its `CheckpointInfo`, or None if no checkpoint recorded a finite value.
    """
    scored = [c for c in list_checkpoints(directory)
              if c.monitor_value is not None and math.isfinite(c.monitor_value)
              and (monitor is None or c.monitor == monitor)]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda c: c.monitor_value)


def template_fields(template: str) -> list[str]:
    """The placeholder names of a `str.format` template.

    Raises:
        ValueError: malformed template, or a field with attribute/index access.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"`filepath` {template!r} is not a valid format string: {e}") from None
    fields = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        if not field or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", field):
            raise ValueError(
                f"`filepath` {template!r} has the placeholder {{{field}}}; placeholders must "
                "be names such as {epoch}, {batch} or a metric name like {val_loss}."
            )
        fields.append(field)
    return fields


def template_regex(template: str, whole: bool = False) -> re.Pattern:
    """A regex that matches the file names a `filepath` template produces.

    `whole`: match relative paths produced by the whole `template` (which may
    have placeholders in directory parts: each stays within one component).
    """
    parts = []
    source = template if whole else os.path.basename(template)
    for literal, field, _, _ in string.Formatter().parse(source):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(r"[^/]+?" if whole else ".+?")
    return re.compile("".join(parts) + r"\Z")


def apply_retention(checkpoints: Sequence[CheckpointInfo], policies: Iterable[Any],
                    protect: Iterable[str] = (),
                    failed: dict[str, OSError] | None = None,
                    remove: Callable[[str], None] = os.remove) -> list[str]:
    """Deletes the checkpoints no policy keeps; returns the deleted paths.

    The newest checkpoint and the paths in `protect` are always kept. A file
    that cannot be deleted (permission denied, immutable) is left and the
    rest are still applied; its error goes into `failed` by path. `remove`
    deletes one path (a remote directory's mirror passes its own).
    """
    checkpoints = list(checkpoints)
    if not checkpoints:
        return []
    keep = set(protect) | {checkpoints[-1].path}
    for policy in policies:
        keep |= policy.keep(checkpoints)
    deleted = []
    for c in checkpoints:
        if c.path not in keep:
            try:
                remove(c.path)
                deleted.append(c.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                if failed is not None:
                    failed[c.path] = e
    return deleted
