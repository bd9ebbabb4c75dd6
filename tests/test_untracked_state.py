"""State Keras keeps outside the model's variables resumes with the rest (fit/hidden_state.py),
and TensorFlow random ops whose state no checkpoint can hold are named after the first step."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import make_data
from test_preemption import same_state
from test_step_counting import StopAfter

import keras_ckpt

X, Y = make_data(64, seed=11)


def fit(model, callbacks, epochs, **kwargs):
    return model.fit(X, Y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
                     validation_data=(X[:16], Y[:16]), callbacks=callbacks, **kwargs)


def crashed_and_resumed(make, tmp_path, save_freq=3):
    """An uninterrupted run and one crashed after step 6 (saved every 3) and resumed, of
    `make()`'s model: bitwise equal (variables, history); returns both models."""
    straight = make()
    reference = fit(straight, [], epochs=3)
    template = str(tmp_path / "c{epoch}-{batch}.keras")
    with pytest.raises(RuntimeError, match="crash"):
        fit(make(), [keras_ckpt.ModelCheckpoint(template, save_freq=save_freq), StopAfter(6)],
            epochs=3)
    resumed = make()
    history = fit(resumed, [keras_ckpt.ModelCheckpoint(template, save_freq=save_freq,
                                                       resume=True)], epochs=3)
    same_state(straight, resumed)
    assert history.history == reference.history
    return straight, resumed


def stateful_lstm(seed=21):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3, 4), batch_size=8),
                              keras.layers.LSTM(4, stateful=True), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


class ResetStates(keras.callbacks.Callback):
    """What a stateful RNN's user often does: the states from zeros at each epoch begin."""

    def on_epoch_begin(self, epoch, logs=None):
        self.model.layers[0].reset_states()


SEQUENCES = np.random.default_rng(3).random((48, 3, 4)).astype("float32")


def fit_sequences(model, callbacks):
    return model.fit(SEQUENCES, SEQUENCES[:, -1, :1], batch_size=8, epochs=3, shuffle=False,
                     verbose=0, callbacks=callbacks)


@pytest.mark.parametrize("save_freq, crash, reset", [
    (4, 10, False), (4, 10, True), ("epoch", 10, True)],
    ids=["mid-epoch", "mid-epoch-reset-each-epoch", "epoch-end-reset-each-epoch"])
def test_a_stateful_rnn_resumes_with_its_states(tmp_path, save_freq, crash, reset):
    """A stateful RNN's states are not among the model's variables (Keras makes them
    untracked): they ride in the checkpoint, and come back before the next epoch's begin
    hooks (epoch end) or after them (mid-epoch), as the uninterrupted run had them."""
    extra = [ResetStates()] if reset else []
    straight = stateful_lstm()
    reference = fit_sequences(straight, list(extra))
    template = str(tmp_path / "c{epoch}-{batch}.weights.h5")

    def ours():
        return keras_ckpt.ModelCheckpoint(template, save_freq=save_freq, resume=True,
                                          save_weights_only=True)

    with pytest.raises(RuntimeError, match="crash"):
        fit_sequences(stateful_lstm(), [*extra, ours(), StopAfter(crash)])
    resumed = stateful_lstm()
    history = fit_sequences(resumed, [*extra, ours()])
    same_state(straight, resumed)
    for a, b in zip(straight.layers[0].states, resumed.layers[0].states, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert history.history == reference.history


class UnseededNoise(keras.layers.Layer):
    """Noise from unseeded `keras.random` calls: Keras's global SeedGenerator, made at first
    use from Python's `random` (outside every model's variables)."""

    def call(self, x, training=False):
        return x + keras.random.normal(keras.ops.shape(x), stddev=0.5) if training else x


def test_unseeded_keras_random_in_a_layer_resumes_with_the_global_seed_generator(tmp_path):
    def noisy():
        keras.utils.set_random_seed(23)  # (also starts Keras's global SeedGenerator afresh)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                  UnseededNoise(), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        return model

    crashed_and_resumed(noisy, tmp_path)


class TensorFlowNoise(keras.layers.Layer):
    """`tf.random.normal` in a layer: its op keeps its position in its kernel, in no variable."""

    def call(self, x, training=False):
        import tensorflow as tf

        return x + tf.random.normal(tf.shape(x), stddev=0.1) if training else x


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's own ops")
def test_tensorflow_random_ops_whose_state_no_checkpoint_holds_are_named_at_the_first_step(
        tmp_path):
    """Keras's random layers draw statelessly (no warning); `tf.random.normal` in a layer is
    named once, after the first step, with what to do."""
    import warnings

    def run(*noise):
        keras.utils.set_random_seed(5)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                                  keras.layers.Dropout(0.3), keras.layers.GaussianNoise(0.1),
                                  *noise, keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(model, [keras_ckpt.ModelCheckpoint(str(tmp_path / f"{len(noise)}" / "c.keras"))],
                epochs=2)
        return [str(w.message) for w in caught if "keep their state" in str(w.message)]

    assert run() == []
    (said,) = run(TensorFlowNoise())
    assert "(RandomStandardNormal, e.g. tf.random.normal" in said
    assert "keras.random.SeedGenerator" in said


class NoisyLoss(keras.losses.Loss):
    """A loss holding what Keras tracks nowhere: a SeedGenerator and a running scale."""

    def __init__(self):
        super().__init__(name="noisy_mse")
        self.seed_generator = keras.random.SeedGenerator(7)
        self.scale = keras.Variable(1.0, trainable=False)

    def call(self, y_true, y_pred):
        noise = keras.random.normal(keras.ops.shape(y_pred), stddev=0.1,
                                    seed=self.seed_generator)
        self.scale.assign(0.9 * self.scale + 0.1 * keras.ops.mean(keras.ops.abs(y_true)))
        return keras.ops.mean(keras.ops.square(y_true - y_pred + noise), axis=-1) / self.scale


class NoisyMean(keras.metrics.Mean):
    def __init__(self):
        super().__init__(name="noisy")
        self.seed_generator = keras.random.SeedGenerator(9)

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(keras.random.uniform(keras.ops.shape(y_pred),
                                                         seed=self.seed_generator))


def test_a_loss_and_a_metric_holding_their_own_state_resume_with_it(tmp_path):
    """What the compiled loss and metric objects hold untracked by Keras rides along."""
    def model():
        keras.utils.set_random_seed(29)
        built = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
        built.compile(optimizer=keras.optimizers.Adam(0.01), loss=NoisyLoss(),
                      metrics=[NoisyMean()])
        return built

    straight, resumed = crashed_and_resumed(model, tmp_path)
    assert resumed.loss.scale.numpy() == straight.loss.scale.numpy()


class LazyScaleLoss(keras.losses.Loss):
    """A loss making its untracked variable in its first call, after train begin."""

    def __init__(self):
        super().__init__(name="lazy_scale_mse")
        self.scale = None

    def call(self, y_true, y_pred):
        if self.scale is None:
            self.scale = keras.Variable(1.0, trainable=False)
        self.scale.assign(0.9 * self.scale + 0.1 * keras.ops.mean(keras.ops.abs(y_true)))
        return keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1) / self.scale


