"""A resumed epoch's trained batches, skipped: what is done with what Keras's internals gave.

`keras_compat.start_epoch_at` finds what this works on among Keras's internals (the running
fit's train-function calls, the parts of Keras's array pipeline); the rest is here, on
public APIs and on the calling conventions of the Keras methods it stands in for once
(`shadow_once`: `_get_iterator(slice_fn, inputs)` and `get_torch_dataloader()`, each pinned by
a test in tests/test_keras_compat.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator, Iterator
from typing import Any

from keras_ckpt import rng
from keras_ckpt.fit import input_state
from keras_ckpt.fit.step_guards import is_end_of_data

__all__ = ["calls_from", "indexed_from", "gathered_from", "shadow_once", "shadowed_once",
           "sliced_from", "loader_from"]


def calls_from(calls: Generator, batches: int, spe: int, how: str, undo: Callable[[], Any],
               skipped: Callable[[Any], None], failed: Callable[[BaseException], None]) -> Any:
    """Keras's `(first step, last step, data iterator)` per train-function call, the calls
    before batch `batches` dropped (`how`, `undo`: `keras_compat._skip_before`'s; "consume":
    their batches read here, as where `undo()` says nothing was skipped). The last skipped
    batch is read and handed to `skipped`."""
    dropped = -(-batches // spe)
    try:
        for n, item in enumerate(calls):
            # The epoch's data iterator is made: its batches skipped, unless undo() says not.
            if n == 0 and how in ("dataset", "index") and undo():
                how = "consume"
            if n >= dropped:
                yield item
                continue
            take = min(spe, batches - n * spe) if how == "consume" else int(n == dropped - 1)
            batch = None
            for _ in range(take):
                try:
                    batch = next(item[-1])
                except BaseException as e:
                    if not is_end_of_data(e):
                        failed(e)
                        raise
                    skipped(None)
                    return
            if n == dropped - 1:
                skipped(batch)
    finally:
        undo()
        calls.close()


def indexed_from(py_dataset: Any, shuffle: bool, standardize: Callable[[Any], Any],
                 count: int, drew: list) -> Iterator:
    """A `PyDataset`'s batches (without workers) in Keras's order for the epoch from batch
    `count` (`_finite_generator`'s: the order drawn from Python's `random` where `shuffle`).

    A dataset whose `__getitem__` draws from the global Python or NumPy RNG, or from a
    generator of its own (random augmentation), needs its skipped batches' draws as the
    uninterrupted run made them: the first one is read to find out (where it is the last
    skipped one too, it is then handed on), and where it drew, all are read (not trained;
    `drew` gets True), else none but the first. A dataset drawing for some batches only is
    judged by its first."""
    indices = list(range(py_dataset.num_batches))
    if shuffle:
        random.shuffle(indices)
    own = input_state.generators_of(py_dataset)
    before = rng.marker(), input_state.marker(own)
    first = py_dataset[indices[0]]  # (the last skipped one where count is 0)
    if (rng.marker(), input_state.marker(own)) != before:
        drew.append(True)
        for i in indices[1:count]:
            py_dataset[i]
    if not count:
        yield standardize(first)
    for i in indices[max(count, 1):]:
        yield standardize(py_dataset[i])


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


def shadow_once(obj: Any, name: str, call: Callable[..., Any]) -> Callable[[], None]:
    """`obj.<name>` answered by `call(original, *args)` for its next call only (an instance
    attribute shadowing a method, or replacing a callable attribute). Returns the undo: it
    puts the original back unless that call already did (idempotent)."""
    had, before, original = name in obj.__dict__, obj.__dict__.get(name), getattr(obj, name)

    def undo() -> None:
        if had:
            obj.__dict__[name] = before
        else:
            obj.__dict__.pop(name, None)

    def once(*args: Any) -> Any:
        undo()
        return call(original, *args)

    obj.__dict__[name] = once
    return undo


def shadowed_once(owner: Any, name: str, skip: Callable[..., tuple[Any, bool]],
                  count: int) -> Callable[[], bool]:
    """`owner.<name>` shadowed for its next call by `skip(original, count, *args)`: `(what the
    call gives from batch `count`, or unskipped where declined; whether skipped)` (`sliced_from`,
    `loader_from`). Returns the undo: true where nothing was skipped (no call, or declined),
    and the batches are then to be read."""
    done: list[bool] = []

    def shadow(original: Callable, *args: Any) -> Any:
        made, skipped = skip(original, count, *args)
        done.append(skipped)
        return made

    restore = shadow_once(owner, name, shadow)

    def undo() -> bool:
        restore()
        return not any(done)

    return undo


def sliced_from(batches_of: Callable, count: int, slice_fn: Callable,
                inputs: Any) -> tuple[Iterator, bool]:
    """Keras's array batches `batches_of(slice_fn, inputs)` (`ArrayDataAdapter._get_iterator`,
    which draws the epoch's permutations with `np.random`) from batch `count`: Keras's own loop
    runs through the first `count`, drawing as it always does, with a slice function that gives
    None for every array (nothing sliced or converted), and those batches are dropped here."""
    slicing = False

    def sliced(sliceable: Any, indices: Any = None) -> Any:
        return slice_fn(sliceable, indices=indices) if slicing else None

    batches, end = batches_of(sliced, inputs), object()

    def rest() -> Iterator:  # drawn at the first batch, where Keras draws
        nonlocal slicing
        for _ in range(count):
            if next(batches, end) is end:
                return
        slicing = True
        yield from batches

    return rest(), True


class _BatchesFrom:
    """A batch sampler's index batches from batch `count`: the first ones drawn (the same
    draws from torch's RNG as ever), not yielded."""

    def __init__(self, sampler: Any, count: int) -> None:
        self.sampler, self.count = sampler, count

    def __iter__(self) -> Iterator:
        batches = iter(self.sampler)
        for _ in range(self.count):
            if next(batches, None) is None:
                return
        yield from batches

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.count)


def loader_from(make_loader: Callable[[], Any], count: int) -> tuple[Any, bool]:
    """Keras's DataLoader of array batches (`make_loader()`, `ArrayDataAdapter.
    get_torch_dataloader`) from batch `count`: a DataLoader on the same dataset and collate
    function whose batch sampler draws Keras's one's first `count` index batches without
    fetching them. Iterating it draws from torch's RNG as Keras's does (its base seed, then its
    batch sampler's). Declined (Keras's own, unskipped) where the loader is not a plain one
    (workers, a generator, pinned memory, an iterable dataset, no batch sampler)."""
    import torch

    loader = make_loader()
    data = torch.utils.data
    if type(loader) is not data.DataLoader or loader.num_workers or loader.pin_memory \
            or loader.generator is not None or loader.batch_sampler is None or loader.timeout \
            or loader.worker_init_fn is not None \
            or isinstance(loader.dataset, data.IterableDataset):
        return loader, False
    return data.DataLoader(loader.dataset, batch_sampler=_BatchesFrom(loader.batch_sampler, count),
                           collate_fn=loader.collate_fn), True
