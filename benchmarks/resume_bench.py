"""Mid-epoch resume: time from process start to the first new step, late in an epoch and early.

Usage:
    python benchmarks/resume_bench.py [--steps 20000] [--late 19000] [--early 100]
        [--rounds 3] [--kinds numpy pydataset tfdata generator]
        [--json benchmarks/results/resume_bench.json]

For each input kind, one fit (in a process of its own) writes a checkpoint
after step `--early` and one after step `--late` of a `--steps`-step epoch (a
small MLP, batch 32). Each
measured resume is a fresh process (`python benchmarks/resume_bench.py
--child ...`) resuming from a directory that holds only one of them; it
reports the wall time from just before the parent started it to the first new
step's `on_train_batch_begin`, its peak RSS at that moment (`VmHWM`), and the
mean time of the next 300 real steps. The rounds interleave kinds and positions (the
order rotates each round) with `os.sync()` before each process.

- `numpy`: arrays, `shuffle=True` (TensorFlow's pipeline skips in C++);
- `pydataset`: a PyDataset without workers, `shuffle=True` (read from the index);
- `tfdata`: `from_tensor_slices(...).batch(32)` (index-addressable: O(1) skip);
- `generator`: a Python generator with `steps_per_epoch` (a stream: read and dropped).

Reported per kind: `late / early` (target at most 1.1 for numpy and
PyDataset) and, for streams, the skip cost per batch as a share of a real step
(`(late - early) / (late_steps - early_steps) / step`, target at most 0.1).
Every round's raw values go to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench_common import status  # (benchmarks/ is this script's directory)

FEATURES, BATCH = 32, 32


def data(steps: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * BATCH, FEATURES)).astype("float32")
    return x, (x[:, :1] * 0.5).astype("float32")


def fit_input(kind: str, steps: int):
    """(fit's positional arguments, its keyword arguments) for one input kind."""
    import keras

    x, y = data(steps)
    if kind == "numpy":
        return (x, y), {"batch_size": BATCH, "shuffle": True}
    if kind == "pydataset":
        class Batches(keras.utils.PyDataset):
            def __len__(self):
                return steps

            def __getitem__(self, i):
                return x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]

        return (Batches(),), {"shuffle": True}
    if kind == "tfdata":
        import tensorflow as tf

        return (tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH),), {}
    if kind == "generator":
        def batches():
            while True:
                for i in range(steps):
                    yield x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]

        return (batches(),), {"steps_per_epoch": steps}
    raise ValueError(kind)


def model():
    import keras

    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(64, activation="relu"),
                          keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    m.compile(keras.optimizers.Adam(1e-3), "mse")
    return m


