"""Pins every private Keras API keras-ckpt uses (keras_ckpt/keras_compat.py) to the installed Keras.

A Keras release that changes one of them fails here, naming it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import make_data, make_model, needs_steps_per_execution

from keras_ckpt import keras_compat
from keras_ckpt.fit.step_guards import is_end_of_data

X, Y = make_data(16)


class Recorder(keras.callbacks.Callback):
    """Records what the compatibility functions see from inside a real fit."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def set_model(self, model):
        super().set_model(model)
        self.seen["callback_list"] = keras_compat.calling_callback_list()

    def on_train_begin(self, logs=None):
        keras_compat.set_initial_epoch(self.model, 1)

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.setdefault("epochs", []).append(epoch)


def test_fit_reads_the_initial_epoch_set_in_train_begin_and_builds_one_callback_list():
    model = make_model()
    recorder = Recorder()
    history = model.fit(X, Y, epochs=3, verbose=0, callbacks=[recorder])
    assert recorder.seen["epochs"] == [1, 2] and history.epoch == [1, 2]
    callbacks = recorder.seen["callback_list"]
    assert isinstance(callbacks, keras.callbacks.CallbackList)
    assert recorder in callbacks.callbacks
    assert keras_compat.get_initial_epoch(model) == 1
    keras_compat.set_initial_epoch(model, None)
    assert model.fit(X, Y, epochs=2, verbose=0).epoch == [0, 1]


def test_callback_list_hooks_can_be_shadowed_per_instance():
    calls = []
    callbacks = keras.callbacks.CallbackList([], model=make_model())
    original = callbacks.on_epoch_begin
    keras_compat.set_instance_attr(callbacks, "on_epoch_begin",
                                   lambda *a, **k: calls.append(a) or original(*a, **k))
    callbacks.on_epoch_begin(0)
    assert calls == [(0,)]
    del callbacks.__dict__["on_epoch_begin"]
    assert callbacks.on_epoch_begin.__func__ is keras.callbacks.CallbackList.on_epoch_begin


def test_private_attributes_bypass_tracking():
    model = make_model()
    keras_compat.set_private(model, "_keras_ckpt_probe", [1, 2])
    assert keras_compat.get_private(model, "_keras_ckpt_probe") == [1, 2]
    assert "_keras_ckpt_probe" not in [v.path for v in model.variables]


def test_model_internals_exist():
    model = make_model()
    model.fit(X, Y, epochs=1, verbose=0)
    assert keras_compat.compiled_metrics(model) is not None
    assert isinstance(keras_compat.learning_rate_variable(model.optimizer), keras.Variable)
    assert keras_compat.callback_model(keras.callbacks.Callback()) is None
    assert keras_compat.metric_direction(keras.metrics.AUC()) == "up"
    assert any(isinstance(layer, keras.layers.Dense)
               for layer in keras_compat.flatten_layers(model))
    model._compile_metrics = None
    fresh = make_model()
    fresh.compile(optimizer="adam", loss="mse", metrics=["mae"])
    keras_compat.symbolic_build(fresh, (X[:4], Y[:4]))
    assert keras_compat.compiled_metrics(fresh).built


def test_saving_internals_exist():
    store, save_state, serialize = keras_compat.saving_internals()
    assert store is not None and callable(save_state)
    config_json, metadata_json = serialize(make_model())  # (config, metadata) JSON strings
    assert '"class_name"' in config_json and '"keras_version"' in metadata_json


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="a TensorFlow tensor view")
def test_tf_tensor_view_shares_the_buffer():
    import tensorflow as tf

    tensor = tf.constant([1.0, 2.0])
    view = keras_compat.tf_tensor_view(tensor)
    assert isinstance(view, np.ndarray) and view.tolist() == [1.0, 2.0]


def test_end_of_data_errors_are_recognised():
    assert is_end_of_data(StopIteration())
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        assert is_end_of_data(tf.errors.OutOfRangeError(None, None, "end"))
    assert not is_end_of_data(ValueError("bad record"))


def test_keras_print_msg_is_importable(capsys):
    from keras.src.utils.io_utils import print_msg

    assert callable(print_msg)
    keras_compat.print_msg("hello from keras-ckpt")
    assert "hello from keras-ckpt" in capsys.readouterr().out


