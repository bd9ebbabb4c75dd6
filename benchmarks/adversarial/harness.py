"""Process isolation for the adversarial runners: forked workers, timeouts, outcomes.

The parent imports Keras and keras-ckpt once but runs no TensorFlow op (TF's
thread pools do not survive a fork); every operation on a hostile file runs
in a child forked from it, so a case costs a fork, not an interpreter start.
A child that runs past the timeout is killed and recorded as a `hang`, one
that dies (signal, `os._exit`, abort in a C library) as a `crash`; the
operations after it run in a fresh child.

Outcomes are plain dicts (they travel through a pipe and into JSON):
`{"status": "ok", ...}`, `{"status": "error", "type", "kind", "message",
"tb"}`, `{"status": "hang", "timeout_s"}` or `{"status": "crash", "signal" |
"exit_code"}`. `kind` is `ckpt` for keras-ckpt's `CorruptCheckpointError`
(and its subclass `ForeignFileError`), `mismatch` for its
`StateMismatchError`, `foreign` for anything else.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import resource
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

import keras_ckpt
import keras_ckpt.cli  # noqa: F401 - loaded once: forked CLI runs see one version
import keras_ckpt.inspect  # noqa: F401

CTX = multiprocessing.get_context("fork")
TRACEBACK = "Traceback (most recent call last)"


def library_fingerprint() -> dict:
    """Which keras-ckpt this run tests: git HEAD, modified files, sha256 of its sources."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(keras_ckpt.__file__)))
    digest = hashlib.sha256()
    package = os.path.join(root, "keras_ckpt")
    for folder, dirs, files in sorted(os.walk(package)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                                  timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"git_head": git("rev-parse", "HEAD").strip(),
            "modified": git("status", "--short", "keras_ckpt").splitlines(),
            "sources_sha256": digest.hexdigest()}


def classify_name(name: str) -> str:
    """`ckpt`, `mismatch` or `foreign` for an exception's class name (CLI stderr)."""
    if name in ("CorruptCheckpointError", "ForeignFileError"):
        return "ckpt"
    return "mismatch" if name == "StateMismatchError" else "foreign"


def classify(exc: BaseException) -> str:
    """`ckpt`, `mismatch` or `foreign` for an exception raised by keras-ckpt's API."""
    if isinstance(exc, keras_ckpt.CorruptCheckpointError):
        return "ckpt"
    return "mismatch" if isinstance(exc, keras_ckpt.StateMismatchError) else "foreign"


def error_outcome(exc: BaseException) -> dict:
    """The outcome of an operation that raised `exc` (type, kind, message, last frames)."""
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(lines[-4:]).rstrip().splitlines()[-6:]
    return {"status": "error", "type": type(exc).__name__, "kind": classify(exc),
            "message": str(exc)[:400], "tb": tail}


def guarded(fn: Callable[[], dict]) -> dict:
    """Runs `fn` and returns its outcome dict, or the error outcome of what it raised."""
    try:
        outcome = fn()
    except Exception as exc:  # noqa: BLE001 - every exception is a finding
        return error_outcome(exc)
    except SystemExit as exc:
        return {"status": "error", "type": "SystemExit", "kind": "foreign",
                "message": repr(exc.code), "tb": []}
    return {"status": "ok", **(outcome or {})}


def rss_mb(field: str = "VmHWM") -> float:
    """This process's resident memory (`VmRSS`) or its peak (`VmHWM`), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _limit_memory(extra_bytes: int | None) -> None:
    """Caps this process's address space at its current size plus `extra_bytes`."""
    if extra_bytes is None:
        return
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status
                    if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + extra_bytes, size + extra_bytes))


def _child(ops: list[str], call: Callable[[str], dict], conn, log_fd: int | None,
           mem_extra: int | None) -> None:
    if log_fd is not None:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
    _limit_memory(mem_extra)
    start_rss = round(rss_mb("VmRSS"), 1)
    for op in ops:
        start = time.perf_counter()
        outcome = guarded(lambda op=op: call(op))
        outcome["seconds"] = round(time.perf_counter() - start, 3)
        outcome["start_rss_mb"] = start_rss
        outcome["peak_rss_mb"] = round(rss_mb("VmHWM"), 1)
        outcome["children_peak_rss_mb"] = round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        conn.send((op, outcome))
    conn.close()


