"""The file systems behind a remote checkpoint directory: fsspec first, tf.io.gfile as fallback.

`store_for(url)` picks, for the URL's scheme, fsspec's implementation where one
is installed (`s3://` through s3fs, `gs://` through gcsfs, `az://` through
adlfs, `memory://`, any registered protocol; standard settings such as
`AWS_ENDPOINT_URL` apply), else TensorFlow's `tf.io.gfile` where it registers
the scheme (`gs://` built in, `ram://`). Both offer the few operations the
mirror needs (`remote.Mirror`): list, size, read a few blocks, download,
upload, rename, delete.
"""

from __future__ import annotations

import io
from typing import Any

__all__ = ["store_for", "FsspecStore", "GfileStore"]


class FsspecStore:
    """A URL's directory through an fsspec file system (listings never served from a cache)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs
        self.kind = f"fsspec ({type(fs).__name__})"

    def exists(self, url: str) -> bool:
        self.fs.invalidate_cache()  # another machine may have written since
        return bool(self.fs.exists(url))

    def listdir(self, url: str) -> list[str]:
        self.fs.invalidate_cache()
        return [entry["name"].rstrip("/").rsplit("/", 1)[-1]
                for entry in self.fs.ls(url, detail=True) if entry.get("type") == "file"]

    def size(self, url: str) -> int:
        self.fs.invalidate_cache()
        return int(self.fs.size(url))

    def open_read(self, url: str) -> Any:
        return self.fs.open(url, "rb", block_size=1 << 16)

    def download(self, url: str, path: str) -> None:
        self.fs.get_file(url, path)

    def upload(self, path: str, url: str) -> None:
        self.fs.put_file(path, url)

    def rename(self, source: str, target: str) -> None:
        self.fs.mv(source, target)

    def remove(self, url: str) -> None:
        self.fs.rm_file(url)

    def makedirs(self, url: str) -> None:
        self.fs.makedirs(url, exist_ok=True)


class _GfileReader(io.RawIOBase):
    """A `tf.io.gfile.GFile` as a raw binary stream that h5py and zipfile read."""

    def __init__(self, handle: Any) -> None:
        super().__init__()
        self._handle = handle

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._handle.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            offset = self._handle.size() + offset
        elif whence == io.SEEK_CUR:
            offset = self._handle.tell() + offset
        self._handle.seek(max(0, offset))
        return self._handle.tell()

    def readinto(self, buffer: Any) -> int:
        data = self._handle.read(len(buffer))
        memoryview(buffer)[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._handle.close()
        super().close()


class GfileStore:
    """A URL's directory through TensorFlow's `tf.io.gfile` (as Keras's file utilities)."""

    kind = "tf.io.gfile"

    def __init__(self, gfile: Any) -> None:
        self.gfile = gfile

    def exists(self, url: str) -> bool:
        return bool(self.gfile.exists(url))

    def listdir(self, url: str) -> list[str]:
        return [n.rstrip("/") for n in self.gfile.listdir(url)]

    def size(self, url: str) -> int:
        return int(self.gfile.stat(url).length)

    def open_read(self, url: str) -> Any:
        return io.BufferedReader(_GfileReader(self.gfile.GFile(url, "rb")),
                                 buffer_size=1 << 16)

    def download(self, url: str, path: str) -> None:
        self.gfile.copy(url, path, overwrite=True)

    def upload(self, path: str, url: str) -> None:
        self.gfile.copy(path, url, overwrite=True)

    def rename(self, source: str, target: str) -> None:
        self.gfile.rename(source, target, overwrite=True)

    def remove(self, url: str) -> None:
        self.gfile.remove(url)

    def makedirs(self, url: str) -> None:
        self.gfile.makedirs(url)


def store_for(url: str) -> FsspecStore | GfileStore:
    """The store for `url`'s scheme: fsspec's where installed, else tf.io.gfile's.

    Raises:
        ValueError: neither knows the scheme here; the message says what to
            install.
    """
    scheme = url.split("://", 1)[0]
    missing = None
    try:
        import fsspec
    except ImportError:
        fsspec = None
    if fsspec is not None:
        try:
            fsspec.get_filesystem_class(scheme)
            return FsspecStore(fsspec.filesystem(scheme))
        except ImportError as e:  # fsspec knows it; its implementation is not installed
            missing = str(e)
        except ValueError:  # fsspec does not know the scheme
            pass
    try:
        import tensorflow as tf

        if scheme in tf.io.gfile.get_registered_schemes():  # no network: nothing is touched
            return GfileStore(tf.io.gfile)
    except ImportError:
        pass
    hint = f" ({missing})" if missing else ""
    raise ValueError(
        f"`filepath` {url!r}: no file system for {scheme}:// is installed here{hint}. "
        "keras-ckpt reaches object stores through fsspec: `pip install keras-ckpt[s3]` "
        "(s3fs), `[gcs]` (gcsfs) or `[azure]` (adlfs); TensorFlow's tf.io.gfile serves "
        "gs:// and ram:// without them.")
