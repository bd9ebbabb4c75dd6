"""Checkpoint directories at a remote URL (`gs://`, `s3://`, `hdfs://`, `ram://`, ...).

keras-ckpt's guarantees (fsync, an atomic rename, a directory lock) need a
local file system, which object stores do not give. A remote `filepath` is
therefore served by a local mirror: every checkpoint is written, verified and
resumed from in a local staging folder as usual, then uploaded under a
temporary name and renamed into place on the remote side (a copy, then one
rename: readers never see a partial file where the store's rename is atomic,
as on HDFS and in memory; on `gs://` and `s3://` a rename is a copy then a
delete, so a crash in between leaves a hidden temporary file, never a partial
checkpoint under a checkpoint's name). Resuming downloads the remote
checkpoints the mirror lacks. URLs go through `tf.io.gfile`, as Keras's own
file utilities do: the schemes are those TensorFlow's file systems register
(`gs://` built in; `s3://` and `hdfs://` with tensorflow-io; `ram://` for tests).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable

__all__ = ["Mirror", "is_remote"]

_TMP = ".tmp-"


def is_remote(path: str) -> bool:
    """Whether `path` is a URL (`scheme://...`) rather than a local path."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def _gfile():
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover - TensorFlow is a dependency
        raise ValueError("A remote `filepath` needs TensorFlow's tf.io.gfile.") from None
    return tf.io.gfile


def _os_error(what: str, url: str, error: Exception) -> OSError:
    return OSError(f"{what} {url} failed: {type(error).__name__}: {error}")


class Mirror:
    """A remote checkpoint directory and the local folder that stages it.

    Args:
        url: the remote directory (`scheme://bucket/path`).
        local: the staging folder; default: one per URL under the system's
            temporary directory.

    Raises:
        ValueError: `url`'s scheme has no `tf.io.gfile` file system here.

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
        self._gfile = _gfile()
        scheme = self.url.split("://", 1)[0]
        schemes = self._gfile.get_registered_schemes()  # no network: the store is not touched
        if scheme not in schemes:
            known = ", ".join(f"{s}://" for s in sorted(schemes) if s not in ("", "file"))
            raise ValueError(
                f"`filepath` {url!r}: TensorFlow has no file system for this URL here "
                f"(tf.io.gfile knows {known}). Supported: the schemes tf.io.gfile registers "
                "(gs:// built in; s3:// and hdfs:// with tensorflow-io; ram:// in memory).")

    def _remote(self, name: str) -> str:
        return f"{self.url}/{name}"

    def names(self) -> list[str]:
        """The remote directory's file names (without temporaries); [] if it does not exist."""
        try:
            if not self._gfile.exists(self.url):
                return []
            return sorted(n.rstrip("/") for n in self._gfile.listdir(self.url)
                          if not (n.startswith(".") and _TMP in n))
        except Exception as e:
            raise _os_error("Listing", self.url, e) from None

    def pull(self, matches: Callable[[str], bool]) -> list[str]:
        """Makes the local folder hold the remote files whose names `matches`.

        Downloads those missing locally or of another size (to a temporary
        name, then renamed); removes local matching files the remote
        directory does not have (deleted there, or never uploaded).

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
            source, target = self._remote(name), os.path.join(self.local, name)
            try:
                size = self._gfile.stat(source).length
                if os.path.exists(target) and os.path.getsize(target) == size:
                    continue
                tmp = os.path.join(self.local, f".{name}{_TMP}{os.getpid()}-pull")
                self._gfile.copy(source, tmp, overwrite=True)
            except Exception as e:
                raise _os_error("Downloading", source, e) from None
            os.replace(tmp, target)
            fetched.append(name)
        return fetched

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
        tmp = self._remote(f".{name}{_TMP}{os.getpid()}-upload")
        try:
            self._gfile.makedirs(self.url)
            self._gfile.copy(path, tmp, overwrite=True)
            self._gfile.rename(tmp, target, overwrite=True)
        except Exception as e:
            try:
                if self._gfile.exists(tmp):
                    self._gfile.remove(tmp)
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
        deleted = []
        for name in self.names():
            if matches(name) and name not in local:
                try:
                    self._gfile.remove(self._remote(name))
                except Exception as e:
                    raise _os_error("Deleting", self._remote(name), e) from None
                deleted.append(name)
        return deleted
