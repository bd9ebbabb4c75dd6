"""Data helpers whose order resumes exactly.

Which inputs replay their order after a resume without help (TensorFlow
backend, `keras.utils.set_random_seed` called before the model is built):

- numpy arrays, `shuffle=False` or `shuffle=True`: Keras 3.15 shuffles with
  a seeded op that is re-created for every epoch, so every epoch of a seeded
  run sees the same order, in the interrupted run and in the resumed one;
- a `keras.utils.PyDataset`: Keras shuffles its batch order with Python's
  `random`, whose state rides in the checkpoint;
- a `tf.data` pipeline without shuffling, or with `reshuffle_each_iteration=False`.

A `tf.data` pipeline that reshuffles every epoch (`.shuffle(...)` with its
default `reshuffle_each_iteration=True`) keeps its shuffle state inside the
TensorFlow runtime, where no callback can save it. Seeded, it resumes all the
same: ModelCheckpoint fast-forwards its seeds at train begin
(`keras_ckpt.inputs.fast_forward`). Where that does not apply (no seed, a
distribution strategy, or a pipeline used outside `fit` between epochs),
replace that `.shuffle(...)` by `.apply(EpochShuffle(buffer_size, seed))`:
every epoch gets its own order, keyed by the epoch, and the epoch counter
rides in the checkpoint.
"""

from __future__ import annotations

import numpy as np

from keras_ckpt import registry
from keras_ckpt.validation import check_number

__all__ = ["EpochShuffle"]

_GRAPH_SEED = 20_261_122


class EpochShuffle:
    """A `tf.data` shuffle that reshuffles every epoch and resumes exactly.

    Epoch `e` is shuffled with a seed derived from `(seed, e)`; the counter
    `e` is saved in every keras-ckpt checkpoint (under `name`) and restored on
    resume, so a resumed run sees the same order, epoch for epoch, as an
    uninterrupted one.

    Args:
        buffer_size: as for `tf.data.Dataset.shuffle`, >= 1.
        seed: the base seed (an integer >= 0).
        name: the key its state is saved under; give each helper its own.

    Example:
    ```python
    shuffle = keras_ckpt.data.EpochShuffle(buffer_size=1024, seed=42)
    train = tf.data.Dataset.from_tensor_slices((x, y)).apply(shuffle).batch(32)
    model.fit(train, epochs=10,
              callbacks=[keras_ckpt.ModelCheckpoint("ckpt/{epoch}.keras", resume=True)])
    ```
    """

    def __init__(self, buffer_size: int, seed: int, name: str = "train_shuffle") -> None:
        check_number("buffer_size", buffer_size, minimum=1, integer=True)
        check_number("seed", seed, minimum=0, integer=True)
        if not isinstance(name, str) or not name:
            raise TypeError(f"`name` must be a non-empty string; got {name!r}.")
        self.buffer_size = int(buffer_size)
        self.seed = int(seed)
        self.name = name
        self.epoch = 0
        registry.track_data(name, self)

    def _next_seed(self) -> np.int64:
        epoch = self.epoch
        self.epoch += 1
        return np.int64((self.seed * 1_000_003 + epoch) % (2**63 - 1))

    def __call__(self, dataset):
        """Returns `dataset` shuffled anew, and reproducibly, on every iteration."""
        import tensorflow as tf

        @tf.autograph.experimental.do_not_convert
        def one_epoch(_):
            # A graph-level seed of our own, for this function's graph only: the
            # order then depends on `seed` and the epoch alone, and TensorFlow's
            # seed helper never compares a tensor seed with a zero global seed.
            tf.compat.v1.set_random_seed(_GRAPH_SEED)
            seed = tf.reshape(tf.numpy_function(self._next_seed, [], tf.int64, stateful=True), [])
            return dataset.shuffle(self.buffer_size, seed=seed, reshuffle_each_iteration=False)

        shuffled = tf.data.Dataset.from_tensors(0).flat_map(one_epoch)
        cardinality = int(dataset.cardinality())
        if cardinality >= 0:
            shuffled = shuffled.apply(tf.data.experimental.assert_cardinality(cardinality))
        return shuffled

    def get_state(self) -> dict:
        """The number of epochs (iterations) begun so far."""
        return {"epoch": self.epoch, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        """Restores `get_state()`'s output."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"EpochShuffle {self.name!r}: the checkpoint was made with seed "
                f"{state['seed']}, this helper has seed {self.seed}.")
        self.epoch = int(state["epoch"])