def run_without_backend(*argv):
    """Runs `python -m keras_ckpt ARGV` in a fresh process; its output and what it loaded."""
    probe = ("import sys, runpy\n"
             "import keras_ckpt\n"
             "sys.argv = ['keras_ckpt', *sys.argv[1:]]\n"
             "code = 0\n"
             "try:\n    runpy.run_module('keras_ckpt', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "loaded = sorted({m.split('.')[0] for m in sys.modules}"
             " & {'tensorflow', 'jax', 'torch', 'keras'})\n"
             "print('LOADED', loaded, code)\n")
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_the_cli_runs_without_a_backend(tmp_path):
    import datetime

    import keras_ckpt

    model = make_model()
    ledger = str(tmp_path / "ledger.json")
    model.fit(X, Y, epochs=1, verbose=0, callbacks=[
        keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras")),
        keras_ckpt.BudgetStop(daily_budget=datetime.timedelta(hours=1), ledger=ledger,
                              verbose=0)])
    out = run_without_backend("inspect", str(tmp_path))
    assert "e1.keras" in out and "LOADED [] 0" in out
    out = run_without_backend("budget", ledger)
    assert "sessions" in out and "LOADED [] 0" in out
    out = run_without_backend("--help")
    assert "inspect" in out and "LOADED [] 0" in out


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data inputs")
@pytest.mark.parametrize("steps_per_epoch", [None, 4])
def test_fit_makes_tf_iterators_per_epoch_as_keras_compat_says(monkeypatch, steps_per_epoch):
    tf = pytest.importorskip("tensorflow")
    from tensorflow.python.data.ops import iterator_ops

    made = []
    original = iterator_ops.OwnedIterator.__init__

    def counting(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not tf.inside_function():  # a traced function's placeholder is no iterator
            made.append(1)

    monkeypatch.setattr(iterator_ops.OwnedIterator, "__init__", counting)
    x, y = make_data(32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(32, seed=1).batch(8)  # 4 batches
    make_model().fit(data, epochs=3, steps_per_epoch=steps_per_epoch, verbose=0)
    # Before epoch 3's: all of them without steps_per_epoch (it makes its own), all
    # but the last one with it (the one epoch 3 would read, made at epoch 2's end).
    before_epoch_3 = keras_compat.tf_iterators_before_epoch(3, steps_per_epoch)
    assert len(made) == before_epoch_3 + (0 if steps_per_epoch is None else 1)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.distribute")
def test_the_default_strategy_is_told_from_the_others():
    tf = pytest.importorskip("tensorflow")
    assert keras_compat.is_default_strategy(tf.distribute.get_strategy())
    assert keras_compat.is_default_strategy(make_model().distribute_strategy)
    assert not keras_compat.is_default_strategy(tf.distribute.OneDeviceStrategy("/cpu:0"))


class StopMidEpoch(keras.callbacks.Callback):
    """Stops the fit after its second step; at train end, optionally releases the iterator."""

    def __init__(self, release):
        super().__init__()
        self.release, self.released = release, None

    def on_train_batch_end(self, batch, logs=None):
        if batch == 1:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.release:
            self.released = keras_compat.release_epoch_iterator(self.model)


def tf_iterators_left_by(fit) -> list:
    """The tf.data iterators `fit()` made that are still alive when it returns, with
    the garbage collector off (so only a reference cycle keeps one alive)."""
    import gc

    from conftest import _track_tf_iterators

    live = _track_tf_iterators()
    gc.collect()
    before = {id(it) for it in live}
    gc.disable()
    try:
        fit()
        return [it for it in live if id(it) not in before]
    finally:
        gc.enable()


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data inputs")
@pytest.mark.parametrize("release", [False, True], ids=["as-keras-leaves-it", "released"])
def test_a_fit_stopped_mid_epoch_leaves_its_iterator_in_a_cycle_unless_released(release):
    tf = pytest.importorskip("tensorflow")
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(4)  # 4 batches
    stop = StopMidEpoch(release)
    left = tf_iterators_left_by(
        lambda: make_model().fit(data, epochs=2, verbose=0, callbacks=[stop]))
    assert stop.released is (True if release else None)
    assert len(left) == (0 if release else 1)


class Indexed(keras.utils.PyDataset):
    """Four batches of four rows; records which batches were read."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.read = []

    def __len__(self):
        return 4

    def __getitem__(self, i):
        self.read.append(i)
        return X[4 * i:4 * i + 4], Y[4 * i:4 * i + 4]


class StartAt(keras.callbacks.Callback):
    """At train begin: the next epoch starts at batch `at` (`keras_compat.start_epoch_at`)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.how, self.handed, self.drew, self.batches = at, None, [], [], []

    def on_train_begin(self, logs=None):
        self.iterator = keras_compat.fit_epoch_iterator(self.model)
        self.how = keras_compat.start_epoch_at(self.model, self.at, self.skipped, lambda e: None)

    def skipped(self, batch, drew):
        self.handed.append(batch)
        self.drew.append(drew)

    def on_train_batch_begin(self, batch, logs=None):
        self.batches.append(batch)


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_py_dataset_epoch_starts_at_a_batch_in_keras_s_order(shuffle):
    """`_finite_generator` draws the order with `random.shuffle`; ours draws it the same way."""
    import random

    data = Indexed()
    random.seed(7)
    keras.utils.set_random_seed(7)
    make_model().fit(data, epochs=1, shuffle=shuffle, verbose=0)
    order = data.read[-4:]  # (TensorFlow reads a few batches first, for their shapes)
    data, start = Indexed(), StartAt(2)
    random.seed(7)
    keras.utils.set_random_seed(7)
    make_model().fit(data, epochs=2, shuffle=shuffle, verbose=0, callbacks=[start])
    assert start.how == "source" and start.batches == [2, 3, 0, 1, 2, 3]
    # batch 0 (read to learn whether it draws from the global RNGs: it does not), batch 1
    # (handed over) and batches 2 and 3
    assert data.read[-8:-4] == order and len(start.handed) == 1 and start.drew == [False]
    assert "_finite_generator" not in vars(data_adapter_of(start))  # one epoch only


def data_adapter_of(callback):
    return callback.iterator.data_adapter


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="`_distributed_dataset`")
def test_tf_data_and_array_epochs_start_at_a_batch_through_the_dataset():
    import tensorflow as tf

    ds = tf.data.Dataset.range(8).map(lambda i: (tf.fill([2, 4], tf.cast(i, "float32")),
                                                 tf.fill([2, 1], tf.cast(i, "float32"))))
    seen = []

    class Inputs(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(batch)

    start = StartAt(5)
    make_model().fit(ds, epochs=1, verbose=0, callbacks=[start, Inputs()])
    assert start.how == "dataset" and seen == [5, 6, 7]
    assert float(start.handed[0][0][0, 0]) == 4.0  # batch 4, the last skipped, handed over
    start = StartAt(3)
    make_model().fit(X, Y, batch_size=4, epochs=1, verbose=0, callbacks=[start])
    assert start.how == "index" and start.batches == [3]  # arrays: `_array_index_skip`


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="Keras's array tf.data")
def test_sparse_arrays_start_at_a_batch_through_the_dataset():
    """Keras slices sparse arrays its own way: `_array_index_skip` leaves them to `.skip`."""
    import tensorflow as tf

    start = StartAt(3)
    make_model().fit(tf.sparse.from_dense(X), Y, batch_size=4, epochs=1, verbose=0,
                     callbacks=[start])
    assert start.how == "dataset" and start.batches == [3]


def rng_states() -> tuple:
    """numpy's global RNG state (and torch's, on torch), as bytes."""
    kind, keys, *rest = np.random.get_state()
    torch_state = b""
    if keras.backend.backend() == "torch":
        import torch

        torch_state = torch.get_rng_state().numpy().tobytes()
    return kind, keys.tobytes(), *rest, torch_state


def fit_recording(x, y, at=None, spe=1, rngs=None, **kwargs):
    """The batches (numpy) a seeded one-epoch fit trains on; with `at`, starting at batch `at`.
    `rngs`: gets the global RNG states each step sees."""
    seen = []

    class Recording(keras.Sequential):
        def train_step(self, *args):  # (JAX's: `state, data`)
            seen.append([keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(args[-1])])
            if rngs is not None:
                rngs.append(rng_states())
            return super().train_step(*args)

    keras.utils.set_random_seed(3)
    model = Recording([keras.Input((x.shape[1],)), keras.layers.Dense(1)])
    model.compile("sgd", "mse", run_eagerly=True, steps_per_execution=spe)
    start = StartAt(at) if at else keras.callbacks.Callback()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[start], **kwargs)
    return seen, start


def array_fit(shuffle, batch_size, weights):
    """16 samples and `fit`'s arguments: shuffled so, in batches of so many, weighted so."""
    x, y = make_data(16, classes=2 if weights == "class" else 0)
    kwargs = dict(batch_size=batch_size, shuffle=shuffle)
    if weights == "sample":
        kwargs["sample_weight"] = np.linspace(0.5, 2.0, 16).astype("float32")
    elif weights == "class":
        kwargs["class_weight"] = {0: 1.0, 1: 3.0}
    return x, y, kwargs


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="Keras's array tf.data")
@pytest.mark.parametrize("shuffle,batch_size,at,spe,weights", [
    (True, 5, 2, 1, None), ("batch", 5, 3, 1, None), (False, 4, 2, 2, None),
    (True, 3, 4, 2, "sample"), ("batch", 5, 2, 1, "class")])
