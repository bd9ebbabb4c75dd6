"""Keras's own tests of the callbacks we replace, run against keras-ckpt's classes.

The test files are copied at test time from the installed keras package (never
vendored) into a temporary directory, with a small pytest plugin (a conftest)
that, before any of them is imported:

- points `keras.src.callbacks.<Name>`, `keras.callbacks.<Name>` and the
  defining modules' names at keras-ckpt's `EarlyStopping`, `ModelCheckpoint`
  and `TerminateOnNaN`, and checks each collected test module's globals;
- registers Keras's markers (`requires_trainable_backend`, skipped on the
  numpy backend as Keras's repository conftest does), which the installed
  package does not ship;
- counts the instantiations of keras-ckpt's classes and of Keras's originals,
  and writes them, with the `keras_ckpt` module file, into a report.

Keras's test logic is not edited. They run in one pytest subprocess on the
current backend.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap

import forkserver
import keras
import keras.src.callbacks
import pytest

import keras_ckpt

NAMES = ("EarlyStopping", "ModelCheckpoint", "TerminateOnNaN")
KERAS_TESTS = ("early_stopping_test.py", "model_checkpoint_test.py", "terminate_on_nan_test.py")

PLUGIN = textwrap.dedent('''
    """Substitutes keras-ckpt's callbacks for Keras's in Keras's own tests."""

    import collections
    import functools
    import json
    import os
    import sys

    import keras
    import keras.callbacks
    import keras.src.callbacks
    import pytest

    import keras_ckpt

    NAMES = ("EarlyStopping", "ModelCheckpoint", "TerminateOnNaN")
    OURS = {name: getattr(keras_ckpt, name) for name in NAMES}
    ORIGINALS = {name: getattr(keras.src.callbacks, name) for name in NAMES}
    COUNTS = collections.Counter()


    def _counting(cls, key):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            COUNTS[key] += 1
            init(self, *args, **kwargs)

        cls.__init__ = __init__


    for _name in NAMES:
        _counting(OURS[_name], "ours." + _name)
        _counting(ORIGINALS[_name], "keras." + _name)
        # The package, the public API, and the module defining the class (a
        # test may import any of them).
        for _module in (keras.src.callbacks, keras.callbacks,
                        sys.modules[ORIGINALS[_name].__module__]):
            setattr(_module, _name, OURS[_name])


    def pytest_configure(config):
        config.addinivalue_line(
            "markers", "requires_trainable_backend: needs a backend that trains (not numpy)")


    def pytest_collection_modifyitems(config, items):
        skip = pytest.mark.skip(reason="the numpy backend cannot train")
        modules = {}
        for item in items:
            if keras.backend.backend() == "numpy" and "requires_trainable_backend" in item.keywords:
                item.add_marker(skip)
            modules[item.module.__name__] = item.module
        for module in modules.values():
            for _name in NAMES:
                # `from keras.src.callbacks import X` bound at import, and
                # `callbacks.X` looked up at run time: both must be ours.
                if _name in vars(module):
                    assert getattr(module, _name) is OURS[_name], (module, _name)
                callbacks = vars(module).get("callbacks")
                if callbacks is not None:
                    assert getattr(callbacks, _name) is OURS[_name], (module, _name)
        COUNTS["modules"] = len(modules)


    def pytest_sessionfinish(session, exitstatus):
        with open(os.environ["KERAS_CKPT_PARITY_REPORT"], "w") as f:
            json.dump({"counts": dict(COUNTS), "keras_ckpt": keras_ckpt.__file__,
                       "backend": keras.backend.backend()}, f)
''')


def keras_callbacks_dir() -> str:
    """Where the installed keras package keeps its callbacks and their tests."""
    return os.path.dirname(keras.src.callbacks.__file__)


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    """Runs Keras's three test files once, in one subprocess; returns (result, report)."""
    source = keras_callbacks_dir()
    missing = [n for n in KERAS_TESTS if not os.path.exists(os.path.join(source, n))]
    if missing:
        pytest.skip(f"this keras ({keras.__version__}) ships no {', '.join(missing)}")
    tmp = tmp_path_factory.mktemp("keras_parity")
    for name in KERAS_TESTS:
        shutil.copy(os.path.join(source, name), tmp / name)
    (tmp / "conftest.py").write_text(PLUGIN)
    (tmp / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(keras_ckpt.__file__)))
    report = tmp / "report.json"
    env = {**os.environ,
           "KERAS_BACKEND": keras.backend.backend(),
           "PYTHONPATH": os.pathsep.join(
               [root, *filter(None, [os.environ.get("PYTHONPATH")])]),
           "KERAS_CKPT_PARITY_REPORT": str(report)}
    for name in [k for k in env if k.startswith("PYTEST_")]:
        env.pop(name)  # a session of its own, not one of this run's xdist workers
    # A child of the backend's fork server (Keras already imported there).
    result = forkserver.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-W", "ignore::DeprecationWarning", "-rfEs", str(tmp)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    data = json.loads(report.read_text()) if report.exists() else None
    return result, data


def test_keras_own_callback_tests_pass_with_our_classes(parity_run):
    result, _ = parity_run
    assert result.returncode == 0, (
        f"Keras's callback tests fail with keras-ckpt's classes:\n{result.stdout[-20000:]}\n"
        f"{result.stderr[-5000:]}")
    assert " passed" in result.stdout


def test_the_classes_keras_tests_instantiate_are_ours(parity_run):
    result, report = parity_run
    assert report is not None, result.stdout[-5000:] + result.stderr[-5000:]
    counts = report["counts"]
    assert report["keras_ckpt"] == keras_ckpt.__file__  # this checkout, not another
    assert report["backend"] == keras.backend.backend()
    assert counts["modules"] == len(KERAS_TESTS)
    for name in NAMES:
        assert counts.get(f"ours.{name}", 0) > 0, counts
        assert counts.get(f"keras.{name}", 0) == 0, counts
