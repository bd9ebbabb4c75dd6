"""`save_freq="auto"`: how often to save, chosen from what a save and a step cost.

ModelCheckpoint tells `AutoFrequency` the clock after every training step
(`observe_step`) and what each of its step-level saves cost (`observe_save`):
the time it blocked training, plus, with `async_write`, the time of the
background write before it (on a machine without a spare core the write slows
the steps by about that much; counting it also keeps writes from queueing). A
save then comes every `n` steps, the smallest `n` for which saving takes at
most `overhead` of the time:

    cost / (n * step + cost) <= overhead   <=>   n >= cost * (1 - overhead) / (overhead * step)

and at most every `max_lost` seconds, so that a kill loses no more than that:
`n * step + cost <= max_lost` (the time since the saved step) wins over the
overhead when they disagree.
(The CheckFreq paper, FAST '21, tunes PyTorch's checkpoint frequency by the
same reasoning.) A fit's first two steps are not measured (tracing, and on
some backends a second compile), nor the interval that holds an epoch's end
(validation), nor the saves themselves.
Before any save has been measured, the first save comes as soon as the step time
is known. A save's cost is the median of the last five (the first save of a
process builds caches and costs more). The estimates ride in the checkpoint, so
a resumed fit starts from them.
"""

from __future__ import annotations

import collections
import math
import statistics
from collections.abc import Callable
from typing import Any

from keras_ckpt.keras_compat import print_msg

__all__ = ["AutoFrequency", "describe_report", "DEFAULT_OVERHEAD", "DEFAULT_MAX_LOST"]

DEFAULT_OVERHEAD = 0.02  # of training time blocked on saves
DEFAULT_MAX_LOST = 3600.0  # seconds of training a kill may lose, without `save_interval`
_MEASURED_STEPS = 2  # measured step intervals before the step time counts
_COSTS_KEPT = 5


class AutoFrequency:
    """A batch-level save policy whose interval follows the measured costs.

    Args:
        overhead: the largest share of training time spent blocked on saves.
        max_lost: the most seconds of training between two saves.
        clock: a function returning seconds (ModelCheckpoint's `clock`).
    """

    batch_level = True

    def __init__(self, overhead: float, max_lost: float, clock: Callable[[], float]) -> None:
        self.overhead = float(overhead)
        self.max_lost = float(max_lost)
        self.clock = clock
        self.save_costs: collections.deque[float] = collections.deque(maxlen=_COSTS_KEPT)
        self.prior_step_seconds: float | None = None  # from a checkpoint
        self.save_seconds: float | None = None  # the median of `save_costs`
        self.reported_steps: int | None = None
        self._now = 0.0
        self.fit_begin()

    # ------------------------------------------------------------ measuring
    def fit_begin(self) -> None:
        """A new fit: its first step (tracing) is not measured."""
        self._anchor: tuple[float, int] | None = None
        self._anchors = 0
        self._time = 0.0
        self._steps = 0

    def epoch_begin(self) -> None:
        """An epoch's first interval holds validation and epoch ends: not measured."""
        self._anchor = None

    def observe_step(self, global_step: int) -> None:
        """The clock after the training step `global_step` (call before `due`)."""
        now = self._now = self.clock()
        if self._anchor is not None and self._anchors > 1:
            then, step = self._anchor
            if global_step > step:
                self._time += max(0.0, now - then)
                self._steps += global_step - step
        if self._anchor is None or global_step > self._anchor[1]:
            self._anchors += 1
        self._anchor = (now, global_step)

    def observe_save(self, seconds: float, verbose: int = 0) -> None:
        """A step-level save blocked training `seconds`; `verbose`: say a new interval."""
        self.save_costs.append(max(0.0, float(seconds)))
        self.save_seconds = statistics.median(self.save_costs)
        if self._anchor is not None:  # not charged to the steps around it
            self._anchor = (self.clock(), self._anchor[1])
        report = self.changed_report() if verbose > 0 else None
        if report is not None:
            print_msg(f"\nModelCheckpoint: save_freq='auto': {describe_report(report)}")

    @property
    def step_seconds(self) -> float | None:
        """The measured time of one training step, or None before it is known."""
        if self._steps >= _MEASURED_STEPS and self._time > 0:
            return self._time / self._steps
        return self.prior_step_seconds

    # ------------------------------------------------------------ deciding
    def interval_steps(self) -> int | None:
        """Steps between saves now (0: save at once, to measure), or None if not known yet."""
        step, cost = self.step_seconds, self.save_seconds
        if step is None:
            return None
        if cost is None:
            return 0
        # (A hair's tolerance: 0.2 * 0.98 / 0.002 is 98, not 98.00000000000001.)
        wanted = math.ceil(cost * (1 - self.overhead) / (self.overhead * step) - 1e-9)
        bound = math.floor((self.max_lost - cost) / step + 1e-9)  # the save's time is lost too
        return max(1, min(wanted, bound))

    def due(self, global_step: int, last_save_step: int, last_save_time: float) -> bool:
        """(After `observe_step` of this step: its clock reading is used again.)"""
        if self._now - last_save_time >= self.max_lost:
            return True
        steps = self.interval_steps()
        return steps is not None and global_step - last_save_step >= max(steps, 1)

    # ------------------------------------------------------------ reporting
    def report(self) -> dict | None:
        """What the policy chose and from what (None before it knows both costs)."""
        steps, step, cost = self.interval_steps(), self.step_seconds, self.save_seconds
        if not steps or step is None or cost is None:
            return None
        return {"every_steps": steps, "save_seconds": cost, "step_seconds": step,
                "expected_overhead": cost / (steps * step + cost),
                "overhead": self.overhead, "max_lost_seconds": self.max_lost,
                "lost_at_most_seconds": steps * step + cost}

    def changed_report(self) -> dict | None:
        """`report()` when the interval is new or moved by more than a quarter, else None."""
        report = self.report()
        if report is None:
            return None
        steps, before = report["every_steps"], self.reported_steps
        if before is not None and abs(steps - before) <= 0.25 * before:
            return None
        self.reported_steps = steps
        return report

    def get_state(self) -> dict:
        return {"save_seconds": list(self.save_costs), "step_seconds": self.step_seconds,
                "every_steps": self.interval_steps(), "overhead": self.overhead,
                "max_lost_seconds": self.max_lost, "chosen": self.report()}

    def set_state(self, state: dict) -> None:
        costs = state.get("save_seconds") or []
        self.save_costs.clear()
        self.save_costs.extend(float(c) for c in costs if _is_seconds(c))
        self.save_seconds = statistics.median(self.save_costs) if self.save_costs else None
        step = state.get("step_seconds")
        self.prior_step_seconds = float(step) if _is_seconds(step) and step > 0 else None


def describe_report(report: dict) -> str:
    """One sentence for the verbose output and `inspect`."""
    return (f"a save every {report['every_steps']} steps (a save blocks "
            f"{_seconds(report['save_seconds'])}, a step takes "
            f"{_seconds(report['step_seconds'])}: {100 * report['expected_overhead']:.1f}% "
            f"of training time, target {100 * report['overhead']:.1f}%; a kill loses at most "
            f"{_seconds(report['lost_at_most_seconds'])} of training)")


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _is_seconds(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)