def test_an_array_epoch_started_at_its_indices_trains_on_keras_s_batches(
        shuffle, batch_size, at, spe, weights):
    """`ArrayDataAdapter.get_tf_dataset`: the rebuilt pipeline yields Keras's batches bitwise."""
    x, y, kwargs = array_fit(shuffle, batch_size, weights)
    keras_own, _ = fit_recording(x, y, spe=spe, **kwargs)
    ours, start = fit_recording(x, y, at=at, spe=spe, **kwargs)
    assert start.how == "index" and len(ours) == len(keras_own) - at > 0
    handed = [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(start.handed[0])]
    for mine, theirs in zip([handed] + ours, keras_own[at - 1:], strict=True):
        assert [(a.dtype, a.shape, a.tobytes()) for a in mine] == [
            (a.dtype, a.shape, a.tobytes()) for a in theirs]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="Keras's array tf.data")
def test_an_array_epoch_started_at_its_indices_gathers_no_skipped_batch(monkeypatch):
    """tf.data's debug mode runs the pipeline's maps in Python: every gather is counted."""
    import tensorflow as tf
    from tensorflow.python.data.ops import debug_mode

    gathered, gather = [], tf.gather

    def counting(params, indices, *args, **kwargs):
        if tf.executing_eagerly():  # (not the traces)
            gathered.append(len(indices))
        return gather(params, indices, *args, **kwargs)

    monkeypatch.setattr(tf, "gather", counting)
    tf.data.experimental.enable_debug_mode()
    try:
        start = StartAt(6)
        make_model().fit(X, Y, batch_size=2, epochs=1, verbose=0, callbacks=[start])
    finally:
        debug_mode.toggle_debug_mode(False)
    assert start.how == "index" and start.batches == [6, 7]
    assert gathered == [2] * 6  # batch 5 (handed over), 6 and 7: x and y each; none before


