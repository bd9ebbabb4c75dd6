"""Inputs a resume cannot replay are named at train begin, with what to do; the others are not."""

from __future__ import annotations

import random
import warnings

import keras
import numpy as np
import pytest
from conftest import make_data, make_model

import keras_ckpt

X, Y = make_data(32, seed=2)


class Reshuffling(keras.utils.PyDataset):
    """The classic Sequence recipe: it shuffles its own index array at every epoch end."""

    def __init__(self):
        super().__init__()
        self.indices = np.arange(32)

    def __len__(self):
        return 2

    def __getitem__(self, i):
        rows = self.indices[i * 16:(i + 1) * 16]
        return X[rows], Y[rows]

    def on_epoch_end(self):
        np.random.shuffle(self.indices)


class Plain(Reshuffling):
    """Keras's own epoch end (nothing to save)."""

    on_epoch_end = keras.utils.PyDataset.on_epoch_end


def generator():
    while True:
        yield X[:16], Y[:16]


def fit_warnings(tmp_path, x, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_model().fit(x, epochs=1, verbose=0, callbacks=[
            keras_ckpt.ModelCheckpoint(str(tmp_path / "c{epoch}.keras"), resume=True)], **kwargs)
    return [str(w.message) for w in caught if "ModelCheckpoint(resume" in str(w.message)]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data inputs")
def test_a_reshuffling_tf_data_input_is_named_with_the_fix(tmp_path):
    tf = pytest.importorskip("tensorflow")
    data = tf.data.Dataset.from_tensor_slices((X, Y))
    tf.random.set_seed(None)  # no global seed: an unseeded shuffle has no order to come back to
    messages = fit_warnings(tmp_path / "a", data.shuffle(32).batch(16))
    assert len(messages) == 1 and "without a seed" in messages[0]
    # Seeded (by the global seed or its own), it is fast-forwarded: no warning.
    assert fit_warnings(tmp_path / "s", data.shuffle(32, seed=4).batch(16)) == []
    keras.utils.set_random_seed(1)
    assert fit_warnings(tmp_path / "t", data.shuffle(32).batch(16)) == []
    assert fit_warnings(tmp_path / "b", data.shuffle(32, reshuffle_each_iteration=False,
                                                     seed=1).batch(16)) == []
    shuffle = keras_ckpt.data.EpochShuffle(32, seed=1, name="inputs_test")
    assert fit_warnings(tmp_path / "c", data.apply(shuffle).batch(16)) == []
    # Repeated: each epoch reads on where the last stopped, unless it reads whole passes
    # (2 batches) of a pipeline that gives the same batches on every pass.
    messages = fit_warnings(tmp_path / "d", data.batch(16).repeat(), steps_per_epoch=3)
    assert len(messages) == 1 and "infinite" in messages[0]
    assert fit_warnings(tmp_path / "d2", data.batch(16).repeat(), steps_per_epoch=2) == []
    assert fit_warnings(tmp_path / "d4", data.batch(16).map(lambda x, y: (2 * x, y)).repeat()
                        .prefetch(1), steps_per_epoch=4) == []
    noisy = data.map(lambda x, y: (x + tf.random.uniform(()), y))
    for i, other in enumerate([data.shuffle(32, seed=4).batch(16).repeat(),  # new order a pass
                               noisy.batch(16).repeat(),  # new noise a pass
                               data.repeat().batch(16)]):  # the cardinality of no pass known
        messages = fit_warnings(tmp_path / f"r{i}", other, steps_per_epoch=2)
        assert len(messages) == 1 and "infinite" in messages[0], i
    # Fewer steps than batches: Keras reads on across epochs, from one iterator.
    messages = fit_warnings(tmp_path / "e", data.shuffle(32, seed=4).batch(8),
                            steps_per_epoch=2)
    assert len(messages) == 1 and "4 batches and steps_per_epoch=2" in messages[0]
    assert "reshuffling seeds" in messages[0]
    assert fit_warnings(tmp_path / "f", data.batch(8), steps_per_epoch=4) == []


def test_a_generator_and_a_stateful_pydataset_are_named(tmp_path):
    messages = fit_warnings(tmp_path / "g", generator(), steps_per_epoch=2)
    assert len(messages) == 1 and "generator" in messages[0]
    messages = fit_warnings(tmp_path / "p", Reshuffling())
    assert len(messages) == 1 and "on_epoch_end" in messages[0]
    assert fit_warnings(tmp_path / "n", Plain()) == []
    assert fit_warnings(tmp_path / "x", X, y=Y, batch_size=16) == []


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data inputs")
@pytest.mark.parametrize("steps_per_epoch", [None, 2], ids=["whole-epochs", "steps-per-epoch"])
def test_a_seeded_reshuffling_tf_data_input_resumes_bitwise(tmp_path, steps_per_epoch):
    tf = pytest.importorskip("tensorflow")

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("killed")

    def run(callbacks, seed):
        model = make_model(seed=seed)
        keras.utils.set_random_seed(7)  # the dataset's seeds: as a re-run script makes them
        data = tf.data.Dataset.from_tensor_slices((X, Y)).shuffle(32).batch(16)  # 2 batches
        history = model.fit(data, epochs=4, verbose=0, steps_per_epoch=steps_per_epoch,
                            callbacks=callbacks)
        return model, history

    template = str(tmp_path / "c{epoch}.keras")
    straight, reference = run([], seed=3)
    with pytest.raises(RuntimeError, match="killed"):
        run([keras_ckpt.ModelCheckpoint(template, resume=True), Crash()], seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, history = run([keras_ckpt.ModelCheckpoint(template, resume=True)], seed=5)
    assert not [w for w in caught if "ModelCheckpoint(resume" in str(w.message)]  # it is exact
    for a, b in zip(straight.variables, resumed.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert history.history == reference.history


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data inputs")
def test_a_reshuffling_tf_data_input_of_unknown_length_is_named(tmp_path):
    tf = pytest.importorskip("tensorflow")
    data = tf.data.Dataset.from_tensor_slices((X, Y)).filter(lambda x, y: True)
    messages = fit_warnings(tmp_path, data.shuffle(32, seed=4).batch(16))
    assert len(messages) == 1 and "assert_cardinality" in messages[0]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data inputs")
def test_a_reshuffling_validation_tf_data_input_is_named(tmp_path):
    tf = pytest.importorskip("tensorflow")
    data = tf.data.Dataset.from_tensor_slices((X, Y))
    messages = fit_warnings(tmp_path / "v", data.batch(16),
                            validation_data=data.shuffle(32, seed=2).batch(16))
    assert len(messages) == 1 and "validation tf.data input reshuffles" in messages[0]
    assert fit_warnings(tmp_path / "w", data.batch(16), validation_data=data.batch(16)) == []


@pytest.mark.backends
def test_arrays_and_a_pydataset_read_on_across_epochs_are_named(tmp_path):
    """Fewer steps an epoch than batches: Keras reads on from one iterator across epochs, and
    a resume would start the input again (epoch 1 trained on epoch 0's batches, silently)."""
    messages = fit_warnings(tmp_path / "a", X, y=Y, batch_size=8, steps_per_epoch=2)
    assert len(messages) == 1 and "4 batches and steps_per_epoch=2" in messages[0]
    messages = fit_warnings(tmp_path / "p", Plain(), steps_per_epoch=1)
    assert len(messages) == 1 and "2 batches and steps_per_epoch=1" in messages[0]
    assert fit_warnings(tmp_path / "w", X, y=Y, batch_size=8, steps_per_epoch=4) == []


class Augmented(Plain):
    """Random augmentation in `__getitem__` from the global NumPy and Python RNGs: a
    Sequence recipe older than Keras 3."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        x = X[i * 8:(i + 1) * 8]
        noise = np.random.normal(0.0, 0.1, x.shape) + random.gauss(0.0, 0.1)
        return (x + noise).astype("float32"), Y[i * 8:(i + 1) * 8]


class NumpyNoise(keras.layers.Layer):
    """A layer drawing from NumPy's global RNG as it runs (eagerly)."""

    def call(self, x, training=False):
        if not training:
            return x
        return x + keras.ops.convert_to_tensor(
            np.random.normal(0.0, 0.1, tuple(x.shape)).astype("float32"))


def _crashed_and_resumed(tmp_path, make, x, capsys, crash=7, save_freq=3, **kwargs):
    from test_preemption import same_state
    from test_step_counting import StopAfter

    def run(callbacks):
        model = make()
        keras.utils.set_random_seed(3)
        data = x() if callable(x) else x  # (a pipeline: made anew, as a script run again does)
        return model, model.fit(data, epochs=3, verbose=0, callbacks=callbacks, **kwargs)

    straight, reference = run([])
    template = str(tmp_path / "c{epoch}-{batch}.keras")
    with pytest.raises(RuntimeError, match="crash"):
        run([keras_ckpt.ModelCheckpoint(template, save_freq=save_freq), StopAfter(crash)])
    capsys.readouterr()
    resumed, history = run([keras_ckpt.ModelCheckpoint(template, save_freq=save_freq,
                                                       resume=True)])
    same_state(straight, resumed)
    assert history.history == reference.history
    return capsys.readouterr().out


class OwnRngAugmented(Augmented):
    """Random augmentation from a generator of the dataset's own (a Mersenne Twister one:
    its state holds an array)."""

    def __init__(self):
        super().__init__()
        self.rng = np.random.Generator(np.random.MT19937(3))

    def __getitem__(self, i):
        x = X[i * 8:(i + 1) * 8]
        return (x + self.rng.normal(0.0, 0.1, x.shape)).astype("float32"), Y[i * 8:(i + 1) * 8]


@pytest.mark.backends
@pytest.mark.parametrize("dataset", [Augmented, OwnRngAugmented], ids=["global", "its-own"])
@pytest.mark.parametrize("save_freq, crash, at", [(3, 7, "epoch 2, step 3"),
                                                  (5, 6, "epoch 2, step 2")],
                         ids=["step-2", "step-1"])
def test_a_pydataset_drawing_random_numbers_resumes_mid_epoch_with_the_same_draws(
        tmp_path, capsys, dataset, save_freq, crash, at):
    """Its skipped batches are read again (not trained): their draws are the uninterrupted
    run's, whatever the backend's reading ahead, from the global RNGs or from its own
    generator (whose state at the epoch begin rides along); said in one line. After one
    step, the one batch skipped is the one read to find out."""
    out = _crashed_and_resumed(tmp_path, make_model, dataset, capsys, crash=crash,
                               save_freq=save_freq)
    assert at in out and "read again, not trained" in out


def test_a_layer_drawing_from_numpy_s_rng_resumes_mid_epoch_with_its_state_at_the_step(
        tmp_path, capsys):
    """The checkpoint holds the Python and NumPy states at its step as well as at the epoch
    begin (from which the epoch's order is drawn again); the first new step gets them."""
    def make():
        keras.utils.set_random_seed(5)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), NumpyNoise(),
                                  keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", run_eagerly=True)
        return model

    out = _crashed_and_resumed(tmp_path, make, X, capsys, y=Y, batch_size=8)
    assert "read again" not in out


@pytest.mark.backends
@pytest.mark.skipif(keras.backend.backend() == "torch", reason="tf.data and Keras layers")
@pytest.mark.parametrize("save_freq, crash", [(3, 7), ("epoch", 9)], ids=["mid-epoch", "epoch"])
def test_a_keras_random_layer_in_a_tf_data_map_resumes_with_its_seed_generator(
        tmp_path, capsys, save_freq, crash):
    """Keras's documented augmentation in the pipeline: the layer's SeedGenerator (a variable
    of the map's, not the model's) rides along; mid-epoch, from the epoch begin's state."""
    tf = pytest.importorskip("tensorflow")

    def pipeline():
        brighter = keras.layers.RandomBrightness(0.2, value_range=(-4.0, 4.0))
        return tf.data.Dataset.from_tensor_slices((X, Y)).batch(8).map(lambda x, y: (
            tf.reshape(brighter(tf.reshape(x, (-1, 2, 2, 1)), training=True), (-1, 4)), y))

    _crashed_and_resumed(tmp_path, make_model, pipeline, capsys, crash=crash,
                         save_freq=save_freq)


def test_a_pydataset_s_epoch_hooks_and_an_endless_one_are_named(tmp_path):
    """`on_epoch_begin` keeps state as `on_epoch_end` does, in training and in validation
    input; an endless PyDataset with steps_per_epoch reads on across epochs."""
    class ShuffledAtBegin(Plain):
        def on_epoch_begin(self):
            np.random.shuffle(self.indices)

    class Endless(Plain):
        @property
        def num_batches(self):
            return None

    (said,) = fit_warnings(tmp_path / "b", ShuffledAtBegin())
    assert "overrides on_epoch_begin" in said
    (said,) = fit_warnings(tmp_path / "v", X, y=Y, batch_size=16, validation_data=Reshuffling())
    assert "Reshuffling validation input overrides on_epoch_end" in said
    (said,) = fit_warnings(tmp_path / "e", Endless(), steps_per_epoch=2)
    assert "endless" in said


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data inputs")
def test_a_shuffle_under_a_repeat_is_named(tmp_path):
    tf = pytest.importorskip("tensorflow")
    data = tf.data.Dataset.from_tensor_slices((X, Y))
    (said,) = fit_warnings(tmp_path / "r", data.shuffle(32, seed=4).repeat(2).batch(16))
    assert "under a `.repeat(n)`" in said
    tf.random.set_seed(None)  # unseeded under a cache: another process caches another order
    (said,) = fit_warnings(tmp_path / "c", data.shuffle(32).cache().batch(16))
    assert "without a seed" in said
    assert fit_warnings(tmp_path / "s", data.repeat(2).shuffle(64, seed=4).batch(16)) == []


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="tf.data inputs")
@pytest.mark.parametrize("kind", ["shuffle-then-cache", "random-each-iteration"])
@pytest.mark.parametrize("save_freq, crash", [(3, 7), ("epoch", 9)], ids=["mid-epoch", "epoch"])
def test_cached_and_rerandomized_tf_data_inputs_resume_bitwise(tmp_path, capsys, kind,
                                                               save_freq, crash):
    """A `.cache()` over a seeded shuffle gives its first order every epoch (no seed to
    fast-forward); `Dataset.random(rerandomize_each_iteration=True)` draws its seeds as a
    shuffle does (fast-forwarded)."""
    tf = pytest.importorskip("tensorflow")

    def pipeline():
        data = tf.data.Dataset.from_tensor_slices((X, Y))
        if kind == "shuffle-then-cache":
            return data.shuffle(32, seed=3).cache().batch(8)
        noise = tf.data.Dataset.random(seed=4, rerandomize_each_iteration=True).map(
            lambda r: tf.cast(r % 7, "float32") / 70.0)
        return tf.data.Dataset.zip((data, noise)).map(lambda d, n: (d[0] + n, d[1])).batch(8)

    _crashed_and_resumed(tmp_path, make_model, pipeline, capsys, crash=crash,
                         save_freq=save_freq)


@pytest.mark.backends
@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch DataLoader")
@pytest.mark.parametrize("save_freq, crash", [(3, 7), ("epoch", 9)], ids=["mid-epoch", "epoch"])
def test_a_torch_data_loader_shuffling_with_its_own_generator_resumes_with_it(
        tmp_path, capsys, save_freq, crash):
    import torch

    def loader():
        data = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
        return torch.utils.data.DataLoader(data, batch_size=8, shuffle=True,
                                           generator=torch.Generator().manual_seed(5))

    _crashed_and_resumed(tmp_path, make_model, loader, capsys, crash=crash, save_freq=save_freq)