def test_a_loss_making_its_state_in_its_first_call_is_named_at_resume(tmp_path):
    """Its variable rides in the checkpoints, but a resume cannot give it back before the first
    step uses it: said at train begin, before any batch, with the fix."""
    def model():
        keras.utils.set_random_seed(29)
        built = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        built.compile(optimizer=keras.optimizers.Adam(0.01), loss=LazyScaleLoss())
        return built

    template = str(tmp_path / "c{epoch}-{batch}.keras")
    with pytest.raises(RuntimeError, match="crash"):
        fit(model(), [keras_ckpt.ModelCheckpoint(template, save_freq=3), StopAfter(4)], epochs=2)
    before_first_batch = []

    class FirstBatch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            before_first_batch.append(len(caught))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model(), [keras_ckpt.ModelCheckpoint(template, save_freq=3, resume=True),
                      FirstBatch()], epochs=2)
    named = [str(w.message) for w in caught[:before_first_batch[0]]
             if "in its first call" in str(w.message)]
    assert len(named) == 1 and "(1 variable(s))" in named[0] and "__init__" in named[0]


class InnerNoise(keras.losses.Loss):
    def __init__(self):
        super().__init__(name="inner_noise")
        self.generators = {"noise": keras.random.SeedGenerator(7)}  # in a dict

    def call(self, y_true, y_pred):
        noise = keras.random.normal(keras.ops.shape(y_pred), stddev=0.1,
                                    seed=self.generators["noise"])
        return keras.ops.mean(keras.ops.square(y_true - y_pred + noise), axis=-1)


class Wrapping(keras.losses.Loss):
    """A loss holding another loss object that holds a SeedGenerator in a dict."""

    def __init__(self):
        super().__init__(name="wrapping")
        self.inner = InnerNoise()

    def call(self, y_true, y_pred):
        return 2.0 * self.inner.call(y_true, y_pred)