@pytest.mark.parametrize("shuffle", [True, "batch", False])
def test_array_batches_are_drawn_and_sliced_by_get_iterator_with_a_slice_function(shuffle):
    """`ArrayDataAdapter._get_iterator(slice_fn, inputs)` makes the epoch's batches (numpy's
    iterator here, JAX's alike), drawing from `np.random`: shadowed once, it gives Keras's
    batches from batch 2 bitwise and leaves numpy's RNG as Keras's leaves it."""
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    from keras_ckpt import epoch_skip

    def epoch(skip):
        adapter = ArrayDataAdapter(X, Y, batch_size=3, shuffle=shuffle)
        undo = epoch_skip.shadowed_once(adapter, "_get_iterator", epoch_skip.sliced_from, 2)
        if not skip:
            assert undo() is True  # never called: nothing skipped
        np.random.seed(5)
        batches = [[a.tobytes() for a in batch] for batch in adapter.get_numpy_iterator()]
        return batches, rng_states(), undo()

    keras_own, keras_rng, _ = epoch(False)
    ours, our_rng, unskipped = epoch(True)
    assert len(keras_own) == 6 and ours == keras_own[2:] and our_rng == keras_rng
    assert unskipped is False


@pytest.mark.backends
@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="Keras's array iterators")
@pytest.mark.parametrize("shuffle,batch_size,at,spe,weights", [
    (True, 5, 2, 1, None), ("batch", 5, 3, 1, None), (False, 4, 2, 1, None),
    (True, 3, 4, 1, "sample"), ("batch", 5, 2, 1, "class"),
    pytest.param(False, 4, 2, 2, None, marks=needs_steps_per_execution),
    pytest.param("batch", 3, 4, 2, "sample", marks=needs_steps_per_execution)])
