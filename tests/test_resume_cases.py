"""Resume cases real scripts meet: fine-tuning from another run, a finished script run again."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
from conftest import make_data, make_model
from test_preemption import same_state

import keras_ckpt
from keras_ckpt import manager

X, Y = make_data(64, seed=11)


def fit(model, callbacks, epochs, **kwargs):
    return model.fit(X, Y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
                     validation_data=(X[:16], Y[:16]), callbacks=callbacks, **kwargs)


class Crash(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("killed")


def test_a_fine_tune_restarted_continues_from_its_own_checkpoints(tmp_path, capsys):
    fit(make_model(seed=2), [keras_ckpt.ModelCheckpoint(str(tmp_path / "run1" / "c{epoch}.keras"))],
        epochs=2)
    start = str(tmp_path / "run1" / "c2.keras")
    template = str(tmp_path / "run2" / "c{epoch}.keras")
    straight = make_model(seed=2)
    reference = fit(straight, [keras_ckpt.ModelCheckpoint(str(tmp_path / "s" / "c{epoch}.keras"),
                                                          resume=start)], epochs=5)
    first = make_model(seed=2)
    try:
        fit(first, [keras_ckpt.ModelCheckpoint(template, resume=start), Crash(epoch=3)], epochs=5)
    except RuntimeError:
        pass
    assert [c.epoch for c in manager.list_checkpoints(tmp_path / "run2")] == [2, 3]
    capsys.readouterr()
    again = make_model(seed=2)
    cb = keras_ckpt.ModelCheckpoint(template, resume=start)
    history = fit(again, [cb], epochs=5)
    assert cb.resumed_from.path.endswith("run2/c4.keras")  # its own newest, not run1's
    assert "continuing from" in capsys.readouterr().out
    assert history.epoch == reference.epoch == [0, 1, 2, 3, 4]
    same_state(straight, again)
    assert history.history == reference.history


def test_running_a_finished_script_again_returns_its_history(tmp_path, capsys):
    template = str(tmp_path / "c{epoch}.keras")
    first = fit(make_model(seed=3), [keras_ckpt.ModelCheckpoint(template, resume=True)], epochs=3)
    capsys.readouterr()
    again = fit(make_model(seed=3), [keras_ckpt.ModelCheckpoint(template, resume=True)], epochs=3)
    assert "nothing left to train" in capsys.readouterr().out
    assert again.epoch == first.epoch == [0, 1, 2]
    assert again.history == first.history


class Validations(keras.callbacks.Callback):
    count = 0

    def on_test_begin(self, logs=None):
        self.count += 1


@pytest.mark.parametrize("min_delta, epochs", [(100.0, 6), (0.0, 3)],
                         ids=["early-stopped", "finished"])
def test_with_mid_epoch_checkpoints_a_rerun_after_the_end_trains_and_validates_nothing(
        tmp_path, capsys, min_delta, epochs):
    # save_freq=3 of 4 steps an epoch: the newest batch checkpoint predates the
    # last epoch's validation and the stop; the epoch end is saved too.
    def run():
        validations = Validations()
        stop = keras_ckpt.EarlyStopping("val_loss", patience=0, min_delta=min_delta)
        checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}-{batch}.keras"),
                                                resume=True, save_freq=3)
        history = fit(make_model(seed=4), [checkpoint, stop, validations], epochs=epochs)
        return history, validations.count

    first, validated = run()
    assert validated == len(first.epoch) and len(first.epoch) == (2 if min_delta else 3)
    capsys.readouterr()
    again, validated = run()
    said = capsys.readouterr().out
    assert validated == 0 and again.history == first.history and again.epoch == first.epoch
    assert ("already stopped training" if min_delta else "nothing left to train") in said


def test_a_stop_on_the_best_epoch_writes_the_best_file(tmp_path):
    # stopping_threshold met at once: the stopping epoch is also the best one.
    checkpoint = keras_ckpt.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_loss",
                                            save_best_only=True)
    stop = keras_ckpt.EarlyStopping("val_loss", stopping_threshold=1e9)
    history = fit(make_model(seed=4), [checkpoint, stop], epochs=5)
    assert history.epoch == [0] and os.listdir(tmp_path) == ["best.keras"]
    assert checkpoint.best == history.history["val_loss"][0]


class PoisonKernel(keras.callbacks.Callback):
    """Puts one NaN into the first kernel at the end of `epoch` (the loss logged stays finite)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            kernel = self.model.layers[0].kernel
            value = kernel.numpy()
            value[0, 0] = float("nan")
            kernel.assign(value)


