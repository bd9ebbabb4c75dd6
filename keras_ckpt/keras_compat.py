"""Every private Keras (and TensorFlow) API keras-ckpt touches, in one place.

Each is pinned by `tests/test_keras_compat.py` against the installed Keras: a release that changes
one fails there, by name, not in a resume. Nothing here imports a backend at import time."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["tf_iterators_before_epoch", "is_default_strategy", "print_msg", "get_initial_epoch",
    "set_initial_epoch", "calling_callback_list", "set_instance_attr", "get_private",
    "set_private", "make_test_function", "fit_arguments", "fit_epoch_iterator", "start_epoch_at",
    "release_epoch_iterator", "guard_torch_fetch", "unguard_torch_fetch", "callback_model",
    "compiled_metrics", "symbolic_build", "epoch_element_spec", "has_keras_train_step",
    "step_counter", "learning_rate_variable", "distribute_strategy", "metric_direction",
    "saving_internals", "store_optimizer_uncopied", "flatten_layers", "tf_tensor_view",
    "SWAP_EMA_STATE", "TENSORBOARD_STEP", "global_seed_generator", "traced_graphs",
    "MODEL_CHECKPOINT_COUNTERS"]


def print_msg(message: str) -> None:
    """Prints through `keras.src.utils.io_utils.print_msg` (honours Keras's logging switch)."""
    try:
        from keras.src.utils.io_utils import print_msg as keras_print_msg
    except ImportError:  # pragma: no cover - pinned by a test
        keras_print_msg = print
    keras_print_msg(message)


# ------------------------------------------------------------ fit's start epoch
def get_initial_epoch(model: Any) -> Any:
    """`model._initial_epoch`: Keras's `fit` reads it right after `on_train_begin`."""
    return getattr(model, "_initial_epoch", None)


def set_initial_epoch(model: Any, epoch: Any) -> None:
    """Sets `model._initial_epoch` (None: `fit`'s own `initial_epoch` argument applies)."""
    model._initial_epoch = epoch


# ------------------------------------------------------------ the fit's CallbackList
def calling_callback_list(max_depth: int = 12) -> Any:
    """The `keras.callbacks.CallbackList` whose `set_model` is running up the stack, or None
    (`fit`'s list calls `set_model` from its constructor; no public API hands it over)."""
    import keras

    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        if isinstance(owner := frame.f_locals.get("self"), keras.callbacks.CallbackList):
            return owner
        frame = frame.f_back
    return None


def set_instance_attr(obj: Any, name: str, value: Any) -> None:
    """Shadows a method of one object (a `CallbackList`'s hook) with an instance attribute."""
    obj.__dict__[name] = value


def get_private(model: Any, name: str) -> Any:
    """An attribute keras-ckpt keeps on a Keras object, bypassing Keras's tracking."""
    return model.__dict__.get(name)


def set_private(model: Any, name: str, value: Any) -> None:
    """Sets such an attribute without Keras's (or torch's) attribute tracking."""
    object.__setattr__(model, name, value)


# ------------------------------------------------------------ step functions
def make_test_function(model: Any) -> None:
    """`model.make_test_function()`: built now so that it can be wrapped for the fit."""
    if callable(make := getattr(model, "make_test_function", None)):
        make()


def _fit_frame(model: Any) -> Any:
    """The frame of the running `model.fit` up the stack, or None."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "fit" and frame.f_locals.get("self") is model:
            return frame
        frame = frame.f_back
    return None


def fit_arguments(model: Any) -> dict | None:
    """The arguments of the running `model.fit` (`x`, `steps_per_epoch`, ...), or None."""
    frame = _fit_frame(model)
    if frame is None:
        return None
    names = frame.f_code.co_varnames[:frame.f_code.co_argcount]
    return {name: frame.f_locals.get(name) for name in names if name != "self"}


def fit_epoch_iterator(model: Any) -> Any:
    """The running fit's `EpochIterator` (every trainer's `fit` names it `epoch_iterator`)."""
    frame = _fit_frame(model)
    return None if frame is None else frame.f_locals.get("epoch_iterator")


def fit_batches(model: Any) -> int | None:
    """The batches in one pass over the running fit's input (its data adapter's), or None."""
    adapter = getattr(fit_epoch_iterator(model), "data_adapter", None)
    return n if isinstance(n := getattr(adapter, "num_batches", None), int) else None


def start_epoch_at(model: Any, batches: int, skipped: Callable[[Any], None],
                   failed: Callable[[BaseException], None]) -> str | None:
    """Makes the running fit's next epoch begin at batch `batches`; returns how, or None.

    Keras's epoch iterator yields `(first step, last step, data iterator)` per train-function
    call from `_enumerate_iterator` (which first makes the epoch's data iterator, drawing its
    order). For one epoch an instance attribute shadows it and drops the calls before `batches`
    (no step, no callback sees them), their data skipped where it costs least (`_skip_before`).
    The last skipped batch is always read: `skipped(batch, drew)` gets it before the first new
    step (None: the data ended; `drew`: the skipped batches were all read, as they draw from the
    global RNG); `failed(error)` hears a data error while skipping (no guard sees it)."""
    it = fit_epoch_iterator(model)
    if it is None or getattr(type(it), "_enumerate_iterator", None) is None or batches <= 0:
        return None
    from keras_ckpt import epoch_skip

    spe = max(1, int(getattr(it, "steps_per_execution", 1) or 1))
    drew: list = []
    how, undo = _skip_before(it, batches - 1, drew)
    epoch_skip.shadow_once(it, "_enumerate_iterator", lambda original: epoch_skip.calls_from(
        original(), batches, spe, how, undo, lambda batch: skipped(batch, bool(drew)),
        failed))  # this epoch only
    return how


def _skip_before(it: Any, count: int, drew: list) -> tuple[str, Callable[[], Any]]:
    """Skips the next data iterator's first `count` batches: `"source"` (a PyDataset without
    workers from the index, as `_finite_generator` orders it, `drew` told where its batches
    draw from the global RNG: `epoch_skip.indexed_from`; a generator's stream advanced),
    `"index"` (Keras's arrays, skipped before their slicing: `_array_index_skip` on TensorFlow,
    `_array_batch_skip`), `"dataset"` (`_distributed_dataset.skip(n)`, in C++) or `"consume"`
    (read and dropped)."""
    from keras_ckpt import epoch_skip

    adapter = getattr(it, "data_adapter", None)
    py_dataset = getattr(adapter, "py_dataset", None)
    if py_dataset is not None and getattr(adapter, "enqueuer", 1) is None \
            and py_dataset.num_batches is not None and hasattr(adapter, "_finite_generator"):
        return "source", epoch_skip.shadow_once(  # Keras's `_finite_generator`, from `count`
            adapter, "_finite_generator", lambda _original: epoch_skip.indexed_from(
                py_dataset, adapter.shuffle, adapter._standardize_batch, count, drew))
    if callable(getattr(adapter, "generator", None)) and hasattr(adapter, "_first_batches"):
        def advanced(generator: Any) -> Any:  # a generator's adapter: its stream, `count` on
            batches = generator()
            try:
                for _ in range(count):
                    next(batches)
            except StopIteration:
                return iter(())
            return batches

        return "source", epoch_skip.shadow_once(adapter, "generator", advanced)
    dataset = getattr(it, "_distributed_dataset", None)
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(dataset, tf.data.Dataset):
        rebuilt = _array_index_skip(it, dataset, count, tf)
        it._distributed_dataset = dataset.skip(count) if rebuilt is None else rebuilt
        return ("dataset" if rebuilt is None else "index",
                lambda: setattr(it, "_distributed_dataset", dataset))
    undo = _array_batch_skip(adapter, count)
    return ("consume", lambda: None) if undo is None else ("index", undo)


def _array_index_skip(it: Any, dataset: Any, count: int, tf: Any) -> Any:
    """Keras's array pipeline, its first `count` batches skipped before their gather; or None.

    `ArrayDataAdapter.get_tf_dataset` is `zip((indices, arrays)).map(gather)` under two
    `with_options` and a prefetch (none in tf.data's debug mode), `indices` drawing the epoch's
    order; found here by its inputs (`_inputs()`), rebuilt by `epoch_skip.gathered_from`."""
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    from keras_ckpt import epoch_skip

    if type(getattr(it, "data_adapter", None)) is not ArrayDataAdapter:
        return None
    node, kinds = dataset, []
    while len(inputs := node._inputs()) == 1:
        kinds += [type(node).__name__.lstrip("_").replace("Parallel", "")]
        node = inputs[0]
    if [k for k in kinds if k != "PrefetchDataset"] != ["OptionsDataset"] * 2 + ["MapDataset"] \
            or type(node).__name__.lstrip("_") != "ZipDataset" or len(inputs) != 2:
        return None
    return epoch_skip.gathered_from(dataset, *inputs, count, tf)


def _array_batch_skip(adapter: Any, count: int) -> Any:
    """An epoch's arrays, `get_jax_iterator`'s `ArrayDataAdapter._get_iterator(slice_fn, inputs)`
    (drawing the order with `np.random`) or `get_torch_dataloader()` (a DataLoader drawing from
    torch's RNG), shadowed for one call (`epoch_skip.shadowed_once`). The undo, or None."""
    import keras
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    from keras_ckpt import epoch_skip as skip

    backend = keras.backend.backend()
    if type(adapter) is not ArrayDataAdapter or backend not in ("jax", "torch"):
        return None
    torch = backend == "torch"
    return skip.shadowed_once(adapter, "get_torch_dataloader" if torch else "_get_iterator",
                              skip.loader_from if torch else skip.sliced_from, count)


def release_epoch_iterator(model: Any) -> bool:
    """At train end, drops the fit's epoch iterator's `_epoch_iterator` (suspended by a stop
    mid-epoch: a cycle with the data iterator, whose tf.data teardown then waits seconds in a
    later collection) and `_current_iterator`; not `reset()` (the data's `on_epoch_end`)."""
    iterator = fit_epoch_iterator(model)
    if iterator is None or not hasattr(iterator, "_epoch_iterator"):
        return False
    iterator._epoch_iterator = None
    iterator._current_iterator = None
    return True


_GUARDED_CLASSES: dict[type, type] = {}


def guard_torch_fetch(model: Any, on_error: Callable[[str, BaseException], None]) -> Any:
    """On torch, reports errors of the data fetch (Keras's torch `fit` takes each batch from its
    epoch iterator outside `train_function`): the iterator's class swapped for one whose
    `__next__` reports them. A handle for `unguard_torch_fetch`, or None (not torch, none)."""
    import keras

    if keras.backend.backend() != "torch":
        return None
    if (iterator := fit_epoch_iterator(model)) is None:
        return None
    if type(iterator) not in _GUARDED_CLASSES.values():
        base = type(iterator)
        if base not in _GUARDED_CLASSES:
            def __next__(self, _base=base):
                try:
                    return _base.__next__(self)
                except StopIteration:
                    raise
                except BaseException as e:
                    for handler in list(self._keras_ckpt_on_error):
                        handler("train_function", e)
                    raise

            _GUARDED_CLASSES[base] = type(base.__name__, (base,), {"__next__": __next__})
        iterator._keras_ckpt_on_error = []
        iterator._keras_ckpt_base = base
        iterator.__class__ = _GUARDED_CLASSES[base]
    iterator._keras_ckpt_on_error.append(on_error)
    return (weakref.ref(iterator), on_error)


def unguard_torch_fetch(handle: Any) -> None:
    """Undoes `guard_torch_fetch`."""
    ref, on_error = handle
    iterator = ref()
    if iterator is None:
        return
    handlers = iterator._keras_ckpt_on_error
    if on_error in handlers:
        handlers.remove(on_error)
    if not handlers:
        iterator.__class__ = iterator._keras_ckpt_base


# ------------------------------------------------------------ model internals
SWAP_EMA_STATE = ("_ema_weights_in_model",)  # SwapEMAWeights: EMA weights in the model
TENSORBOARD_STEP = "_global_train_batch"  # TensorBoard: a fit's batch ends, from 0
MODEL_CHECKPOINT_COUNTERS = ("_batches_seen_since_last_saving", "_last_batch_seen")


def global_seed_generator(create: bool = False) -> Any:
    """The `SeedGenerator` unseeded `keras.random` calls draw from (Keras makes it at first use,
    seeded from Python's `random`), made now with `create`; else None where there is none."""
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator as sg

    return sg.global_seed_generator() if create else \
        global_state.get_global_attribute(sg.GLOBAL_SEED_GENERATOR)


def callback_model(callback: Any) -> Any:
    """`Callback._model`: the model without `Callback.model`'s JAX state sync (thread-safe)."""
    return callback._model


def compiled_metrics(model: Any) -> Any:
    """`model._compile_metrics` (the `CompileMetrics` of `compile(metrics=...)`), or None."""
    return getattr(model, "_compile_metrics", None)


def symbolic_build(model: Any, batch: Any) -> None:
    """`model._symbolic_build(data_batch=...)`: builds the compiled state from a batch or spec."""
    model._symbolic_build(data_batch=batch)


def epoch_element_spec(model: Any) -> Any:
    """The running fit's input spec on TensorFlow (`_distributed_dataset.element_spec`)."""
    dataset = getattr(fit_epoch_iterator(model), "_distributed_dataset", None)
    return getattr(dataset, "element_spec", None)


def has_keras_train_step(model: Any) -> bool:
    """Whether `model` trains with Keras's own TensorFlow `train_step` (not overridden)."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    return getattr(type(model), "train_step", None) is TensorFlowTrainer.train_step


def step_counter(optimizer: Any) -> Any:
    """The variable counting the optimizer's steps (one a batch): `_iterations` where
    `gradient_accumulation_steps=N` makes `iterations` `_iterations // N`; a wrapper's inner's."""
    if (inner := getattr(optimizer, "inner_optimizer", None)) is not None:
        return step_counter(inner)
    if getattr(optimizer, "gradient_accumulation_steps", None):
        return optimizer._iterations
    return optimizer.iterations


def learning_rate_variable(optimizer: Any) -> Any:
    """`optimizer._learning_rate`: the variable (or schedule) behind `learning_rate`."""
    return getattr(optimizer, "_learning_rate", None)


def distribute_strategy(model: Any) -> Any:
    """`model._distribute_strategy`: the `tf.distribute` strategy it was built under."""
    return getattr(model, "_distribute_strategy", None)


def metric_direction(metric: Any) -> Any:
    """`metric._direction` ("up"/"down") where Keras records it, else None."""
    return getattr(metric, "_direction", None)


def saving_internals() -> tuple[Any, Any, Callable[[Any], tuple[str, str]]]:
    """`(H5IOStore, _save_state, _serialize_model_as_json)` of `keras.src.saving.saving_lib`:
    `_save_state` is Keras's walk over a model's trackables that writes `.weights.h5`;
    keras-ckpt runs it against a recording store to learn the layout (no variable copied)."""
    from keras.src.saving import saving_lib

    return (getattr(saving_lib, "H5IOStore", None), getattr(saving_lib, "_save_state", None),
            saving_lib._serialize_model_as_json)


def store_optimizer_uncopied(optimizer: Any) -> Callable[[], None]:
    """While Keras's layout is recorded, the optimizer stores its variables, not copies:
    `BaseOptimizer.save_own_variables` stores `variable.numpy()` (a copy) as key `i` of
    `optimizer.variables[i]`; a class overriding it is left alone. Returns the undo."""
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    if getattr(type(optimizer), "save_own_variables", None) is not BaseOptimizer.save_own_variables:
        return lambda: None

    def save_own_variables(store: Any) -> None:
        for i, variable in enumerate(optimizer.variables):
            store[str(i)] = variable

    set_instance_attr(optimizer, "save_own_variables", save_own_variables)
    return lambda: optimizer.__dict__.pop("save_own_variables", None)


def flatten_layers(model: Any) -> list:
    """`model._flatten_layers()`: every layer, nested ones included."""
    return list(f()) if callable(f := getattr(model, "_flatten_layers", None)) else [model]


def tf_tensor_view(tensor: Any) -> Any:
    """`EagerTensor._numpy()`: a numpy array sharing the tensor's buffer (no copy)."""
    return tensor._numpy()


def tf_iterators_before_epoch(epoch: int, steps_per_epoch: Any) -> int:
    """How many iterators of a finite tf.data input Keras's `fit` makes before epoch `epoch`'s
    (one after an epoch's last batch; without `steps_per_epoch`, one at each epoch begin)."""
    return epoch * (2 if steps_per_epoch is None else 1)


def traced_graphs(function: Any) -> list:
    """The graphs traced by Keras's TensorFlow step function: the `tf.function`s its closure
    holds (`_make_function`'s), through `_list_all_concrete_functions()`; none off TF."""
    graphs = []
    for cell in getattr(function, "__closure__", None) or ():
        lister = getattr(cell.cell_contents, "_list_all_concrete_functions", None)
        graphs += [concrete.graph for concrete in lister()] if callable(lister) else []
    return graphs


def is_default_strategy(strategy: Any) -> bool:
    """Whether `strategy` is TensorFlow's default one (no tf.distribute strategy in use)."""
    return type(strategy).__name__ == "_DefaultDistributionStrategy"
