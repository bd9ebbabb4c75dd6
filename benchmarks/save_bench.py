"""Save and restore cost: keras-ckpt side by side with Keras's own ways, in one process.

Usage:
    python benchmarks/save_bench.py [--sizes 1 10 50] [--rounds 5] [--dir DIR]
        [--json benchmarks/results/save_bench.json]

For each model size (millions of parameters; a stack of Dense layers trained
one step with Adam, so the state is weights plus two slots), every method
below saves (or restores) the same model, each into its own folder in a
temporary directory under DIR (default: this script's folder, on the
repository's disk). `--repeats` is the old name of `--rounds`.

- Round 0 calls every method once, in the order below: each one's *first
  call*, reported on its own (in one process a first call pays one-off costs:
  tracing, a library's first use, a thread's start; a cost several methods
  share falls on the first of them). Then `--rounds` rounds call every method
  once more, interleaved, the order rotated by one method per round (the JSON
  keeps each round's order); medians and ranges (min, max) are over these.
- Before each call, untimed: the method's folder is emptied (not for
  `BackupAndRestore` and Orbax, which keep their own files), its set-up runs,
  `os.sync()` writes out every dirty page (none is left to slow the next
  method's fsync), garbage is collected and freed heap memory handed back
  (`malloc_trim`); before a cold restore the page cache is dropped
  (`/proc/sys/vm/drop_caches`, root only; the JSON and the output say whether
  it was).
- Each call is one window: its wall time (`seconds`); `peak_extra`, the
  process's peak RSS (`VmHWM`, reset through `/proc/self/clear_refs` at the
  start) above its RSS at the start, over the state's bytes; `rss_after_extra`,
  the RSS at the end above the start, over the state's bytes, and
  `rss_after_trim_extra`, the same once garbage is collected and freed heap
  memory handed back (what the call really kept). A background write is waited
  for inside the window.

The methods:

- `disk_fsync`: the state's bytes written with one plain `write`, then fsync
  (the disk's bandwidth in this run, also as `gib_per_s`);
- `floor`: every variable read without a copy (`state.host_view`), one h5py
  write, fsync;
- `keras_save_weights` / `keras_save_weights_fsync`: `model.save_weights`,
  without and with an fsync (Keras never fsyncs);
- `keras_save_keras`: `model.save("x.keras")` (not fsynced);
- `keras_modelcheckpoint`: one `keras.callbacks.ModelCheckpoint(
  save_weights_only=True)`, at an epoch end;
- `keras_backup_and_restore`: `keras.callbacks.BackupAndRestore` at an epoch end;
- `tf_checkpoint_write`: `tf.train.Checkpoint(model, optimizer).write` + fsync;
- `keras_orbax` / `keras_orbax_async`: `keras.callbacks.OrbaxCheckpoint`
  (needs `pip install orbax-checkpoint`, else "not measured") at an epoch end
  until `wait_until_finished`; for the background one also `blocking_s` (the
  training thread's time) and each phase's peak (`blocking_peak_extra`,
  `write_peak_extra`);
- `ours_weights_h5` / `ours_keras`: `keras_ckpt.ModelCheckpoint` (fsynced, the
  whole state) to `.weights.h5` / `.keras` at an epoch end (its
  `on_epoch_begin` is set-up): blocking time = time to durable;
- `ours_async`: the same to `.weights.h5` with `async_write=True`: the epoch
  end (`blocking_s`, `blocking_peak_extra`), one training step while the write
  is in flight (`train_step_after_s`: TensorFlow copies a variable the step
  writes while the snapshot holds it), the wait for the write (`seconds`: time
  to durable; `write_peak_extra`: the peak during the step and the write); a
  plain training step is timed in the set-up (`train_step_s`);
- `restore_keras_load_weights` / `restore_ours`, page cache warm (the file
  read once in the set-up), and `..._cold`: `model.load_weights` of a
  `save_weights` file against `keras_ckpt.restore` of ours, both written once.

Ratios are taken per round, between calls of the same round, then summarised:
every save against `floor` and `keras_save_weights_fsync` (`vs_floor`,
`vs_keras_save_weights_fsync`), and the named ones under `ratios`. The JSON
keeps every call's values (`first`, `rounds`), their `summary`, and at each
size's top level the medians under the names earlier results and `plot.py`
use. Figures go to stdout and to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from bench_common import Method, filesystem, fsync, interleave, per_round, spread, summary  # noqa: E402

import keras_ckpt  # noqa: E402

LOSS = {"loss": 1.0}
FLOOR, KERAS_DURABLE = "floor", "keras_save_weights_fsync"
RESTORES = ("restore_keras_load_weights", "restore_ours")
# "method" is its `seconds`, "method:key" another of its values.
# Medians under the names earlier results (and plot.py) use.
ALIASES = {"keras_orbax_async_blocking": "keras_orbax_async:blocking_s",
           "ours_async_blocking": "ours_async:blocking_s", "ours_async_durable": "ours_async",
           "train_step": "ours_async:train_step_s",
           "train_step_during_async_write": "ours_async:train_step_after_s"}
RATIOS = {  # per round: name -> (numerator, denominator)
    "ours_weights_h5_vs_floor": ("ours_weights_h5", FLOOR),
    "ours_weights_h5_vs_keras_save_weights_fsync": ("ours_weights_h5", KERAS_DURABLE),
    "ours_keras_vs_keras_save_keras": ("ours_keras", "keras_save_keras"),
    "ours_weights_h5_throughput_vs_disk": ("disk_fsync", "ours_weights_h5"),
    "ours_async_blocking_vs_keras_save_weights": ("ours_async:blocking_s", "keras_save_weights"),
    "restore_ours_vs_keras_load_weights": ("restore_ours", "restore_keras_load_weights"),
    "restore_ours_vs_keras_load_weights_cold":
        ("restore_ours_cold", "restore_keras_load_weights_cold"),
}


def ref(value: str) -> tuple[str, str]:
    """"method" -> (method, "seconds"); "method:key" -> (method, key)."""
    name, _, key = value.partition(":")
    return name, key or "seconds"


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


def state_variables(model: keras.Model) -> list:
    return list(model.variables) + list(model.optimizer.variables)


def methods(model: keras.Model, d: str, nbytes: int, closers: list) -> list[Method]:
    """Every method, in round 0's order; `closers` gets what ends them."""
    variables = state_variables(model)

    def file(name: str, ext: str, template: str = "{call}") -> Callable:
        return lambda call: os.path.join(d, name, template.format(call=call, epoch=call + 1) + ext)

    def to_file(name: str, ext: str, write: Callable, durable: bool = False) -> Method:
        def run(call, w):
            write(file(name, ext)(call))
            if durable:
                fsync(file(name, ext)(call))

        return Method(name, run, written=file(name, ext))

    blob = np.ones(nbytes, dtype=np.uint8)

    def raw(path):
        with open(path, "wb") as f:
            f.write(memoryview(blob))

    def floor(path):
        with h5py.File(path, "w") as f:
            for j, v in enumerate(variables):
                f.create_dataset(f"a{j}", data=keras_ckpt.state.host_view(v))

    keras_mc = keras.callbacks.ModelCheckpoint(
        os.path.join(d, "keras_modelcheckpoint", "{epoch}.weights.h5"), save_weights_only=True)
    keras_mc.set_model(model)
    backup = keras.callbacks.BackupAndRestore(os.path.join(d, "keras_backup_and_restore"))
    backup.set_model(model)
    tf_ckpt: list = []

    def tf_prepare(call):
        if not tf_ckpt:  # here, so that a backend without it is only "not measured"
            import tensorflow as tf

            tf_ckpt.append(tf.train.Checkpoint(model=model, optimizer=model.optimizer))

    def tf_write(call, w):
        folder, base = os.path.split(tf_ckpt[0].write(file("tf_checkpoint_write", "")(call)))
        for name in os.listdir(folder):
            if name.startswith(base):
                fsync(os.path.join(folder, name))

    def orbax(name: str, background: bool) -> Method:
        held: list = []

        def prepare(call):
            if not held:  # needs `pip install orbax-checkpoint`
                cb = keras.callbacks.OrbaxCheckpoint(os.path.join(d, name, "orbax"),
                                                     max_to_keep=1, save_on_background=background)
                cb.set_model(model)
                cb.on_train_begin()
                held.append(cb)
                closers.append(cb.on_train_end)

        def run(call, w):
            held[0].on_epoch_end(call, LOSS)
            if background:
                w.mark("blocking")
            held[0].wait_until_finished()
            if background:
                w.mark("write")

        return Method(name, run, prepare, clean=False, optional=True)

    # Restore: Keras's file and ours, written now (ours by its own ModelCheckpoint fit).
    os.makedirs(os.path.join(d, "restore"))
    theirs, mine = (os.path.join(d, "restore", n) for n in ("k.weights.h5", "c.weights.h5"))
    model.save_weights(theirs)
    cb = keras_ckpt.ModelCheckpoint(mine, save_weights_only=True, lock=False)
    cb.set_model(model)
    cb.on_train_begin()
    cb.on_epoch_end(0, LOSS)
    cb.on_train_end()

    def restore(name: str, path: str, fn: Callable, cold: bool) -> Method:
        def warm(call):
            with open(path, "rb") as f:
                while f.read(16 << 20):
                    pass

        def run(call, w):
            fn(path)

        return Method(name + ("_cold" if cold else ""), run, None if cold else warm,
                      clean=False, cold=cold)

    # Ours: the three callbacks join one fit (all set_model before any on_train_begin).
    ours_cbs = {name: keras_ckpt.ModelCheckpoint(
        os.path.join(d, name, "ours-{epoch}" + ext), save_weights_only=ext == ".weights.h5",
        lock=False, async_write=name == "ours_async")
        for name, ext in (("ours_weights_h5", ".weights.h5"), ("ours_keras", ".keras"),
                          ("ours_async", ".weights.h5"))}
    for name, cb in ours_cbs.items():
        os.makedirs(os.path.join(d, name))
        cb.set_model(model)
    for cb in ours_cbs.values():
        cb.on_train_begin()
        closers.append(cb.on_train_end)

    def ours(name: str, ext: str) -> Method:
        cb = ours_cbs[name]
        return Method(name, lambda call, w: cb.on_epoch_end(call, LOSS),
                      lambda call: cb.on_epoch_begin(call), file(name, ext, "ours-{epoch}"))

    batch = np.zeros((8, model.input_shape[-1]), "float32")
    background = ours_cbs["ours_async"]

    def async_prepare(call):
        started = time.perf_counter()
        model.train_on_batch(batch, batch)
        step = time.perf_counter() - started
        background.on_epoch_begin(call)
        return {"train_step_s": step}

    def async_run(call, w):
        background.on_epoch_end(call, LOSS)
        w.mark("blocking")
        started = time.perf_counter()
        model.train_on_batch(batch, batch)  # while the write is in flight
        step = time.perf_counter() - started
        background.saver.wait()
        w.mark("write")
        return {"train_step_after_s": step}

    return [
        to_file("disk_fsync", ".raw", raw, durable=True),
        to_file(FLOOR, ".h5", floor, durable=True),
        to_file("keras_save_weights", ".weights.h5", model.save_weights),
        to_file(KERAS_DURABLE, ".weights.h5", model.save_weights, durable=True),
        to_file("keras_save_keras", ".keras", model.save),
        Method("keras_modelcheckpoint", lambda call, w: keras_mc.on_epoch_end(call, LOSS),
               written=file("keras_modelcheckpoint", ".weights.h5", "{epoch}")),
        Method("keras_backup_and_restore", lambda call, w: backup.on_epoch_end(call, LOSS),
               clean=False),
        Method("tf_checkpoint_write", tf_write, tf_prepare, optional=True),
        orbax("keras_orbax", False),
        orbax("keras_orbax_async", True),
        ours("ours_weights_h5", ".weights.h5"),
        ours("ours_keras", ".keras"),
        Method("ours_async", async_run, async_prepare,
               file("ours_async", ".weights.h5", "ours-{epoch}")),
        restore(RESTORES[0], theirs, model.load_weights, cold=False),
        restore(RESTORES[1], mine, lambda path: keras_ckpt.restore(model, path), cold=False),
        restore(RESTORES[0], theirs, model.load_weights, cold=True),
        restore(RESTORES[1], mine, lambda path: keras_ckpt.restore(model, path), cold=True),
    ]


