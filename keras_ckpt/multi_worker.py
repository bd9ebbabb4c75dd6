"""Training over several processes: `tf.distribute.MultiWorkerMirroredStrategy`, or JAX's
`jax.distributed` (several processes, one Keras distribution over all their devices).

Who writes (the chief only: process 0 on JAX), and decisions all workers must
take at the same step (a budget stop, a preemption signal that reached one of
them), agreed by an all-reduce of one number among the workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from keras_ckpt import keras_compat

__all__ = ["Workers", "JaxProcesses", "is_chief", "workers_of", "several_jax_processes"]


class Workers:
    """This process's place among the workers of a multi-worker strategy.

    Args:
        strategy: a `tf.distribute.MultiWorkerMirroredStrategy` over more than
            one worker.
        task_type: this worker's task type in the cluster (`"chief"` or
            `"worker"`).
        task_id: this worker's index among its task type.
        count: the number of training workers (chief included).
        is_chief: whether this worker writes checkpoints, ledgers and logs.

    Example:

    ```python
    workers = workers_of(model)  # None unless multi-worker
    if workers is None or workers.is_chief:
        ...  # write
    ```
    """

    # Each worker's replicas of a variable can differ (BatchNormalization's statistics).
    per_replica_state = True

    def __init__(self, strategy: Any, task_type: str, task_id: int, count: int,
                 is_chief: bool) -> None:
        self.strategy = strategy
        self.task_type = task_type
        self.task_id = task_id
        self.count = count
        self.is_chief = is_chief
        self._sum = None
        self._gather: tuple | None = None

    def __repr__(self) -> str:
        return (f"Workers({self.task_type}:{self.task_id} of {self.count}, "
                f"{'chief' if self.is_chief else 'not chief'})")

    def sum(self, value: float) -> float:
        """The sum of `value` over all workers (every worker must call it, in the same order).

        Args:
            value: this worker's number.

        Returns:
            The sum over the workers, the same on each.
        """
        import tensorflow as tf

        if self._sum is None:
            strategy = self.strategy

            @tf.function
            def reduce_sum(x):
                def replica():
                    context = tf.distribute.get_replica_context()
                    # One replica of each worker adds `x` (exactly: no shares).
                    local = context.num_replicas_in_sync // self.count
                    first = tf.equal(context.replica_id_in_sync_group % local, 0)
                    share = tf.where(first, tf.identity(x), tf.zeros_like(x))
                    return context.all_reduce("SUM", share)
                return strategy.run(replica)

            self._sum = reduce_sum
        result = self._sum(tf.constant(float(value), tf.float64))
        return float(self.strategy.experimental_local_results(result)[0].numpy())

    def gather(self, variables: list) -> list[np.ndarray]:
        """Every replica's value of each distributed variable (a collective: every worker calls it).

        Keras updates BatchNormalization's moving statistics on each replica
        from its own part of the batch, so the "mirrored" copies drift apart
        between workers; reading one gives this worker's.

        Args:
            variables: Keras variables created under the strategy.

        Returns:
            One array per variable, stacked by replica id (all workers' replicas).
        """
        import tensorflow as tf

        if not variables:
            return []
        key = tuple(id(v) for v in variables)
        if self._gather is None or self._gather[0] != key:

            @tf.function
            def gather_all():
                local = self.strategy.run(
                    lambda: [tf.expand_dims(tf.identity(v.value), 0) for v in variables])
                return [self.strategy.gather(x, axis=0) for x in local]

            self._gather = (key, gather_all)
        return [np.array(x.numpy()) for x in self._gather[1]()]

    def local_replica_ids(self) -> list[int]:
        """The replica ids (in the whole group) of this worker's devices, in component order."""
        import tensorflow as tf

        ids = self.strategy.run(
            lambda: tf.distribute.get_replica_context().replica_id_in_sync_group)
        return [int(tf.get_static_value(i)) if tf.get_static_value(i) is not None
                else int(i.numpy()) for i in self.strategy.experimental_local_results(ids)]

    def check_model(self, model: Any, who: str, refuse: str | None = None) -> list[str]:
        """Raises where `model` cannot be checkpointed across these workers (nothing here)."""
        return []

    def barrier(self) -> None:
        """Returns once every worker has called it (an all-reduce of nothing)."""
        self.sum(0.0)

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any worker (a collective: every worker calls it)."""
        return self.sum(1.0 if flag else 0.0) > 0.5

    def from_chief(self, value: float) -> float:
        """The chief's `value`, on every worker (a collective: every worker calls it)."""
        return self.sum(value if self.is_chief else 0.0)


def is_chief(task_type: str | None, task_id: int, cluster: dict) -> bool:
    """Whether a task writes: the `chief`, or worker 0 when the cluster has no chief.

    Args:
        task_type: the task's type in `TF_CONFIG` (`"chief"`, `"worker"`, ...).
        task_id: its index among that type.
        cluster: the cluster spec as a dict (`{"worker": [...], ...}`).

    Returns:
        True for the one task that writes (TensorFlow's own rule).
    """
    if task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


class JaxProcesses(Workers):
    """This process's place among the processes of a multi-process JAX run.

    After `jax.distributed.initialize`, Keras's distribution (`DataParallel`,
    `ModelParallel`) spans the devices of every process, and each process runs
    the same `fit`. Process 0 is the chief: it writes checkpoints, retention,
    the directory lock, the ledger. A variable's value is the same on every
    process (one global array), so no per-replica state is gathered.

    Args:
        index: `jax.process_index()`.
        count: `jax.process_count()` (more than one).

    Example:

    ```python
    processes = workers_of(model)  # a JaxProcesses after jax.distributed.initialize
    stop = processes.any(signal_seen)  # the same answer on every process
    ```
    """

    per_replica_state = False

    def __init__(self, index: int, count: int) -> None:
        super().__init__(None, "process", index, count, index == 0)

    def values(self, value: float) -> list[float]:
        """Every process's `value`, by process index (every process calls it, in the same order).

        The float64 travels as two uint32 words (JAX computes in 32 bits by
        default), so it arrives exactly without `jax_enable_x64`.
        """
        from jax.experimental import multihost_utils

        words = np.array([value], np.float64).view(np.uint32)
        gathered = np.asarray(multihost_utils.process_allgather(words))
        return [float(v) for v in
                np.ascontiguousarray(gathered.reshape(self.count, 2)).view(np.float64).ravel()]

    def sum(self, value: float) -> float:
        return float(sum(self.values(value)))

    def check_model(self, model: Any, who: str, refuse: str | None = None) -> list[str]:
        """The paths of the variables split across processes (some process holds only part).

        Args:
            model: the model about to train.
            who: the callback asking, for the message.
            refuse: why the caller cannot keep such a variable; None: it writes
                them as per-process pieces (`shards`).

        Raises:
            NotImplementedError: a variable is split and `refuse` says why not.
        """
        from keras_ckpt import shards
        from keras_ckpt.snapshot import model_variables

        groups = model_variables(model)
        split = [v.path for v in shards.split_keys(
            {g: groups[g] for g in ("model", "optimizer")}).values()]
        if split and refuse is not None:
            raise NotImplementedError(
                f"{who}: the variable {split[0]!r} is split across the {self.count} JAX "
                f"processes (some process holds only part of it), which this callback cannot "
                f"keep: {refuse}. Keep each variable's shards within one process's devices (a "
                "ModelParallel layout whose model axis spans one process), or train in one "
                "process.")
        return split

    def gather(self, variables: list) -> list[np.ndarray]:
        raise NotImplementedError("JAX's variables hold one value on every process")

    def local_replica_ids(self) -> list[int]:
        raise NotImplementedError("JAX's variables hold one value on every process")


def several_jax_processes() -> bool:
    """Whether Keras runs on JAX in one of several processes (`jax.distributed`)."""
    import keras

    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.process_count() > 1


def workers_of(model: Any) -> Workers | None:
    """This process's `Workers` when `model` trains over several processes, else None.

    Args:
        model: a Keras model: under a multi-worker strategy (TensorFlow), or
            in one of several JAX processes (`jax.distributed`).

    Returns:
        A `Workers` (a `JaxProcesses` on JAX), or None for single-process
        training (one device, a `MirroredStrategy` on one machine, JAX's
        distributions over one process's devices, torch).
    """
    import keras

    if several_jax_processes():
        import jax

        return JaxProcesses(jax.process_index(), jax.process_count())
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    strategy = keras_compat.distribute_strategy(model)
    if strategy is None:
        strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    count = len(spec.get("chief", [])) + len(spec.get("worker", []))
    if count <= 1:
        return None
    known = getattr(strategy, "_keras_ckpt_workers", None)
    if known is not None:  # one per strategy: it keeps its compiled collectives
        return known
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    workers = Workers(strategy, task_type, task_id, count, is_chief(task_type, task_id, spec))
    strategy._keras_ckpt_workers = workers
    return workers
