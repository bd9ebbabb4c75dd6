"""What the tests of two training processes on 127.0.0.1 share (tests/test_multi_worker.py,
tests/test_jax_processes.py): free ports, waiting for both, reading their reports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import forkserver
import numpy as np

TIMEOUT = 240


def free_ports(n: int = 2) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(child: str, address: str, directory, out, args, backend: str) -> list:
    """Starts `child INDEX ADDRESS DIRECTORY OUT-INDEX.npz ARGS...` as processes 0 and 1,
    forked by `backend`'s fork server (it imported the backend and started no runtime, so what
    the child sets up before its first op, TF_CONFIG or `jax.distributed`, is what counts)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("KERAS_BACKEND", "TF_CONFIG", "XLA_FLAGS")}
    env.update(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0")
    return [forkserver.Popen(
        [sys.executable, child, str(i), address, str(directory), f"{out}-{i}.npz", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for i in range(2)]


def finish(procs, statuses=(0, 0)) -> list[str]:
    """Waits for both processes; checks their exit statuses; returns their output."""
    deadline = time.monotonic() + TIMEOUT
    logs = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        logs.append(output)
    codes = [proc.returncode for proc in procs]
    assert codes == list(statuses), "\n".join(
        f"--- process {i} (exit {code}):\n{output[-2500:]}"
        for i, (code, output) in enumerate(zip(codes, logs, strict=True)))
    return logs


def read(out, index: int) -> tuple[dict, dict]:
    """Process `index`'s report: (arrays, outcome)."""
    with np.load(f"{out}-{index}.npz") as data:
        arrays = {k: data[k] for k in data.files if k != "outcome"}
        return arrays, json.loads(data["outcome"].tobytes())


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def run_both(procs, out, statuses=(0, 0)) -> tuple[dict, dict, dict, dict]:
    """Both processes to their end; their reports. Process 0 (the chief) wrote into the
    directory, process 1 did not: (arrays 0, outcome 0, arrays 1, outcome 1). Both seeded
    alike, so neither was told that their RNG states differ."""
    logs = finish(procs, statuses)
    assert not any("RNG states differ" in log for log in logs), logs[0][-2000:]
    (first, first_outcome), (second, second_outcome) = read(out, 0), read(out, 1)
    assert first_outcome.pop("changes"), "process 0 wrote nothing"
    assert second_outcome.pop("changes") == []  # process 1 wrote nothing there
    return first, first_outcome, second, second_outcome


def kill_both(procs) -> list[str]:
    """Process 1 has SIGKILLed itself (from a callback of its own); process 0, stuck in the
    next step's collective, is then ended as a scheduler would end the job. Their output."""
    procs[1].wait(timeout=TIMEOUT)
    assert procs[1].returncode == -signal.SIGKILL
    procs[0].kill()
    return finish(procs, statuses=(-signal.SIGKILL, -signal.SIGKILL))
