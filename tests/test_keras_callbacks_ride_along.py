"""Keras's own stateful callbacks beside ours: their state resumes, schedules apply once."""

from __future__ import annotations

import functools

import keras
import pytest
from conftest import make_data, make_model
from test_preemption import same_state
from test_step_counting import StopAfter

import keras_ckpt
from keras_ckpt import keras_compat, manager

X, Y = make_data(64, seed=13)


def fit(model, callbacks, epochs=6):
    return model.fit(X, Y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
                     validation_data=(X[:16], Y[:16]), callbacks=callbacks)


def plateau():
    # A min_delta no epoch meets: it waits, reduces every 2 epochs, cools down for 1.
    return keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2,
                                             min_delta=10.0, cooldown=1, verbose=0)


def scheduler():
    return keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.7)


def swap_ema():
    # Keras's documented use: EMA weights in the model at every epoch end, for the checkpoint;
    # its next epoch begin swaps them back (its arithmetic swap is not bitwise neutral).
    return keras.callbacks.SwapEMAWeights(swap_on_epoch=True)


def model_for(make):
    ema = keras.optimizers.Adam(0.01, use_ema=True, ema_momentum=0.9) if make is swap_ema \
        else None
    return make_model(seed=6, optimizer=ema)


STATE = ("wait", "cooldown_counter", "best", *keras_compat.SWAP_EMA_STATE)


@functools.cache
def uninterrupted(make):
    """The run without keras-ckpt (shared by the tests of one Keras callback in a worker)."""
    callback, model = make(), model_for(make)
    history = fit(model, [callback])
    return (model, history.history,
            {name: getattr(callback, name, None) for name in STATE})


@pytest.mark.parametrize("save_freq, crash", [("epoch", 13), (3, 14)],
                         ids=["epoch-end", "mid-epoch"])
@pytest.mark.parametrize("keras_first", [True, False], ids=["keras-first", "ours-first"])
@pytest.mark.parametrize("make", [plateau, scheduler, swap_ema],
                         ids=["ReduceLROnPlateau", "LearningRateScheduler", "SwapEMAWeights"])
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, save_freq, crash, keras_first,
                                                    make):
    def callbacks(checkpoint, keras_callback):
        return [keras_callback, checkpoint] if keras_first else [checkpoint, keras_callback]

    straight, reference, straight_state = uninterrupted(make)
    name = "c-{epoch}.keras" if save_freq == "epoch" else "c-{epoch}-{batch}.keras"
    template = str(tmp_path / name)
    crashed = model_for(make)
    with pytest.raises(RuntimeError, match="crash"):
        fit(crashed, callbacks(keras_ckpt.ModelCheckpoint(template, save_freq=save_freq),
                               make()) + [StopAfter(crash)])
    newest = manager.list_checkpoints(tmp_path)[-1]
    assert newest.epoch_complete == (save_freq == "epoch")
    resumed_callback = make()
    resumed = model_for(make)
    history = fit(resumed, callbacks(keras_ckpt.ModelCheckpoint(template, save_freq=save_freq,
                                                                resume=True), resumed_callback))
    same_state(straight, resumed)
    assert history.history == reference
    assert {name: getattr(resumed_callback, name, None) for name in STATE} == straight_state


def test_a_csv_logger_that_rewrites_its_file_is_named_at_train_begin(tmp_path):
    import warnings

    template = str(tmp_path / "c{epoch}.keras")
    rewrites = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    with pytest.warns(UserWarning, match=r"CSVLogger\(append=False\) rewrites .*log\.csv"):
        fit(make_model(), [keras_ckpt.ModelCheckpoint(template, resume=True), rewrites],
            epochs=1)
    appends = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"), append=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit(make_model(), [keras_ckpt.ModelCheckpoint(template, resume=True), appends],
            epochs=2)
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 3  # the header, 2 epochs


def batch_summaries(logdir) -> dict:
    """TensorBoard's `batch_loss` by step, the last written for a step (files in order)."""
    import glob
    import os

    import tensorflow as tf

    found = {}
    for path in sorted(glob.glob(os.path.join(logdir, "train", "events.out.tfevents.*")),
                       key=os.path.getmtime):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "batch_loss":
                    found[event.step] = tf.make_ndarray(value.tensor).item()
    return found


@functools.cache
def uninterrupted_summaries(logdir):
    fit(make_model(seed=6), [keras.callbacks.TensorBoard(logdir, update_freq=1)], epochs=4)
    return batch_summaries(logdir)


@pytest.mark.parametrize("save_freq, crash, tensorboard_first", [
    ("epoch", 10, True), (3, 10, False), (4, 8, True)],
    ids=["epoch-end", "mid-epoch", "last-step-replayed"])
def test_tensorboard_batch_summaries_go_on_from_the_checkpoint_s_step(
        tmp_path, tmp_path_factory, save_freq, crash, tensorboard_first):
    """TensorBoard counts a fit's batch ends from 0 (its batch summaries' step): a resumed
    run's summaries go on at the checkpoint's step, whatever the order of the callbacks,
    so the log holds one curve, step for step the uninterrupted run's."""
    reference = uninterrupted_summaries(str(tmp_path_factory.mktemp("tb") / "logs"))
    assert sorted(reference) == list(range(1, 17))  # 4 epochs of 4 batches
    logdir, name = str(tmp_path / "logs"), str(tmp_path / "c-{epoch}-{batch}.keras")

    def callbacks(*extra):
        ours = keras_ckpt.ModelCheckpoint(name, save_freq=save_freq, resume=True)
        board = keras.callbacks.TensorBoard(logdir, update_freq=1)
        return [board, ours, *extra] if tensorboard_first else [ours, board, *extra]

    with pytest.raises(RuntimeError, match="crash"):
        fit(make_model(seed=6), callbacks(StopAfter(crash)), epochs=4)
    fit(make_model(seed=6), callbacks(), epochs=4)
    assert batch_summaries(logdir) == reference


