"""Which way a metric improves: minimised or maximised, from its name, the model, or Keras."""

from __future__ import annotations

from typing import Any

from keras_ckpt import keras_compat

__all__ = ["infer_mode", "non_scalar_shape"]

# Short names that Keras's compile() accepts but `keras.metrics.get` does not.
_ALIASES = {
    "acc": "max",
    "ce": "min",
    "crossentropy": "min",
    "bce": "min",
    "cce": "min",
}



def _flatten_metrics(metrics: Any) -> list:
    out = []
    for m in metrics or []:
        inner = getattr(m, "metrics", None)
        if inner is not None and inner is not m and not hasattr(m, "_direction"):
            out.extend(_flatten_metrics(inner))
        out.append(m)
    return out


def _user_metric_objects(model: Any) -> list:
    """The metric objects a user passed to `compile`, before Keras builds them."""
    compiled = keras_compat.compiled_metrics(model)
    found = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        elif obj is not None and not isinstance(obj, str) and hasattr(obj, "name"):
            found.append(obj)

    for attr in ("_user_metrics", "_user_weighted_metrics"):
        walk(getattr(compiled, attr, None))
    return found


def _direction_of(metric: Any) -> str | None:
    direction = keras_compat.metric_direction(metric)
    if direction == "up":
        return "max"
    if direction == "down":
        return "min"
    return None


def _registry_direction(name: str) -> str | None:
    if name in _ALIASES:
        return _ALIASES[name]
    import keras

    try:
        metric = keras.metrics.get(name)
    except (ValueError, TypeError):
        return None
    if not hasattr(metric, "_direction") and callable(metric):
        metric = keras.metrics.MeanMetricWrapper(metric)
    return _direction_of(metric)


def _candidate_names(monitor: str, model: Any) -> list[str]:
    name = monitor[len("val_"):] if monitor.startswith("val_") else monitor
    names = [name]
    for output in getattr(model, "output_names", None) or []:
        if name.startswith(f"{output}_"):
            names.append(name[len(output) + 1:])
    return names


def non_scalar_shape(monitor: str, model: Any) -> tuple | None:
    """The shape of the metric `monitor` names when it is not a scalar (a vector per class).

    Read from the model's metric objects at train begin: a built metric's
    result, or an `F1Score`/`FBetaScore` with `average=None` (one value per
    class of the model's single output) not built yet. None when it is a scalar
    (one class) or cannot be told before the first step.
    """
    if model is None:
        return None
    import numpy as np

    names = _candidate_names(monitor, model)
    metrics = _flatten_metrics(getattr(model, "metrics", None)) + _user_metric_objects(model)
    for metric in metrics:
        if getattr(metric, "name", None) not in names:
            continue
        if hasattr(metric, "beta") and getattr(metric, "average", "") is None:
            outputs = getattr(model, "outputs", None) or []
            classes = outputs[0].shape[-1] if len(outputs) == 1 else None
            if isinstance(classes, int) and classes > 1:
                return (classes,)  # one value per class: the output's last axis
        if getattr(metric, "built", False) and getattr(metric, "variables", None):
            try:
                shape = tuple(np.shape(np.asarray(metric.result())))
            except Exception:  # a metric that cannot report before its first update
                continue
            if int(np.prod(shape)) > 1:
                return shape
    return None


def infer_mode(monitor: str, model: Any = None) -> str | None:
    """Infers whether `monitor` should be minimised or maximised.

    Looks, in order, at: the name (`loss`, `val_loss` and any `*_loss`, such
    as the per-output losses of a multi-output model, are minimised); the
    model's metrics (built or as passed to `compile`), whose Keras direction is
    used; and Keras's metric registry, with the model's output names stripped
    from the front of the name (`out_a_accuracy` -> `accuracy`).

    Args:
        monitor: the name of the quantity, as it appears in the logs.
        model: the compiled model, or None to go by the name alone.

    Returns:
        `"min"`, `"max"`, or None when the direction cannot be told.

    Example:
    >>> infer_mode("val_loss")
    'min'
    >>> infer_mode("val_accuracy")
    'max'
    """
    names = _candidate_names(monitor, model)
    if names[0] == "loss" or names[0].endswith("_loss"):
        return "min"
    if model is not None:
        candidates = _flatten_metrics(getattr(model, "metrics", None))
        candidates += _user_metric_objects(model)
        for candidate in names:
            for metric in candidates:
                if getattr(metric, "name", None) == candidate:
                    direction = _direction_of(metric)
                    if direction is not None:
                        return direction
    for candidate in names:
        direction = _registry_direction(candidate)
        if direction is not None:
            return direction
    return None
