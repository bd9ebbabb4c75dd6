"""Steps are what `fit` ran: with gradient accumulation, batches count, not updates."""

from __future__ import annotations

import os

import keras
import pytest
from conftest import make_data, make_model
from test_preemption import Failing, same_state

import keras_ckpt
from keras_ckpt import manager

X, Y = make_data(96, seed=7)  # 6 steps of 16 per epoch


def accumulating(seed=3):
    return make_model(seed=seed, metrics=["mae"],
                      optimizer=keras.optimizers.Adam(0.01, gradient_accumulation_steps=4))


def fit(model, callbacks, epochs=3, **kwargs):
    return model.fit(X, Y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
                     callbacks=callbacks, **kwargs)


class StopAfter(keras.callbacks.Callback):
    """Raises after `steps` training batches (a crash between two checkpoints)."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.seen = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.steps:
            raise RuntimeError("crash")


def test_save_freq_counts_batches_with_gradient_accumulation(tmp_path):
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}-{batch}.keras"), save_freq=3)
    fit(accumulating(), [cb], epochs=2)
    saved = manager.list_checkpoints(tmp_path)
    assert [c.global_step for c in saved] == [3, 6, 9, 12]  # as Keras's: every 3 batches
    assert [(c.epoch, c.step) for c in saved] == [(0, 3), (0, 6), (1, 3), (1, 6)]


def test_a_resume_mid_accumulation_is_bitwise_equal(tmp_path):
    template = str(tmp_path / "c-{epoch}-{batch}.keras")
    straight = accumulating()
    reference = fit(straight, [], epochs=3)
    crashed = accumulating()
    with pytest.raises(RuntimeError, match="crash"):
        fit(crashed, [keras_ckpt.ModelCheckpoint(template, save_freq=3), StopAfter(11)])
    newest = manager.list_checkpoints(tmp_path)[-1]
    assert (newest.epoch, newest.step, newest.global_step) == (1, 3, 9)  # mid-accumulation
    resumed = accumulating()
    cb = keras_ckpt.ModelCheckpoint(template, save_freq=3, resume=True)
    history = fit(resumed, [cb])
    assert cb.resumed_from.global_step == 9
    same_state(straight, resumed)
    assert history.history == reference.history


def test_save_on_exception_with_gradient_accumulation_saves_the_last_step(tmp_path):
    x, y = make_data(n=64)
    model = make_model(seed=4, metrics=["mae"],
                       optimizer=keras.optimizers.Adam(0.01, gradient_accumulation_steps=2))
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}.keras"),
                                            save_on_exception=True)
    data = Failing(x, y, fail=(1, 2))
    done = []
    count = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: done.append(1))
    with pytest.raises(Exception, match="bad record"):
        model.fit(data, epochs=3, verbose=0, callbacks=[data.feed(), checkpoint, count])
    newest = manager.list_checkpoints(tmp_path)[-1]
    assert (newest.epoch, newest.epoch_complete, newest.global_step) == (1, False, len(done))
    assert not os.path.exists(tmp_path / ".keras_ckpt.lock")
