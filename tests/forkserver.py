"""Child processes without the import tax: a pre-imported fork server per Keras backend.

Most of the suite's child processes spend ~5 s importing TensorFlow and Keras
and a few milliseconds training. The server imports keras (with its backend),
h5py, numpy and keras_ckpt once, runs no backend op, and then forks one real
process per request: the child has its own pid, the test can SIGKILL it or
send it signals, and its exit status is the one a fresh `python` would have
(the server reaps it and reports the raw wait status). The child's stdin,
stdout and stderr are the test's pipes or files, passed over a Unix socket.

Use it like `subprocess` (the same arguments, `[sys.executable, ...]`):

    from forkserver import Popen, run
    proc = run([sys.executable, "-m", "keras_ckpt.demo_train", ...],
               capture_output=True, text=True, env=env, timeout=300)
    child = Popen([sys.executable, "tests/some_child.py", ...], stdout=subprocess.PIPE)

`sys.executable -m MODULE`, `sys.executable SCRIPT.py` and `sys.executable -c
CODE` are understood. The child runs under the environment it is given, but
what is read at import time cannot change after the fork: the backend
(`KERAS_BACKEND` picks the server), `PYTHONHASHSEED` and `TF_CPP_MIN_LOG_LEVEL`
must be what the server started with (a mismatch is an error, not a silent
difference). Environment read later (TF_CONFIG, XLA_FLAGS before JAX's first
device query, logical TensorFlow devices) is set in the child as usual.

Forking after importing TensorFlow, JAX or torch is safe only while no
backend runtime or thread pool has started: the server checks that there is
one Python thread and that TensorFlow's eager context, JAX's backends and
torch's thread pools are not initialized before it serves (`SERVER_INFO`).
The only native threads then are OpenBLAS's idle pools, which OpenBLAS stops
around `fork()` itself. The servers stop with the pytest session (`shutdown`,
called from conftest): each kills and reaps what is still running; no zombie
is left behind (`children_alive` is the test hook).
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

THIS = os.path.abspath(__file__)
HERE = os.path.dirname(THIS)
ROOT = os.path.dirname(HERE)
FIXED_AT_IMPORT = ("KERAS_BACKEND", "PYTHONHASHSEED", "TF_CPP_MIN_LOG_LEVEL")
DEFAULTS = {"KERAS_BACKEND": "tensorflow", "PYTHONHASHSEED": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}


# ====================================================================== the server
def _preimport() -> None:
    import importlib.util

    import h5py  # noqa: F401
    import keras  # noqa: F401
    import numpy  # noqa: F401

    # Where installed, on every backend: the tests' tf.data inputs and TF-only URL
    # schemes use it (keras-ckpt itself needs it only when Keras runs on it).
    if importlib.util.find_spec("tensorflow") is not None:
        import tensorflow  # noqa: F401

    import keras_ckpt  # noqa: F401
    import keras_ckpt.data  # noqa: F401
    import keras_ckpt.manager  # noqa: F401

    backend = os.environ["KERAS_BACKEND"]
    if backend != "tensorflow":
        __import__(backend)


def _fork_safety() -> dict:
    """What makes forking safe now; raises if a runtime or a thread has started."""
    import keras

    problems = []
    python_threads = [t.name for t in threading.enumerate()]
    if len(python_threads) != 1:
        problems.append(f"Python threads: {python_threads}")
    if "tensorflow" in sys.modules:
        from tensorflow.python.eager import context

        if context.context()._context_handle is not None:
            problems.append("TensorFlow's eager context is initialized")
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge._backends:
            problems.append(f"JAX backends initialized: {list(xla_bridge._backends)}")
    info = {"backend": keras.backend.backend(), "python_threads": python_threads,
            "native_threads": len(os.listdir("/proc/self/task")), "pid": os.getpid(),
            "env": {k: os.environ.get(k) for k in FIXED_AT_IMPORT}}
    if problems:
        raise RuntimeError("forking would not be safe: " + "; ".join(problems))
    return info


def _recv_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    if len(data) < 4:
        raise EOFError("no request")
    (size,) = struct.unpack("!I", data[:4])
    data = data[4:]
    while len(data) < size:
        more = conn.recv(size - len(data))
        if not more:
            raise EOFError("truncated request")
        data += more
    return json.loads(data), fds


def _serve(listener: socket.socket):
    """Accepts requests until told to stop; returns (in the forked child only) its request."""
    children: dict[int, socket.socket] = {}
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "wake")
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "control")

    def reap():
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"status": status}).encode() + b"\n")
                except OSError:
                    pass  # the test stopped listening; the child is reaped all the same
                conn.close()

    while True:
        for key, _ in selector.select(timeout=1.0):
            if key.data == "control":
                if not os.read(key.fd, 1024):  # the test session ended (or died)
                    for pid in list(children):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    while children:
                        pid, status = os.waitpid(-1, 0)
                        conn = children.pop(pid, None)
                        if conn is not None:
                            try:
                                conn.sendall(json.dumps({"status": status}).encode() + b"\n")
                            except OSError:
                                pass
                            conn.close()
                    # Every child is reaped: nothing is left to finalize (tearing
                    # TensorFlow, JAX or torch down takes the interpreter 1-2 s).
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(0)
            elif key.data == "wake":
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
            else:
                conn, _ = listener.accept()
                try:
                    request, fds = _recv_request(conn)
                except (OSError, EOFError, ValueError):
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                started_r, started_w = os.pipe()
                pid = os.fork()
                if pid == 0:  # the child: leave the server behind
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    # SIGINT as a fresh python started by the test would have it.
                    signal.signal(signal.SIGINT, signal.SIG_IGN if request.get("sigint_ignored")
                                  else signal.default_int_handler)
                    if request.get("new_session"):
                        os.setsid()  # start_new_session=True: its own session and group
                    os.close(started_r)
                    os.write(started_w, b"1")  # set up: the test may now signal its group
                    os.close(started_w)
                    selector.close()
                    for fd in (wake_r, wake_w):
                        os.close(fd)
                    for other in children.values():
                        other.close()
                    listener.close()
                    conn.close()
                    return request, fds
                os.close(started_w)
                os.read(started_r, 1)  # the child has its session before anyone knows its pid
                os.close(started_r)
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        reap()


def _reopen_stdio(fds: list[int]) -> None:
    """Makes the passed descriptors this process's 0, 1 and 2, with fresh Python streams."""
    for target, fd in enumerate(fds):
        if fd != target:
            os.dup2(fd, target)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    import io

    encoding = sys.stdout.encoding

    def stream(fd, mode, **kwargs):
        raw = io.FileIO(fd, mode, closefd=False)
        buffered = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding=encoding, **kwargs)

    sys.stdin = sys.__stdin__ = stream(0, "r")
    sys.stdout = sys.__stdout__ = stream(1, "w", line_buffering=os.isatty(1))
    sys.stderr = sys.__stderr__ = stream(2, "w", errors="backslashreplace", line_buffering=True)


