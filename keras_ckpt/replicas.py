"""Per-replica values of distributed variables (BatchNorm statistics drift between replicas)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from keras_ckpt import multi_worker
from keras_ckpt.snapshot import StateMismatchError

__all__ = ["replicas_of", "replica_arrays", "drifted", "assign_replicas"]


def replicas_of(variable: Any) -> tuple | None:
    """The per-device components of a TensorFlow distributed variable (two or more), or None."""
    components = getattr(getattr(variable, "value", None), "values", None)
    return components if isinstance(components, tuple) and len(components) > 1 else None


def replica_arrays(variable: Any) -> list[np.ndarray] | None:
    """Each replica's value of a distributed variable, where they are not all equal.

    Under `tf.distribute.MirroredStrategy`, Keras updates BatchNormalization's
    moving statistics on each replica from its own part of the batch: the
    "mirrored" copies drift apart, and reading the variable gives replica 0's.
    An exact resume needs each one back.
    """
    components = replicas_of(variable)
    if components is None:
        return None
    return drifted([np.array(c.numpy()) for c in components])


def drifted(values: list[np.ndarray]) -> list[np.ndarray] | None:
    """`values` (one per replica) where they differ; None where all are equal."""
    if all(np.array_equal(values[0], v) for v in values[1:]):
        return None
    return values


def assign_replicas(model: Any, variables: list, replicas: Mapping[str, int],
                    arrays: Mapping[str, np.ndarray], group: str = "model") -> None:
    """Gives each replica of a distributed variable of `group` its own saved value back.

    Where the model now runs with another number of replicas (or none), the
    variable keeps the value the plain assignment gave it.
    """
    replicas = {k: c for k, c in replicas.items() if k.startswith(f"{group}/")}
    workers = multi_worker.workers_of(model) if replicas else None
    if workers is not None and group != "model":
        return  # several workers: only model variables are gathered per replica
    ids = workers.local_replica_ids() if workers is not None else None
    for key, count in replicas.items():
        variable = variables[int(key.split("/")[1])]
        if ids is not None:  # several workers: this worker's replicas of all of them
            components = getattr(getattr(variable, "value", None), "values", None)
            if (not isinstance(components, tuple) or len(components) != len(ids)
                    or count != workers.strategy.num_replicas_in_sync):
                continue
            pairs = zip(ids, components, strict=True)
        else:
            components = replicas_of(variable)
            if components is None or len(components) != count:
                continue
            pairs = enumerate(components)
        for r, component in pairs:
            value = arrays[f"replicas/{key}/{r}"]
            if tuple(value.shape) != tuple(component.shape):
                raise StateMismatchError(f"The checkpoint's replica {r} of {variable.path} has "
                                         f"shape {value.shape}; the variable {component.shape}.")
            component.assign(value)

