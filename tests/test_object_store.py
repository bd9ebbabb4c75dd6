"""Checkpoints in an S3 bucket, against a real S3 API server on 127.0.0.1 (moto's server).

The server is a process of its own, started for this module; keras-ckpt reaches
it through fsspec (s3fs) with the standard `AWS_ENDPOINT_URL` setting, as a user
reaches an emulator or another S3-compatible store. The training runs are real
processes forked by the fork server, SIGKILLed for real.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import forkserver
import numpy as np
import pytest

s3fs = pytest.importorskip("s3fs", reason="pip install -e '.[test]' installs s3fs")

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "object_store_child.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """(the environment that points S3 clients at the server, an s3fs file system on it)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    listening, lines = threading.Event(), []

    def drain():  # the server's log, read as it comes (its pipe never fills)
        for line in server.stdout:
            lines.append(line)
            if f"Running on http://127.0.0.1:{port}" in line:
                listening.set()
        listening.set()  # it ended

    threading.Thread(target=drain, daemon=True).start()
    if not listening.wait(timeout=120) or server.poll() is not None:
        pytest.fail("moto's server did not start: " + "".join(lines)[-2000:])
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env, s3fs.S3FileSystem(skip_instance_cache=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(url, out, machine, *args, expect_kill=False):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TMPDIR": str(machine)}
    machine.mkdir(exist_ok=True)
    proc = forkserver.run([sys.executable, CHILD, url, str(out), *args], capture_output=True,
                          text=True, env=env, timeout=300)
    expected = -signal.SIGKILL if expect_kill else 0
    assert proc.returncode == expected, proc.stderr[-3000:]
    return proc


def test_killed_mirror_wiped_and_resumed_from_the_bucket_bitwise(s3, tmp_path):
    env, fs = s3
    fs.mkdir("runs")
    url = "s3://runs/job"
    run("memory://reference", tmp_path / "straight.npz", tmp_path / "ref")  # uninterrupted
    first = tmp_path / "machine-1"
    run(url, tmp_path / "killed.npz", first, "--kill-epoch", "2", expect_kill=True)
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("runs/job")) == ["c-1.keras", "c-2.keras"]
    shutil.rmtree(first)  # the machine is gone; a fresh one resumes from the bucket
    run(url, tmp_path / "resumed.npz", tmp_path / "machine-2")
    with np.load(tmp_path / "straight.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        assert int(b["resumed_epoch"]) == 1 and int(a["resumed_epoch"]) == -1
        for key in a.files:
            if key.startswith("v"):
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    fs.invalidate_cache()
    # KeepLast(2) applied in the bucket; no upload's temporary name left behind.
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("runs/job")) == ["c-2.keras", "c-3.keras"]
    with fs.open("runs/job/c-3.keras", "rb") as f:
        assert f.read(4) == b"PK\x03\x04"  # a whole archive Keras loads
