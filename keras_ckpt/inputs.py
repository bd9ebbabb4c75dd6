"""Whether a fit's input resumes exactly: checked at train begin, and said when it does not.

The input pipeline is part of the training state. README's table ("What an
exact resume needs") says, for each kind of input `fit` accepts, whether a
resume is exact; this module finds, at train begin, the inputs that are not:
a `tf.data` pipeline that reshuffles every epoch, an infinite stream with
`steps_per_epoch`, a Python generator, a `PyDataset` whose `on_epoch_end`
keeps state it cannot save; and warns, naming the input and what to do.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

from keras_ckpt import keras_compat

__all__ = ["check_input", "input_problems"]


def _tf_reshuffles(dataset: Any) -> bool:
    seen, stack = set(), [dataset]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if getattr(node, "_reshuffle_each_iteration", False) is True:
            return True
        inputs = getattr(node, "_inputs", None)
        try:
            stack.extend(inputs() if callable(inputs) else [])
        except Exception:  # an input kind that cannot list its inputs
            continue
    return False


def input_problems(x: Any, steps_per_epoch: Any) -> list[str]:
    """What would make a resume of a fit on `x` differ from the uninterrupted run, with the fix."""
    problems = []
    kind = type(x)
    module = kind.__module__ or ""
    if module.startswith("tensorflow") and hasattr(x, "cardinality"):
        if _tf_reshuffles(x):
            problems.append(
                "the tf.data input reshuffles every epoch (`.shuffle(...)` with "
                "reshuffle_each_iteration=True): that order lives in TensorFlow's runtime, so a "
                "resumed epoch sees another order. Use `.apply(keras_ckpt.data.EpochShuffle("
                "buffer_size, seed))` instead of `.shuffle(...)`.")
        try:
            infinite = int(x.cardinality()) == -1  # tf.data.INFINITE_CARDINALITY
        except Exception:
            infinite = False
        if infinite and steps_per_epoch:
            problems.append(
                "the tf.data input is infinite (`.repeat()`) with steps_per_epoch: each epoch "
                "continues where the last one stopped reading, and a resume starts the stream "
                "again. Give each epoch its own finite dataset (no `.repeat()`, or "
                "`.repeat()` before `.take(steps_per_epoch)` of a dataset that restarts).")
    elif isinstance(x, (types.GeneratorType, types.AsyncGeneratorType)) or (
            hasattr(x, "__next__") and not hasattr(x, "__getitem__")):
        problems.append(
            f"the input is a Python {kind.__name__} whose position is not saved: a resume "
            "starts it again. Wrap the data in a keras.utils.PyDataset (index-addressable), "
            "or make the generator restart each epoch the same way.")
    else:
        try:
            import keras

            dataset_class = keras.utils.PyDataset
        except (ImportError, AttributeError):  # pragma: no cover
            return problems
        if isinstance(x, dataset_class) and kind.on_epoch_end is not dataset_class.on_epoch_end \
                and not (callable(getattr(x, "get_state", None))
                         and callable(getattr(x, "set_state", None))):
            problems.append(
                f"the {kind.__name__} input overrides on_epoch_end (e.g. it reshuffles its "
                "indices) and that state is not saved: after a resume the epochs see other "
                "batches. Give it get_state()/set_state() and register it with "
                "keras_ckpt.registry.track_data(name, dataset), or derive the order from the "
                "epoch number alone.")
    return problems


def check_input(model: Any) -> list[str]:
    """Warns, at train begin, about each way the running fit's input would resume inexactly."""
    arguments = keras_compat.fit_arguments(model)
    if arguments is None:
        return []
    problems = input_problems(arguments.get("x"), arguments.get("steps_per_epoch"))
    for problem in problems:
        warnings.warn(f"ModelCheckpoint(resume=...): {problem} Until then a resumed run "
                      "differs from an uninterrupted one.", stacklevel=4)
    return problems
