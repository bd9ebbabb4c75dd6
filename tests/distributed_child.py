"""One training run under a distribution strategy, for tests/test_distributed.py.

Usage: python distributed_child.py STRATEGY DIRECTORY OUT [--epochs N] [--kill-step S]
    [--budget-steps B] [--poison-step P]

STRATEGY: `mirrored` (TensorFlow, `tf.distribute.MirroredStrategy` over two
logical CPU devices), `data_parallel` (JAX, `keras.distribution.DataParallel`
over two host devices) or `model_parallel` (JAX, a Dense kernel sharded over
two host devices). The devices are made before the backend starts, which is
why this is a process of its own. Trains a small model with Dropout and
BatchNormalization, a keras-ckpt ModelCheckpoint (every 3 steps, resume=True)
and optionally BudgetStop (a simulated clock: one second a step) or
TerminateOnNaN (a NaN target at global step P); SIGKILLs itself after global
step S. Writes the model's and optimizer's variables, the history and what the
callbacks report to OUT (an .npz).
"""

from __future__ import annotations

import os
import signal
import sys

STRATEGY = sys.argv[1]
BACKEND = "tensorflow" if STRATEGY == "mirrored" else "jax"
os.environ["KERAS_BACKEND"] = BACKEND
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import child_setup  # noqa: E402
import keras  # noqa: E402

import keras_ckpt  # noqa: E402


class Kill(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def scope():
    """The strategy's scope (TensorFlow) or a no-op after setting the distribution (JAX)."""
    import contextlib

    if STRATEGY == "mirrored":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        return strategy.scope()
    import jax

    devices = jax.devices()
    assert len(devices) == 2, devices
    if STRATEGY == "data_parallel":
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    else:
        mesh = keras.distribution.DeviceMesh((2,), ["model"], devices)
        layouts = keras.distribution.LayoutMap(mesh)
        # The first Dense kernel, split by columns (Keras matches the whole path).
        layouts[".*/dense/kernel"] = (None, "model")
        keras.distribution.set_distribution(keras.distribution.ModelParallel(
            layout_map=layouts, batch_dim_name=None))
    return contextlib.nullcontext()


def main() -> None:
    a = child_setup.parser("strategy").parse_args()

    keras.utils.set_random_seed(3)
    x, y = child_setup.data(a.poison_step)
    with scope():
        model = child_setup.small_model()
    checkpoint = keras_ckpt.ModelCheckpoint(
        os.path.join(a.directory, "c-{epoch:02d}-{batch}.keras"), save_freq=3, resume=True)
    callbacks = [checkpoint]
    budget = guard = None
    if a.budget_steps is not None:
        clock = child_setup.Clock()
        budget = keras_ckpt.BudgetStop(max_duration=a.budget_steps + 0.5, clock=clock, verbose=0)
        callbacks = [clock, checkpoint, budget]
    if a.poison_step is not None:
        guard = keras_ckpt.TerminateOnNaN(verbose=0)
        callbacks.append(guard)
    if a.kill_step is not None:
        callbacks.append(Kill(a.kill_step))
    # The poisoned run is not shuffled, so that its NaN batch sits at a known step.
    history = model.fit(x, y, batch_size=16, epochs=a.epochs, verbose=0,
                        shuffle=a.poison_step is None, validation_data=(x[:32], y[:32]),
                        callbacks=callbacks)
    child_setup.write_report(
        a.out, model, history, checkpoint, guard,
        budget=None if budget is None else [budget.stop_reason, budget.checkpoint],
        sharding=str(getattr(model.layers[0].kernel.value, "sharding", "")))


if __name__ == "__main__":
    main()
