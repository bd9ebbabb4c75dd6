"""What BudgetStop reports: its error, its argument check, its one-line message."""

from __future__ import annotations

import datetime
from typing import Any

from keras_ckpt.ledger import format_duration as _fmt
from keras_ckpt.validation import check_number

__all__ = ["BudgetExhaustedError", "budget_message", "check_seconds", "other_stop"]


class BudgetExhaustedError(RuntimeError):
    """Raised at train begin when the budget is already spent and `raise_if_exhausted=True`."""


def check_seconds(name: str, value: float | datetime.timedelta | None) -> float | None:
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    check_number(name, value, allow_none=True, minimum=0, exclusive=True)
    return None if value is None else float(value)


def budget_message(stop: Any, now: float, stopped: bool) -> str:
    """The one-line report of a BudgetStop `stop` at `now` (stopped, or spent at start)."""
    day = stop.days.day(now - 1e-6)
    seconds, cost = stop._ledger.used_on(day.isoformat())
    parts = []
    if stop.daily_budget is not None:
        parts.append(f"used {_fmt(seconds)} of {_fmt(stop.daily_budget)} for {day} "
                     f"({stop.timezone})")
    if stop.daily_cost_limit is not None:
        parts.append(f"spent {cost:.2f} of {stop.daily_cost_limit:.2f} for {day}")
    if stop.max_duration is not None or stop.run_cost_limit is not None:
        parts.append(f"this run used {_fmt(now - stop._start)}")
    head = "BudgetStop: " + "; ".join(parts)
    if not stopped:
        return (f"{head}. The budget is spent: no step was trained. The next window "
                f"opens {stop.days.format(stop.days.next_start(now))}.")
    epoch, step = stop.stopped_at
    where = f"after epoch {epoch + 1}" + (f", step {step}" if step else "")
    saved = f"; checkpoint {stop.checkpoint}" if stop.checkpoint else \
        "; no keras-ckpt ModelCheckpoint in this fit, so no checkpoint was written"
    window = ""
    if stop.stop_reason in ("daily-budget", "daily-cost-limit"):
        window = f"; next window opens {stop.days.format(stop.days.next_start(now))}"
    return f"{head}; stopped {where} ({stop.stop_reason}){saved}{window}."


def other_stop(model: Any) -> str | None:
    """Why another callback stopped the fit, for the ledger: `early-stopping`, `stopped` or None."""
    from keras_ckpt import registry

    if not getattr(model, "stop_training", False):
        return None
    session = registry.current_fit(model)
    callbacks = session.callback_list() if session is not None else None
    stoppers = callbacks.callbacks if callbacks is not None else []
    return "early-stopping" if any(getattr(c, "stopped_epoch", 0) for c in stoppers) else "stopped"
