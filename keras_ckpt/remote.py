"""Checkpoint directories at a remote URL (`s3://`, `gs://`, `az://`, `memory://`, `ram://`, ...).

keras-ckpt's guarantees (fsync, an atomic rename, a directory lock) need a
local file system, which object stores do not give. A remote `filepath` is
therefore served by a local mirror: every checkpoint is written, verified and
resumed from in a local staging folder as usual, then uploaded under a
temporary name and renamed into place on the remote side (a copy, then one
rename: readers never see a partial file where the store's rename is atomic,
as in memory; on `gs://` and `s3://` a rename is a copy then a delete, so a
crash in between leaves a hidden temporary file, never a partial checkpoint
under a checkpoint's name). A fit lists the remote checkpoints the mirror
lacks or holds another version of (a file of the same name is compared by
content: the metadata keras-ckpt records in it, every array's checksum, the
step, the time written, never by size alone, so a fixed name rewritten by
another machine counts as new), reading only the few blocks of each that hold
that metadata. Resume then downloads newest first, only until one verifies;
retention sees the remote-only files too and deletes what it drops on both
sides (`CheckpointDirectory`). `Mirror.pull` downloads everything at once.
URLs go through fsspec where its implementation for the scheme is installed
(s3fs, gcsfs, adlfs; `remote_store.store_for`), else through `tf.io.gfile`,
as Keras's own file utilities do (`gs://` built in, `ram://` in memory).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable

from keras_ckpt import atomic, storage
from keras_ckpt.remote_store import store_for

__all__ = ["Mirror", "is_remote"]

_TMP = atomic.MARK  # ours, and older versions' (`.NAME.tmp-PID-upload`)


def is_remote(path: str) -> bool:
    """Whether `path` is a URL (`scheme://...`) rather than a local path."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def _os_error(what: str, url: str, error: Exception) -> OSError:
    return OSError(f"{what} {url} failed: {type(error).__name__}: {error}")


def _local_meta(path: str) -> dict | None:
    try:
        return storage.read_meta(path)
    except (storage.CorruptCheckpointError, OSError):
        return None


class Mirror:
    """A remote checkpoint directory and the local folder that stages it.

    Args:
        url: the remote directory (`scheme://bucket/path`).
        local: the staging folder; default: one per URL under the system's
            temporary directory.

    Raises:
        ValueError: no file system for `url`'s scheme is installed here.

    Example:

    ```python
    mirror = Mirror("gs://bucket/run1")
    mirror.pull(lambda name: name.endswith(".keras"))  # before resuming
    mirror.push(os.path.join(mirror.local, "ckpt-3.keras"))  # after a save
    ```
    """

    def __init__(self, url: str, local: str | None = None) -> None:
        self.url = url.rstrip("/")
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.local = local or os.path.join(tempfile.gettempdir(), "keras-ckpt-mirror", digest)
        self._store = store_for(self.url)  # no network: the store is not touched yet

    def _remote(self, name: str) -> str:
        return f"{self.url}/{name}"

    def names(self) -> list[str]:
        """The remote directory's file names (without temporaries); [] if it does not exist."""
        try:
            if not self._store.exists(self.url):
                return []
            return sorted(n for n in self._store.listdir(self.url)
                          if not (n.startswith(".") and _TMP in n))
        except Exception as e:
            raise _os_error("Listing", self.url, e) from None

    def pull(self, matches: Callable[[str], bool]) -> list[str]:
        """Makes the local folder hold the remote files whose names `matches`.

        Downloads those missing locally or holding other content (to a
        temporary name, then renamed; see `same`); removes local matching
        files the remote directory does not have (deleted there, or never
        uploaded).

        Returns:
            The names downloaded.
        """
        os.makedirs(self.local, exist_ok=True)
        remote = [n for n in self.names() if matches(n)]
        for name in os.listdir(self.local):
            if matches(name) and name not in remote:
                os.remove(os.path.join(self.local, name))
        fetched = []
        for name in remote:
            if not (os.path.exists(os.path.join(self.local, name)) and self.same(name)):
                self.fetch(name)
                fetched.append(name)
        return fetched

    def size(self, name: str) -> int:
        """The remote file's size in bytes."""
        try:
            return int(self._store.size(self._remote(name)))
        except Exception as e:
            raise _os_error("Reading the size of", self._remote(name), e) from None

    def remote_meta(self, name: str) -> dict:
        """keras-ckpt's metadata of the remote file `name`, read without downloading it.

        Only the blocks that hold it are read (`storage.read_meta` on the
        remote file). Raises `CorruptCheckpointError` (or `ForeignFileError`)
        for a file it cannot be read from, `OSError` when the store fails.
        """
        source = self._remote(name)
        try:
            reader = self._store.open_read(source)
        except Exception as e:
            raise _os_error("Reading", source, e) from None
        with reader:
            return storage.read_meta(source, fileobj=reader)

    def fetch(self, name: str) -> str:
        """Downloads the remote file `name` into the local folder (atomically); returns its path."""
        os.makedirs(self.local, exist_ok=True)
        source, target = self._remote(name), os.path.join(self.local, name)

        def download(tmp: str) -> None:
            self._store.download(source, tmp)

        try:
            atomic.write(target, download, purpose="pull")
        except Exception as e:
            raise _os_error("Downloading", source, e) from None
        return target

    def delete(self, names: list[str]) -> None:
        """Deletes these remote files (those already gone are no error)."""
        for name in names:
            try:
                if self._store.exists(self._remote(name)):
                    self._store.remove(self._remote(name))
            except Exception as e:
                raise _os_error("Deleting", self._remote(name), e) from None

    def same(self, name: str) -> bool:
        """Whether the local file `name` holds what the remote one does, without downloading it.

        Two checkpoints are the same when their sizes and keras-ckpt
        metadata are (it lists every array's CRC-32, the step and the time
        written); only the blocks holding the remote file's metadata are
        read. A file either side cannot read that metadata from is never the
        same (it is downloaded again).
        """
        source, target = self._remote(name), os.path.join(self.local, name)
        if not os.path.exists(target) or self._store.size(source) != os.path.getsize(target):
            return False
        local = _local_meta(target)
        if local is None:
            return False
        try:
            return self.remote_meta(name) == local
        except storage.CorruptCheckpointError:
            return False

    def push(self, path: str) -> str:
        """Uploads the local file `path` under its name: a temporary copy, then a rename.

        Returns:
            The remote URL written.

        Raises:
            OSError: the upload failed; the remote checkpoint of that name, if
                any, is unchanged where the store renames atomically.
        """
        name = os.path.basename(path)
        target = self._remote(name)
        tmp = self._remote(atomic.temp_name(name, "upload"))
        try:
            self._store.makedirs(self.url)
            self._store.upload(path, tmp)
            self._store.rename(tmp, target)
        except Exception as e:
            try:
                if self._store.exists(tmp):
                    self._store.remove(tmp)
            except Exception:  # noqa: BLE001 - the upload error is the one to report
                pass
            raise _os_error("Uploading to", target, e) from None
        return target

    def prune(self, matches: Callable[[str], bool]) -> list[str]:
        """Deletes remote files whose names `matches` and that the local folder no longer has.

        Returns:
            The names deleted.
        """
        local = set(os.listdir(self.local)) if os.path.isdir(self.local) else set()
        deleted = [name for name in self.names() if matches(name) and name not in local]
        self.delete(deleted)
        return deleted
