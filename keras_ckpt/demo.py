"""`python -m keras_ckpt demo`: kill a real training run, resume it, prove it is exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

__all__ = ["run_demo"]


def _train(directory: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "keras_ckpt.demo_train", directory, out, *extra],
        capture_output=True, text=True, env=env)


def _load(path: str):
    import numpy as np

    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "history"}
        history = json.loads(data["history"].tobytes())
    return arrays, history


def run_demo(out: str = "keras_ckpt_demo", epochs: int = 6) -> int:
    """Trains a small model three times in child processes and reports.

    1. uninterrupted, `epochs` epochs;
    2. the same script, SIGKILLed in the middle of an epoch (after step 20);
    3. the same script again: it resumes from the newest checkpoint.

    The final model and optimizer variables and the history of runs 1 and 3
    are compared bit for bit.

    Args:
        out: directory for the checkpoints and results.
        epochs: epochs per run (>= 4).

    Returns:
        0 when the resumed run equals the uninterrupted one, 1 otherwise.
    """
    import numpy as np

    from keras_ckpt.manager import list_checkpoints

    if epochs < 4:
        raise ValueError(f"`epochs` must be >= 4 for the demo; got {epochs}.")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    straight, killed = os.path.join(out, "uninterrupted"), os.path.join(out, "interrupted")
    for d in (straight, killed):
        if os.path.isdir(d):
            for name in os.listdir(d):
                os.remove(os.path.join(d, name))
    common = ["--epochs", str(epochs), "--save-freq", "4"]
    start = time.monotonic()
    print(f"keras-ckpt demo: {epochs} epochs of a small model (Dropout, BatchNorm, Adam with a "
          "schedule),\nseeded and deterministic, checkpointing every 4 steps into " + out)

    print("\n1. Training without interruption ...")
    proc = _train(straight, os.path.join(out, "uninterrupted.npz"), *common)
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        return 1
    print("2. Training again, and killing the process (SIGKILL) after step 20 ...")
    proc = _train(killed, os.path.join(out, "interrupted.npz"), *common, "--kill-step", "20")
    status = "killed by SIGKILL" if proc.returncode == -signal.SIGKILL else f"rc={proc.returncode}"
    saved = list_checkpoints(killed)
    newest = saved[-1] if saved else None
    print(f"   process {status}; {len(saved)} checkpoints on disk, the newest "
          + (f"{os.path.basename(newest.path)} (epoch {newest.epoch + 1}, step {newest.step})"
             if newest else "none"))
    print("3. Running the same script again: it resumes from the newest checkpoint ...")
    proc = _train(killed, os.path.join(out, "interrupted.npz"), *common)
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        return 1

    a, history_a = _load(os.path.join(out, "uninterrupted.npz"))
    b, history_b = _load(os.path.join(out, "interrupted.npz"))
    differing = [k for k in a if k not in b or not np.array_equal(a[k], b[k])]
    same_history = history_a == history_b
    print("\nResult")
    print(f"   variables compared: {len(a)} (model and optimizer), differing: {len(differing)}")
    print(f"   history identical: {same_history}")
    final_a, final_b = (h["history"]["val_loss"][-1] for h in (history_a, history_b))
    print(f"   final val_loss: uninterrupted {final_a!r}, resumed {final_b!r}")
    ok = not differing and same_history
    print("   => the resumed run is bitwise equal to the uninterrupted one." if ok
          else "   => MISMATCH: " + ", ".join(differing[:5]))
    print(f"\nCheckpoints: {killed}\nInspect them with: python -m keras_ckpt inspect {killed}")
    print(f"Done in {time.monotonic() - start:.0f} s.")
    return 0 if ok else 1