def _run_child(request: dict, fds: list[int]) -> None:
    """Runs the request's command line in this (forked) process, as `python ARGS` would."""
    import runpy
    import types

    import numpy as np

    _reopen_stdio(fds)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    np.random.seed()  # a fresh process seeds NumPy's global generator from the OS
    args = request["argv"][1:]
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        sys.path[0] = ""
        main = types.ModuleType("__main__")
        main.__builtins__ = __builtins__
        sys.modules["__main__"] = main
        exec(compile(args[1], "<string>", "exec"), main.__dict__)
    else:
        path = os.path.abspath(args[0])
        sys.argv = [args[0], *args[1:]]
        sys.path[0] = os.path.dirname(path)
        runpy.run_path(path, run_name="__main__")


def _server_main(socket_path: str) -> None:
    _preimport()
    info = _fork_safety()
    # What the imports made lives as long as the children: their garbage
    # collections need not walk it again and again (nor touch its pages,
    # which then stay shared with the server).
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    # A Ctrl-C to the test's process group is the test session's to handle: the
    # server ends when the session closes its stdin (and then ends its children).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("ready " + json.dumps(info), flush=True)
    request, fds = _serve(listener)
    _child_main(request, fds)


def _exit_status(error: SystemExit) -> int:
    code = error.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _child_main(request: dict, fds: list[int]) -> None:
    """Runs the request, then ends the process the way the interpreter would.

    An uncaught exception goes to `sys.excepthook` (exit status 1); SystemExit
    gives its status; KeyboardInterrupt ends the process by SIGINT. Then, as in
    `Py_FinalizeEx`: the non-daemon threads are joined, the `atexit` hooks run,
    stdout and stderr are flushed, and the process exits without tearing down
    its modules (over a second with TensorFlow loaded, and nothing a test sees).
    """
    import atexit

    status, interrupted = 0, False
    try:
        _run_child(request, fds)
    except SystemExit as e:
        status = _exit_status(e)
    except BaseException as e:  # noqa: BLE001 - reported as python reports it
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (THIS, "<frozen runpy>"):
            tb = tb.tb_next  # the fork server's own frames are not the child's
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        status, interrupted = 1, isinstance(e, KeyboardInterrupt)
    try:
        threading._shutdown()
    except BaseException:  # noqa: BLE001
        pass
    try:
        atexit._run_exitfuncs()
    except SystemExit as e:
        status = _exit_status(e)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