def test_an_array_epoch_started_at_its_batch_trains_on_keras_s_batches_and_rng_states(
        shuffle, batch_size, at, spe, weights):
    """JAX's `ArrayDataAdapter._get_iterator`, torch's `get_torch_dataloader`: shadowed for the
    epoch, Keras's batches bitwise, every step seeing the global RNG states Keras's sees."""
    x, y, kwargs = array_fit(shuffle, batch_size, weights)
    keras_rngs, our_rngs = [], []
    keras_own, _ = fit_recording(x, y, spe=spe, rngs=keras_rngs, **kwargs)
    ours, start = fit_recording(x, y, at=at, spe=spe, rngs=our_rngs, **kwargs)
    assert len(ours) == len(keras_own) - at > 0
    handed = [keras.ops.convert_to_numpy(t) for t in keras.tree.flatten(start.handed[0])]
    for mine, theirs in zip([handed] + ours, keras_own[at - 1:], strict=True):
        assert [(a.dtype, a.shape, a.tobytes()) for a in mine] == [
            (a.dtype, a.shape, a.tobytes()) for a in theirs]
    assert our_rngs == keras_rngs[at:]
    assert start.how == "index"
    assert not {"_get_iterator", "get_torch_dataloader"} & set(vars(data_adapter_of(start)))


@pytest.mark.backends
@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="Keras's array iterators")
@pytest.mark.parametrize("shuffle", [True, "batch", False])
def test_an_array_epoch_started_at_its_batch_slices_no_skipped_batch(monkeypatch, shuffle):
    """Every slice of an array Keras makes is counted: only the handed and the new batches'."""
    from keras.src.trainers.data_adapters import array_slicing

    start, sliced, getitem = StartAt(6), [], array_slicing.Sliceable.__getitem__

    def counting(self, indices):
        if start.how is not None:  # (not the symbolic build's batch before the fit)
            sliced.append(len(self.array[indices]))
        return getitem(self, indices)

    monkeypatch.setattr(array_slicing.Sliceable, "__getitem__", counting)
    make_model().fit(X, Y, batch_size=2, epochs=1, shuffle=shuffle, verbose=0, callbacks=[start])
    assert start.batches == [6, 7]
    assert sliced == [2] * 6  # batch 5 (handed over), 6 and 7: x and y each; none before
    assert start.how == "index"


@pytest.mark.backends
@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch's DataLoader")
def test_a_data_loader_unlike_keras_s_is_left_unskipped():
    """Workers, a generator of its own...: `loader_from` declines, the undo says so."""
    import torch

    from keras_ckpt import epoch_skip

    class Owner:
        def loader(self):
            return torch.utils.data.DataLoader(range(8), batch_size=2,
                                               generator=torch.Generator().manual_seed(1))

    owner = Owner()
    undo = epoch_skip.shadowed_once(owner, "loader", epoch_skip.loader_from, 2)
    assert len(owner.loader()) == 4 and "loader" not in vars(owner) and undo() is True
    undo = epoch_skip.shadowed_once(owner, "loader", lambda make, count: (
        epoch_skip.loader_from(lambda: torch.utils.data.DataLoader(range(8), batch_size=2),
                               count)), 2)
    assert [b.tolist() for b in owner.loader()] == [[4, 5], [6, 7]] and undo() is False