def child(directory: str, kind: str, steps: int, out: str) -> None:
    """Resumes from `directory`; writes when the first new step began, RSS, step time."""
    import warnings

    import keras

    import keras_ckpt

    warnings.simplefilter("ignore")
    times: list[float] = []

    class First(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            times.append(time.time())
            if len(times) == 1:
                self.rss = status("VmHWM") // 1024
            if len(times) > 301:
                self.model.stop_training = True

    first = First()
    args, kwargs = fit_input(kind, steps)
    checkpoint = keras_ckpt.ModelCheckpoint(os.path.join(directory, "c-{epoch}-{batch}.keras"),
                                            save_freq=10**9, resume=True)
    model().fit(*args, epochs=1, verbose=0, callbacks=[checkpoint, first], **kwargs)
    with open(out, "w") as f:
        json.dump({"first_step_at": times[0], "rss_kib": first.rss,
                   "step_s": (times[-1] - times[1]) / (len(times) - 2)}, f)


def write_checkpoints(directory: str, kind: str, steps: int, at: list[int]) -> dict:
    """One fit; keeps the checkpoints written after the steps in `at`; returns their paths."""
    import keras

    import keras_ckpt

    class Crash(keras.callbacks.Callback):  # (a stop would end the epoch: Keras's rule)
        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 >= max(at):
                raise RuntimeError("crash")

    class Only:
        def keep(self, checkpoints):
            return {c.path for c in checkpoints if c.step in at}

    args, kwargs = fit_input(kind, steps)
    step = min(at)
    checkpoint = keras_ckpt.ModelCheckpoint(
        os.path.join(directory, "c-{epoch}-{batch}.keras"), save_freq=step,
        retention=[Only()])
    try:
        model().fit(*args, epochs=1, verbose=0, callbacks=[checkpoint, Crash()], **kwargs)
    except RuntimeError:
        pass
    return {c.step: c.path for c in keras_ckpt.list_checkpoints(directory)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", nargs=4, metavar=("DIR", "KIND", "STEPS", "OUT"))
    p.add_argument("--write", nargs=5, metavar=("DIR", "KIND", "STEPS", "EARLY", "LATE"))
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--late", type=int, default=19000)
    p.add_argument("--early", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kinds", nargs="+", default=["numpy", "pydataset", "tfdata", "generator"])
    p.add_argument("--json", default="benchmarks/results/resume_bench.json")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if args.child:
        directory, kind, steps, out = args.child
        child(directory, kind, int(steps), out)
        return
    if args.write:
        directory, kind, steps, early, late = args.write
        with open(os.path.join(directory, "written.json"), "w") as f:
            json.dump(write_checkpoints(directory, kind, int(steps), [int(early), int(late)]), f)
        return
    if args.late % args.early:
        p.error("--late must be a multiple of --early (checkpoints every --early steps)")
    work = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(__file__)))
    try:
        sources = {}
        for kind in args.kinds:  # (in a process of its own: this one stays idle)
            directory = os.path.join(work, kind)
            os.makedirs(directory)
            subprocess.run([sys.executable, os.path.abspath(__file__), "--write", directory,
                            kind, str(args.steps), str(args.early), str(args.late)], check=True)
            with open(os.path.join(directory, "written.json")) as f:
                sources[kind] = {int(k): v for k, v in json.load(f).items()}
        cases = [(kind, pos) for kind in args.kinds for pos in (args.early, args.late)]
        rounds = []
        for r in range(args.rounds):
            order = cases[r % len(cases):] + cases[:r % len(cases)]
            rows = []
            for kind, pos in order:
                directory = os.path.join(work, f"run-{kind}-{pos}")
                shutil.rmtree(directory, ignore_errors=True)
                os.makedirs(directory)
                shutil.copy(sources[kind][pos], directory)
                out = os.path.join(work, "out.json")
                os.sync()
                started = time.time()
                subprocess.run([sys.executable, os.path.abspath(__file__), "--child", directory,
                                kind, str(args.steps), out], check=True)
                with open(out) as f:
                    row = json.load(f)
                row.update(kind=kind, resumed_at=pos,
                           to_first_step_s=row.pop("first_step_at") - started)
                rows.append(row)
                print(json.dumps(row), flush=True)
            rounds.append(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for kind in args.kinds:
        early = [r["to_first_step_s"] for rd in rounds for r in rd
                 if r["kind"] == kind and r["resumed_at"] == args.early]
        late = [r["to_first_step_s"] for rd in rounds for r in rd
                if r["kind"] == kind and r["resumed_at"] == args.late]
        step = statistics.median(r["step_s"] for rd in rounds for r in rd if r["kind"] == kind)
        ratios = [b / a for a, b in zip(early, late, strict=True)]
        per_batch = [(b - a) / (args.late - args.early) for a, b in zip(early, late, strict=True)]
        rss = {pos: [r["rss_kib"] for rd in rounds for r in rd
                     if r["kind"] == kind and r["resumed_at"] == pos]
               for pos in (args.early, args.late)}
        summary[kind] = {
            "early_s": early, "late_s": late, "late_over_early": ratios,
            "peak_rss_kib_early": rss[args.early], "peak_rss_kib_late": rss[args.late],
            "median_late_over_early": statistics.median(ratios), "step_s": step,
            "skip_per_batch_over_step": [max(0.0, b) / step for b in per_batch],
        }
    from importlib.metadata import version

    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                         f"{platform.python_version()}, Keras {version('keras')}",
              "steps": args.steps, "early": args.early, "late": args.late,
              "rounds": rounds, "summary": summary}
    print(json.dumps(summary, indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
