"""Crash stress: SIGKILL a training process at random instants, resume, and compare bitwise.

Usage:
    python benchmarks/crash_stress.py --kills 200 [--per-episode 5] [--seed 0]
        [--workdir DIR] [--json benchmarks/results/crash_stress.json]

The training is `python -m keras_ckpt.demo_train` (Dropout, BatchNormalization,
Adam with a schedule, seeded, op determinism) with a checkpoint every 2 steps,
so a good part of its time is spent writing. An episode starts it in a fresh
directory and kills it `--per-episode` times before letting it finish:

- `random`: SIGKILL at an instant drawn uniformly over the training time of
  an uninterrupted run (counted from the moment `fit` begins);
- `writer`: the child SIGKILLs itself inside a randomly chosen checkpoint
  write, at a random phase: after Keras's part is in the temporary file, when
  the file is complete but neither fsynced nor renamed, or after the rename
  and before the directory fsync.

After every kill, every checkpoint file in the directory is read and verified
(any failure is a corrupt load), and the newest valid checkpoint must exist
once one was written. Each finished episode's final model, optimizer state
and history must be bitwise equal to the uninterrupted run's. The summary is
printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

TRAIN_ARGS = ["--data", "numpy", "--save-freq", "2", "--epochs", "6"]
PHASES = ("keras", "state", "rename")


def _env() -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0",
            "KERAS_BACKEND": "tensorflow"}


def _start(directory: str, out: str, *extra: str) -> subprocess.Popen:
    # stderr goes to a file: a full pipe would block the child mid-training.
    err = tempfile.TemporaryFile(mode="w+")
    child = subprocess.Popen(
        [sys.executable, "-m", "keras_ckpt.demo_train", directory, out, *TRAIN_ARGS,
         "--announce", *extra],
        stdout=subprocess.PIPE, stderr=err, text=True, env=_env())
    child.err_file = err
    return child


def _finish(child: subprocess.Popen) -> str:
    """Waits for the child; returns the end of its stderr."""
    child.communicate(timeout=600)
    child.err_file.seek(0)
    text = child.err_file.read()[-3000:]
    child.err_file.close()
    return text


def _wait_training(child: subprocess.Popen) -> float:
    """Blocks until the child says `training`; returns that moment (monotonic)."""
    for line in child.stdout:
        if line.strip() == "training":
            return time.monotonic()
    return time.monotonic()  # it ended before training (reported by its exit status)


def _load(path: str) -> tuple[dict, dict]:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "history"}
        history = json.loads(data["history"].tobytes())
    history.pop("resumed_from", None)
    return arrays, history


def _check_directory(directory: str) -> tuple[int, int, bool]:
    """(files, corrupt loads, a valid newest checkpoint found) after a kill."""
    from keras_ckpt import manager, storage

    corrupt = 0
    names = [n for n in os.listdir(directory) if not n.startswith(".") and n.endswith(".keras")]
    for name in names:
        try:
            storage.read(os.path.join(directory, name))
        except storage.CorruptCheckpointError:
            corrupt += 1
    found = manager.latest_checkpoint(directory) is not None if names else True
    return len(names), corrupt, found


def reference(workdir: str) -> tuple[dict, dict, float, int]:
    """Runs the uninterrupted training; returns its outcome, training seconds and writes."""
    directory, out = os.path.join(workdir, "reference"), os.path.join(workdir, "reference.npz")
    child = _start(directory, out)
    began = _wait_training(child)
    err = _finish(child)
    seconds = time.monotonic() - began
    if child.returncode != 0:
        raise RuntimeError(f"the reference run failed:\n{err}")
    writes = len([n for n in os.listdir(directory) if n.endswith(".keras")])
    arrays, history = _load(out)
    return arrays, history, seconds, writes


def run_stress(kills: int, per_episode: int = 5, seed: int = 0, workdir: str | None = None,
               log=print) -> dict:
    """Kills `kills` times over episodes of `per_episode` kills; returns the summary."""
    rng = random.Random(seed)
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="keras-ckpt-crash-")
    try:
        ref_arrays, ref_history, train_seconds, writes = reference(workdir)
        log(f"reference: {train_seconds:.2f} s of training, {writes} checkpoint files")
        summary = {"kills": 0, "random_kills": 0, "writer_kills": {p: 0 for p in PHASES},
                   "kills_with_a_partial_file_left": 0, "resumes": 0, "episodes": 0,
                   "corrupt_loads": 0, "missing_checkpoint_after_kill": 0,
                   "episodes_bitwise_equal": 0, "episodes_different": 0,
                   "train_seconds_reference": round(train_seconds, 3),
                   "checkpoints_in_reference": writes}
        episode = 0
        while summary["kills"] < kills:
            episode += 1
            directory = os.path.join(workdir, f"episode-{episode:03d}")
            out = directory + ".npz"
            todo = min(per_episode, kills - summary["kills"])
            done_in_episode = 0
            while True:
                killing = done_in_episode < todo
                kind = rng.choice(("random", "writer")) if killing else None
                extra = []
                if kind == "writer":
                    phase = rng.choice(PHASES)
                    extra = ["--die-in-write", f"{rng.randint(1, max(1, writes // 2))}:{phase}"]
                child = _start(directory, out, *extra)
                began = _wait_training(child)
                if kind == "random":
                    try:
                        child.wait(timeout=max(0.0, rng.uniform(0, train_seconds) - (
                            time.monotonic() - began)))
                    except subprocess.TimeoutExpired:
                        child.send_signal(signal.SIGKILL)
                err = _finish(child)
                if child.returncode == -signal.SIGKILL:
                    summary["kills"] += 1
                    done_in_episode += 1
                    if kind == "random":
                        summary["random_kills"] += 1
                    else:
                        summary["writer_kills"][phase] += 1
                    if os.path.isdir(directory) and any(
                            ".tmp-" in n for n in os.listdir(directory)):
                        summary["kills_with_a_partial_file_left"] += 1
                    files, corrupt, found = _check_directory(directory) if os.path.isdir(
                        directory) else (0, 0, True)
                    summary["corrupt_loads"] += corrupt
                    summary["missing_checkpoint_after_kill"] += int(not found)
                    summary["resumes"] += int(files > 0)
                    continue
                if child.returncode != 0:
                    raise RuntimeError(f"episode {episode}: exit {child.returncode}\n{err}")
                if killing:
                    # The run finished before the chosen instant: count nothing, go on.
                    done_in_episode = todo
                break
            arrays, history = _load(out)
            same = arrays.keys() == ref_arrays.keys() and all(
                np.array_equal(arrays[k], ref_arrays[k]) for k in arrays) and (
                history == ref_history)
            summary["episodes"] += 1
            summary["episodes_bitwise_equal" if same else "episodes_different"] += 1
            log(f"episode {episode}: {summary['kills']} kills so far, "
                f"{'bitwise equal' if same else 'DIFFERENT'}; "
                f"corrupt loads {summary['corrupt_loads']}")
            shutil.rmtree(directory, ignore_errors=True)
        return summary
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=200)
    p.add_argument("--per-episode", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir")
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "crash_stress.json"))
    a = p.parse_args()
    started = time.time()
    summary = run_stress(a.kills, a.per_episode, a.seed, a.workdir)
    summary.update(seconds=round(time.time() - started, 1), seed=a.seed,
                   machine=f"{platform.machine()}, {os.cpu_count()} cores, "
                           f"Python {platform.python_version()}",
                   date=time.strftime("%Y-%m-%d"))
    print(json.dumps(summary, indent=2))
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(summary, f, indent=2)
    failed = summary["corrupt_loads"] or summary["episodes_different"] or summary[
        "missing_checkpoint_after_kill"]
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
