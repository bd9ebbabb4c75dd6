"""What a user reads: warnings point at the user's own line and never garble the progress bar."""

from __future__ import annotations

import io
import sys
import warnings

import numpy as np
import pytest
from conftest import make_model

import keras_ckpt

X = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")


def fit(model, callbacks, verbose=0):
    model.fit(X, X[:, :1], batch_size=8, epochs=1, verbose=verbose,
              validation_data=(X[:8], X[:8, :1]), callbacks=callbacks)


def test_warnings_point_at_the_line_of_the_users_script(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"), mode="bogus",
                                                monitor="val_acc", save_best_only=True)
        line_of_construction = sys._getframe().f_lineno - 2
        fit(make_model(), [checkpoint])
    ours = {str(w.message)[:40]: (w.filename, w.lineno) for w in caught
            if "ModelCheckpoint" in str(w.message)}
    assert ours[next(k for k in ours if "mode 'bogus'" in k)] == (__file__, line_of_construction)
    at_fit = ours[next(k for k in ours if "val_acc" in k)]  # raised inside Keras's loop
    assert at_fit[0] == __file__ and at_fit[1] == fit.__code__.co_firstlineno + 1


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("verbose", [1, 0])
def test_a_warning_during_a_fit_with_a_progress_bar_starts_on_a_fresh_line(tmp_path,
                                                                            monkeypatch, verbose):
    terminal, shown = Terminal(), []
    monkeypatch.setattr(sys, "stdout", terminal)
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c.keras"), monitor="val_acc",
                                            save_best_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *args, **kwargs: shown.append(
            terminal.getvalue()) if "ModelCheckpoint" in str(message) else None
        fit(make_model(), [checkpoint], verbose=verbose)
    assert shown, "no warning was shown"
    if verbose:  # the bar draws its line in place: the warning comes after a line end
        assert "1/4" in terminal.getvalue() and all(text.endswith("\n") for text in shown)
    else:  # no bar: no blank line
        assert terminal.getvalue() == ""


def test_a_resume_says_so_in_one_line_at_the_default_verbosity(tmp_path, capsys):
    import keras
    from test_step_counting import StopAfter

    template = str(tmp_path / "c-{epoch}-{batch}.keras")

    def run(*callbacks):
        fit(make_model(), [keras_ckpt.ModelCheckpoint(template, resume=True, save_freq=3),
                           *callbacks])

    with pytest.raises(RuntimeError, match="crash"):
        run(StopAfter(3))
    capsys.readouterr()
    run()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines == [f"ModelCheckpoint: resumed from {tmp_path / 'c-1-3.keras'}; continuing at "
                     "epoch 1, step 4 (3 trained batches skipped)."]
    keras.config.disable_interactive_logging()  # Keras's own switch silences it
    try:
        run()
    finally:
        keras.config.enable_interactive_logging()
    assert capsys.readouterr().out == ""