@pytest.mark.parametrize("async_write", [False, True])
def test_a_non_finite_variable_is_never_checkpointed(tmp_path, async_write):
    template = str(tmp_path / "c{epoch}.keras")
    cb = keras_ckpt.ModelCheckpoint(template, async_write=async_write)
    with pytest.warns(UserWarning, match=r"not saving at Epoch 2: the variable .*kernel holds NaN"):
        fit(make_model(seed=5), [PoisonKernel(epoch=1), cb], epochs=2)
    assert [c.epoch for c in manager.list_checkpoints(tmp_path)] == [0]
    assert cb.last_saved_path.endswith("c1.keras") and cb.save_errors == []
    resumed = make_model(seed=5)
    fit(resumed, [keras_ckpt.ModelCheckpoint(template, resume=True)], epochs=1)
    assert all(np.isfinite(v.numpy()).all() for v in resumed.variables)


def f1_model(seed=8):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="categorical_crossentropy",
                  metrics=[keras.metrics.F1Score()])  # average=None: a vector per class
    return model


def test_vector_valued_logs_never_crash_and_resume_exactly(tmp_path):
    x = make_data(64, seed=9)[0]
    y = keras.utils.to_categorical(np.arange(64) % 3, 3)

    def run(model, epochs, callbacks):
        return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False,
                         validation_split=0.25, callbacks=callbacks)

    def ours(**kwargs):
        return [keras_ckpt.ModelCheckpoint(str(tmp_path / "c-{epoch}-{batch}.keras"),
                                           save_freq=2, **kwargs),
                keras_ckpt.EarlyStopping(monitor="loss", patience=5),
                keras_ckpt.TerminateOnNaN(),
                keras_ckpt.BudgetStop(max_duration=3600, verbose=0,
                                      ledger=str(tmp_path / "ledger.json"))]

    straight = f1_model()
    reference = run(straight, 4, [])
    run(f1_model(), 2, ours())  # a run stopped after two epochs (a mid-epoch save at step 2)
    resumed = f1_model()
    history = run(resumed, 4, ours(resume=True))
    same_state(straight, resumed)
    assert history.history.keys() == reference.history.keys()
    for key, values in reference.history.items():
        assert len(history.history[key]) == len(values) == 4
        for a, b in zip(values, history.history[key], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=key)
            assert type(a) is type(b)


def test_a_changed_batch_size_is_an_error_mid_epoch_and_a_warning_at_an_epoch_end(tmp_path):
    template = str(tmp_path / "mid" / "c-{epoch}-{batch}.keras")
    with pytest.raises(RuntimeError, match="killed"):
        fit(make_model(seed=4), [keras_ckpt.ModelCheckpoint(template, save_freq=3),
                                 Crash(epoch=1)], epochs=3)  # 4 steps an epoch: 3, 6 saved
    assert manager.list_checkpoints(tmp_path / "mid")[-1].step == 2  # mid-epoch 2
    with pytest.raises(ValueError, match=r"steps_per_epoch=4, this fit has steps_per_epoch=8 "
                                         r"\(batch_size"):
        make_model(seed=4).fit(X, Y, batch_size=8, epochs=3, verbose=0, callbacks=[
            keras_ckpt.ModelCheckpoint(template, save_freq=3, resume=True)])
    template = str(tmp_path / "end" / "e-{epoch}.keras")
    fit(make_model(seed=4), [keras_ckpt.ModelCheckpoint(template)], epochs=1)
    with pytest.warns(UserWarning, match="steps_per_epoch=4, this fit has steps_per_epoch=8"):
        history = make_model(seed=4).fit(X, Y, batch_size=8, epochs=3, verbose=0, callbacks=[
            keras_ckpt.ModelCheckpoint(template, resume=True)])
    assert history.epoch == [0, 1, 2]


def test_keep_best_with_an_integer_save_freq_keeps_the_best_epoch_end(tmp_path):
    # README's quickstart: step saves carry no validation value; the epoch ends do.
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "epoch-{epoch:03d}-{batch}.keras"),
                                    save_freq=3, retention=[keras_ckpt.KeepLast(2),
                                                            keras_ckpt.KeepBest(1)])
    history = fit(make_model(seed=12), [cb], epochs=5)  # 4 steps an epoch
    best_epoch = int(np.argmin(history.history["val_loss"]))
    best = keras_ckpt.best_checkpoint(tmp_path, "val_loss")
    assert best is not None and best.epoch_complete and best.epoch == best_epoch
    assert best.monitor_value == pytest.approx(min(history.history["val_loss"]))
    kept = manager.list_checkpoints(tmp_path)
    assert len(kept) <= 3 and best.path in [c.path for c in kept]


