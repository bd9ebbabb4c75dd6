"""The fork server (tests/forkserver.py): its children are real processes, equal to fresh ones.

The canary runs one scenario (a run SIGKILLed mid-epoch, then resumed) as
fresh `subprocess` processes and as forked children, and compares the results
bit for bit. The rest checks what the tests rely on: a real pid that can be
killed and signalled, the exit status python would give, captured output, no
thread or runtime started before the fork, no zombie left, a clean shutdown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import forkserver
import numpy as np
import pytest
from conftest import BACKEND, load_demo_result

import keras_ckpt
from keras_ckpt import manager

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}
SCENARIO = ["--data", "numpy", "--save-freq", "2", "--epochs", "3"]


def demo(spawn, directory, out, *args):
    return spawn([sys.executable, "-m", "keras_ckpt.demo_train", str(directory), str(out),
                  *SCENARIO, *args], capture_output=True, text=True, env=ENV, timeout=300)


@pytest.mark.slow
@pytest.mark.backends
def test_a_forked_child_ends_bitwise_equal_to_a_fresh_process(tmp_path):
    results = {}
    for name, spawn in (("fresh", subprocess.run), ("forked", forkserver.run)):
        directory, out = tmp_path / name, tmp_path / f"{name}.npz"
        killed = demo(spawn, directory, out, "--kill-step", "7")
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        saved = [os.path.basename(c.path) for c in manager.list_checkpoints(directory)]
        resumed = demo(spawn, directory, out)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        arrays, outcome = load_demo_result(out)
        assert outcome["resumed_from"]["epoch"] == 0  # resumed from a save in epoch 1
        outcome["resumed_from"]["path"] = os.path.basename(outcome["resumed_from"]["path"])
        results[name] = saved, arrays, outcome
    (saved_a, fresh, outcome_a), (saved_b, forked, outcome_b) = results["fresh"], results["forked"]
    assert saved_a == saved_b and saved_a
    assert outcome_a == outcome_b
    assert fresh.keys() == forked.keys()
    for name in fresh:
        np.testing.assert_array_equal(fresh[name], forked[name], err_msg=name)


CHECK = r"""
import json, os, sys, threading
import keras, keras_ckpt, tensorflow as tf
from tensorflow.python.eager import context
print(json.dumps({"threads": [t.name for t in threading.enumerate()],
                  "tf_context": context.context()._context_handle is not None,
                  "backend": keras.backend.backend(), "keras_ckpt": keras_ckpt.__file__,
                  "ppid": os.getppid(), "argv": sys.argv, "cwd": os.getcwd(),
                  "hashseed": os.environ.get("PYTHONHASHSEED"), "mine": os.environ.get("MINE")}))
"""


def test_children_fork_before_any_thread_or_runtime_and_see_their_own_world(tmp_path):
    info = forkserver.server(BACKEND).ready()
    assert info["python_threads"] == ["MainThread"] and info["backend"] == BACKEND
    proc = forkserver.run([sys.executable, "-c", CHECK, "a", "b"], capture_output=True,
                          text=True, env={**ENV, "MINE": "yes"}, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    seen = json.loads(proc.stdout)
    assert seen["threads"] == ["MainThread"] and not seen["tf_context"]
    assert seen["backend"] == BACKEND and seen["ppid"] == info["pid"]
    assert seen["keras_ckpt"] == keras_ckpt.__file__  # this checkout's package, not another
    assert seen["argv"] == ["-c", "a", "b"] and seen["cwd"] == str(tmp_path)
    assert (seen["hashseed"], seen["mine"]) == ("0", "yes")


def test_children_are_real_processes_with_real_exit_statuses():
    run = forkserver.run
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(7)"
    proc = run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "out\n", "err\n")
    proc = run([sys.executable, "-c", "raise ValueError('no')"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == "ValueError: no"
    assert "forkserver.py" not in proc.stderr  # the traceback is the child's own
    proc = run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert proc.returncode == -signal.SIGKILL
    proc = run([sys.executable, "-c", "raise KeyboardInterrupt"], capture_output=True)
    assert proc.returncode == -signal.SIGINT  # as python ends on an uncaught Ctrl-C

    waiting = "import sys; print('ready', flush=True); print(sys.stdin.readline().strip())"
    child = forkserver.Popen([sys.executable, "-c", waiting], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n" and child.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.2)
    assert os.path.exists(f"/proc/{child.pid}")  # a real pid, signalled by the test itself
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == -signal.SIGTERM
    child = forkserver.Popen([sys.executable, "-c", waiting], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate("hello\n", timeout=60)
    assert (child.returncode, out) == (0, "ready\nhello\n")
    # start_new_session=True (Jupyter's kernels): its own session and process group
    # from the moment its pid is known, so signalling its group spares everyone else.
    child = forkserver.Popen([sys.executable, "-c", waiting], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert os.getpgid(child.pid) == os.getsid(child.pid) == child.pid
    assert child.stdout.readline() == "ready\n"
    os.killpg(child.pid, signal.SIGINT)  # KeyboardInterrupt in the child, uncaught
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGINT
    assert forkserver.children_alive(BACKEND) == []  # every child reaped: no zombie


def test_what_is_fixed_at_import_cannot_be_changed_per_child():
    with pytest.raises(ValueError, match="PYTHONHASHSEED"):
        forkserver.run([sys.executable, "-c", "pass"], env={**ENV, "PYTHONHASHSEED": "1"})
    with pytest.raises(ValueError, match=r"sys.executable"):
        forkserver.run(["sh", "-c", "true"])


def test_a_server_stops_cleanly_and_takes_its_children_with_it(monkeypatch):
    own = forkserver._Server(BACKEND)  # not the session's: this one is stopped here
    own.ready()
    with monkeypatch.context() as m:
        m.setitem(forkserver._servers, BACKEND, own)
        child = forkserver.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"],
                                 stdin=subprocess.PIPE)
        assert forkserver.children_alive(BACKEND) == [child.pid]
    own.stop()  # the child still waits on its stdin: the server kills and reaps it
    assert own.process.returncode == 0
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert not os.path.exists(f"/proc/{child.pid}")  # reaped, not a zombie
    assert not os.path.exists(own.directory)
    child.stdin.close()
