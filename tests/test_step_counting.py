"""Steps are what `fit` ran: with gradient accumulation, batches count, not updates."""

from __future__ import annotations

import os

import keras
import pytest
from conftest import make_data, make_model, needs_steps_per_execution
from test_preemption import fit_until_a_bad_record, same_state

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
    model = make_model(seed=4, metrics=["mae"],
                       optimizer=keras.optimizers.Adam(0.01, gradient_accumulation_steps=2))
    newest, done = fit_until_a_bad_record(model, tmp_path)
    assert (newest.epoch, newest.epoch_complete, newest.global_step) == (1, False, len(done))
    assert not os.path.exists(tmp_path / ".keras_ckpt.lock")


@needs_steps_per_execution
def test_a_nan_in_a_partial_last_execution_is_at_the_step_trained(tmp_path):
    class PoisonLast(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == 6:
                logs["loss"] = float("nan")

    model = make_model(seed=3)
    model.compile(optimizer="adam", loss="mse", steps_per_execution=4)
    guard = keras_ckpt.TerminateOnNaN(verbose=0)
    # 6 steps an epoch in executions of 4: Keras reports the second one as batch 7.
    fit(model, [PoisonLast(), guard], epochs=2)
    assert [(e.epoch, e.step, e.key) for e in guard.events] == [(0, 6, "loss")]
