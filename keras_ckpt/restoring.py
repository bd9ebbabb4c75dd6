"""Restoring a model from one checkpoint file (`keras_ckpt.restore`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from keras_ckpt import state as state_lib
from keras_ckpt.manager import CheckpointInfo, info_from_meta, read_verified_lazily
from keras_ckpt.multi_worker import workers_of
from keras_ckpt.state_checks import state_bytes_bound

__all__ = ["restore"]


def restore(model: Any, path: str | os.PathLike, *, weights_only: bool = False,
            objects: Mapping[str, Any] | None = None, rng: bool = False) -> CheckpointInfo:
    """Restores `model` (and its optimizer) from one checkpoint file.

    Use it to start a new run from any earlier checkpoint, e.g. to fine-tune on
    fresh data from epoch 5 of an old run, writing into a new directory; the
    old run's files are only read. A checkpoint of variables split across JAX
    processes reads their pieces from its shard files: each process the pieces
    its devices hold, or, in one process, every piece joined into whole arrays.
    With several processes, every process calls it: they agree on the pieces'
    verification, so a damaged piece raises on each of them before any assigns.

    Args:
        model: a built model with the same variables as the checkpoint's (the
            optimizer may be unbuilt: it is built from the model first).
        path: the checkpoint file.
        weights_only: restore `model.variables` alone (any optimizer).
        objects: stateful objects by key whose saved state to restore.
        rng: also restore the global Python and NumPy RNG states.

    Returns:
        The checkpoint's `CheckpointInfo` (its `resume_point` says where the
        run stood).

    Raises:
        CorruptCheckpointError: the file is not a valid checkpoint (or, with
            several processes, a shard file fails on one of them).
        StateMismatchError: it does not fit the model; the message names the
            first differing variable.
        ValueError: the model is not built.

    Example:
    ```python
    info = keras_ckpt.restore(model, "run1/ckpt-05.keras")
    model.fit(new_x, new_y, initial_epoch=info.resume_point[0], epochs=10,
              callbacks=[keras_ckpt.ModelCheckpoint("run2/ckpt-{epoch:02d}.keras")])
    ```
    """
    path = os.fspath(path)
    if not model.variables:
        raise ValueError(
            "The model is not built, so its variables cannot be restored. Build it first: "
            "call it on a batch, call model.build(input_shape), or start it with keras.Input."
        )
    # Verified whole first; then each array is read as it is assigned (one at a time).
    bound = state_bytes_bound(model)
    with read_verified_lazily(path, state_bytes=bound) as snapshot:
        info = info_from_meta(path, snapshot.meta, os.path.getsize(path))
        try:
            state_lib.apply(snapshot, model, objects, weights_only=weights_only, rng=rng,
                            workers=workers_of(model) if "shards" in snapshot.meta else None,
                            state_bytes=bound)
        finally:
            if snapshot.shard_files is not None:  # variables split across JAX processes
                snapshot.shard_files.close()
    return info
