"""A fit's compiled state built before its first trace, as a resumed fit needs it.

On TensorFlow without a distribution strategy, Keras builds the compiled
metrics, the compiled loss and the optimizer inside the first trace of
`train_function`. Creating variables there makes `tf.function` trace the step
twice. Under a strategy (and on JAX and torch) Keras's `fit` builds them first,
symbolically (`_symbolic_build`), and traces once.

A resumed fit must build them at train begin anyway, to restore into them. So a
fit with any keras-ckpt callback builds them there too, the way Keras does under
a strategy, from the input's spec instead of a batch. A fresh fit and a resumed
fit then create their state the same way. The values do not change: the
optimizer's and metrics' variables start as Keras starts them, and a fit so built
ends bitwise equal to one without keras-ckpt (tests/test_first_trace.py). It also
saves the second trace (a third of a tiny model's first epoch).

It is done only where the result cannot differ:

- the model is built and trains with Keras's own `train_step` (a custom one may
  feed its metrics something other than the input's targets);
- every input and target has a known shape but for the batch dimension (the
  compiled metrics choose their kind from it, e.g. which accuracy);
- the model does not run eagerly (nothing is traced then).

Anything else, and a symbolic build that fails, is left to the first trace, as in Keras.

After the first trace, `hidden_random_ops` names the TensorFlow random ops in the
train step whose state lives in their kernels, outside every variable (a custom
layer's `tf.random.normal`): no checkpoint holds it, so a resumed run draws other
numbers. The fit's step guards warn once (exact or loud).
"""

from __future__ import annotations

import sys
from typing import Any

from keras_ckpt import keras_compat

__all__ = ["build_before_first_trace", "hidden_random_ops"]


def build_before_first_trace(model: Any) -> bool:
    """Builds `model`'s compiled state now where Keras would in the first trace.

    Call it at train begin, from inside `fit`. Returns whether it built.
    """
    import keras

    if keras.backend.backend() != "tensorflow" or getattr(model, "run_eagerly", False) \
            or keras_compat.distribute_strategy(model) is not None:
        return False
    optimizer, metrics = getattr(model, "optimizer", None), keras_compat.compiled_metrics(model)
    if optimizer is None or (optimizer.built and (metrics is None or metrics.built)) \
            or not keras_compat.has_keras_train_step(model) \
            or not all(layer.built for layer in keras_compat.flatten_layers(model)):
        return False
    spec = keras_compat.epoch_element_spec(model)
    tf = sys.modules.get("tensorflow")
    flat = tf.nest.flatten(spec) if tf is not None and spec is not None else []
    if not flat or not all(type(s) is tf.TensorSpec and s.shape.rank
                           and None not in s.shape.as_list()[1:] for s in flat):
        return False
    try:
        keras_compat.symbolic_build(model, spec)
    except Exception:  # what a symbolic call cannot do, the first trace does as in Keras
        return False
    return True


# Stateful TensorFlow random ops: a seed pair in the op, the position in its kernel (or a
# generator resource Keras does not track). Keras's own random ops are stateless.
_HIDDEN_RANDOM = frozenset({
    "RandomStandardNormal", "RandomUniform", "RandomUniformInt", "TruncatedNormal",
    "ParameterizedTruncatedNormal", "RandomGamma", "RandomPoisson", "RandomPoissonV2",
    "RandomShuffle", "Multinomial", "StatefulStandardNormalV2", "StatefulUniform",
    "StatefulUniformInt", "StatefulUniformFullInt", "StatefulTruncatedNormal",
    "StatefulRandomBinomial", "RngSkip", "RngReadAndSkip", "NonDeterministicInts"})


def hidden_random_ops(function: Any) -> list[str]:
    """The stateful random ops in the graphs `function` (a traced `tf.function`) runs, the
    functions they call included; none off TensorFlow."""
    found: set[str] = set()
    for graph in keras_compat.traced_graphs(function):
        graph_def = graph.as_graph_def()
        nodes = [*graph_def.node, *(n for f in graph_def.library.function for n in f.node_def)]
        found |= {node.op for node in nodes if node.op in _HIDDEN_RANDOM}
    return sorted(found)

