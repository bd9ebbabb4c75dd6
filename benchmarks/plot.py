"""Plots `results/save_bench.json` (and the step overheads) into `results/benchmarks.png`.

Usage: python benchmarks/plot.py
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = [
    ("floor", "floor (no-copy read,\none h5py write, fsync)"),
    ("keras_save_weights", "Keras save_weights\n(not durable)"),
    ("keras_save_weights_fsync", "Keras save_weights\n+ fsync"),
    ("keras_save_keras", "Keras .keras"),
    ("keras_backup_and_restore", "BackupAndRestore"),
    ("tf_checkpoint_write", "tf.train.Checkpoint\n+ fsync"),
    ("keras_orbax", "Keras OrbaxCheckpoint"),
    ("keras_orbax_async_blocking", "Keras OrbaxCheckpoint\nbackground: blocked"),
    ("ours_weights_h5", "keras-ckpt .weights.h5\n(full state, fsync)"),
    ("ours_keras", "keras-ckpt .keras\n(full state, fsync)"),
    ("ours_async_blocking", "keras-ckpt async:\ntraining blocked"),
    ("ours_async_durable", "keras-ckpt async:\nuntil durable"),
]


def main() -> None:
    with open(os.path.join(HERE, "results", "save_bench.json")) as f:
        bench = json.load(f)
    sizes = list(bench["sizes"])
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(6 * (len(sizes) + 1), 6))
    for ax, size in zip(axes, sizes, strict=False):
        r = bench["sizes"][size]
        names = [label for key, label in METHODS if isinstance(r.get(key), float)]
        values = [r[key] * 1000 for key, _ in METHODS if isinstance(r.get(key), float)]
        colors = ["tab:green" if label.startswith("keras-ckpt") else "tab:gray"
                  for label in names]
        ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("ms per save (median)")
        ax.set_title(f"{size} parameters, {r['state_bytes'] / (1 << 20):.0f} MiB of state")
        ax.tick_params(axis="y", labelsize=8)
    ax = axes[-1]
    labels, values = [], []
    for backend in ("tensorflow", "jax"):
        path = os.path.join(HERE, "results", f"step_overhead-{backend}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            overhead = json.load(f)["overhead"]
        for key, value in overhead.items():
            labels.append(f"{backend}: {key}")
            values.append(value * 100)
    ax.barh(labels, values, color=["tab:green" if v <= 3 else "tab:red" for v in values])
    ax.axvline(3, color="black", linestyle="--", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("per-step overhead vs no callbacks (%), target 3%")
    ax.set_title("The four callbacks on a fit of many small steps")
    ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"keras-ckpt benchmarks: {bench['machine']}, {bench['date']}")
    fig.tight_layout()
    out = os.path.join(HERE, "results", "benchmarks.png")
    fig.savefig(out, dpi=80)
    print(out)


if __name__ == "__main__":
    main()