@pytest.mark.backends
@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="Keras's array iterators")
def test_an_array_epoch_whose_iterator_keras_made_before_is_consumed():
    """With `steps_per_epoch`, Keras's first epoch reads the iterator its symbolic build made
    (not shadowed, its first batch read by then): the batches are read and dropped instead."""
    keras_own, _ = fit_recording(X, Y, batch_size=2, steps_per_epoch=7)
    ours, start = fit_recording(X, Y, at=3, batch_size=2, steps_per_epoch=7)
    assert start.how == "index" and len(ours) == 4
    for mine, theirs in zip(ours, keras_own[3:], strict=True):
        assert [a.tobytes() for a in mine] == [a.tobytes() for a in theirs]


def test_a_generator_epoch_starts_at_a_batch_by_advancing_its_stream():
    """`GeneratorDataAdapter.generator()` is the stream: advanced in Python, unconverted."""
    def batches():
        for i in range(8):
            yield np.full((2, 4), i, "float32"), np.full((2, 1), i, "float32")

    start = StartAt(5)
    make_model().fit(batches(), steps_per_epoch=8, epochs=1, verbose=0, callbacks=[start])
    assert start.how == "source" and start.batches == [5, 6, 7]
    assert float(start.handed[0][0][0, 0]) == 4.0  # batch 4, the last skipped, handed over


def test_the_optimizer_stores_its_variables_uncopied_where_keras_stores_numpy_copies(
        monkeypatch):
    """`BaseOptimizer.save_own_variables`: key `i` is `variables[i].numpy()`; ours: the variable."""
    from keras_ckpt import keras_layout

    model = make_model()
    model.fit(X, Y, verbose=0)
    names = {id(v): f"v{i}" for i, v in enumerate(model.variables + model.optimizer.variables)}
    ours = keras_layout.layout(model, names)
    assert "save_own_variables" not in vars(model.optimizer)  # undone
    monkeypatch.setattr(keras_compat, "store_optimizer_uncopied", lambda optimizer: lambda: None)
    keras_own = keras_layout.layout(model, names)  # copies, mapped back by value
    assert ours == keras_own and all(e.array is not None for e in ours.entries)
    assert sum(e.group.endswith("optimizer/vars") for e in ours.entries) == len(
        model.optimizer.variables)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="Keras defers building on TF")
def test_the_input_spec_builds_the_compiled_state_before_the_first_trace():
    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            model = self.model
            self.spec = keras_compat.epoch_element_spec(model)
            self.before = (model.optimizer.built, keras_compat.compiled_metrics(model).built)
            keras_compat.symbolic_build(model, self.spec)
            self.after = (model.optimizer.built, keras_compat.compiled_metrics(model).built)

    class Custom(keras.Sequential):
        def train_step(self, data):
            return super().train_step(data)

    model, probe = make_model(), Probe()
    model.compile("adam", "mse", metrics=["mae"])
    model.fit(X, Y, batch_size=5, epochs=1, verbose=0, callbacks=[probe])
    assert [s.shape.as_list() for s in probe.spec] == [[None, X.shape[1]], [None, 1]]
    assert probe.before == (False, False) and probe.after == (True, True)  # Keras: in the trace
    assert keras_compat.has_keras_train_step(model)
    assert not keras_compat.has_keras_train_step(Custom([keras.Input((2,)), keras.layers.Dense(1)]))


