"""One temporary-name format (pid, token), atomic writes, a cleaner that spares live writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_data, make_model

import keras_ckpt
from keras_ckpt import atomic, storage
from keras_ckpt.state import Snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(keras_ckpt.__file__)))

# A second process updating a budget ledger; its replace (the rename of its
# temporary file over the ledger) waits for a line on stdin, so the parent
# can look at the directory while the write is in flight.
LEDGER_WRITER = """
import os, sys
real_replace = os.replace

def paused_replace(src, dst):
    print(src, flush=True)
    sys.stdin.readline()
    real_replace(src, dst)

os.replace = paused_replace
from keras_ckpt.ledger import DayClock, Ledger
ledger = Ledger(sys.argv[1], DayClock("UTC"))
ledger.begin(1_800_000_000.0, {"daily_seconds": 60})
"""

# A process that dies with a temporary file left behind (SIGKILL mid-write).
DYING_WRITER = """
import os, signal, sys
from keras_ckpt import atomic
with open(atomic.temp_path(sys.argv[1], suffix=".keras"), "wb") as f:
    f.write(b"half a checkpoint")
os.kill(os.getpid(), signal.SIGKILL)
"""


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **kwargs)


def test_the_name_format_round_trips_and_rejects_others():
    name = atomic.temp_name("ckpt-01-0.53.weights.h5", "pull", ".weights.h5")
    parsed = atomic.parse(name)
    assert name.startswith(".") and name.endswith(".weights.h5")
    assert (parsed.name, parsed.pid, parsed.purpose, parsed.suffix) == (
        "ckpt-01-0.53.weights.h5", os.getpid(), "pull", ".weights.h5")
    assert len(parsed.token) == 16 and atomic.temp_name("a") != atomic.temp_name("a")
    assert atomic.parse(os.path.join("/some/dir", name)) == parsed
    for other in ("ckpt.keras", ".last.tmp-123-link", ".ledger.json.tmp-0a1b2c3d",
                  ".x.tmp-0-0123456789abcdef", "x.tmp-12-0123456789abcdef"):
        assert atomic.parse(other) is None, other
    with pytest.raises(ValueError, match="lower-case word"):
        atomic.temp_name("a", purpose="Bad-Word")


def test_a_live_processs_ledger_write_survives_cleaning_and_a_dead_ones_is_reported(tmp_path):
    ledger_path = tmp_path / "budget_ledger.json"  # BudgetStop's ledger in the checkpoint dir
    writer = python(LEDGER_WRITER, str(ledger_path), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        in_flight = writer.stdout.readline().strip()
        assert in_flight, writer.stderr.read()
        parsed = atomic.parse(in_flight)
        assert parsed is not None and (parsed.name, parsed.pid) == (
            "budget_ledger.json", writer.pid)
        assert os.path.dirname(in_flight) == str(tmp_path)

        dying = python(DYING_WRITER, str(tmp_path / "c-9.keras"), stderr=subprocess.PIPE)
        assert dying.wait(timeout=120) == -9, dying.stderr.read()
        dead = [n for n in os.listdir(tmp_path) if n.startswith(".c-9.keras.tmp-")]
        assert len(dead) == 1 and atomic.parse(dead[0]).pid == dying.pid
        mine = atomic.temp_path(str(tmp_path / "c-8.keras"))
        open(mine, "wb").close()  # this process's own write in flight
        open(tmp_path / ".notes.tmp-backup", "wb").close()  # not our format

        assert atomic.stale_temporaries(str(tmp_path)) == dead
        os.remove(mine)
        os.remove(tmp_path / ".notes.tmp-backup")

        # A run starting in that directory cleans it: the ledger write in flight stays.
        x, y = make_data(n=16)
        with pytest.warns(UserWarning, match=r"removed \.c-9\.keras\.tmp-"):
            make_model().fit(x, y, epochs=1, verbose=0, callbacks=[
                keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"))])
        assert os.path.exists(in_flight)
        assert not os.path.exists(tmp_path / dead[0])

        writer.stdin.write("\n")
        writer.stdin.close()
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert json.loads(ledger_path.read_text())["sessions"][0]["start"] == 1_800_000_000.0
    assert not os.path.exists(in_flight)


def test_storage_writes_under_the_format_and_a_failed_write_leaves_nothing(tmp_path):
    model = make_model()
    path = str(tmp_path / "w.weights.h5")
    seen = []

    def keras_writer(tmp: str) -> None:  # Keras's part: Keras writes it at the temporary path
        seen.append(tmp)
        model.save_weights(tmp)

    snapshot = Snapshot(arrays={"a": np.arange(3.0)}, meta={})
    storage.write(path, snapshot, keras_writer=keras_writer)
    parsed = atomic.parse(seen[0])
    assert (parsed.name, parsed.pid, parsed.suffix) == ("w.weights.h5", os.getpid(), ".weights.h5")
    assert os.listdir(tmp_path) == ["w.weights.h5"]

    def failing(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(f"{tmp}: no space left on device")

    with pytest.raises(OSError, match="no space"):
        atomic.write(path, failing)
    assert os.listdir(tmp_path) == ["w.weights.h5"]  # the previous file, whole
    np.testing.assert_array_equal(storage.read(path).arrays["a"], np.arange(3.0))
