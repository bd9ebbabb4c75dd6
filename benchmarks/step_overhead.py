"""Per-step overhead of the keras-ckpt callbacks on a fit of many small steps.

Usage:
    KERAS_BACKEND=tensorflow python benchmarks/step_overhead.py [--steps 2000] [--rounds 5]
        [--epochs 4] [--save-every 500] [--dir DIR]
    KERAS_BACKEND=jax python benchmarks/step_overhead.py
        [--json benchmarks/results/step_overhead-<backend>.json]

A small MLP (32-64-64-1, about 6,300 parameters, Adam) trains `--steps`
steps of batch 32 per epoch for `--epochs` epochs. The first epoch of each
fit holds the compilation (tracing) and is excluded; a fit's time per step is
the median, over its other epochs, of the epoch's time over `--steps`. An
epoch is timed from the first callback's `on_epoch_begin` to the last one's
`on_epoch_end`, so an epoch-end checkpoint is inside the time (Keras's
`History` runs after it, outside).

Configurations, each with `steps_per_execution` 1 and 25:

- `none`: no callbacks (the anchor);
- `suite`: `ModelCheckpoint(epoch, resume=True)` (so it also handles
  preemption signals), `EarlyStopping`, `BudgetStop(daily_budget=...)` and
  `TerminateOnNaN`; the checkpoint saves once per epoch;
- `suite_no_preemption`: the same with `preemption=None`;
- `ckpt_batch`: `keras_ckpt.ModelCheckpoint(save_weights_only=True,
  save_freq=N)` alone, a file every N steps (`--save-every`), with its
  defaults otherwise: fsynced, checksummed, optimizer state included;
- `keras_batch`: `keras.callbacks.ModelCheckpoint(save_weights_only=True,
  save_freq=N)`, Keras's own batch-level checkpoint with the same N (no
  fsync, weights only): what `ckpt_batch` is to be compared with.

With `steps_per_execution` 25, N is rounded up to a multiple of 25, so each
save falls at the end of an execution. The two batch-level checkpoints write
`w-{epoch}-{batch}.weights.h5`, a new file each save; the files are counted
after the fit (all its epochs, the first included).

Each round runs every configuration once (a fresh model each fit); the order
is rotated by one configuration each round, so that no configuration always
runs first and a drift of the machine does not always hit the same one. A configuration's
overhead in a round is its time per step over that of `none` (same
`steps_per_execution`) in the same round, minus one. The summary gives, per
configuration, the median time per step over the rounds and the median of the
per-round overheads with their range (min, max): not a ratio of medians. The
JSON file keeps every round's raw values (time per step, overhead, each
measured epoch's time per step, saves per fit) and the order of each round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ckpt  # noqa: E402

BATCH = 32
SPES = (1, 25)
NAMES = ("none", "suite", "suite_no_preemption", "ckpt_batch", "keras_batch")


class EpochStart(keras.callbacks.Callback):
    """First in the list: notes when an epoch begins."""

    started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()


class EpochEnd(keras.callbacks.Callback):
    """Last in the list: the epoch's time, after every other callback's epoch end."""

    def __init__(self, start: EpochStart):
        super().__init__()
        self.start = start
        self.seconds: list[float] = []

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start.started)


def suite(directory: str, preemption: str | None) -> list:
    return [
        keras_ckpt.ModelCheckpoint(os.path.join(directory, "ckpt.keras"), resume=True,
                                   preemption=preemption, lock=False),
        keras_ckpt.EarlyStopping(monitor="loss", patience=1000),
        keras_ckpt.BudgetStop(daily_budget=24 * 3600, verbose=0,
                              ledger=os.path.join(directory, "ledger.json")),
        keras_ckpt.TerminateOnNaN(verbose=0),
    ]


def callbacks_for(name: str, directory: str, save_every: int) -> list:
    if name == "none":
        return []
    if name.startswith("suite"):
        return suite(directory, "exit" if name == "suite" else None)
    path = os.path.join(directory, "w-{epoch}-{batch}.weights.h5")
    kind = keras_ckpt if name == "ckpt_batch" else keras.callbacks
    return [kind.ModelCheckpoint(path, save_weights_only=True, save_freq=save_every)]


def save_every_for(spe: int, save_every: int) -> int:
    """`save_every`, rounded up to a multiple of `spe`."""
    return -(-save_every // spe) * spe


def one_fit(name: str, spe: int, a, x, y, directory: str | None) -> dict:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-3), "mse", steps_per_execution=spe)
    start = EpochStart()
    end = EpochEnd(start)
    with tempfile.TemporaryDirectory(dir=directory) as d:
        callbacks = callbacks_for(name, d, save_every_for(spe, a.save_every))
        model.fit(x, y, batch_size=BATCH, epochs=a.epochs, verbose=0, shuffle=False,
                  callbacks=[start] + callbacks + [end])
        saves = sum(f.endswith(".weights.h5") for f in os.listdir(d))
    measured = [s / a.steps * 1e6 for s in end.seconds[1:]]  # epoch 1: compilation
    return {"us_per_step": statistics.median(measured), "epochs_us_per_step": measured,
            "saves": saves}


def measure(a, x, y) -> dict:
    keys = [f"{n}/spe{spe}" for spe in SPES for n in NAMES]
    raw: dict = {k: {"us_per_step": [], "epochs_us_per_step": [], "saves": []} for k in keys}
    for key in keys:
        if not key.startswith("none/"):
            raw[key]["overhead"] = []
    orders = []
    for r in range(a.rounds):
        shift = r % len(keys)
        order = keys[shift:] + keys[:shift]  # rotated: no configuration always first
        orders.append(order)
        fits = {}
        for key in order:
            name, spe = key.split("/spe")
            fits[key] = one_fit(name, int(spe), a, x, y, a.dir)
            print(f"round {r + 1}/{a.rounds} {key}: {fits[key]['us_per_step']:.1f} us/step, "
                  f"{fits[key]['saves']} batch-level saves", flush=True)
        for key in keys:  # paired: against `none` of this round
            base = fits[f"none/spe{key.split('/spe')[1]}"]["us_per_step"]
            for field in ("us_per_step", "epochs_us_per_step", "saves"):
                raw[key][field].append(fits[key][field])
            if "overhead" in raw[key]:
                raw[key]["overhead"].append(fits[key]["us_per_step"] / base - 1)
    return {"keys": keys, "orders": orders, "raw": raw}


def summary(result: dict) -> str:
    lines = [f"{'configuration':28} {'us/step':>9}  "
             f"{'overhead vs none (per round): median [min, max]':49} saves/fit"]
    for key, row in result["raw"].items():
        over = ""
        if not key.startswith("none/"):
            low, high = result["overhead_range"][key]
            over = (f"{result['overhead'][key] * 100:+6.1f} %  "
                    f"[{low * 100:+.1f} %, {high * 100:+.1f} %]")
        saves = (f"{statistics.median(row['saves']):g}"
                 if key.split("/")[0].endswith("batch") else "")
        lines.append(f"{key:28} {result['us_per_step'][key]:9.1f}  {over:49} {saves:>9}".rstrip())
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="steps per epoch")
    p.add_argument("--epochs", type=int, default=4, help="epochs per fit (the first excluded)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--save-every", type=int, default=500,
                   help="steps between batch-level saves (rounded up to a multiple of 25 "
                        "with steps_per_execution 25)")
    p.add_argument("--dir", help="where the checkpoints go (default: the system's temp dir)")
    p.add_argument("--json")
    a = p.parse_args()
    if a.steps < 1 or a.rounds < 1 or a.save_every < 1:
        p.error("--steps, --rounds and --save-every must be positive")
    if a.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch (compilation) is not measured")
    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(a.steps * BATCH, 32)).astype("float32")
    y = x[:, :1] * 2
    measured = measure(a, x, y)
    raw = measured["raw"]
    result = {
        "backend": backend,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}, Keras {keras.__version__}",
        "date": time.strftime("%Y-%m-%d"), "steps_per_epoch": a.steps, "epochs": a.epochs,
        "measured_epochs": a.epochs - 1, "batch": BATCH, "rounds": a.rounds,
        "save_every": {f"spe{spe}": save_every_for(spe, a.save_every) for spe in SPES},
        "checkpoint_dir": a.dir or tempfile.gettempdir(),
        "method": "each fit: median over its epochs after the first (compilation) of the "
                  "epoch's time per step; overhead: per round, against none of the same "
                  "round and steps_per_execution; medians and [min, max] over rounds",
        "orders": measured["orders"],
        # Medians over rounds (`overhead` stays {configuration: number}, as plot.py reads).
        "us_per_step": {k: statistics.median(v["us_per_step"]) for k, v in raw.items()},
        "us_per_step_range": {k: [min(v["us_per_step"]), max(v["us_per_step"])]
                              for k, v in raw.items()},
        "overhead": {k: statistics.median(v["overhead"]) for k, v in raw.items()
                     if not k.startswith("none/")},
        "overhead_range": {k: [min(v["overhead"]), max(v["overhead"])] for k, v in raw.items()
                           if not k.startswith("none/")},
        "raw": raw,
    }
    print(f"\n{backend}, {a.steps} steps an epoch, {a.epochs - 1} measured epochs a fit, "
          f"{a.rounds} rounds, batch-level save every "
          f"{result['save_every']['spe1']} / {result['save_every']['spe25']} steps "
          f"(spe 1 / 25)")
    print(summary(result))
    path = a.json or os.path.join(os.path.dirname(__file__), "results",
                                  f"step_overhead-{backend}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(path)


if __name__ == "__main__":
    main()