# ====================================================================== the client
class _Server:
    def __init__(self, backend: str):
        self.backend = backend
        self.directory = tempfile.mkdtemp(prefix=f"keras-ckpt-forkserver-{backend}-")
        self.socket_path = os.path.join(self.directory, "socket")
        self.log_path = os.path.join(self.directory, "server.log")
        # The keras_ckpt this process would import (found, not imported), first on the path.
        import importlib.util

        package = os.path.dirname(os.path.dirname(importlib.util.find_spec("keras_ckpt").origin))
        env = {**os.environ, **DEFAULTS, "KERAS_BACKEND": backend,
               "PYTHONPATH": os.pathsep.join(
                   p for p in (package, os.environ.get("PYTHONPATH")) if p)}
        env.pop("TF_CONFIG", None)
        env.pop("XLA_FLAGS", None)
        self.env = {k: env[k] for k in FIXED_AT_IMPORT}
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", self.socket_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env, cwd=ROOT)
        self.info: dict | None = None

    def ready(self) -> dict:
        if self.info is None:
            line = self.process.stdout.readline()
            if not line.startswith(b"ready "):
                self.process.wait()
                raise RuntimeError(f"the {self.backend} fork server did not start:\n"
                                   + open(self.log_path).read()[-4000:])
            self.info = json.loads(line[len(b"ready "):])
        return self.info

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # EOF: kill and reap the children, exit
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.log.close()
        for name in (self.socket_path, self.log_path):
            if os.path.exists(name):
                os.remove(name)
        os.rmdir(self.directory)


class _Remote:
    """A server another process started, reached through its socket (see `address`)."""

    def __init__(self, backend: str, known: dict):
        self.backend, self.socket_path, self.info = backend, known["socket"], known["info"]
        self.env = self.info["env"]
        self.process = None

    def ready(self) -> dict:
        return self.info

    def stop(self) -> None:
        pass  # its owner stops it


ADDRESS = "KERAS_CKPT_FORKSERVER"
_servers: dict[str, _Server | _Remote] = {}
_lock = threading.Lock()


def server(backend: str = "tensorflow") -> _Server | _Remote:
    """The session's fork server for `backend`, started on first use.

    In a process whose environment has `address(backend)` (a child that starts
    children of its own), that server is used instead of starting another.
    """
    found = _get(backend)
    found.ready()
    return found


def _get(backend: str) -> _Server | _Remote:
    with _lock:
        if backend not in _servers:
            known = json.loads(os.environ.get(ADDRESS, "{}")).get(backend)
            _servers[backend] = _Server(backend) if known is None else _Remote(backend, known)
        return _servers[backend]


def address(backend: str = "tensorflow") -> dict[str, str]:
    """Environment that lets a child's own children come from this session's server."""
    found = server(backend)
    return {ADDRESS: json.dumps({backend: {"socket": found.socket_path, "info": found.info}})}


def prestart(backend: str = "tensorflow") -> None:
    """Starts a server's imports in the background, so the first request does not wait."""
    _get(backend)


def shutdown() -> None:
    """Stops every server of this process (each kills and reaps its remaining children)."""
    with _lock:
        servers = list(_servers.values())
        _servers.clear()
    for s in servers:
        s.stop()


