"""Save and restore cost: keras-ckpt side by side with Keras's own ways, in one process.

Usage:
    python benchmarks/save_bench.py [--sizes 1 10 50] [--repeats 5] [--dir DIR]
        [--json benchmarks/results/save_bench.json]

For each model size (millions of parameters; a stack of Dense layers trained
one step with Adam, so the state is weights plus two slots), every method
saves the same model `--repeats` times into DIR (default: a temporary
directory on the same disk as this repository) and the median is reported:

- `disk_fsync`: the state's bytes written with one plain `write` and fsync
  (the disk's bandwidth in this run);
- `floor`: every variable read without a copy (`state.host_view`), one h5py write,
  fsync;
- `keras_save_weights` / `keras_save_weights_fsync`: `model.save_weights`,
  without and with an fsync (Keras never fsyncs);
- `keras_save_keras`: `model.save("x.keras")`;
- `keras_modelcheckpoint`: `keras.callbacks.ModelCheckpoint(save_weights_only=True)`;
- `keras_backup_and_restore`: `keras.callbacks.BackupAndRestore` at an epoch end;
- `tf_checkpoint_write`: `tf.train.Checkpoint(model, optimizer).write` (+ fsync);
- `keras_orbax` / `keras_orbax_async`: `keras.callbacks.OrbaxCheckpoint` (needs
  `pip install orbax-checkpoint`), until finished; for the background one
  also the blocking time (`keras_orbax_async_blocking`);
- `ours_weights_h5` / `ours_keras`: `keras_ckpt.ModelCheckpoint` (fsynced,
  the whole state) to `.weights.h5` / `.keras`: blocking time = time to durable;
- `ours_async_*`: `async_write=True`: the training thread's blocking time
  per save, the time until durable, and the first training step after the
  save compared with a plain one;
- restore: `model.load_weights` versus `keras_ckpt.restore`.

Ratios are against `floor` and `keras_save_weights_fsync` measured in the
same run. Figures go to stdout and to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ckpt  # noqa: E402


def build(millions: float) -> keras.Model:
    """A Dense stack of about `millions` M parameters, trained one step with Adam."""
    width = 1024
    layers = max(1, round(millions * 1e6 / (width * width)))
    model = keras.Sequential([keras.Input((width,))] + [keras.layers.Dense(width)
                                                         for _ in range(layers)])
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    x = np.zeros((8, width), "float32")
    model.fit(x, x, epochs=1, verbose=0)
    return model


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def state_variables(model: keras.Model) -> list:
    return list(model.variables) + list(model.optimizer.variables)


def timed(fn, repeats: int, setup=None) -> float:
    times = []
    for i in range(repeats):
        if setup is not None:
            setup(i)
        started = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench(millions: float, repeats: int, root: str) -> dict:
    model = build(millions)
    variables = state_variables(model)
    nbytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)
    params = model.count_params()
    d = tempfile.mkdtemp(dir=root)
    r: dict = {"parameters": params, "state_bytes": nbytes}

    def path(name, i):
        return os.path.join(d, f"{name}-{i}")

    def clean(_):
        for name in os.listdir(d):
            full = os.path.join(d, name)
            shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)

    blob = np.ones(nbytes, dtype=np.uint8)

    def disk(i):
        with open(path("raw", i), "wb") as f:
            f.write(memoryview(blob))
            f.flush()
            os.fsync(f.fileno())

    r["disk_fsync"] = timed(disk, repeats, clean)

    def floor(i):
        p = path("floor", i) + ".h5"
        with h5py.File(p, "w") as f:
            for j, v in enumerate(variables):
                f.create_dataset(f"a{j}", data=keras_ckpt.state.host_view(v))
        fsync(p)

    r["floor"] = timed(floor, repeats, clean)

    r["keras_save_weights"] = timed(
        lambda i: model.save_weights(path("kw", i) + ".weights.h5"), repeats, clean)
    r["keras_save_weights_bytes"] = os.path.getsize(path("kw", repeats - 1) + ".weights.h5")

    def kw_sync(i):
        p = path("kws", i) + ".weights.h5"
        model.save_weights(p)
        fsync(p)

    r["keras_save_weights_fsync"] = timed(kw_sync, repeats, clean)
    r["keras_save_keras"] = timed(lambda i: model.save(path("km", i) + ".keras"), repeats, clean)

    def keras_mc(i):
        cb = keras.callbacks.ModelCheckpoint(path("kmc", i) + ".weights.h5",
                                             save_weights_only=True)
        cb.set_model(model)
        cb.on_epoch_end(0, {"loss": 1.0})

    r["keras_modelcheckpoint"] = timed(keras_mc, repeats, clean)

    backup = keras.callbacks.BackupAndRestore(os.path.join(d, "backup"))
    backup.set_model(model)

    def keras_backup(i):
        backup.on_epoch_end(i, {"loss": 1.0})

    r["keras_backup_and_restore"] = timed(keras_backup, repeats)
    try:
        import tensorflow as tf

        ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)

        def tf_write(i):
            prefix = ckpt.write(path("tfc", i))
            for name in os.listdir(d):
                if name.startswith(os.path.basename(prefix)):
                    fsync(os.path.join(d, name))

        r["tf_checkpoint_write"] = timed(tf_write, repeats, clean)
    except Exception as e:  # a backend without tf.train.Checkpoint support
        r["tf_checkpoint_write"] = f"not measured: {e}"

    try:  # Keras's OrbaxCheckpoint, where `pip install orbax-checkpoint` was done
        for name, background in (("keras_orbax", False), ("keras_orbax_async", True)):
            orbax = keras.callbacks.OrbaxCheckpoint(os.path.join(d, name), max_to_keep=1,
                                                    save_on_background=background)
            orbax.set_model(model)
            orbax.on_train_begin()
            blocked, durable = [], []
            for i in range(repeats):
                started = time.perf_counter()
                orbax.on_epoch_end(i, {"loss": 1.0})
                blocked.append(time.perf_counter() - started)
                orbax.wait_until_finished()
                durable.append(time.perf_counter() - started)
            orbax.on_train_end()
            r[name] = statistics.median(durable)
            if background:
                r["keras_orbax_async_blocking"] = statistics.median(blocked)
    except Exception as e:  # noqa: BLE001 - not installed, or not on this backend
        r["keras_orbax"] = f"not measured: {type(e).__name__}: {e}"

    for name, ext in (("ours_weights_h5", ".weights.h5"), ("ours_keras", ".keras")):
        cb = keras_ckpt.ModelCheckpoint(os.path.join(d, "ours-{epoch}" + ext),
                                        save_weights_only=ext == ".weights.h5", lock=False)
        cb.set_model(model)
        cb.on_train_begin()

        def ours(i, cb=cb):
            cb.on_epoch_begin(i)
            cb.on_epoch_end(i, {"loss": 1.0})

        r[name] = timed(ours, repeats, clean)
        cb.on_train_end()
        written = os.path.join(d, f"ours-{repeats}{ext}")
        r[f"{name}_bytes"] = os.path.getsize(written) if os.path.exists(written) else None
    # Background writing: the time the training thread is blocked per save,
    # the time until the file is durable, and what the first training step
    # after the save costs (TensorFlow copies a variable before writing it
    # while the snapshot still reads it).
    cb = keras_ckpt.ModelCheckpoint(os.path.join(d, "async-{epoch}.weights.h5"),
                                    save_weights_only=True, lock=False, async_write=True)
    cb.set_model(model)
    cb.on_train_begin()
    width = model.inputs[0].shape[-1]
    batch = np.zeros((8, width), "float32")
    model.train_on_batch(batch, batch)
    blocked, durable, step_after, step_plain = [], [], [], []
    for i in range(repeats):
        started = time.perf_counter()
        model.train_on_batch(batch, batch)
        step_plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        cb.on_epoch_begin(i)
        cb.on_epoch_end(i, {"loss": 1.0})
        blocked.append(time.perf_counter() - started)
        step = time.perf_counter()
        model.train_on_batch(batch, batch)
        step_after.append(time.perf_counter() - step)
        cb._writer.wait()
        durable.append(time.perf_counter() - started)
    cb.on_train_end()
    r["ours_async_blocking"] = statistics.median(blocked)
    r["ours_async_durable"] = statistics.median(durable)
    r["train_step"] = statistics.median(step_plain)
    r["train_step_during_async_write"] = statistics.median(step_after)
    # Restore: Keras load_weights versus ours, from files written now.
    kp, op = os.path.join(d, "restore.weights.h5"), os.path.join(d, "restore-ours.weights.h5")
    model.save_weights(kp)
    cb = keras_ckpt.ModelCheckpoint(op, save_weights_only=True, lock=False)
    cb.set_model(model)
    cb.on_train_begin()
    cb.on_epoch_end(0, {"loss": 1.0})
    cb.on_train_end()
    r["restore_keras_load_weights"] = timed(lambda i: model.load_weights(kp), repeats)
    r["restore_ours"] = timed(lambda i: keras_ckpt.restore(model, op), repeats)
    shutil.rmtree(d, ignore_errors=True)

    gib = nbytes / (1 << 30)
    r["disk_fsync_gib_per_s"] = gib / r["disk_fsync"]
    r["ratios"] = {
        "ours_weights_h5_vs_floor": r["ours_weights_h5"] / r["floor"],
        "ours_weights_h5_vs_keras_save_weights_fsync":
            r["ours_weights_h5"] / r["keras_save_weights_fsync"],
        "ours_keras_vs_keras_save_keras": r["ours_keras"] / r["keras_save_keras"],
        "ours_weights_h5_throughput_vs_disk": r["disk_fsync"] / r["ours_weights_h5"],
        "ours_async_blocking_vs_keras_save_weights":
            r["ours_async_blocking"] / r["keras_save_weights"],
        "restore_ours_vs_keras_load_weights":
            r["restore_ours"] / r["restore_keras_load_weights"],
    }
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 50])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "save_bench.json"))
    a = p.parse_args()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"Python {platform.python_version()}, Keras {keras.__version__}, "
                          f"backend {keras.backend.backend()}",
               "date": time.strftime("%Y-%m-%d"), "repeats": a.repeats, "sizes": {}}
    for size in a.sizes:
        r = bench(size, a.repeats, a.dir)
        results["sizes"][f"{size:g}M"] = r
        print(f"\n{size:g}M parameters, {r['state_bytes'] / (1 << 20):.0f} MiB of state")
        for k, v in r.items():
            if isinstance(v, float):
                print(f"  {k:34s} {v * 1000 if k not in ('disk_fsync_gib_per_s',) else v:9.1f}"
                      f"{' ms' if k != 'disk_fsync_gib_per_s' else ' GiB/s'}")
        for k, v in r["ratios"].items():
            print(f"  {k:48s} {v:6.2f}x")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