def test_swap_ema_weights_records_whether_the_model_holds_the_ema_weights():
    """`SWAP_EMA_STATE`: set by `SwapEMAWeights`'s epoch end (EMA weights swapped in), read by
    its epoch begin (swapped back where set): what a checkpoint carries for it."""
    model = make_model(optimizer=keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.5))
    model.fit(X, Y, epochs=2, verbose=0)  # (its end writes the EMA weights into the model)
    for v in model.trainable_variables:
        v.assign(v + 1.0)  # the EMA weights now differ from the model's
    swap = keras.callbacks.SwapEMAWeights(swap_on_epoch=True)
    swap.set_model(model)
    swap.set_params({"epochs": 5})
    (name,) = keras_compat.SWAP_EMA_STATE
    raw = [v.numpy() for v in model.trainable_variables]
    assert getattr(swap, name) is False
    swap.on_epoch_end(0)
    assert getattr(swap, name) is True
    for a, v in zip(raw, model.trainable_variables, strict=True):
        np.testing.assert_allclose(a - 1.0, v.numpy(), rtol=1e-6, atol=1e-6)  # the EMA's
    restored = keras.callbacks.SwapEMAWeights(swap_on_epoch=True)  # a resumed run's
    restored.set_model(model)
    setattr(restored, name, True)
    restored.on_epoch_begin(1)
    assert getattr(restored, name) is False
    for a, v in zip(raw, model.trainable_variables, strict=True):
        np.testing.assert_allclose(a, v.numpy(), rtol=1e-6, atol=1e-6)


def test_tensorboard_counts_a_fit_s_train_batch_ends_from_zero(tmp_path):
    """`TENSORBOARD_STEP`: `TensorBoard`'s step for batch summaries, reset at train begin and
    one more at each train batch end (what a resumed fit's is set from)."""
    board = keras.callbacks.TensorBoard(str(tmp_path), update_freq="epoch")
    model = make_model()
    model.fit(X, Y, batch_size=4, epochs=2, verbose=0, callbacks=[board])
    assert getattr(board, keras_compat.TENSORBOARD_STEP) == 8
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0, callbacks=[board])
    assert getattr(board, keras_compat.TENSORBOARD_STEP) == 2


def test_model_checkpoint_counts_batches_as_save_freq_counters_works_them_out():
    """`MODEL_CHECKPOINT_COUNTERS`: `ModelCheckpoint(save_freq=N)`'s batches since its last
    save and last batch index, as its `_should_save_on_batch` keeps them hook by hook, equal
    `keras_callbacks.save_freq_counters` at every point a resume may start from."""
    from keras_ckpt.fit.keras_callbacks import save_freq_counters

    def counters(callback):
        return tuple(getattr(callback, name) for name in keras_compat.MODEL_CHECKPOINT_COUNTERS)

    for every, steps, spe in [(3, 4, 1), (2, 4, 1), (3, 5, 2), (4, 6, 4), (5, 7, 3), (1, 3, 2)]:
        theirs = keras.callbacks.ModelCheckpoint("k.keras", save_freq=every)
        for epoch in range(4):
            assert save_freq_counters(every, steps, spe, epoch, 0) == counters(theirs)
            for batch in [min(end, steps) - 1 for end in range(spe, steps + spe, spe)]:
                theirs._should_save_on_batch(batch)
                if batch + 1 < steps:  # (a resume at the epoch's end starts the next one)
                    assert save_freq_counters(every, steps, spe, epoch, batch + 1) == \
                        counters(theirs), (every, steps, spe, epoch, batch)


def test_the_global_seed_generator_is_made_at_the_first_unseeded_draw():
    """`global_seed_generator`: none after `set_random_seed` (which starts it afresh), Keras's
    own after an unseeded `keras.random` call; `create=True` makes it."""
    keras.utils.set_random_seed(3)
    assert keras_compat.global_seed_generator() is None
    keras.random.normal((2,))
    made = keras_compat.global_seed_generator()
    assert isinstance(made, keras.random.SeedGenerator)
    assert keras_compat.global_seed_generator(create=True) is made
    keras.utils.set_random_seed(3)
    assert keras_compat.global_seed_generator(create=True) is not made


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's tf.function")
def test_the_train_function_s_traced_graphs_are_found_through_its_closure():
    """`traced_graphs`: Keras's TensorFlow `train_function` is a Python function closing over
    the `tf.function`s `_make_function` made; after a step, their traced graphs."""
    model = make_model()
    model.fit(X, Y, epochs=1, verbose=0)
    graphs = keras_compat.traced_graphs(model.train_function)
    assert graphs and any(op.type == "ReadVariableOp" or op.type == "StatefulPartitionedCall"
                          for g in graphs for op in g.get_operations())