def bench(millions: float, rounds: int, root: str) -> dict:
    model = build(millions)
    nbytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                 for v in state_variables(model))
    d = tempfile.mkdtemp(dir=root)
    closers: list = []
    try:
        calls, failed, orders = interleave(methods(model, d, nbytes, closers), rounds, d, nbytes)
    finally:
        for close in closers:
            close()
        shutil.rmtree(d, ignore_errors=True)
    return summarize(model.count_params(), nbytes, calls, failed, orders)


def summarize(params: int, nbytes: int, calls: dict, failed: dict, orders: list) -> dict:
    r: dict = {"parameters": params, "state_bytes": nbytes, "order": orders, "methods": {}}
    not_saves = (FLOOR,) + RESTORES + tuple(n + "_cold" for n in RESTORES)
    for name, done in calls.items():
        if name in failed:
            r["methods"][name] = {"error": failed[name], "calls": done}
            r[name] = failed[name]
            continue
        entry = r["methods"][name] = summary(done)
        if name not in not_saves:
            for anchor in (FLOOR, KERAS_DURABLE):
                entry["vs_" + anchor] = per_round(calls, (name, "seconds"), (anchor, "seconds"))
        r[name] = entry["summary"]["seconds"]["median"]
        if "bytes" in done[-1]:
            r[name + "_bytes"] = done[-1]["bytes"]
    gib = [nbytes / (1 << 30) / c["seconds"] for c in calls["disk_fsync"][1:]]
    r["methods"]["disk_fsync"]["gib_per_s"] = {"rounds": gib, **spread(gib)}
    r["disk_fsync_gib_per_s"] = spread(gib)["median"]
    for alias, value in ALIASES.items():
        name, key = ref(value)
        if name not in failed:
            r[alias] = r["methods"][name]["summary"][key]["median"]
    r["ratios"] = {name: per_round(calls, ref(a), ref(b)) for name, (a, b) in RATIOS.items()}
    r["caches_dropped"] = all(c["cache_dropped"] for n in RESTORES for c in calls[n + "_cold"])
    return r