def _died(exitcode: int | None) -> dict:
    if exitcode is not None and exitcode < 0:
        return {"status": "crash", "signal": signal.Signals(-exitcode).name}
    return {"status": "crash", "exit_code": exitcode}


def run_ops(ops: list[str], call: Callable[[str], dict], timeout: float, *,
            one_per_child: bool = False, log_fd: int | None = None,
            mem_extra: int | None = None) -> dict[str, dict]:
    """Runs `call(op)` for each op in forked children; returns each op's outcome.

    Args:
        ops: operation names, run in order.
        call: runs one operation in the child, returns extra outcome fields.
        timeout: seconds each operation may take before it counts as a hang.
        one_per_child: a fresh child per operation (its peak RSS is its own).
        log_fd: where the children's stdout and stderr go (None: inherited).
        mem_extra: cap each child's address space at its size plus this.
    """
    results: dict[str, dict] = {}
    remaining = list(ops)
    while remaining:
        batch = remaining[:1] if one_per_child else list(remaining)
        reader, writer = CTX.Pipe(duplex=False)
        proc = CTX.Process(target=_child, args=(batch, call, writer, log_fd, mem_extra),
                           daemon=True)
        proc.start()
        writer.close()
        for op in batch:
            if not reader.poll(timeout):
                proc.kill()
                proc.join()
                results[op] = {"status": "hang", "timeout_s": timeout}
                remaining.remove(op)
                break
            try:
                name, outcome = reader.recv()
            except EOFError:
                proc.join()
                results[op] = _died(proc.exitcode)
                remaining.remove(op)
                break
            results[name] = outcome
            remaining.remove(name)
        proc.join(timeout)
        if proc.is_alive():  # finished its operations but does not exit
            proc.kill()
            proc.join()
        reader.close()
    return results


# ------------------------------------------------------------------ the command line
def _cli_in_fork(args: list[str], out: int, err: int) -> None:
    """In a forked grandchild: what `python -m keras_ckpt ARGS` does, then `_exit`."""
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    sys.argv = ["keras_ckpt", *args]
    code = 0
    try:
        runpy.run_module("keras_ckpt", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as the interpreter reports it
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait_pid(pid: int, timeout: float) -> int | None:
    """The wait status of `pid`, or None after killing it at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        select.select([], [], [], 0.005)


def run_cli(args: list[str], timeout: float, mode: str = "fork",
            mem_bytes: int | None = None) -> dict:
    """Runs `python -m keras_ckpt ARGS`: `{rc, stdout, stderr}` or `{hang}` / `{signal}`.

    `mode="subprocess"` starts a real interpreter; `"fork"` forks this process
    (keras-ckpt already imported) and runs the module's `__main__` the way the
    interpreter does: same exit codes, an uncaught exception printed as a
    traceback on stderr.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        if mode == "subprocess":
            def limit() -> None:
                if mem_bytes:
                    resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))

            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
            try:
                proc = subprocess.run([sys.executable, "-m", "keras_ckpt", *args], stdout=out,
                                      stderr=err, timeout=timeout, env=env, preexec_fn=limit)
            except subprocess.TimeoutExpired:
                return {"hang": True}
            rc = proc.returncode
            signaled = rc < 0
        else:
            pid = os.fork()
            if pid == 0:
                try:
                    _cli_in_fork(args, out.fileno(), err.fileno())
                finally:
                    os._exit(70)
            status = _wait_pid(pid, timeout)
            if status is None:
                return {"hang": True}
            signaled = os.WIFSIGNALED(status)
            rc = -os.WTERMSIG(status) if signaled else os.WEXITSTATUS(status)
        out.seek(0)
        err.seek(0)
        result = {"rc": rc, "stdout": out.read().decode("utf-8", "replace"),
                  "stderr": err.read().decode("utf-8", "replace")}
        if signaled:
            result["signal"] = signal.Signals(-rc).name
        return result
