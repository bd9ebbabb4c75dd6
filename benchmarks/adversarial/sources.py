"""The real checkpoints the adversarial runners damage, and what they should read back as.

Every source is a 2-epoch fit of a tiny model with `keras_ckpt.ModelCheckpoint(
".../ck-{epoch:02d}<ext>", save_freq="epoch")`, giving `ck-01` (the valid,
older checkpoint a damaged `ck-02` sits beside) and `ck-02` (the file that
is damaged). Architecture `A` is the model under test; `B` (other layers)
only provides whole foreign files. `.weights.h5` needs `save_weights_only=True`
(ModelCheckpoint refuses that extension otherwise).

Importing this module sets `KERAS_BACKEND=tensorflow` and imports Keras;
sources are trained in a forked child so that the importing process runs no
TensorFlow op and can keep forking workers.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import shutil
import zipfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ckpt  # noqa: E402
import keras_ckpt.callbacks  # noqa: E402, F401 - imported before any fork
from keras_ckpt import storage  # noqa: E402

OLD, NEW = "ck-01", "ck-02"
TEMPLATE = "ck-{epoch:02d}"
_CKPT_ARGS = set(inspect.signature(keras_ckpt.ModelCheckpoint.__init__).parameters)

# name: (architecture, extension, extra ModelCheckpoint arguments)
SPECS = {
    "weights_default": ("A", ".weights.h5", {}),
    "weights_async": ("A", ".weights.h5", {"async_write": True}),
    "weights_gzip": ("A", ".weights.h5", {"compression": "gzip"}),
    "keras_default": ("A", ".keras", {}),
    "keras_async": ("A", ".keras", {"async_write": True}),
    "keras_gzip": ("A", ".keras", {"compression": "gzip"}),
    "other_weights": ("B", ".weights.h5", {}),
    "other_keras": ("B", ".keras", {}),
}


def specs() -> dict:
    """`SPECS` without the variants whose argument this keras-ckpt lacks."""
    return {name: spec for name, spec in SPECS.items() if set(spec[2]) <= _CKPT_ARGS}


def build_model(arch: str = "A") -> keras.Model:
    """A compiled tiny model: `A` is the one under test, `B` has other layers."""
    if arch == "A":
        layers = [keras.layers.Dense(8), keras.layers.Dropout(0.2), keras.layers.Dense(1)]
    else:
        layers = [keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3),
                  keras.layers.Dense(1)]
    model = keras.Sequential([keras.Input((4,)), *layers])
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    return model


def data() -> tuple[np.ndarray, np.ndarray]:
    """The 32 training samples every fit uses."""
    rng = np.random.default_rng(0)
    return rng.random((32, 4), dtype=np.float32), rng.random((32, 1), dtype=np.float32)


def checkpoint_kwargs(name: str) -> dict:
    """ModelCheckpoint arguments (beyond `filepath`) that source `name` was written with."""
    _, ext, extra = SPECS[name]
    return {"save_freq": "epoch", "save_weights_only": ext == ".weights.h5", **extra}


def _train_all(root: str) -> None:
    x, y = data()
    for seed, (name, (arch, ext, _)) in enumerate(specs().items()):
        keras.utils.set_random_seed(seed)  # distinct arrays: a splice or link shows
        model = build_model(arch)
        path = os.path.join(root, name, TEMPLATE + ext)
        model.fit(x, y, epochs=2, verbose=0,
                  callbacks=[keras_ckpt.ModelCheckpoint(path, **checkpoint_kwargs(name))])


def make_sources(root: str) -> dict:
    """Trains every source under `root` (in a forked child) unless its manifest exists.

    Returns the manifest: `{name: {"arch", "ext", "old", "new", "sha256"}}`.
    """
    manifest_path = os.path.join(root, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            return json.load(f)
    shutil.rmtree(root, ignore_errors=True)
    from harness import CTX

    proc = CTX.Process(target=_train_all, args=(root,))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"training the source checkpoints failed ({proc.exitcode})")
    manifest = {}
    for name, (arch, ext, extra) in specs().items():
        entry = {"arch": arch, "ext": ext, "options": extra, "sha256": {}}
        for which, stem in (("old", OLD), ("new", NEW)):
            path = os.path.join(root, name, stem + ext)
            entry[which] = path
            with open(path, "rb") as f:
                entry["sha256"][which] = hashlib.sha256(f.read()).hexdigest()
        manifest[name] = entry
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def reference(path: str) -> dict[str, np.ndarray]:
    """The arrays `storage.read` returns for an undamaged file."""
    return dict(storage.read(path).arrays)


def differing(arrays: dict, expected: dict | None) -> list[str]:
    """Names of arrays that differ from `expected` (dtype, shape or bytes); [] if equal."""
    if expected is None:
        return []
    names = sorted(set(arrays) | set(expected))
    bad = []
    for name in names:
        a, b = arrays.get(name), expected.get(name)
        if a is None or b is None:
            bad.append(name)
            continue
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            bad.append(name)
    return bad


def _h5_regions(h5: h5py.File, base: int) -> dict[str, list[tuple[int, int]]]:
    spans = []
    group = h5.get("keras_ckpt/arrays")
    for dataset in (group.values() if group is not None else []):
        offset = dataset.id.get_offset()
        if offset is not None and dataset.nbytes:
            spans.append((base + offset, base + offset + dataset.id.get_storage_size()))
    return {"array": spans}


def regions(path: str) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges worth aiming at: `head`, `tail`, `meta` (the JSON), `array` (data)."""
    with open(path, "rb") as f:
        blob = f.read()
    size = len(blob)
    found = {"head": [(0, min(size, 4096))], "tail": [(max(0, size - 4096), size)]}
    text = json.dumps(storage.read_meta(path), separators=(",", ":")).encode()[:40]
    start = blob.find(text[:24])
    if start >= 0:
        found["meta"] = [(start, min(size, start + 4096))]
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(storage.KERAS_WEIGHTS_MEMBER)
            member = archive.read(info)
        if info.compress_type == zipfile.ZIP_STORED:
            base = blob.find(member[:64])
            with h5py.File(io.BytesIO(member), "r") as h5:
                found.update(_h5_regions(h5, base))
    else:
        with h5py.File(path, "r") as h5:
            found.update(_h5_regions(h5, 0))
    return {k: v for k, v in found.items() if v}