def _range(s: dict, scale: float = 1.0, fmt: str = ".1f") -> str:
    return f"{s['median'] * scale:{fmt}} ({s['min'] * scale:{fmt}}-{s['max'] * scale:{fmt}})"


def report(r: dict) -> None:
    print(f"{'method':32s} {'first ms':>9s}  {'ms: median (min-max)':>24s}  "
          f"{'peak+ first':>11s}  {'peak+ median':>12s}  {'kept+ / trimmed':>15s}  "
          f"{'vs floor':>8s}  {'vs kw+fsync':>11s}")
    for name, e in r["methods"].items():
        if "error" in e:
            print(f"{name:32s} {e['error']}")
            continue
        s = e["summary"]
        ratios = [f"{e[k]['median']:.2f}x" if e.get(k) else "" for k in
                  ("vs_floor", "vs_" + KERAS_DURABLE)]
        print(f"{name:32s} {e['first']['seconds'] * 1000:9.1f}  "
              f"{_range(s['seconds'], 1000):>24s}  {e['first']['peak_extra']:10.2f}x  "
              f"{s['peak_extra']['median']:11.2f}x  {s['rss_after_extra']['median']:7.2f}x / "
              f"{s['rss_after_trim_extra']['median']:.2f}x  "
              f"{ratios[0]:>8s}  {ratios[1]:>11s}")
        if "blocking_s" in s:
            print(f"{'':34s}blocking {_range(s['blocking_s'], 1000)} ms, peak+ "
                  f"{s['blocking_peak_extra']['median']:.2f}x; until written, peak+ "
                  f"{s['write_peak_extra']['median']:.2f}x (first call: blocking "
                  f"{e['first']['blocking_s'] * 1000:.1f} ms, peak+ "
                  f"{e['first']['write_peak_extra']:.2f}x)")
        if "train_step_s" in s:
            print(f"{'':34s}training step {_range(s['train_step_s'], 1000)} ms, "
                  f"the one during the write {_range(s['train_step_after_s'], 1000)} ms")
    gib = r["methods"]["disk_fsync"]["gib_per_s"]
    print(f"disk fsync bandwidth {_range(gib, 1, '.2f')} GiB/s")
    print("ratios, per round: median (min-max)")
    for name, v in r["ratios"].items():
        print(f"  {name:48s} " + (f"{_range(v, 1, '.2f')}" if v else "not measured"))
    if not r["caches_dropped"]:
        print("the page cache could NOT be dropped (needs root): the *_cold restores "
              "read a warm cache")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 50])
    p.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=5,
                   help="measured rounds after the first calls (--repeats: the old name)")
    p.add_argument("--dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "save_bench.json"))
    a = p.parse_args()
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"Python {platform.python_version()}, Keras {keras.__version__}, "
                          f"backend {keras.backend.backend()}",
               "date": time.strftime("%Y-%m-%d"), "rounds": a.rounds,
               "dir_filesystem": filesystem(a.dir), "sizes": {}}
    for size in a.sizes:
        r = bench(size, a.rounds, a.dir)
        results["sizes"][f"{size:g}M"] = r
        print(f"\n{size:g}M parameters ({r['parameters']:,}), {r['state_bytes'] / (1 << 20):.0f} "
              f"MiB of state; first call, then {a.rounds} interleaved rounds; disk: "
              f"{results['dir_filesystem']}; peak+/kept+: RSS above the start, x state bytes")
        report(r)
    results["caches_dropped"] = all(r["caches_dropped"] for r in results["sizes"].values())
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
