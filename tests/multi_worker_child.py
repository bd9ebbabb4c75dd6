"""One worker of a two-worker MultiWorkerMirroredStrategy run, for tests/test_multi_worker.py.

Usage: python multi_worker_child.py INDEX PORTS DIRECTORY OUT [--epochs N]
    [--kill-step S] [--budget-steps B] [--poison-step P] [--signal-step S]
    [--worker1-directory D] [--early-stopping] [--async-write]

INDEX is this worker's index (0 is the chief), PORTS the two workers' ports
on 127.0.0.1 ("p0,p1"). Trains a small model (Dropout, BatchNormalization)
on a tf.data pipeline the strategy shards between the workers, with a
keras-ckpt ModelCheckpoint (every 3 steps, resume=True) and optionally:
EarlyStopping (restore_best_weights, the best weights in a file),
BudgetStop (a daily budget of B steps) with a simulated clock (one second a
step on the chief, from 0 each run, so the same day; worker 1's
clock runs ten times faster, so a worker deciding by its own clock would
stop elsewhere), TerminateOnNaN (NaN targets at global step P), a SIGKILL of
worker 1 after global step S, a SIGTERM sent to worker 1 alone after step S,
or another checkpoint directory for worker 1 (--worker1-directory); with
--async-write the chief writes on its background writer.

Everything this process does that changes the checkpoint directory (files
opened for writing, renames, removals, new folders) is recorded, to show
that only the chief writes there. Writes the variables, the history and what
the callbacks report to OUT (an .npz).

Keras 3.15's `fit` does not run under MultiWorkerMirroredStrategy
(keras-team/keras#20585): `patch_keras_fit` applies the two fixes it needs
here, in this test process only (see docs/backends.md).
"""

from __future__ import annotations

import json
import os
import sys

INDEX = int(sys.argv[1])
PORTS = sys.argv[2].split(",")
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"127.0.0.1:{p}" for p in PORTS]},
    "task": {"type": "worker", "index": INDEX}})
os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import child_setup  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_ckpt  # noqa: E402


def patch_keras_fit() -> None:
    """The two Keras 3.15 fixes `fit` needs under MultiWorkerMirroredStrategy.

    1. `_maybe_symbolic_build` averages a distributed batch across workers to
       learn its shapes, which fails; the first local replica's part is enough.
    2. `reduce_per_replica` averages scalar logs with `axis=0`, which fails on
       scalars; they are averaged with `axis=None`.
    """
    from keras.src.backend.tensorflow import trainer

    def symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tf.nest.map_structure(
                    lambda v: self.distribute_strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues) else v, batch)
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    reduce_per_replica = trainer.reduce_per_replica

    def reduce_scalars(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(
                strategy):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None)
                if trainer._is_per_replica_instance(v) else v, values)
        return reduce_per_replica(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = symbolic_build
    trainer.reduce_per_replica = reduce_scalars


def main() -> None:
    p = child_setup.parser("index", "ports")
    p.add_argument("--signal-step", type=int)
    p.add_argument("--sigint-chief-step", type=int)
    p.add_argument("--worker1-directory")
    p.add_argument("--early-stopping", action="store_true")
    p.add_argument("--async-write", action="store_true")
    a = p.parse_args()
    if INDEX == 1 and a.worker1_directory:  # a worker that cannot see the chief's files
        a.directory = a.worker1_directory

    patch_keras_fit()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == 2
    changes = child_setup.record_writes(a.directory)

    x, y = child_setup.data(a.poison_step)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with strategy.scope():
        keras.utils.set_random_seed(3)
        model = child_setup.small_model()
    checkpoint = keras_ckpt.ModelCheckpoint(
        os.path.join(a.directory, "c-{epoch:02d}-{batch}.keras"), save_freq=3,
        resume=True, verbose=0, async_write=a.async_write)
    callbacks = [checkpoint]
    if a.early_stopping:
        callbacks.append(keras_ckpt.EarlyStopping(
            monitor="loss", patience=10, restore_best_weights=True,
            best_weights_path=os.path.join(a.directory, "best.weights.h5")))
    callbacks = child_setup.two_process_callbacks(a, INDEX, model, checkpoint, callbacks,
                                                  changes)
    model.fit(data, epochs=a.epochs, verbose=0, callbacks=callbacks)


if __name__ == "__main__":
    main()
