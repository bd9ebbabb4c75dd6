"""Checkpoints in an S3 bucket, against a real S3 API server on 127.0.0.1 (moto's server).

The server is a process of its own, started for this module; keras-ckpt reaches
it through fsspec (s3fs) with the standard `AWS_ENDPOINT_URL` setting, as a user
reaches an emulator or another S3-compatible store. The training runs are real
processes forked by the fork server, SIGKILLed for real; a failed upload is a
real connection cut by a relay between the trainer and the server (`Link`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import forkserver
import numpy as np
import pytest

# Imported where installed; else the module's tests are skipped (deselected, not collected
# as skips, where a run selects none of them: the JAX run without TensorFlow in .ci/run).
s3fs = importlib.import_module("s3fs") if importlib.util.find_spec("s3fs") else None
pytestmark = pytest.mark.skipif(s3fs is None, reason="pip install -e '.[test]' installs s3fs")

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


class Link:
    """The network between a trainer and the server: a TCP relay on 127.0.0.1 that can fail.

    While `down`, every open connection is cut and new ones are closed as soon
    as they are accepted, as when a machine loses its route to the store.
    """

    def __init__(self, target_port: int) -> None:
        self.target, self.up, self.open = target_port, True, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.up:
                client.close()
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def down(self) -> None:
        self.up = False
        for s in self.open:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.open = []

    def close(self) -> None:
        self.down()
        self.listener.close()


def test_an_upload_cut_off_by_the_network_is_reported_and_leaves_nothing_partial(
        s3, tmp_path, monkeypatch):
    import keras
    from conftest import make_data
    from tiny import make_model

    import keras_ckpt

    env, fs = s3
    fs.mkdir("flaky")
    link = Link(int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{link.port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries; s3fs still retries its 5
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "machine-1"))
    (tmp_path / "machine-1").mkdir()
    s3fs.S3FileSystem.clear_instance_cache()  # a client made now goes through the link

    class Outage(keras.callbacks.Callback):  # the network is down while epoch 2 saves
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                link.down()
            if epoch == 2:
                link.up = True

    url = "s3://flaky/run"
    checkpoint = keras_ckpt.ModelCheckpoint(f"{url}/c-{{epoch}}.keras",
                                            retention=[keras_ckpt.KeepLast(2)])
    x, y = make_data(64, seed=2)
    try:
        with pytest.warns(UserWarning, match=r"Uploading to s3://flaky/run/c-2\.keras failed"):
            make_model().fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False,
                             callbacks=[Outage(), checkpoint])
    finally:
        link.close()
        s3fs.S3FileSystem.clear_instance_cache()
    assert len(checkpoint.save_errors) == 1  # the fit went on
    fs.invalidate_cache()
    # c-2 never arrived (no partial object, no temporary name); c-3 did; KeepLast(2)
    # removed c-1 from the bucket.
    assert [p.rsplit("/", 1)[-1] for p in fs.ls("flaky/run")] == ["c-3.keras"]
    with fs.open("flaky/run/c-3.keras", "rb") as f:
        assert f.read(4) == b"PK\x03\x04"
    # A fresh machine resumes from what the bucket holds.
    monkeypatch.setenv("AWS_ENDPOINT_URL", env["AWS_ENDPOINT_URL"])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "machine-2"))
    (tmp_path / "machine-2").mkdir()
    resumed = keras_ckpt.ModelCheckpoint(f"{url}/c-{{epoch}}.keras", resume=True)
    try:
        make_model().fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[resumed])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert resumed.resumed_from is not None and resumed.resumed_from.epoch == 2
