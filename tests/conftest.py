"""Shared fixtures: quiet TF, tiny deterministic models and generated data; the session's
fork servers (tests/forkserver.py), the shared reference runs, and the `realtime` lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("PYTHONHASHSEED", "0")

# A shell starts a background job with SIGINT ignored, and Python then keeps it
# ignored: the tests of Ctrl-C (ours and the children's, which inherit it) need
# the handler an interactive `python` has.
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import forkserver  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Keras reads its backend from KERAS_BACKEND, set above. Keras itself is first
# imported by the test modules (tests/tiny.py: the models), so that pytest-xdist's
# controller, which runs no test, does not spend seconds importing TensorFlow.
BACKEND = os.environ["KERAS_BACKEND"]

# Keras's torch backend refuses steps_per_execution > 1 (keras/src/backend/torch/trainer.py).
needs_steps_per_execution = pytest.mark.skipif(
    BACKEND == "torch", reason="Keras's torch backend has no steps_per_execution > 1")


def __getattr__(name):
    """`EpochFed` and `make_model` live in tests/tiny.py (they import Keras)."""
    if name in ("EpochFed", "make_model"):
        import tiny

        return getattr(tiny, name)
    raise AttributeError(name)


def make_data(n: int = 64, features: int = 4, classes: int = 0, seed: int = 0):
    """Generated regression (classes=0) or classification data, deterministic."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    w = rng.normal(size=(features, 1)).astype("float32")
    if classes:
        y = (x @ w > 0).astype("int32").ravel() % classes
    else:
        y = (x @ w + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


@pytest.fixture
def data():
    return make_data()


@pytest.fixture
def classification_data():
    return make_data(classes=2)


# ------------------------------------------------------------------ the session's machinery
def pytest_collection_modifyitems(config, items):
    """The longest tests first; starts the fork server's imports early when one will use it.

    pytest-xdist hands tests out in this order as its workers free up: with the
    nested sessions and the real-process tests first, the short ones fill in at
    the end and the workers finish together. (The order within each group is
    the collected one; every worker collects the same.)
    """
    items.sort(key=lambda item: 0 if item.get_closest_marker("nested") else
               1 if item.get_closest_marker("slow") else 2)
    if not config.option.collectonly and any(
            getattr(item.module, "forkserver", None) is forkserver for item in items
            if item.get_closest_marker("slow")):
        forkserver.prestart(BACKEND)


def pytest_configure(config):
    # xdist's controller: name the run, to remove the workers' lock files at its end.
    if (not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None)
            and getattr(config.option, "testrunuid", "") is None):
        import uuid

        config.option.testrunuid = uuid.uuid4().hex
    _share_jax_compilations(config)


# JAX compiles the same tiny train steps again in every child process: the
# session's processes share one persistent compilation cache (set before any
# fork server or nested session starts; they inherit it), removed at the end.
# A cached executable is the one the compiler would produce, so the runs are
# the same bitwise (the fork server's canary compares a fresh process with a
# forked one, both using it).
JAX_CACHE = "JAX_COMPILATION_CACHE_DIR"


