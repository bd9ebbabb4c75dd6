"""Trains into DIR until writes fail; prints what it saw as JSON (run by test_fault_tolerance).

Usage: python diskfull_child.py DIR warn|raise [--fsize-after-epoch BYTES | --tmpfs SIZE]

`--fsize-after-epoch` lowers this process's file-size limit (RLIMIT_FSIZE)
after the first epoch, so later checkpoint writes fail with EFBIG like a
quota. `--tmpfs SIZE` first moves this process into a new user and mount
namespace (unshare(2), as `unshare -rm` does) and mounts a tmpfs of SIZE over
DIR, which fills up: writes fail with ENOSPC. unshare(2) needs a process with
one thread: a child forked by tests/forkserver.py is one (a fresh interpreter
has OpenBLAS's threads by now). Where the machine allows no such namespace it
prints `NO-NAMESPACE <why>` and exits with status 3.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import signal
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ckpt  # noqa: E402
from keras_ckpt import manager, storage  # noqa: E402

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000


def own_tmpfs(directory: str, size: str) -> None:
    """A new user+mount namespace (this process alone) with a tmpfs of `size` over `directory`."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        print(f"NO-NAMESPACE unshare: {os.strerror(ctypes.get_errno())}", flush=True)
        raise SystemExit(3)
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                       ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    if libc.mount(b"tmpfs", directory.encode(), b"tmpfs", 0, f"size={size}".encode()) != 0:
        code = ctypes.get_errno()
        print(f"NO-NAMESPACE mount: {errno.errorcode.get(code, code)}", flush=True)
        raise SystemExit(3)


class Limit(keras.callbacks.Callback):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, resource.RLIM_INFINITY))


def main() -> None:
    directory, policy = sys.argv[1], sys.argv[2]
    option = sys.argv[3] if len(sys.argv) > 3 else None
    limit = int(sys.argv[4]) if option == "--fsize-after-epoch" else None
    if option == "--tmpfs":
        own_tmpfs(directory, sys.argv[4])
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2048), keras.layers.Dense(1)])
    model.compile("adam", "mse")  # about 230 KiB of state with Adam's slots
    checkpoint = keras_ckpt.ModelCheckpoint(os.path.join(directory, "ckpt-{epoch:02d}.keras"),
                                            on_save_error=policy)
    callbacks = [checkpoint] if limit is None else [checkpoint, Limit(limit)]
    outcome: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.fit(x, y, epochs=6, batch_size=16, verbose=0, callbacks=callbacks)
            outcome["raised"] = None
        except OSError as e:
            outcome["raised"] = f"{type(e).__name__}: {e}"
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    outcome["epochs_trained"] = int(model.optimizer.iterations.numpy()) // 4
    outcome["save_errors"] = checkpoint.save_errors
    outcome["warnings"] = [str(w.message) for w in caught if "FAILED" in str(w.message)]
    outcome["files"] = sorted(os.listdir(directory))
    outcome["valid"] = []
    for info in manager.list_checkpoints(directory, include_invalid=True):
        storage.read(info.path)  # raises if any visible file is damaged
        outcome["valid"].append([os.path.basename(info.path), info.epoch])
    print("RESULT " + json.dumps(outcome), flush=True)


if __name__ == "__main__":
    main()