class NoisySGD(keras.optimizers.SGD):
    """Gradient noise from a SeedGenerator of the optimizer's (not among its variables)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise = keras.random.SeedGenerator(11)

    def update_step(self, gradient, variable, learning_rate):
        noise = keras.random.normal(keras.ops.shape(gradient), stddev=0.1, seed=self.noise)
        return super().update_step(gradient + noise, variable, learning_rate)


class CountingL2(keras.regularizers.Regularizer):
    """A regularizer keeping a count in a variable of its own."""

    def __init__(self):
        self.calls = keras.Variable(0.0, trainable=False)

    def __call__(self, weights):
        self.calls.assign_add(1.0)
        return 1e-3 * self.calls * keras.ops.sum(keras.ops.square(weights))

    def get_config(self):
        return {}


@pytest.mark.parametrize("scaled", [False, True], ids=["all-three", "optimizer-in-a-scaler"])
def test_what_nested_losses_an_optimizer_and_a_regularizer_hold_resumes_with_them(tmp_path,
                                                                                   scaled):
    """Scaled: the user's optimizer, inside Keras's LossScaleOptimizer, is the only object of
    the user's classes."""
    def model():
        keras.utils.set_random_seed(31)
        regularizer = None if scaled else CountingL2()
        built = keras.Sequential([keras.Input((4,)),
                                  keras.layers.Dense(8, kernel_regularizer=regularizer),
                                  keras.layers.Dense(1)])
        optimizer = NoisySGD(0.01)
        built.compile(optimizer=keras.optimizers.LossScaleOptimizer(optimizer) if scaled
                      else optimizer, loss="mse" if scaled else Wrapping())
        return built

    straight, resumed = crashed_and_resumed(model, tmp_path)
    parts = [lambda m: getattr(m.optimizer, "inner_optimizer", m.optimizer).noise.state]
    if not scaled:
        parts += [lambda m: m.loss.inner.generators["noise"].state,
                  lambda m: m.layers[0].kernel_regularizer.calls]
    for part in parts:
        np.testing.assert_array_equal(np.asarray(part(straight)), np.asarray(part(resumed)))


@pytest.mark.backends
@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch modules")
def test_the_buffers_of_a_wrapped_torch_module_resume_with_it(tmp_path):
    """A `BatchNorm1d` in a `TorchModuleWrapper`: its running statistics are buffers of the
    module's, not Keras variables; they ride along."""
    import torch

    def model():
        keras.utils.set_random_seed(37)
        module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                     torch.nn.ReLU(), torch.nn.Linear(8, 1))
        built = keras.Sequential([keras.Input((4,)), keras.layers.TorchModuleWrapper(module)])
        built.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        return built

    straight, resumed = crashed_and_resumed(model, tmp_path)
    for a, b in zip(straight.layers[0].module.buffers(), resumed.layers[0].module.buffers(),
                    strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


class GAN(keras.Model):
    """keras.io's GAN example, small: a custom train_step applying two optimizers held as
    attributes (`compile(d_optimizer, g_optimizer)`); `model.optimizer` is never built."""

    def __init__(self):
        super().__init__()
        self.discriminator = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                                               keras.layers.Dense(1)])
        self.generator = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4)])
        self.seed_generator = keras.random.SeedGenerator(13)
        self.d_loss = keras.metrics.Mean(name="d_loss")

    def call(self, x):
        return self.discriminator(x)

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    @property
    def metrics(self):
        return [self.d_loss]

    def train_step(self, data):
        import tensorflow as tf

        real, _ = data
        n = tf.shape(real)[0]
        ones, zeros = keras.ops.ones((n, 1)), keras.ops.zeros((n, 1))
        with tf.GradientTape() as tape:
            fake = self.generator(keras.random.normal((n, 2), seed=self.seed_generator))
            d_loss = self.loss_fn(keras.ops.concatenate([ones, zeros], 0), self.discriminator(
                keras.ops.concatenate([fake, real], 0)))
        weights = self.discriminator.trainable_weights
        self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, weights), weights,
                                             strict=True))
        with tf.GradientTape() as tape:
            fake = self.generator(keras.random.normal((n, 2), seed=self.seed_generator))
            g_loss = self.loss_fn(zeros, self.discriminator(fake))
        weights = self.generator.trainable_weights
        self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, weights), weights,
                                             strict=True))
        self.d_loss.update_state(d_loss)
        return {"d_loss": self.d_loss.result()}

    def test_step(self, data):
        real, _ = data
        return {"d_loss": self.loss_fn(keras.ops.zeros_like(real[:, :1]),
                                       self.discriminator(real))}


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="a TensorFlow train_step")
def test_keras_s_gan_example_resumes_with_both_of_its_optimizers(tmp_path):
    """Both optimizers are built by their first apply, inside the traced step, each with the
    variables it is applied to: the resumed run's get their step counts and learning rates
    at train begin, their slots right after Keras builds them. model.optimizer never counts a
    step: said after the first one, and no checkpoint is written inside an epoch."""
    from keras_ckpt import manager

    def model():
        keras.utils.set_random_seed(41)
        built = GAN()
        built.compile(keras.optimizers.Adam(0.001), keras.optimizers.Adam(0.002))
        built(X[:1])
        return built

    with pytest.warns(UserWarning, match="did not apply model.optimizer"):
        straight, resumed = crashed_and_resumed(model, tmp_path, save_freq="epoch")
    saved = manager.list_checkpoints(tmp_path)  # epoch 1's (resumed from), 2's, 3's
    assert [(c.epoch, c.epoch_complete) for c in saved] == [(0, True), (1, True), (2, True)]
    for name in ("d_optimizer", "g_optimizer"):
        ours, theirs = getattr(straight, name).variables, getattr(resumed, name).variables
        assert len(ours) == len(theirs) > 2
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
