"""Inputs a resume cannot replay are named at train begin, with what to do; the others are not."""

from __future__ import annotations

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
