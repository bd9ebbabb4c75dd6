"""The checkpoint directory of one ModelCheckpoint: which files are its own, and their upkeep.

The directory is the longest part of `filepath` without placeholders: with
`run/ep{epoch}/m.keras` (which Keras accepts) it is `run/`, and the files are
looked for in the subdirectories the template produces. It holds the lock,
the `last` copy, the write probe, and is what retention, the remote mirror,
listing and resume work on.

With a URL `filepath`, the listing also holds the remote checkpoints the local
mirror lacks (their metadata read from the store, `remote_only`): resume
downloads one only when it is the newest left to try, and retention deletes
the ones it drops remotely, never downloading them.
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from typing import Any

from keras_ckpt import atomic, dirlock, manager, remote, shard_listing, storage
from keras_ckpt.keras_compat import print_msg
from keras_ckpt.warn import warn

__all__ = ["CheckpointDirectory", "local_template"]


def local_template(filepath: str) -> tuple[str, str | None, Any]:
    """`(local template, URL template or None, mirror or None)` for a `filepath`."""
    if not remote.is_remote(filepath):
        return filepath, None, None
    url, name = filepath.rsplit("/", 1)
    if manager.template_fields(url):
        raise ValueError(f"`filepath` {filepath!r}: with a URL, placeholders may only be in "
                         "the file name, not in the directory.")
    mirror = remote.Mirror(url)
    return os.path.join(mirror.local, name), filepath, mirror


def _split_template(filepath: str) -> tuple[str, str]:
    """(directory without placeholders, the template relative to it)."""
    path = os.path.abspath(filepath)
    parts = path.split(os.sep)
    for i, part in enumerate(parts[:-1]):
        if any(field is not None for _, field, _, _ in string.Formatter().parse(part)):
            return os.sep.join(parts[:i]) or os.sep, os.sep.join(parts[i:])
    return os.path.dirname(path), parts[-1]


class CheckpointDirectory:
    """Names, listing, temporaries, lock, retention and mirror of one template.

    Args:
        filepath: the local path template.
        mirror: a `remote.Mirror` for a URL `filepath`, or None.
        lock: whether `acquire` takes the directory lock.
        verbose: print what retention and the mirror do.
    """

    def __init__(self, filepath: str, mirror: Any = None, lock: bool = True,
                 verbose: int = 0) -> None:
        self.filepath = filepath
        self.path, self.template = _split_template(filepath)
        self.nested = os.sep in self.template  # placeholders in directory parts
        self._regex = manager.template_regex(self.template, whole=True)
        self._has_fields = bool(manager.template_fields(self.template))
        self.mirror = mirror
        self.lock = lock
        self.verbose = verbose
        self._undeletable: set[str] = set()  # retention warned of these once
        self.last_path = os.path.join(self.path, "last" + storage.extension(filepath))
        self._owner: Any = None
        self.remote_only: dict[str, manager.CheckpointInfo] = {}  # local path -> remote info

    # ------------------------------------------------------------ names
    def own_name(self, relative: str) -> bool:
        """Whether `relative` (to the directory) is one of this template's regular files."""
        if self._has_fields and relative == os.path.basename(self.last_path):
            return False  # `last.keras` beside `{epoch}.keras`: the copy, not a checkpoint
        return bool(self._regex.match(relative))

    def own_or_last(self, relative: str) -> bool:
        """`own_name`, or the `last` copy (what the mirror keeps in step)."""
        return self.own_name(relative) or relative == os.path.basename(self.last_path)

    def candidates(self) -> list[str]:
        """The template's files on disk (not the `last` copy), sorted."""
        depth = self.template.count(os.sep)
        found = []
        for top, dirs, files in os.walk(self.path):
            rel = os.path.relpath(top, self.path)
            level = 0 if rel == "." else rel.count(os.sep) + 1
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if level < depth else []
            for name in files:
                relative = name if rel == "." else os.path.join(rel, name)
                if not name.startswith(".") and self.own_name(relative):
                    found.append(os.path.join(top, name))
        return sorted(found)

    def checkpoints(self, include_invalid: bool = False) -> list[manager.CheckpointInfo]:
        """This template's regular checkpoints (metadata only), oldest first."""
        remote = [c for p, c in self.remote_only.items()
                  if self.own_name(os.path.basename(p)) and (include_invalid or c.error is None)]
        return [c for c in manager.in_order(
                    manager.read_infos(self.candidates(), include_invalid) + remote)
                if c.kind in ("regular", "foreign") or c.error is not None]

    def resumable(self, state_bytes: int | None = None) -> list[manager.CheckpointInfo]:
        """Every file resume may choose from, damaged ones included (see `latest`)."""
        if self.nested:
            paths = self.candidates() + (
                [self.last_path] if os.path.isfile(self.last_path) else [])
        else:
            paths = manager.candidate_paths(self.path)
        return manager.in_order(manager.read_infos(paths, include_invalid=True,
                                                   state_bytes=state_bytes)
                                + list(self.remote_only.values()))

    def latest(self, state_bytes: int | None = None, fits: Any = None, lazy: Any = None
               ) -> tuple[manager.CheckpointInfo, Any] | None:
        """The newest valid checkpoint to resume from, read and verified, or None.

        `state_bytes`: the most its arrays may take (`state_checks.state_bytes_bound`).
        `fits`, `lazy`: see `manager.latest_valid` (another model's checkpoints are
        skipped; with `lazy`, arrays are read when asked for).
        """
        return manager.latest_valid(self.resumable(state_bytes), state_bytes=state_bytes,
                                    fits=fits, fetch=self._fetch, lazy=lazy)

    def _fetch(self, info: manager.CheckpointInfo) -> None:
        """Downloads a remote-only checkpoint before resume reads it."""
        if self.remote_only.pop(info.path, None) is not None:
            self.mirror.fetch(os.path.basename(info.path))
            if self.verbose > 0:
                print_msg(f"ModelCheckpoint: downloaded {os.path.basename(info.path)} from "
                          f"{self.mirror.url}.")

    def file_path(self, logs: dict, epoch: int, steps_in_epoch: int | None) -> str:
        """The template filled with the logs, `epoch` (1-based) and `batch` (steps done)."""
        values = dict(logs)
        values["epoch"] = epoch + 1
        if steps_in_epoch is not None and "batch" not in values:
            values["batch"] = steps_in_epoch
        try:
            return self.filepath.format(**values)
        except KeyError as e:
            raise KeyError(
                f"ModelCheckpoint cannot fill the placeholder {e} of filepath="
                f"{self.filepath!r}; available: {', '.join(sorted(values))}.") from None

    def check_fields(self, logs: dict, fields: Sequence[str]) -> None:
        """Every placeholder in `fields` must be a key the logs will have."""
        known = set(logs) | {f"val_{k}" for k in logs}
        unknown = [f for f in fields if f not in known]
        if unknown:
            available = ", ".join(["epoch", "batch"] + sorted(known))
            raise ValueError(
                f"ModelCheckpoint: filepath {self.filepath!r} has the placeholder "
                f"{{{unknown[0]}}}, which is not a key of the logs; available: {available}.")

    # ------------------------------------------------------------ a fit's upkeep
    def check_writable(self) -> None:
        """Fails early (train begin) when the template names a directory or cannot be written."""
        sample = {name: 0 for name in manager.template_fields(self.filepath)}
        sample["epoch"] = 1
        probe = self.filepath.format(**sample)
        if os.path.isdir(probe):
            raise IsADirectoryError(
                f"ModelCheckpoint: filepath {self.filepath!r} names a directory; give a "
                "file name such as 'ckpt/epoch-{epoch:02d}.keras'.")
        try:
            os.makedirs(self.path, exist_ok=True)
            probe_file = atomic.temp_path(os.path.join(self.path, "write-test"), "probe")
            with open(probe_file, "wb") as f:
                f.write(b"ok")
            os.remove(probe_file)
        except OSError as e:
            raise PermissionError(
                f"ModelCheckpoint cannot write to {self.path!r} ({e.strerror}); choose a "
                "writable directory in `filepath`.") from None

    def acquire(self, owner: Any) -> None:
        """Takes the directory lock (if `lock`) for `owner`'s fit."""
        if self.lock:
            dirlock.acquire(self.path, owner)
            self._owner = owner

    def release(self) -> None:
        """Releases the lock `acquire` took (once; later calls do nothing)."""
        owner, self._owner = self._owner, None
        if owner is not None:
            dirlock.release(self.path, owner)

    def clean_temporaries(self) -> None:
        """Removes unfinished writes of processes that ended mid-save (never checkpoints)."""
        tops = [self.path] + sorted({os.path.dirname(p) for p in self.candidates()})
        for top in dict.fromkeys(tops):
            for name in atomic.stale_temporaries(top):
                try:
                    os.remove(os.path.join(top, name))
                except OSError:
                    continue
                warn(f"ModelCheckpoint: removed {name} from {top}: an unfinished "
                     "write of a process that ended mid-save (never a checkpoint).")
            for path in shard_listing.orphans(top):
                shard_listing.remove_files([path])
                warn(f"ModelCheckpoint: removed {os.path.basename(path)} from {top}: the "
                     "shard file of a save that never committed (or of a checkpoint since "
                     "replaced).")

    def pull(self) -> None:
        """Lists the remote directory (URL `filepath`) against the local mirror.

        A local file the remote directory lacks is removed (deleted there, or
        never uploaded), and so is one whose remote version differs; every
        remote file the mirror does not hold goes into `remote_only`, with its
        metadata read from the store (an unreadable one: its error), so that
        resume and retention see it. Nothing is downloaded here.
        """
        mirror = self.mirror
        if mirror is None:
            return
        os.makedirs(mirror.local, exist_ok=True)
        remote = [n for n in mirror.names() if self.own_or_last(n)]
        self.remote_only = {}
        for name in os.listdir(mirror.local):
            target = os.path.join(mirror.local, name)
            if self.own_or_last(name) and (name not in remote or not mirror.same(name)):
                os.remove(target)
        for name in remote:
            target = os.path.join(mirror.local, name)
            if not os.path.exists(target):
                self.remote_only[target] = self._remote_info(name, target)
        if self.remote_only and self.verbose > 0:
            print_msg(f"ModelCheckpoint: {len(self.remote_only)} checkpoint(s) in "
                      f"{mirror.url} not in the local mirror {self.path}.")

    def _remote_info(self, name: str, target: str) -> manager.CheckpointInfo:
        return manager.info_of(target, self.mirror.size(name),
                               lambda: self.mirror.remote_meta(name))

    def push(self, paths: Sequence[str]) -> None:
        if self.mirror is not None:
            for path in paths:
                self.mirror.push(path)

    def apply_retention(self, policies: Sequence[Any], protect: Sequence[str | None]) -> None:
        """Deletes the checkpoints no policy keeps (here, then on the remote side)."""
        kept = [c for c in self.checkpoints() if c.kind == "regular"]
        failed: dict[str, OSError] = {}
        deleted = manager.apply_retention(kept, policies, [p for p in protect if p], failed,
                                          remove=self._remove)
        for path, error in failed.items():
            if path not in self._undeletable:  # once a file: it stays, the rest are applied
                self._undeletable.add(path)
                warn(f"ModelCheckpoint: retention cannot delete {path} "
                     f"({error.strerror or error}); it is left, and the rest of "
                     "the retention policy is applied.")
        if deleted and self.verbose > 0:
            print_msg(f"ModelCheckpoint: retention removed {len(deleted)} checkpoint(s)")
        if self.mirror is not None:
            self.mirror.delete([os.path.basename(p) for p in deleted])

    def _remove(self, path: str) -> None:
        """Deletes a checkpoint here (a remote-only one: only from `remote_only`), with its
        shard files (variables split across processes)."""
        if self.remote_only.pop(path, None) is None:
            pieces = shard_listing.files_of(path)  # (any fit's: one process may resume them)
            os.remove(path)
            shard_listing.remove_files(pieces)