def _share_jax_compilations(config):
    if os.environ.get(JAX_CACHE):
        return  # a nested session: its parent's cache
    run = getattr(config.option, "testrunuid", None) or os.environ.get("PYTEST_XDIST_TESTRUNUID")
    path = os.path.join(tempfile.gettempdir(),
                        f"keras-ckpt-tests-{run or os.getpid()}.jax-cache")
    os.environ.update({JAX_CACHE: path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    config._keras_ckpt_jax_cache = path if not hasattr(config, "workerinput") else None


def pytest_sessionfinish(session, exitstatus):
    import shutil

    forkserver.shutdown()  # each server kills and reaps what is left, then exits
    run = getattr(session.config.option, "testrunuid", None)
    if run and not hasattr(session.config, "workerinput"):
        for suffix in (".gate", ".lock"):
            path = os.path.join(tempfile.gettempdir(), f"keras-ckpt-tests-{run}{suffix}")
            if os.path.exists(path):
                os.remove(path)
    if getattr(session.config, "_keras_ckpt_jax_cache", None):
        shutil.rmtree(session.config._keras_ckpt_jax_cache, ignore_errors=True)


# Tests marked `realtime` measure real time (or need an idle machine): each runs
# alone. With pytest-xdist, every other test holds a shared lock while it runs
# and a `realtime` test an exclusive one; a gate taken first keeps the other
# worker from starting new tests while a `realtime` test waits for its turn.
# A test marked `nested` runs a pytest session of its own (tests/test_backends.py):
# it takes no lock, its session's tests do (LOCK_BASE tells them where).
LOCK_BASE = "KERAS_CKPT_TEST_LOCK_BASE"


def lock_base() -> str | None:
    """Where this session's realtime locks are; None when tests run one at a time."""
    if os.environ.get(LOCK_BASE):
        return os.environ[LOCK_BASE]
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    return os.path.join(tempfile.gettempdir(), f"keras-ckpt-tests-{run}") if run else None


@pytest.fixture(autouse=True)
def _realtime_runs_alone(request):
    base = lock_base()
    if base is None or request.node.get_closest_marker("nested") is not None:
        yield
        return
    alone = request.node.get_closest_marker("realtime") is not None
    with open(base + ".gate", "a") as gate, open(base + ".lock", "a") as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


# A fit stopped in the middle of an epoch leaves Keras's epoch iterator in a
# reference cycle, so its tf.data iterator dies only at a later full garbage
# collection, in whatever test runs then. Destroying an iterator waits for its
# autotuning thread, which sleeps longer the older the iterator is: such
# collections stalled tests 8-35 s (seen with py-spy: `~RootDataset::Iterator`
# under `EagerTensor_dealloc`, in a collection). Collecting right after the
# test that left one keeps each of those waits short. What survives it is then
# frozen, so the next collection walks only what later tests made: without
# that, each walked every object the session had made so far (0.8 s each, 27 s
# of one worker's time in a full run). Frozen objects are still freed by their
# reference counts; only a cycle among them would be kept.
_LIVE_ITERATORS = None


def _track_tf_iterators():
    global _LIVE_ITERATORS
    if _LIVE_ITERATORS is None and "tensorflow" in sys.modules:
        import weakref

        from tensorflow.python.data.ops import iterator_ops

        _LIVE_ITERATORS = weakref.WeakSet()
        original = iterator_ops.OwnedIterator.__init__

        def init(self, *args, **kwargs):
            original(self, *args, **kwargs)
            _LIVE_ITERATORS.add(self)

        iterator_ops.OwnedIterator.__init__ = init
    return _LIVE_ITERATORS


@pytest.fixture(autouse=True, scope="session")
def _freeze_the_imports():
    """The imports (Keras, the backend) live for the whole session: collections need not
    walk them again. Frozen once, before the first test (after collection imported them)."""
    import gc

    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _collect_left_iterators():
    _track_tf_iterators()
    yield
    live = _track_tf_iterators()
    if live:
        import gc

        gc.collect()
        gc.freeze()


# ------------------------------------------------------------------ shared reference runs
# What makes an uninterrupted `keras_ckpt.demo_train` run's result: the options
# below (data, epochs, steps per execution, early stopping, budget, poison...)
# and the backend. How often it saves and where its best weights live do not
# (that is the library's promise, checked by every comparison made against one).
NOT_DETERMINING = {"--save-freq": 1, "--best-on-disk": 0}


def reference_key(args) -> tuple:
    args, key, i = [str(a) for a in args], [], 0
    while i < len(args):
        if args[i] in NOT_DETERMINING:
            i += 1 + NOT_DETERMINING[args[i]]
            continue
        key.append(args[i])
        i += 1
    return (BACKEND, *key)


def load_demo_result(path):
    """A demo_train result: (arrays, outcome)."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "history"}
        outcome = json.loads(data["history"].tobytes())
    return arrays, outcome


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """`reference_run(*args)`: the result of an uninterrupted demo_train run, once a session.

    Keyed by `reference_key(args)`; the run is a forked child of the fork server.
    With pytest-xdist the workers share the runs (a directory per key, under a
    lock). Returns (arrays, outcome), fresh copies for each caller.
    """
    import hashlib

    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent  # the root the workers' temporary directories share
    root = base / "reference-runs"
    root.mkdir(exist_ok=True)

    def get(*args):
        key = reference_key(args)
        directory = root / hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
        directory.mkdir(exist_ok=True)
        out = directory / "result.npz"
        with open(directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not out.exists():
                env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}
                proc = forkserver.run([sys.executable, "-m", "keras_ckpt.demo_train",
                                       str(directory / "run"), str(directory / "tmp.npz"),
                                       *key[1:]],
                                      capture_output=True, text=True, env=env, timeout=300)
                assert proc.returncode == 0, proc.stderr[-3000:]
                os.replace(directory / "tmp.npz", out)
                (directory / "key.json").write_text(json.dumps(key))
        return load_demo_result(out)

    return get
