"""Damages real checkpoints in seeded ways and reads each copy; prints what happened as JSON.

Usage: python mutation_child.py DIR COUNT SEED (run by tests/test_mutations.py)

Trains a tiny model for two epochs with ModelCheckpoint writing `.weights.h5`
and `.keras` files, then makes COUNT damaged copies of them, each one mutation:
bit flips, truncation, a zeroed page, appended garbage, or a byte range spliced
in from the other epoch's file. Each copy is read with `storage.read_meta`,
`storage.read` and `keras_ckpt.restore`, in this process (the test's timeout
catches a hang). Counted: outcomes that are not keras-ckpt's own error, reads
that succeed with other arrays than the file held, and restores that raise
after changing the model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ckpt  # noqa: E402
from keras_ckpt import storage  # noqa: E402


def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    m.compile(keras.optimizers.Adam(), "mse")
    return m


def mutate(rng: random.Random, blob: bytes, donor: bytes) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "flips", "truncate", "zero-page", "append", "splice"])
    data = bytearray(blob)
    if kind in ("flip", "flips"):
        for _ in range(1 if kind == "flip" else rng.randint(2, 16)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(len(data)):]
    elif kind == "zero-page":
        at = rng.randrange(0, len(data), 4096) if len(data) > 4096 else 0
        data[at:at + 4096] = bytes(len(data[at:at + 4096]))
    elif kind == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096)))
    else:
        length = rng.randint(1, 512)
        src, dst = rng.randrange(max(1, len(donor) - length)), rng.randrange(len(data))
        data[dst:dst + length] = donor[src:src + length]
    return kind, bytes(data)


def values(m: keras.Model) -> list[np.ndarray]:
    return [v.numpy().copy() for v in m.variables + m.optimizer.variables]


def main() -> None:
    directory, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    sources = {}
    for ext in (".weights.h5", ".keras"):
        template = os.path.join(directory, "src", "c-{epoch}" + ext)
        model().fit(x, x[:, :1], batch_size=8, epochs=2, verbose=0, callbacks=[
            keras_ckpt.ModelCheckpoint(template, save_weights_only=ext == ".weights.h5")])
        files = [template.format(epoch=e) for e in (1, 2)]
        sources[ext] = [(open(f, "rb").read(), storage.read(f).arrays) for f in files]
    target = model()
    target.fit(x, x[:, :1], epochs=1, verbose=0)  # built, with its optimizer
    rng = random.Random(seed)
    tally: dict = {"cases": 0, "kinds": {}, "outcomes": {}, "foreign": [], "silent_wrong": [],
                   "changed_then_raised": []}
    for case in range(count):
        ext = (".weights.h5", ".keras")[case % 2]
        which = rng.randrange(2)
        blob, arrays = sources[ext][which]
        kind, damaged = mutate(rng, blob, sources[ext][1 - which][0])
        path = os.path.join(directory, f"case{case}{ext}")
        with open(path, "wb") as f:
            f.write(damaged)
        tally["kinds"][kind] = tally["kinds"].get(kind, 0) + 1
        for op in ("read_meta", "read", "restore"):
            before = values(target) if op == "restore" else None
            try:
                if op == "read_meta":
                    storage.read_meta(path)
                elif op == "read":
                    got = storage.read(path).arrays
                    if got.keys() != arrays.keys() or any(
                            not np.array_equal(got[k], arrays[k]) for k in arrays):
                        tally["silent_wrong"].append([case, kind])
                else:
                    keras_ckpt.restore(target, path)
                outcome = "ok"
            except keras_ckpt.CorruptCheckpointError:
                outcome = "CorruptCheckpointError"
            except Exception as e:  # anything else is a finding
                outcome = type(e).__name__
                tally["foreign"].append([case, kind, op, f"{type(e).__name__}: {e}"[:300]])
            if op == "restore" and outcome != "ok" and any(
                    not np.array_equal(a, b) for a, b in zip(before, values(target),
                                                             strict=True)):
                tally["changed_then_raised"].append([case, kind])
            key = f"{op}:{outcome}"
            tally["outcomes"][key] = tally["outcomes"].get(key, 0) + 1
        os.remove(path)
        tally["cases"] += 1
    shutil.rmtree(os.path.join(directory, "src"))
    print("RESULT " + json.dumps(tally), flush=True)


if __name__ == "__main__":
    main()
