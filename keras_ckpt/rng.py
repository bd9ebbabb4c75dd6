"""The global RNG states (Python, NumPy, and torch's on the torch backend) a checkpoint holds."""

from __future__ import annotations

import json
import random
import sys
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from keras_ckpt.snapshot import Snapshot, StateMismatchError

__all__ = ["rng_state", "torch_if_used", "rng_tuples", "restore_rng_at_step", "capture_rng",
           "digest", "DIFFER_KEY", "differ_message", "AT_STEP", "at_step", "marker"]

# A mid-epoch checkpoint's Python and NumPy states at its step (its `rng` holds the epoch
# begin's, from which a resume draws the epoch's order again), set at the first new step.
AT_STEP = "at_step"
# Set in a checkpoint's metadata when the processes' global RNG states differed as it was
# written (several workers or JAX processes): it holds the chief's, which every one resumes with.
DIFFER_KEY = "rng_differs_across_processes"
_FIX = ("Seed every process alike (keras.utils.set_random_seed with one seed), or give each "
        "process's input pipeline a seed of its own (a tf.data shuffle seed).")


def differ_message(at_resume: bool) -> str:
    """What a resume from a checkpoint of processes with differing RNG states changes."""
    if at_resume:
        return ("the processes' global Python/NumPy RNG states differed when this checkpoint "
                "was written; it holds process 0's (the chief's), and every process resumes "
                "with them, so this run differs from the uninterrupted one wherever another "
                "process draws from them. " + _FIX)
    return ("the processes' global Python/NumPy RNG states differ at this save (each process "
            "seeded differently?); a checkpoint holds process 0's (the chief's), and a resume "
            "would give every process those, so it would differ from the uninterrupted run "
            "wherever another process draws from them. " + _FIX)


def _now(keys_name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The global Python and NumPy RNG states now: (meta, {keys_name: NumPy's keys})."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return ({"python": {"version": version, "internal": list(internal), "gauss": gauss},
             "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached": float(cached)}},
            {keys_name: np.array(keys, dtype=np.uint32)})


def rng_state() -> tuple[dict, dict[str, np.ndarray]]:
    meta, arrays = _now("rng/numpy_keys")
    torch = torch_if_used()
    if torch is not None:
        # Keras's torch backend shuffles arrays with torch's global generator
        # (its DataLoader's RandomSampler draws a seed from it every epoch).
        arrays["rng/torch_cpu"] = torch.get_rng_state().numpy().copy()
    return meta, arrays


def torch_if_used() -> Any:
    """The torch module when Keras runs on torch, else None (no Keras loaded: None)."""
    if sys.modules.get("torch") is None or "keras" not in sys.modules:
        return None  # (a reader without Keras, as `inspect`, loads no backend for this)
    import keras

    return sys.modules["torch"] if keras.backend.backend() == "torch" else None


def _python_numpy(meta: Any, keys: Any) -> tuple:
    """The Python and NumPy states of `rng_state`'s meta and keys (checked, not yet set)."""
    py = meta["python"]
    python_state = (int(py["version"]), tuple(int(v) for v in py["internal"]),
                    None if py["gauss"] is None else float(py["gauss"]))
    nps = meta["numpy"]
    numpy_state = (str(nps["kind"]), keys, int(nps["pos"]), int(nps["has_gauss"]),
                   float(nps["cached"]))
    random.Random().setstate(python_state)
    np.random.RandomState().set_state(numpy_state)
    return python_state, numpy_state


def rng_tuples(meta: Any, arrays: Mapping[str, np.ndarray]) -> tuple:
    """The Python, NumPy (and torch) RNG states a checkpoint holds (checked, not yet set; the
    states at a mid-epoch checkpoint's step too, `AT_STEP`)."""
    try:
        python_state, numpy_state = _python_numpy(meta, arrays["rng/numpy_keys"])
        if AT_STEP in meta:
            _python_numpy(meta[AT_STEP], arrays[f"rng/{AT_STEP}/numpy_keys"])
        torch_state = arrays.get("rng/torch_cpu")
        torch = torch_if_used()
        if torch is None:
            torch_state = None
        else:
            expected = torch.get_rng_state().numel()
            for state in (torch_state, arrays.get("rng/torch_cpu_at_step")):
                if state is not None and (state.dtype != np.uint8
                                          or state.shape != (expected,)):
                    raise ValueError(f"torch RNG state of shape {state.shape}, "
                                     f"{state.dtype}; expected ({expected},), uint8")
    except (KeyError, TypeError, ValueError) as e:
        raise StateMismatchError(f"The checkpoint's RNG state is malformed ({e!r}).") from None
    return python_state, numpy_state, torch_state


def restore_rng_at_step(snapshot: Snapshot, python_and_numpy: bool = True) -> None:
    """Sets the RNG states a mid-epoch snapshot holds for its step, if any (checked by `apply`,
    `rng_tuples`): torch's, and Python's and NumPy's unless `python_and_numpy` is False (the
    input drew from them as its skipped batches were read again: they are where they were)."""
    state = snapshot.arrays.get("rng/torch_cpu_at_step")
    torch = torch_if_used()
    if state is not None and torch is not None:
        torch.set_rng_state(torch.from_numpy(state.copy()))
    at_step = (snapshot.meta.get("rng") or {}).get(AT_STEP)
    if at_step is not None and python_and_numpy:
        python_state, numpy_state = _python_numpy(at_step,
                                                  snapshot.arrays[f"rng/{AT_STEP}/numpy_keys"])
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def at_step() -> tuple[dict, dict[str, np.ndarray]]:
    """The global Python and NumPy RNG states now, at a mid-epoch checkpoint's step, as what
    `capture` adds to the epoch begin's (`rng_state`): (meta under `AT_STEP`, arrays)."""
    return _now(f"rng/{AT_STEP}/numpy_keys")


def marker() -> tuple:
    """What changes when anything draws from the global Python or NumPy RNG."""
    state = np.random.get_state()
    return random.getstate(), state[2], state[3], state[1].tobytes()


def digest(snapshot: Snapshot) -> int:
    """A CRC-32 of the global RNG states `snapshot` holds (to compare across processes)."""
    crc = zlib.crc32(json.dumps(snapshot.meta.get("rng"), sort_keys=True).encode())
    for name in sorted(n for n in snapshot.arrays if n.startswith("rng/")):
        crc = zlib.crc32(np.ascontiguousarray(snapshot.arrays[name]).tobytes(), crc)
    return crc


def capture_rng() -> tuple[dict, dict[str, np.ndarray]]:
    """The global Python and NumPy RNG states, as (JSON meta, arrays)."""
    return rng_state()

