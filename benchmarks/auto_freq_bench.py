"""`save_freq="auto"`: the share of training time blocked on saves, against its target.

Usage:
    python benchmarks/auto_freq_bench.py [--millions 10] [--steps 1500] [--rounds 2]
        [--overhead 0.02] [--json benchmarks/results/auto_freq.json]

Each round fits a fresh Dense stack of about `--millions` M parameters (Adam)
for `--steps` steps of batch 64, once per method, the methods interleaved
and `os.sync()` between them:

- `none`: no checkpoint (the anchor);
- `hooks_only`: `ModelCheckpoint(save_freq=10**9)`, which never saves: what its
  batch hook costs a step (on TensorFlow a batch hook makes Keras read the
  step's logs every step);
- `auto_sync`: `ModelCheckpoint(save_freq="auto", save_weights_only=True)`;
- `auto_async`: the same with `async_write=True`.

For each fit: the wall time, the time the training thread spent inside the
callback's saves (measured here, around `Saver.save`, not by the policy), the
saves made and what the policy chose. The share blocked is that time over the
fit's wall time; the overhead against `none` of the same round is reported
beside it (it also holds what saving costs outside the blocking: the
background write's competition for the cores). Every round's raw values go
to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ckpt  # noqa: E402

WIDTH, BATCH = 1024, 64


def build(millions: float) -> keras.Model:
    layers = max(1, round(millions * 1e6 / (WIDTH * WIDTH)))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((WIDTH,))] + [keras.layers.Dense(WIDTH)
                                                         for _ in range(layers)])
    model.compile(keras.optimizers.Adam(1e-4), "mse")
    return model


def one_fit(method: str, millions: float, steps: int, overhead: float, directory: str) -> dict:
    model = build(millions)
    x = np.random.default_rng(0).normal(size=(BATCH * 50, WIDTH)).astype("float32")
    dataset_epochs = -(-steps // 50)
    callbacks, blocked, saves = [], [0.0], [0]
    checkpoint = None
    if method == "hooks_only":
        callbacks.append(keras_ckpt.ModelCheckpoint(
            os.path.join(directory, "w.weights.h5"), save_weights_only=True, save_freq=10**9))
    elif method != "none":
        checkpoint = keras_ckpt.ModelCheckpoint(
            os.path.join(directory, "w-{epoch}-{batch}.weights.h5"), save_weights_only=True,
            save_freq="auto", save_overhead=overhead, async_write=method == "auto_async",
            retention=[keras_ckpt.KeepLast(2)])
        save = checkpoint.saver.save

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                written = save(*args, **kwargs)
                saves[0] += written is not None
                return written
            finally:
                blocked[0] += time.perf_counter() - started

        checkpoint.saver.save = timed
        callbacks.append(checkpoint)
    started = time.perf_counter()
    model.fit(x, x, batch_size=BATCH, epochs=dataset_epochs, callbacks=callbacks, verbose=0)
    wall = time.perf_counter() - started
    row = {"wall_s": wall, "blocked_s": blocked[0], "share_blocked": blocked[0] / wall}
    if checkpoint is not None:
        auto = checkpoint.auto_freq
        row.update(saves=saves[0], chosen=auto.report(),
                   save_costs_s=list(auto.save_costs))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--millions", type=float, default=10)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--overhead", type=float, default=0.02)
    p.add_argument("--dir", default=None)
    p.add_argument("--json", default="benchmarks/results/auto_freq.json")
    args = p.parse_args()
    methods = ["none", "hooks_only", "auto_sync", "auto_async"]
    rounds = []
    for r in range(args.rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]  # rotate the order
        rows = {}
        for method in order:
            directory = tempfile.mkdtemp(dir=args.dir or os.path.dirname(os.path.abspath(
                __file__)))
            try:
                os.sync()
                rows[method] = one_fit(method, args.millions, args.steps, args.overhead,
                                       directory)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            base = rows.get("none")
            if base and method != "none" and "overhead_vs_none" not in rows[method]:
                rows[method]["overhead_vs_none"] = rows[method]["wall_s"] / base["wall_s"] - 1
            print(f"round {r + 1} {method}: " + json.dumps(rows[method]), flush=True)
        for method, row in rows.items():
            if method != "none" and "overhead_vs_none" not in row:
                row["overhead_vs_none"] = row["wall_s"] / rows["none"]["wall_s"] - 1
        rounds.append({"order": order, **rows})
    shares = {m: [rd[m]["share_blocked"] for rd in rounds] for m in methods[2:]}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}, Keras {keras.__version__}, "
                   f"{keras.backend.backend()}",
        "millions": args.millions, "steps": args.steps, "batch": BATCH,
        "target_overhead": args.overhead, "rounds": rounds,
        "share_blocked_over_target": {m: [s / args.overhead for s in v]
                                      for m, v in shares.items()},
    }
    print(json.dumps(result["share_blocked_over_target"], indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
