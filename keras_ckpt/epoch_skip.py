"""A resumed epoch's trained batches, skipped: what is done, with public APIs only.

`keras_compat.start_epoch_at` finds what this works on among Keras's internals (the running
fit's train-function calls, the parts of Keras's array pipeline); the rest is here.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from keras_ckpt import keras_compat

__all__ = ["calls_from", "gathered_from"]


def calls_from(calls: Generator, batches: int, spe: int, how: str, undo: Callable[[], None],
               skipped: Callable[[Any], None], failed: Callable[[BaseException], None]) -> Any:
    """Keras's `(first step, last step, data iterator)` per train-function call, the calls
    before batch `batches` dropped (`how`, `undo`: `keras_compat._skip_before`'s; "consume":
    their batches read here). The last skipped batch is read and handed to `skipped`."""
    dropped = -(-batches // spe)
    try:
        for n, item in enumerate(calls):
            if n == 0 and how in ("dataset", "index"):  # the epoch's data iterator is made
                undo()
            if n >= dropped:
                yield item
                continue
            take = min(spe, batches - n * spe) if how == "consume" else int(n == dropped - 1)
            batch = None
            for _ in range(take):
                try:
                    batch = next(item[-1])
                except BaseException as e:
                    if not keras_compat.is_end_of_data(e):
                        failed(e)
                        raise
                    skipped(None)
                    return
            if n == dropped - 1:
                skipped(batch)
    finally:
        undo()
        calls.close()


def gathered_from(dataset: Any, indices: Any, arrays: Any, count: int, tf: Any) -> Any:
    """Keras's array pipeline `dataset` (`zip((indices, arrays)).map(gather)`, options and a
    prefetch; `keras_compat._array_index_skip`) rebuilt on `indices.skip(count)`: the same
    index dataset (the same order), its skipped batches gathered from nothing. None where the
    arrays are not all dense or the result's element spec is not `dataset`'s."""
    if not all(type(s) is tf.TensorSpec for s in tf.nest.flatten(arrays.element_spec)) \
            or getattr(indices.element_spec, "dtype", None) != tf.int64:
        return None

    def gather(i: Any, data: Any) -> Any:  # Keras's `grab_batch` on dense tensors
        return tf.nest.map_structure(lambda a: tf.gather(a, i, axis=0), data)

    rebuilt = tf.data.Dataset.zip((indices.skip(count), arrays)).map(
        gather, num_parallel_calls=tf.data.AUTOTUNE)
    rebuilt = rebuilt.with_options(dataset.options()).prefetch(tf.data.AUTOTUNE)
    return rebuilt if rebuilt.element_spec == dataset.element_spec else None
