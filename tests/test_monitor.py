"""The shared comparator: property tests against a plain reference, state round-trips, auto mode."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest
from conftest import make_data, make_model
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_ckpt.monitor import Monitor, infer_mode


class Reference:
    """The rules written the plainest way, independently of keras_ckpt.monitor."""

    def __init__(self, direction, min_delta, relative, patience, baseline, start, threshold):
        self.direction, self.min_delta, self.relative = direction, min_delta, relative
        self.patience, self.baseline, self.start = patience, baseline, start
        self.best, self.best_epoch, self.wait = threshold, None, 0

    def better(self, v, ref):
        if v != v or v in (math.inf, -math.inf):
            return False
        if ref is None:
            return True
        d = self.min_delta * (abs(ref) if self.relative else 1.0)
        return v + d < ref if self.direction == "min" else v - d > ref

    def step(self, v, epoch):
        if v is None or epoch < self.start:
            return (False, False)
        self.wait += 1
        improved = self.better(v, self.best)
        if improved:
            self.best, self.best_epoch = v, epoch
            if self.baseline is None or self.better(v, self.baseline):
                self.wait = 0
        return (True, improved)


values = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1.0, None]),
)
configs = st.fixed_dictionaries({
    "direction": st.sampled_from(["min", "max"]),
    "min_delta": st.one_of(st.just(0.0), st.floats(0, 10, allow_nan=False)),
    "relative": st.booleans(),
    "patience": st.integers(0, 5),
    "baseline": st.one_of(st.none(), st.floats(-100, 100, allow_nan=False)),
    "start": st.integers(0, 4),
    "threshold": st.one_of(st.none(), st.floats(-100, 100, allow_nan=False)),
})


def build(cfg) -> Monitor:
    m = Monitor("val_loss", mode=cfg["direction"], min_delta=cfg["min_delta"],
                min_delta_mode="relative" if cfg["relative"] else "absolute",
                patience=cfg["patience"], baseline=cfg["baseline"],
                start_from_epoch=cfg["start"], initial_value_threshold=cfg["threshold"])
    m.resolve()
    return m


@settings(max_examples=300, deadline=None)
@given(cfg=configs, seq=st.lists(values, max_size=30))
def test_every_decision_matches_the_reference(cfg, seq):
    m = build(cfg)
    ref = Reference(cfg["direction"], cfg["min_delta"], cfg["relative"], cfg["patience"],
                    cfg["baseline"], cfg["start"], cfg["threshold"])
    for epoch, v in enumerate(seq):
        d = m.update(v, epoch=epoch)
        counted, improved = ref.step(v, epoch)
        assert (d.counted, d.improved) == (counted, improved)
        assert d.best == ref.best and d.best_epoch == ref.best_epoch
        assert d.wait == ref.wait
        assert d.patience_exhausted == (ref.wait >= cfg["patience"])
        assert d.best is None or math.isfinite(d.best)


@settings(max_examples=200, deadline=None)
@given(cfg=configs, seq=st.lists(values, min_size=1, max_size=30), data=st.data())
def test_state_round_trip_mid_sequence_gives_identical_decisions(cfg, seq, data):
    cut = data.draw(st.integers(0, len(seq)))
    straight = build(cfg)
    decisions = [straight.update(v, epoch=e) for e, v in enumerate(seq)]
    first = build(cfg)
    for e, v in enumerate(seq[:cut]):
        first.update(v, epoch=e)
    text = json.dumps(first.get_state(), allow_nan=False)  # strict JSON
    resumed = build(cfg)
    resumed.set_state(json.loads(text))
    later = [resumed.update(v, epoch=e) for e, v in enumerate(seq) if e >= cut]
    assert later == decisions[cut:]


def test_first_nan_does_not_poison_best():
    m = Monitor("val_loss", mode="min")
    m.resolve()
    assert not m.update(math.nan, epoch=0).improved
    assert m.best is None
    assert m.update(3.0, epoch=1).improved and m.best == 3.0


def test_infinite_values_are_never_an_improvement():
    for mode, bad in (("min", -math.inf), ("max", math.inf)):
        m = Monitor("x", mode=mode)
        m.resolve()
        m.update(1.0, epoch=0)
        assert not m.update(bad, epoch=1).improved and m.best == 1.0


def test_infinite_state_values_round_trip_as_strict_json():
    m = Monitor("val_loss", mode="min", initial_value_threshold=1.0)
    m.resolve()
    state = m.get_state()
    state["best"] = "inf"  # what encode_float writes for +inf
    m.set_state(json.loads(json.dumps(state, allow_nan=False)))
    assert m.best == math.inf


def test_baseline_semantics():
    # Improvements that do not beat the baseline keep patience running.
    m = Monitor("val_loss", mode="min", patience=2, baseline=0.5)
    m.resolve()
    seq = [0.9, 0.8, 0.7]
    decisions = [m.update(v, epoch=e) for e, v in enumerate(seq)]
    assert [d.improved for d in decisions] == [True, True, True]
    assert [d.wait for d in decisions] == [1, 2, 3]
    assert decisions[-1].patience_exhausted and m.best == 0.7
    assert m.update(0.4, epoch=3).wait == 0


def test_relative_min_delta():
    m = Monitor("loss", mode="min", min_delta=0.1, min_delta_mode="relative")
    m.resolve()
    m.update(10.0, epoch=0)
    assert not m.update(9.5, epoch=1).improved  # needs < 9.0
    assert m.update(8.9, epoch=2).improved


def test_start_from_epoch_ignores_early_values():
    m = Monitor("loss", mode="min", start_from_epoch=2)
    m.resolve()
    assert not m.update(0.1, epoch=0).counted
    assert m.update(5.0, epoch=2).improved and m.best == 5.0


def test_missing_monitor_warns_once_per_fit_and_lists_keys():
    m = Monitor("val_acc", mode="max")
    m.resolve()
    with pytest.warns(UserWarning, match=r"Available keys: accuracy, loss") as record:
        for _ in range(3):
            assert m.get_value({"loss": 1.0, "accuracy": 0.5}) is None
    assert len(record) == 1
    m.resolve()  # a new fit warns again
    with pytest.warns(UserWarning):
        m.get_value({"loss": 1.0})


def test_missing_monitor_raises_when_strict():
    m = Monitor("val_acc", mode="max", strict=True)
    with pytest.raises(KeyError, match="val_acc"):
        m.get_value({"loss": 1.0})


def test_values_are_python_floats():
    m = Monitor("loss", mode="min")
    value = m.get_value({"loss": np.float32(0.25)})
    assert type(value) is float and value == 0.25
    with pytest.raises(ValueError, match="scalar"):
        m.get_value({"loss": np.ones(3)})


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "maximum"}, "`mode` must be one of"),
    ({"min_delta": -0.1}, "`min_delta` must be >= 0"),
    ({"min_delta": "0.1"}, "`min_delta` must be a number"),
    ({"patience": 1.5}, "`patience` must be an integer"),
    ({"patience": -1}, "`patience` must be >= 0"),
    ({"baseline": math.nan}, "`baseline` must be a finite number"),
    ({"start_from_epoch": True}, "`start_from_epoch` must be an integer"),
    ({"min_delta_mode": "percent"}, "`min_delta_mode` must be one of"),
    ({"initial_value_threshold": math.inf}, "`initial_value_threshold` must be a finite"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Monitor("val_loss", **kwargs)


def test_set_state_refuses_another_monitor():
    a = Monitor("val_loss", mode="min")
    a.resolve()
    b = Monitor("val_accuracy", mode="max")
    with pytest.raises(ValueError, match="monitors 'val_loss'"):
        b.set_state(a.get_state())


# ----------------------------------------------------------- auto mode, real models
@pytest.mark.parametrize("monitor, expected", [
    ("loss", "min"), ("val_loss", "min"), ("accuracy", "max"), ("val_accuracy", "max"),
    ("val_auc", "max"), ("mean_absolute_error", "min"), ("val_acc", "max"),
])
def test_auto_mode_single_output(monitor, expected):
    model = make_model(classes=2, metrics=["accuracy", keras.metrics.AUC(name="auc")])
    m = Monitor(monitor)
    assert m.resolve(model) == expected


def test_auto_mode_multi_output_before_and_after_fit():
    inp = keras.Input((4,))
    h = keras.layers.Dense(8)(inp)
    model = keras.Model(inp, {"out_a": keras.layers.Dense(1, name="out_a")(h),
                              "out_b": keras.layers.Dense(1, activation="sigmoid",
                                                          name="out_b")(h)})
    model.compile("adam", loss={"out_a": "mse", "out_b": "binary_crossentropy"},
                  metrics={"out_a": ["mae"],
                           "out_b": ["accuracy", keras.metrics.AUC(name="auc_b")]})
    expected = {"val_out_a_loss": "min", "out_b_loss": "min", "val_out_a_mae": "min",
                "out_b_accuracy": "max", "val_out_b_auc_b": "max"}
    for name, direction in expected.items():
        assert infer_mode(name, model) == direction, name
    x, _ = make_data(16)
    model.fit(x, {"out_a": x[:, :1], "out_b": (x[:, :1] > 0).astype("int32")}, epochs=1,
              verbose=0)
    for name, direction in expected.items():
        assert infer_mode(name, model) == direction, name
    # Keras itself cannot tell for per-output losses; we must.
    cb = keras.callbacks.EarlyStopping(monitor="val_out_a_loss")
    cb.set_model(model)
    with pytest.raises(ValueError):
        cb._set_monitor_op()


def test_auto_mode_custom_metric_function_fails_at_train_begin():
    def my_score(y_true, y_pred):
        return keras.ops.mean(y_pred)

    model = make_model(metrics=[my_score])
    monitor = Monitor("val_my_score", owner="EarlyStopping")
    begin = keras.callbacks.LambdaCallback(on_train_begin=lambda logs: monitor.resolve(model))
    x, y = make_data(32)
    with pytest.raises(ValueError, match=r"monitor='val_my_score'.*Pass mode='min' or mode='max'"):
        model.fit(x, y, validation_split=0.25, epochs=2, callbacks=[begin], verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 0  # nothing was trained
    assert Monitor("val_my_score", mode="max").resolve(model) == "max"


def test_a_missing_monitor_suggests_the_close_key_and_says_what_then_happens():
    import keras_ckpt

    checkpoint = keras_ckpt.ModelCheckpoint("/tmp/unused/c.keras", monitor="val_acc",
                                            save_best_only=True)
    with pytest.warns(UserWarning) as caught:
        assert checkpoint._monitor.get_value({"loss": 1.0, "val_accuracy": 0.5}) is None
    message = str(caught[0].message)
    assert "Did you mean 'val_accuracy'?" in message
    assert "save_best_only saves at every save moment" in message
    with pytest.warns(UserWarning) as caught:
        Monitor("zzz", owner="EarlyStopping").get_value({"loss": 1.0})
    assert "Did you mean" not in str(caught[0].message)
