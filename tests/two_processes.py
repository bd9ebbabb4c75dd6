"""What the tests of two training processes on 127.0.0.1 share (tests/test_multi_worker.py,
tests/test_jax_processes.py): free ports, waiting for both, reading their reports."""

from __future__ import annotations

import json
import socket
import subprocess
import time

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
