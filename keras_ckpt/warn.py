"""keras-ckpt's warnings: they point at the user's line and start on a fresh line.

A warning from a callback is raised deep inside Keras's training loop; with
`stacklevel` it would point at keras-ckpt's or Keras's own code. `warn` points
it at the first frame outside keras-ckpt, Keras and the backends: the user's
`model.fit(...)` (or the constructor call). While Keras's progress bar is
drawing a line on the terminal, the warning starts on the next one.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import warnings

__all__ = ["warn"]

_LIBRARIES = tuple(os.sep + name + os.sep for name in (
    "keras", "tensorflow", "tf_keras", "jax", "jaxlib", "torch", "absl", "h5py"))
_HERE = os.path.dirname(os.path.abspath(__file__))
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"])


def _ours(filename: str) -> bool:
    """keras-ckpt's, a backend's or Python's own code (where no user writes a `fit`)."""
    return (filename.startswith((_HERE, _STDLIB, "<frozen"))
            or any(part in filename for part in _LIBRARIES))


def _walk():
    """(the user's frame, whether a Keras `fit` with a progress bar is running below it)."""
    frame, bar = sys._getframe(2), False
    while frame is not None and _ours(frame.f_code.co_filename):
        if frame.f_code.co_name == "fit" and os.sep + "keras" + os.sep in \
                frame.f_code.co_filename and frame.f_locals.get("verbose") in ("auto", 1):
            bar = True
        frame = frame.f_back
    return frame, bar


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message)`, pointing at the user's line, on a fresh terminal line."""
    frame, bar = _walk()
    if bar and _terminal():
        sys.stdout.write("\n")  # the bar draws its line without ending it
        sys.stdout.flush()
    if frame is None:
        warnings.warn(message, category, stacklevel=2)
        return
    module_globals = frame.f_globals
    warnings.warn_explicit(
        message, category, frame.f_code.co_filename, frame.f_lineno,
        module=module_globals.get("__name__", "<string>"),
        registry=module_globals.setdefault("__warningregistry__", {}),
        module_globals=module_globals)


def _terminal() -> bool:
    """Whether Keras draws its progress bar in place (a terminal, interactive logging)."""
    keras = sys.modules.get("keras")
    if keras is None or not getattr(sys.stdout, "isatty", lambda: False)():
        return False
    return bool(keras.config.is_interactive_logging_enabled())