def _fd_or_inherited(fd: int, default: int, stack: list[int]) -> int:
    if fd != -1:
        return fd
    try:
        os.fstat(default)
        return default
    except OSError:
        null = os.open(os.devnull, os.O_RDWR)
        stack.append(null)
        return null


class Popen(subprocess.Popen):
    """`subprocess.Popen` whose process is forked by the backend's fork server.

    Everything but starting and waiting is subprocess's own code: pipes,
    `communicate`, timeouts, `send_signal`/`kill` (to the real pid).
    """

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env,
                       startupinfo, creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite,
                       errread, errwrite, restore_signals, gid, gids, uid, umask,
                       start_new_session, *rest):
        args = [os.fspath(a) for a in args]
        if shell or preexec_fn is not None or pass_fds or not args or args[0] != sys.executable:
            raise ValueError("the fork server runs `[sys.executable, ...]` command lines only")
        env = dict(os.environ if env is None else env)
        backend = env.get("KERAS_BACKEND", "tensorflow")
        found = server(backend)
        for name in FIXED_AT_IMPORT:
            if name == "KERAS_BACKEND":
                continue
            if env.get(name, found.env[name]) != found.env[name]:
                raise ValueError(f"{name}={env.get(name)!r}: the {backend} fork server was "
                                 f"started with {found.env[name]!r}, fixed at import")
            env[name] = found.env[name]
        env["KERAS_BACKEND"] = backend
        if gid is not None or gids is not None or uid is not None or umask >= 0 or (
                rest and rest[0] not in (None, -1)):
            raise ValueError("the fork server does not change users, umask or process group")
        request = json.dumps({"argv": args, "env": env, "new_session": bool(start_new_session),
                              "sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
                              "cwd": os.path.abspath(cwd or os.getcwd())}).encode()
        opened: list[int] = []
        fds = [_fd_or_inherited(p2cread, 0, opened), _fd_or_inherited(c2pwrite, 1, opened),
               _fd_or_inherited(errwrite, 2, opened)]
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(found.socket_path)
            socket.send_fds(conn, [struct.pack("!I", len(request)) + request], fds)
            self._conn, self._buffer = conn, b""
            self.pid = json.loads(self._line(None))["pid"]
        except BaseException:
            conn.close()
            raise
        finally:
            for fd in opened:
                os.close(fd)
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
        self._child_created = True
        self.forked = True

    def _line(self, timeout: float | None) -> bytes | None:
        """The server's next reply line; None if none came within `timeout`."""
        import select

        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._conn], [], [], left)
            if not ready:
                return None
            data = self._conn.recv(4096)
            if not data:
                raise RuntimeError("the fork server went away before the child ended")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _status(self, timeout: float | None) -> int | None:
        """The raw wait status, once the server has reaped the child; None if not yet."""
        line = self._line(timeout)
        if line is None:
            return None
        self._conn.close()
        return json.loads(line)["status"]

    def _internal_poll(self, _deadstate=None, _waitpid=None, _WNOHANG=None, _ECHILD=None):
        if self.returncode is None and getattr(self, "_conn", None) is not None:
            try:
                status = self._status(0)
            except (OSError, ValueError, RuntimeError):
                if _deadstate is not None:
                    self.returncode = _deadstate
                return self.returncode
            if status is not None:
                self._handle_exitstatus(status)
        return self.returncode

    def _wait(self, timeout):
        if self.returncode is not None:
            return self.returncode
        status = self._status(timeout)
        if status is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        self._handle_exitstatus(status)
        return self.returncode


def run(*popenargs, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """`subprocess.run`, with the process from the fork server."""
    if capture_output:
        kwargs["stdout"] = subprocess.PIPE
        kwargs["stderr"] = subprocess.PIPE
    with Popen(*popenargs, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        except BaseException:
            process.kill()
            raise
        retcode = process.poll()
        if check and retcode:
            raise subprocess.CalledProcessError(retcode, process.args, output=stdout,
                                                stderr=stderr)
    return subprocess.CompletedProcess(process.args, retcode, stdout, stderr)


def children_alive(backend: str = "tensorflow") -> list[int]:
    """Pids of the server's children still existing (zombies included), for the tests."""
    pid = server(backend).info["pid"]
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and int(entry) != os.getpid():  # not the caller itself
                alive.append(int(entry))
    return alive


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _server_main(sys.argv[2])
