"""Per-step overhead of the keras-ckpt callbacks on a fit of many small steps.

Usage:
    KERAS_BACKEND=tensorflow python benchmarks/step_overhead.py [--steps 2000] [--rounds 5]
    KERAS_BACKEND=jax python benchmarks/step_overhead.py
        [--json benchmarks/results/step_overhead-<backend>.json]

A small MLP trains `--steps` steps of batch 32 per epoch; the time of each
epoch after the first (compilation) is measured, for each configuration, in
interleaved rounds (so drifts of the machine hit all alike), and the median
time per step is compared with the fit without callbacks:

- `none`: no callbacks;
- `suite`: `ModelCheckpoint(epoch, resume=True)` (so it also handles
  preemption signals), `EarlyStopping`, `BudgetStop(daily_budget=...)` and
  `TerminateOnNaN`;
- `suite_no_preemption`: the same with `preemption=None`;

each with `steps_per_execution` 1 and 25. The checkpoint itself (once per
epoch) is part of the time.
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


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def suite(directory: str, preemption: str | None) -> list:
    return [
        keras_ckpt.ModelCheckpoint(os.path.join(directory, "ckpt.keras"), resume=True,
                                   preemption=preemption, lock=False),
        keras_ckpt.EarlyStopping(monitor="loss", patience=1000),
        keras_ckpt.BudgetStop(daily_budget=24 * 3600, verbose=0,
                              ledger=os.path.join(directory, "ledger.json")),
        keras_ckpt.TerminateOnNaN(verbose=0),
    ]


def run(config: str, spe: int, steps: int, epochs: int, x, y) -> float:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(1e-3), "mse", steps_per_execution=spe)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as d:
        callbacks = [] if config == "none" else suite(
            d, "exit" if config == "suite" else None)
        model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, shuffle=False,
                  callbacks=[timer] + callbacks)
    return statistics.median(timer.times[1:]) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(a.steps * 32, 32)).astype("float32")
    y = x[:, :1] * 2
    configs = [(c, spe) for spe in (1, 25) for c in ("none", "suite", "suite_no_preemption")]
    samples: dict = {f"{c}/spe{spe}": [] for c, spe in configs}
    for _ in range(a.rounds):
        for c, spe in configs:
            samples[f"{c}/spe{spe}"].append(run(c, spe, a.steps, a.epochs, x, y))
    result = {"backend": backend, "steps_per_epoch": a.steps, "rounds": a.rounds,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"Python {platform.python_version()}, Keras {keras.__version__}",
              "date": time.strftime("%Y-%m-%d"), "us_per_step": {}, "overhead": {}}
    for key, values in samples.items():
        result["us_per_step"][key] = statistics.median(values) * 1e6
    for c, spe in configs:
        if c != "none":
            base = result["us_per_step"][f"none/spe{spe}"]
            result["overhead"][f"{c}/spe{spe}"] = result["us_per_step"][f"{c}/spe{spe}"] / base - 1
    print(json.dumps(result, indent=2))
    path = a.json or os.path.join(os.path.dirname(__file__), "results",
                                  f"step_overhead-{backend}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
