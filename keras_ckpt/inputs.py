"""Whether a fit's input resumes exactly: checked at train begin, and said when it does not.

The input pipeline is part of the training state. README's table ("What an
exact resume needs") says, for each kind of input `fit` accepts, whether a
resume is exact; this module finds, at train begin, the inputs that are not:
an unseeded (or distributed) `tf.data` pipeline that reshuffles every epoch,
an infinite stream with `steps_per_epoch`, a Python generator, a `PyDataset`
whose `on_epoch_end` keeps state it cannot save; and warns, naming the input
and what to do. A seeded `.shuffle(...)` is fast-forwarded (`fast_forward`).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

from keras_ckpt import keras_compat
from keras_ckpt.warn import warn

__all__ = ["check_input", "fast_forward", "input_problems", "pipeline_variables"]


def _stages(dataset: Any, below_cache: bool = True) -> Iterator[Any]:
    """Each stage of a tf.data pipeline once, from the top (depth first, inputs in order);
    without those under a `.cache()` where not `below_cache`. Stops quietly at a stage that
    cannot list its inputs (another TF, a stage of another kind)."""
    seen, stack = set(), [dataset]
    while stack:
        node = stack.pop()
        if id(node) in seen or (not below_cache and type(node).__name__ == "CacheDataset"):
            continue
        seen.add(id(node))
        yield node
        try:
            stack.extend(reversed(node._inputs()))
        except Exception:  # (any: a stage's own listing)
            continue


def _reshuffling(dataset: Any, below_cache: bool = False) -> list:
    """The stages of a tf.data pipeline that draw anew on every iteration: `.shuffle(...)`,
    `Dataset.random(rerandomize_each_iteration=True)`; none under a `.cache()` (which gives
    its first iteration's elements again) unless `below_cache`."""
    return [node for node in _stages(dataset, below_cache=below_cache)
            if getattr(node, "_reshuffle_each_iteration", False) is True
            or getattr(node, "_rerandomize", False) is True]


def _reshuffled_per_pass(dataset: Any) -> bool:
    """A reshuffling stage under a `.repeat(n)`: each iteration draws n orders, where a
    resume's fast-forward (iterators made, not read) draws one."""
    try:
        return any(type(node).__name__ == "_RepeatDataset" and int(node._count) > 1
                   and _reshuffling(node._inputs()[0]) for node in _stages(dataset))
    except (AttributeError, TypeError, ValueError, IndexError):
        return False


def _seeded(stage: Any) -> bool:
    """tf.data takes seeds (0, 0) for "random" (no global seed, none given)."""
    try:
        return (int(stage._seed), int(stage._seed2)) != (0, 0)
    except (AttributeError, TypeError, ValueError):  # a graph tensor, another TF
        return False


def _default_strategy(model: Any) -> bool:
    """No tf.distribute strategy (TensorFlow's default one, which wraps nothing)."""
    strategy = getattr(model, "distribute_strategy", None)
    return strategy is None or keras_compat.is_default_strategy(strategy)


def _is_tf_dataset(x: Any) -> bool:
    return (type(x).__module__ or "").startswith("tensorflow") and hasattr(x, "cardinality")


def _cardinality(x: Any) -> int:
    try:
        return int(x.cardinality())  # -1 infinite, -2 unknown
    except Exception:
        return -2


def _shuffle_kind(x: Any, model: Any) -> str | None:
    """None (no reshuffling stage), "unseeded", "distributed" or "seeded".

    A seeded `.shuffle(...)` draws the seeds of each epoch's order from a seed
    generator of its own, advanced once per iterator made of the pipeline: a
    resume can make the iterators the interrupted run had made (`fast_forward`).
    An unseeded one has no order to come back to (under a `.cache()` too: a
    resumed process fills its cache in another order); under a distribution
    strategy the pipeline is rebuilt, with a generator of its own.
    """
    if not all(_seeded(s) for s in _reshuffling(x, below_cache=True)):
        return "unseeded"
    stages = _reshuffling(x)
    if not stages:
        return None
    return "seeded" if model is None or _default_strategy(model) else "distributed"


def _reads_on_across_epochs(cardinality: int, steps_per_epoch: Any) -> bool:
    """Keras keeps one iterator across epochs: a resume would start it again."""
    return bool(steps_per_epoch) and (cardinality < 0 or cardinality > int(steps_per_epoch))


# Stages that pass each element on as it is (with a function: one with no stateful op).
_ELEMENTWISE = ("_PrefetchDataset", "_OptionsDataset", "_MapDataset", "_ParallelMapDataset")


def _stateless(node: Any) -> bool:
    """No function of the stage holds a stateful op (a random op, a variable, a py_function):
    each pass over it gives the same elements."""
    return not any(op._is_stateful for function in _functions(node)
                   for op in function.graph.get_operations())


def _functions(node: Any) -> list:
    """The traced functions of one tf.data stage (`.map`'s, `.filter`'s, ...)."""
    return [value.function for value in vars(node).values()
            if type(value).__name__ == "StructuredFunctionWrapper"
            and getattr(value, "function", None) is not None]


def pipeline_variables(dataset: Any) -> list:
    """The TensorFlow variables a tf.data pipeline's functions keep state in (the
    `SeedGenerator` of a Keras random layer in a `.map`, a `tf.random.Generator`), each once,
    in the order found; [] for anything else."""
    if not _is_tf_dataset(dataset):
        return []
    found: dict[int, Any] = {}
    try:
        for node in _stages(dataset):
            for function in _functions(node):
                found.update((id(v), v) for v in function.graph.variables)
    except (AttributeError, TypeError, ValueError):  # another TF
        return []
    return list(found.values())


def _pass_length(dataset: Any) -> int | None:
    """The batches of one pass of an endlessly repeated pipeline that gives the same batches
    on every pass (`.batch(...).repeat()`: no reshuffling, no stateful function, only
    element-wise stages after the repeat); None for any other."""
    node = dataset
    try:
        while type(node).__name__ != "_RepeatDataset":
            if type(node).__name__ not in _ELEMENTWISE or not _stateless(node):
                return None
            (node,) = node._inputs()
        if int(node._count) != -1:
            return None
        (inner,) = node._inputs()
        if not all(_stateless(below) for below in _stages(inner)):
            return None
    except (AttributeError, TypeError, ValueError):  # another TF, a stage of another kind
        return None
    length = _cardinality(inner)
    return length if length > 0 and not _reshuffling(inner) else None


def fast_forward(model: Any, epochs: int) -> int:
    """Makes the running fit's seeded, reshuffling tf.data input ready for epoch `epochs`.

    Makes (and reads nothing from) the iterators the interrupted run had made
    before that epoch's, so its shuffle draws the same seeds. Returns how many
    (0 when the input needs none).
    """
    arguments = keras_compat.fit_arguments(model) or {}
    x, steps_per_epoch = arguments.get("x"), arguments.get("steps_per_epoch")
    if epochs <= 0 or not _is_tf_dataset(x) or _shuffle_kind(x, model) != "seeded" or \
            _cardinality(x) < 0 or _reads_on_across_epochs(_cardinality(x), steps_per_epoch):
        return 0  # nothing to do, or warned at train begin
    made = keras_compat.tf_iterators_before_epoch(epochs, steps_per_epoch)
    for _ in range(made):
        iter(x)  # made, never read: its seeds are drawn
    return made


def input_problems(x: Any, steps_per_epoch: Any, model: Any = None) -> list[str]:
    """What would make a resume of a fit on `x` differ from the uninterrupted run, with the fix."""
    problems = []
    kind = type(x)
    if _is_tf_dataset(x):
        shuffle, cardinality = _shuffle_kind(x, model), _cardinality(x)
        if shuffle == "unseeded":
            problems.append(
                "the tf.data input reshuffles every epoch (`.shuffle(...)`) without a seed: no "
                "two runs see the same order. Call keras.utils.set_random_seed(seed) before "
                "building the dataset, or pass `seed=` to `.shuffle`.")
        elif shuffle == "distributed":
            problems.append(
                "the tf.data input reshuffles every epoch (`.shuffle(...)`) under a "
                "distribution strategy, which rebuilds the pipeline with a shuffle state of "
                "its own. Use `.apply(keras_ckpt.data.EpochShuffle(buffer_size, seed))` "
                "instead of `.shuffle(...)`.")
        if shuffle == "seeded" and _reshuffled_per_pass(x):
            problems.append(
                "the tf.data input reshuffles (`.shuffle(...)`) under a `.repeat(n)`: each "
                "epoch draws n orders, and a resume cannot count them again. Reshuffle after "
                "the repeat, or use `.apply(keras_ckpt.data.EpochShuffle(buffer_size, seed))`.")
        if shuffle == "seeded" and cardinality == -2 and not steps_per_epoch:
            problems.append(
                "the tf.data input reshuffles every epoch (`.shuffle(...)`) and Keras does not "
                "know its length (a `.filter`, `from_generator`...), so the iterators its "
                "epochs make, which draw the shuffle's seeds, cannot be counted again. Add "
                "`.apply(tf.data.experimental.assert_cardinality(batches))`, or use "
                "`.apply(keras_ckpt.data.EpochShuffle(buffer_size, seed))`.")
        if cardinality == -1 and steps_per_epoch:
            # Unless every epoch starts a pass of a pipeline that repeats itself: a resume's
            # new stream is then where the epoch began.
            passes = _pass_length(x)
            if not passes or int(steps_per_epoch) % passes:
                problems.append(
                    "the tf.data input is infinite (`.repeat()`) with steps_per_epoch: each "
                    "epoch continues where the last one stopped reading, and a resume starts "
                    "the stream again. Give each epoch its own finite dataset (no "
                    "`.repeat()`), or let steps_per_epoch be a whole number of passes over a "
                    "pipeline that gives the same batches on every pass (no reshuffling, no "
                    "random op in a `.map`).")
        elif _reads_on_across_epochs(cardinality, steps_per_epoch):
            count = "an unknown number of" if cardinality == -2 else cardinality
            problems.append(
                f"the tf.data input has {count} batches and steps_per_epoch="
                f"{steps_per_epoch}: Keras then reads on from where the last epoch stopped, "
                "and a resume starts the dataset again"
                + (" (and its reshuffling seeds)" if shuffle else "") + ". Let one epoch read "
                "the whole dataset (`.take(steps_per_epoch)`, no steps_per_epoch).")
    elif steps_per_epoch and model is not None and (
            batches := keras_compat.fit_batches(model) or 0) > int(steps_per_epoch):
        problems.append(
            f"the input has {batches} batches and steps_per_epoch={steps_per_epoch}: Keras "
            "then reads on from where the last epoch stopped, and a resume starts the input "
            "again. Let one epoch read the whole input (give fit only steps_per_epoch "
            "batches of it, or no steps_per_epoch).")
    elif isinstance(x, (types.GeneratorType, types.AsyncGeneratorType)) or (
            hasattr(x, "__next__") and not hasattr(x, "__getitem__")):
        problems.append(
            f"the input is a Python {kind.__name__} whose position is not saved: a resume "
            "starts it again. Wrap the data in a keras.utils.PyDataset (index-addressable), "
            "or make the generator restart each epoch the same way.")
    else:
        problems += _py_dataset_problems(x, steps_per_epoch, "input")
    return problems


def _py_dataset_problems(x: Any, steps_per_epoch: Any, role: str) -> list[str]:
    """What a `keras.utils.PyDataset` (`role`: "input" or "validation input") keeps that a
    resume does not carry: state its epoch hooks change, an endless stream's position."""
    import keras

    kind, base = type(x), keras.utils.PyDataset
    if not isinstance(x, base):
        return []
    if x.num_batches is None and steps_per_epoch and role == "input":
        return [f"the {kind.__name__} input is endless (num_batches None) with steps_per_epoch: "
                "each epoch reads on from where the last one stopped, and a resume starts it "
                "again. Give it a length (its batches indexed from 0 every epoch)."]
    hooks = [name for name in ("on_epoch_begin", "on_epoch_end")
             if getattr(kind, name, None) is not getattr(base, name, None)]
    if hooks and not (callable(getattr(x, "get_state", None))
                      and callable(getattr(x, "set_state", None))):
        return [f"the {kind.__name__} {role} overrides {' and '.join(hooks)} (e.g. it "
                "reshuffles its indices) and that state is not saved: after a resume the "
                "epochs see other batches. Give it get_state()/set_state() and register it "
                "with keras_ckpt.registry.track_data(name, dataset), or derive the order from "
                "the epoch number alone."]
    return []


def check_input(model: Any, more: list[str] | None = None) -> list[str]:
    """Warns, at train begin, about each way the running fit's input would resume inexactly.

    `more`: other such problems of the fit (its Keras callbacks), warned alike.
    """
    arguments = keras_compat.fit_arguments(model)
    problems = list(more or [])
    if arguments is None:
        return _warn(problems)
    problems += input_problems(arguments.get("x"), arguments.get("steps_per_epoch"), model)
    validation = arguments.get("validation_data")
    problems += _py_dataset_problems(validation, None, "validation input")
    if _is_tf_dataset(validation) and _reshuffling(validation):
        # Keras keeps one evaluation iterator maker for the whole fit; its seeds
        # are not fast-forwarded, and the order changes the validation sums.
        problems.append(
            "the validation tf.data input reshuffles every epoch (`.shuffle(...)`): a resumed "
            "run validates in another order, so its validation logs differ (in the last bits; "
            "on other batches, and by more, where validation_steps reads part of it). "
            "Validation needs no shuffle: remove it from `validation_data`.")
    return _warn(problems)


def _warn(problems: list[str]) -> list[str]:
    for problem in problems:
        warn(f"ModelCheckpoint(resume=...): {problem} Until then a resumed run "
             "differs from an uninterrupted one.")
    return problems
