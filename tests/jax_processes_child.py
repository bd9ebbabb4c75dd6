"""One of two JAX processes (`jax.distributed` on 127.0.0.1), for tests/test_jax_processes.py.

Usage: python jax_processes_child.py INDEX PORT DIRECTORY OUT [--epochs N]
    [--kill-step S] [--budget-steps B] [--poison-step P] [--signal-step S]
    [--split-kernel] [--restore-best] [--keep-last N] [--rollback] [--only-step K]
    [--seed-per-process] [--split-within] [--url] [--keras-last] [--restore FILE]
    [--fail-main-step S]

INDEX is this process's index (0 writes), PORT the coordinator's port on
127.0.0.1. Each process has one CPU device; Keras's `DataParallel` spans
both, and each process feeds its own half of every global batch of 16 (its
own 48 of the 96 samples). Trains the children's small model (Dropout,
BatchNormalization) with a keras-ckpt ModelCheckpoint (every 3 steps,
resume=True) and optionally: BudgetStop (a daily budget of B steps) on a
simulated clock (one second a step on process 0, from 0 each run; process
1's runs ten times faster, so a process deciding by its own clock would stop
elsewhere), TerminateOnNaN (NaN targets at global step P), a SIGKILL of
process 1 after global step S, a SIGTERM to process 1 alone after step S.
`--split-kernel`: a `ModelParallel` layout that splits the first Dense kernel
(and its optimizer slots) across the two processes' devices: each process
writes its pieces to a shard file; its batch axis spans one device, so both
processes feed every global batch whole. `--restore-best`: an
`EarlyStopping(restore_best_weights=True)` too. `--keep-last N`: retention keeps the N
newest checkpoints. `--rollback`: TerminateOnNaN rolls back (from memory).
`--only-step K`: (with `--split-kernel`) the data is global batch K alone.
`--seed-per-process`: NumPy's global RNG seeded differently in each process.
`--split-within`: two devices a process, the first Dense kernel split over each process's
two and the same on both processes (each feeds its own rows, as with `DataParallel`).
`--url`: the checkpoints go to a `memory://` URL directory (its name from DIRECTORY).
`--keras-last`: `.keras` files (the whole model), and a `last` file beside them.
`--restore FILE`: no fit; `keras_ckpt.restore(model, FILE)` in each process, which prints
`restored` or `not restored: ` and the error (and writes no OUT).
`--fail-main-step S`: `on_save_error="raise"`, and process 0's file-size limit (RLIMIT_FSIZE)
is 16 KiB from global step S - 1 on: its shard files fit, its main files do not.

Every change this process makes under DIRECTORY is recorded, to show that
only process 0 writes there. Writes the variables, the history and what the
callbacks report to OUT (an .npz).
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import sys

INDEX, PORT = int(sys.argv[1]), int(sys.argv[2])
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
FSIZE = resource.getrlimit(resource.RLIMIT_FSIZE)
WITHIN = "--split-within" in sys.argv  # two devices a process (read at JAX's first device query)
if WITHIN:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402

# Before any JAX computation: both processes' devices form one global set.
jax.distributed.initialize(f"127.0.0.1:{PORT}", num_processes=2, process_id=INDEX,
                           initialization_timeout=60)

import child_setup  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ckpt  # noqa: E402


def distribution(split_kernel: bool) -> keras.distribution.Distribution:
    devices = jax.devices()
    assert len(devices) == (4 if WITHIN else 2) and jax.process_count() == 2
    if WITHIN:
        # Rows: the processes (the batch axis: each feeds its own rows); columns: each
        # process's two devices (the model axis), so the kernel is split within each process
        # and the same on both: no process can read it whole as one array.
        grid = np.array(sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(2, 2)
        mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], grid)
        layouts = keras.distribution.LayoutMap(mesh)
        layouts[".*/dense/kernel"] = (None, "model")
        return keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch",
                                                auto_shard_dataset=False)
    if not split_kernel:
        # Each process feeds its own rows (below): already sharded.
        return keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    layouts = keras.distribution.LayoutMap(mesh)
    # Columns 0-7 on process 0, 8-15 on process 1 (Keras matches the whole path).
    layouts[".*/dense/kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch",
                                            auto_shard_dataset=False)


def main() -> None:
    p = child_setup.parser("index", "port")
    p.add_argument("--signal-step", type=int)
    p.add_argument("--split-kernel", action="store_true")
    p.add_argument("--restore-best", action="store_true")
    p.add_argument("--keep-last", type=int)
    p.add_argument("--rollback", action="store_true")
    p.add_argument("--only-step", type=int)
    p.add_argument("--seed-per-process", action="store_true")
    p.add_argument("--split-within", action="store_true")
    p.add_argument("--url", action="store_true")
    p.add_argument("--keras-last", action="store_true")
    p.add_argument("--restore")
    p.add_argument("--fail-main-step", type=int)
    a = p.parse_args()
    changes = child_setup.record_writes(a.directory)
    keras.distribution.set_distribution(distribution(a.split_kernel))
    x, y = child_setup.data(a.poison_step)
    # Global batch k is rows 16k..16k+15 (a poisoned step's too); process i feeds 16k+8i..+7.
    rows = [r for k in range(6) for r in range(16 * k + 8 * INDEX, 16 * k + 8 * INDEX + 8)]
    if not a.split_kernel:  # (split: the batch axis spans no process; both feed it whole)
        x, y = x[rows], y[rows]
    elif a.only_step:
        batch = slice(16 * (a.only_step - 1), 16 * a.only_step)
        x, y = x[batch], y[batch]
    keras.utils.set_random_seed(3)
    if a.seed_per_process:
        np.random.seed(100 + INDEX)
    model = child_setup.small_model()
    if a.restore:
        try:
            keras_ckpt.restore(model, a.restore)
        except keras_ckpt.CorruptCheckpointError as e:
            print(f"not restored: {e}", flush=True)
        else:
            print("restored", flush=True)
        return
    where = a.directory if not a.url else \
        "memory://" + hashlib.sha256(a.directory.encode()).hexdigest()[:16]
    name = "c-{epoch:02d}-{batch}" + (".keras" if a.keras_last else ".weights.h5")
    checkpoint = keras_ckpt.ModelCheckpoint(
        os.path.join(where, name), save_freq=3, save_last=a.keras_last,
        save_weights_only=not a.keras_last, resume=True, verbose=0,
        retention=[keras_ckpt.KeepLast(a.keep_last)] if a.keep_last else None,
        on_save_error="raise" if a.fail_main_step else "warn")
    own = [checkpoint]
    if a.fail_main_step and INDEX == 0:
        own.append(FileSizeLimit(a.fail_main_step - 1, 16 << 10))
    if a.restore_best:
        own.append(keras_ckpt.EarlyStopping(monitor="loss", patience=50,
                                            restore_best_weights=True))
    callbacks = child_setup.two_process_callbacks(a, INDEX, model, checkpoint, own, changes)
    try:
        model.fit(x, y, batch_size=16 if a.split_kernel else 8, epochs=a.epochs,
                  shuffle=False, verbose=0, callbacks=callbacks)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, FSIZE)


class FileSizeLimit(keras.callbacks.Callback):
    """Lowers this process's file-size limit to `size` bytes after global step `step`."""

    def __init__(self, step: int, size: int):
        super().__init__()
        self.step, self.size = step, size

    def on_train_batch_end(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == self.step:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.size, FSIZE[1]))


if __name__ == "__main__":
    main()
