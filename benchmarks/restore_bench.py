"""Restore, cold and warm: time and peak extra memory, against a plain read of the same file.

Usage:
    python benchmarks/restore_bench.py [--millions 50] [--rounds 3]
        [--json benchmarks/results/restore_bench.json]

One checkpoint of a Dense stack trained one step with Adam (weights plus two
slots) is written once, by `ModelCheckpoint(save_weights_only=True)`, with
Keras's `save_weights` beside it. Each measurement is a fresh process that
builds the model (not timed), then times one method:

- `read`: the checkpoint's bytes read into one 4 MiB buffer (the floor);
- `keras_ckpt.restore`: verified whole, then each array read as it is assigned;
- `load_weights`: Keras's `model.load_weights` of its own file (no verification).

Rounds interleave the methods; before every measurement the page cache is
dropped (`/proc/sys/vm/drop_caches`, root only: the JSON says whether it was)
for `cold`, or the file is read once for `warm`. Peak extra memory is the
process's peak RSS (`VmHWM`, reset through `/proc/self/clear_refs`) during the
method above its RSS before, over the state's bytes. Every round's raw values
go to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_common import drop_caches, reset_peak, status  # noqa: E402 - the shared probes

METHODS = ("read", "keras_ckpt.restore", "load_weights")


def child(method: str, millions: float, directory: str) -> dict:
    """One measurement, in this (fresh) process."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import save_bench

    import keras_ckpt

    keras.utils.set_random_seed(1)
    model = save_bench.build(millions)  # trained one step: the optimizer is built
    state = sum(v.numpy().nbytes for v in save_bench.state_variables(model))
    ours, theirs = (os.path.join(directory, n) for n in ("c.weights.h5", "k.weights.h5"))
    reset_peak()
    before = status("VmRSS")
    start = time.perf_counter()
    if method == "read":
        buffer = bytearray(4 << 20)
        with open(ours, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    elif method == "keras_ckpt.restore":
        keras_ckpt.restore(model, ours)
    else:
        model.load_weights(theirs)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_extra": (status("VmHWM") - before) / state,
            "state_bytes": state}


def write_files(millions: float, directory: str) -> None:
    """The checkpoint (`ModelCheckpoint`, after one more step) and Keras's own file."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import save_bench

    import keras_ckpt

    keras.utils.set_random_seed(1)
    model = save_bench.build(millions)
    x = np.zeros((8, 1024), "float32")
    model.fit(x, x, epochs=1, verbose=0, callbacks=[keras_ckpt.ModelCheckpoint(
        os.path.join(directory, "c.weights.h5"), save_weights_only=True)])
    model.save_weights(os.path.join(directory, "k.weights.h5"))


def _warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--millions", type=float, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(HERE, "results", "restore_bench.json"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.setup:
        write_files(args.millions, args.setup)
        return 0
    if args.child:
        print(json.dumps(child(args.child[0], args.millions, args.child[1])))
        return 0
    directory = tempfile.mkdtemp(prefix="restore-bench-", dir=os.path.dirname(HERE))
    subprocess.run([sys.executable, __file__, "--millions", str(args.millions),
                    "--setup", directory], check=True)
    size = os.path.getsize(os.path.join(directory, "c.weights.h5"))
    rounds: list[dict] = []
    dropped = True
    for r in range(args.rounds):
        for cache in ("cold", "warm"):
            for method in METHODS:
                if cache == "cold":
                    dropped = drop_caches() and dropped
                else:
                    for name in ("c.weights.h5", "k.weights.h5"):
                        _warm(os.path.join(directory, name))
                out = subprocess.run([sys.executable, __file__, "--millions", str(args.millions),
                                      "--child", method, directory],
                                     check=True, capture_output=True, text=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                rounds.append({"round": r, "cache": cache, "method": method, **result})
                print(f"round {r} {cache:4s} {method:20s} {result['seconds'] * 1e3:8.1f} ms  "
                      f"peak extra {result['peak_extra']:.3f}x", flush=True)
    summary = {}
    for cache in ("cold", "warm"):
        for method in METHODS:
            values = sorted(x["seconds"] for x in rounds
                            if x["cache"] == cache and x["method"] == method)
            peaks = sorted(x["peak_extra"] for x in rounds
                           if x["cache"] == cache and x["method"] == method)
            summary[f"{cache}/{method}"] = {"median_s": values[len(values) // 2],
                                            "range_s": [values[0], values[-1]],
                                            "peak_extra_range": [peaks[0], peaks[-1]]}
    for cache in ("cold", "warm"):
        floor = summary[f"{cache}/read"]["median_s"]
        for method in METHODS[1:]:
            entry = summary[f"{cache}/{method}"]
            entry["vs_read"] = entry["median_s"] / floor
    print(json.dumps(summary, indent=1))
    with open(args.json, "w") as f:
        json.dump({"millions": args.millions, "file_bytes": size, "caches_dropped": dropped,
                   "summary": summary, "rounds": rounds}, f, indent=1)
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