class Subclassed(keras.Model):
    """The usual way to write a model: its variables come at its first call."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.dropout = keras.layers.Dropout(0.2)
        self.out = keras.layers.Dense(1)

    def call(self, x, training=False):
        return self.out(self.dropout(self.hidden(x), training=training))


def subclassed(seed=14):
    keras.utils.set_random_seed(seed)
    model = Subclassed()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    return model


@pytest.mark.parametrize("save_freq", ["epoch", 3], ids=["epoch-end", "mid-epoch"])
def test_a_subclassed_model_not_built_before_fit_resumes_bitwise(tmp_path, save_freq):
    template = str(tmp_path / ("c{epoch}.keras" if save_freq == "epoch" else "c{epoch}-{batch}"
                                                                              ".keras"))
    straight = subclassed()
    reference = fit(straight, [], epochs=3)
    with pytest.raises(RuntimeError, match="killed"):
        fit(subclassed(), [keras_ckpt.ModelCheckpoint(template, save_freq=save_freq),
                           Crash(epoch=1)], epochs=3)
    resumed = subclassed()
    cb = keras_ckpt.ModelCheckpoint(template, save_freq=save_freq, resume=True)
    history = fit(resumed, [cb], epochs=3)
    assert cb.resumed_from is not None
    same_state(straight, resumed)
    assert history.history == reference.history


def test_the_same_variables_in_another_order_are_matched_by_name():
    from keras_ckpt.state_checks import saved_order

    def entry(path, shape=(2,)):
        return {"path": path, "shape": list(shape), "dtype": "float32"}

    saved = [entry("m/dense/kernel", (4, 8)), entry("seed_generator_3/state"),
             entry("seed_generator_4/state"), entry("m/dense/bias", (8,))]
    now = [entry("seed_generator_7/state"), entry("seed_generator_8/state"),
           entry("m/dense/kernel", (4, 8)), entry("m/dense/bias", (8,))]
    assert saved_order("model", saved, now) == [1, 2, 0, 3]  # same names keep their order
    assert saved_order("model", saved, saved) is None
    assert saved_order("model", saved, now[:3]) is None  # not the same variables: an error


def test_terminate_on_nan_by_default_stops_on_a_non_finite_variable_at_a_checkpoint(tmp_path):
    guard = keras_ckpt.TerminateOnNaN()  # Keras's default: it looks at the loss, still finite
    cb = keras_ckpt.ModelCheckpoint(str(tmp_path / "c{epoch}.keras"))
    with pytest.warns(UserWarning, match="kernel holds NaN"):
        history = fit(make_model(seed=5), [PoisonKernel(epoch=1), cb, guard], epochs=5)
    assert history.epoch == [0, 1]  # stopped at the refused checkpoint of epoch 2
    assert len(guard.events) == 1 and "kernel" in guard.events[0].key
    assert (guard.events[0].epoch, guard.events[0].step) == (1, None)
    assert [c.epoch for c in manager.list_checkpoints(tmp_path)] == [0]


@pytest.mark.parametrize("callback", [
    lambda path: keras_ckpt.EarlyStopping(monitor="val_f1_score", mode="max"),
    lambda path: keras_ckpt.ModelCheckpoint(path, monitor="f1_score", mode="max",
                                            save_best_only=True),
], ids=["EarlyStopping", "ModelCheckpoint"])
def test_a_vector_monitor_is_an_error_at_train_begin(tmp_path, callback):
    x = make_data(32, seed=9)[0]
    y = keras.utils.to_categorical(np.arange(32) % 3, 3)
    trained = []
    seen = keras.callbacks.LambdaCallback(on_train_batch_end=lambda *a: trained.append(1))
    with pytest.raises(ValueError, match=r"f1_score'?, which is not a scalar.*shape \(3,\)"
                                         r".*average='macro'"):
        f1_model().fit(x, y, batch_size=16, epochs=2, verbose=0, validation_split=0.25,
                       callbacks=[callback(str(tmp_path / "b.keras")), seen])
    assert trained == [] and not os.listdir(tmp_path)  # before the first step, nothing saved