@pytest.mark.parametrize("stops", [True, False], ids=["stopped-early", "ran-to-the-end"])
def test_a_finished_run_started_again_with_keras_early_stopping_ends_as_it_did(tmp_path,
                                                                               stops):
    """The same script run again after its fit ended: Keras's `EarlyStopping` had stopped
    (trains no further, where it used to train one more epoch), or the run had ended with
    nothing left to train (its best weights still put back at train end: its restored state
    used to wait for an epoch begin that never came)."""
    def early():  # loss falls: "max" never improves after epoch 1, and stops after epoch 2
        return keras.callbacks.EarlyStopping(monitor="loss", mode="max",
                                             patience=1 if stops else 10,
                                             restore_best_weights=True)

    template = str(tmp_path / "c-{epoch}.keras")
    first = make_model(seed=6)
    done = fit(first, [early(), keras_ckpt.ModelCheckpoint(template, resume=True)], epochs=4)
    assert len(done.epoch) == (2 if stops else 4)
    again = make_model(seed=6)
    history = fit(again, [early(), keras_ckpt.ModelCheckpoint(template, resume=True)], epochs=4)
    same_state(first, again)  # the best (epoch 1's) weights, no step more
    assert history.history == done.history


def test_an_appended_csv_log_with_rows_after_the_checkpoint_is_named_at_resume(tmp_path):
    """A crash after an epoch's row but before its checkpoint (saved every 3 steps here):
    the rows of the epochs the resumed run trains again are named, with what to do."""
    import warnings

    template, log = str(tmp_path / "c{epoch}-{batch}.keras"), str(tmp_path / "log.csv")
    with pytest.raises(RuntimeError, match="crash"):
        fit(make_model(seed=6), [keras_ckpt.ModelCheckpoint(template, save_freq=3),
                                 keras.callbacks.CSVLogger(log, append=True), StopAfter(5)])
    with pytest.warns(UserWarning, match=r"log\.csv ends with 1 row\(s\) of epoch 1 on"):
        fit(make_model(seed=6), [keras_ckpt.ModelCheckpoint(template, save_freq=3, resume=True),
                                 keras.callbacks.CSVLogger(log, append=True)], epochs=2)
    assert [r.split(",")[0] for r in open(log).read().splitlines()] == ["epoch", "0", "0", "1"]
    ends, log = str(tmp_path / "e" / "c{epoch}.keras"), str(tmp_path / "e.csv")
    fit(make_model(seed=6), [keras_ckpt.ModelCheckpoint(ends),
                             keras.callbacks.CSVLogger(log, append=True)], epochs=1)
    with warnings.catch_warnings():  # rows up to the checkpoint only: nothing to say
        warnings.simplefilter("error", UserWarning)
        fit(make_model(seed=6), [keras_ckpt.ModelCheckpoint(ends, resume=True),
                                 keras.callbacks.CSVLogger(log, append=True)], epochs=2)


@pytest.mark.parametrize("every, ours, crash, spe", [
    (3, 3, 7, 1), (2, 3, 7, 1), (3, 4, 6, 1), (3, 2, 3, 2)],
    ids=["3-not-dividing", "2-dividing", "3-from-an-epoch-end", "3-by-2s"])
def test_keras_s_model_checkpoint_saving_every_few_steps_saves_at_the_same_steps(
        tmp_path, every, ours, crash, spe):
    """Keras's ModelCheckpoint(save_freq=N) counts batches from 0 in every fit; resumed, it
    gets the uninterrupted run's count at the resume point, so it saves at the same steps (4
    steps an epoch: a resume mid-epoch, or at an epoch end; hooks every step, or every 2)."""
    def run(directory, *callbacks):
        model = make_model(seed=6)
        model.compile(optimizer=model.optimizer, loss="mse", steps_per_execution=spe)
        theirs = keras.callbacks.ModelCheckpoint(
            str(directory / "k{epoch}-{batch}.weights.h5"), save_weights_only=True,
            save_freq=every)
        fit(model, [theirs, *callbacks], epochs=3)

    run(tmp_path / "straight")
    template = str(tmp_path / "run" / "c{epoch}-{batch}.keras")
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "run", keras_ckpt.ModelCheckpoint(template, save_freq=ours),
            StopAfter(crash))
    run(tmp_path / "run", keras_ckpt.ModelCheckpoint(template, save_freq=ours, resume=True))
    expected = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert len(expected) >= 3
    assert sorted(p.name for p in (tmp_path / "run").glob("k*")) == expected



def test_keras_s_model_checkpoint_saving_every_few_steps_of_an_unknown_epoch_is_named(
        tmp_path):
    """Without an epoch's steps (a generator, no steps_per_epoch) its count at the resume
    point cannot be worked out: named at train begin, with the fix."""
    import warnings

    def batches():
        for i in range(4):
            yield X[16 * i:16 * (i + 1)], Y[16 * i:16 * (i + 1)]

    theirs = keras.callbacks.ModelCheckpoint(str(tmp_path / "k{epoch}.keras"), save_freq=3)
    ours = keras_ckpt.ModelCheckpoint(str(tmp_path / "c{epoch}.keras"), resume=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_model().fit(batches(), epochs=1, verbose=0, callbacks=[theirs, ours])
    (said,) = [str(w.message) for w in caught if "counts batches from 0" in str(w.message)]
    assert "ModelCheckpoint(save_freq=3)" in said and "steps_per_epoch" in said
