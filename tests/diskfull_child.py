"""Trains into DIR until writes fail; prints what it saw as JSON (run by test_fault_tolerance).

Usage: python diskfull_child.py DIR warn|raise [--fsize-after-epoch BYTES | --tmpfs SIZE]
       [--ext .keras|.weights.h5] [--async]

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
    """Lowers the file-size limit at the end of epoch `after` (after the checkpoint's save)."""

    def __init__(self, size, after=0):
        super().__init__()
        self.size, self.after = size, after

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.after:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, resource.RLIM_INFINITY))


def main() -> None:
    args = sys.argv[1:]
    background = "--async" in args
    if background:
        args.remove("--async")
    ext = ".keras"
    if "--ext" in args:
        at = args.index("--ext")
        ext = args.pop(at + 1)
        args.pop(at)
    directory, policy = args[0], args[1]
    option = args[2] if len(args) > 2 else None
    limit = int(args[3]) if option == "--fsize-after-epoch" else None
    if option == "--tmpfs":
        own_tmpfs(directory, args[3])
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2048), keras.layers.Dense(1)])
    model.compile("adam", "mse")  # about 230 KiB of state with Adam's slots
    checkpoint = keras_ckpt.ModelCheckpoint(os.path.join(directory, "ckpt-{epoch:02d}" + ext),
                                            on_save_error=policy, async_write=background,
                                            save_weights_only=ext == ".weights.h5")
    # A background write of epoch 1's checkpoint may still be in flight at its end;
    # at epoch 2's end it is done (a save waits for the one before).
    callbacks = [checkpoint] if limit is None else [
        checkpoint, Limit(limit, after=1 if background else 0)]
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
