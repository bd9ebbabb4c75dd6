"""`BudgetStop`: stop cleanly, checkpoint written, before a time or cost limit is passed."""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable

from keras_ckpt import keras_compat, multi_worker, registry
from keras_ckpt.callbacks.base import StatefulCallback, print_msg
from keras_ckpt.callbacks.budget_report import (
    BudgetExhaustedError,
    budget_message,
    check_seconds,
    other_stop,
)
from keras_ckpt.callbacks.model_checkpoint import ModelCheckpoint
from keras_ckpt.clocks import SteadyClock
from keras_ckpt.fit.protocol import steps_done
from keras_ckpt.ledger import DayClock, Ledger, default_ledger_path
from keras_ckpt.validation import check_bool, check_number

# Why a run stops; with several workers the chief sends the index to the others.
_REASONS = ("daily-budget", "daily-cost-limit", "max-duration", "run-cost-limit")

__all__ = ["BudgetStop", "BudgetExhaustedError"]


class BudgetStop(StatefulCallback):
    """Stops training before a wall-clock or cost limit is passed, with a checkpoint written.

    Limits, in any combination; the first reached stops training:

    - `max_duration`: wall-clock time of this run;
    - `daily_budget`: training time per budget day, across runs and
      processes, days being calendar days in `timezone` starting at
      `reset_hour`;
    - `daily_cost_limit` / `run_cost_limit`: money, at `price_per_hour` per
      device times `devices`.

    Usage is kept in a ledger file shared by every run that names it: charged
    on a monotonic clock as training goes (paid ahead one `sync_interval` at a
    time, under a lock), so that a crash loses at most one interval, two
    processes never both spend the same budget, and neither resuming an older
    checkpoint nor a wall clock stepped back refunds time. Each run is
    recorded; `python -m keras_ckpt budget LEDGER` prints it.

    From running estimates of the step, validation and checkpoint-save
    durations, it stops at the last step whose projected end, the final save
    included, still fits: the limit is passed by at most one step (one
    execution with `steps_per_execution`). On stop it sets
    `model.stop_training`, has the keras-ckpt `ModelCheckpoint` of the same fit
    write a checkpoint at that step (resumable mid-epoch), says what happened,
    and keeps the reason in `stop_reason`. Starting with the budget spent,
    no step is trained and `fit` returns (or raises, with
    `raise_if_exhausted`).

    Per step it reads a clock and compares: no logs, no device sync, and it is
    safe for Keras's asynchronous batch dispatch. Under
    `tf.distribute.MultiWorkerMirroredStrategy` the chief's clock and ledger
    decide, and every worker stops at the chief's step (one all-reduce of a
    number per batch end; the other workers keep no ledger).

    Args:
        max_duration: seconds or a `timedelta` for this run.
        daily_budget: seconds or a `timedelta` of training per budget day.
        timezone: IANA time zone of the budget day, e.g. `"Europe/Berlin"`.
        reset_hour: local hour (0-23) at which a budget day begins.
        price_per_hour: price of one device-hour (for cost limits).
        devices: devices this run uses (cost = hours x price x devices).
        daily_cost_limit: money per budget day.
        run_cost_limit: money for this run.
        ledger: the ledger file; default `$KERAS_CKPT_LEDGER` or
            `~/.keras_ckpt/budget_ledger.json`.
        sync_interval: seconds between ledger updates (the most a crash can
            leave uncharged... or charged in advance).
        raise_if_exhausted: raise `BudgetExhaustedError` when the budget is
            already spent at train begin, instead of returning.
        clock: POSIX seconds (default `time.time`), read once a fit to place
            it in its budget days; tests pass a fake one.
        monotonic_clock: seconds that never go back, by which time is charged
            (default `time.monotonic`; `clock` when only that is given).
        verbose: 0 or 1.

    Attributes:
        stop_reason: None, or why training stopped: `"max-duration"`,
            `"run-cost-limit"`, `"daily-budget"`, `"daily-cost-limit"` or
            `"budget-spent-at-start"` (also in the ledger's session record).
        stopped_at: `(epoch, step)` of the stop (step None at an epoch end).
        checkpoint: the checkpoint written at the stop.
        session: this run's ledger record, after `fit`.

    Example:
    ```python
    budget = keras_ckpt.BudgetStop(daily_budget=datetime.timedelta(hours=1),
                                   timezone="Europe/Berlin")
    model.fit(x, y, epochs=1000, callbacks=[
        keras_ckpt.ModelCheckpoint("ckpt/{epoch:04d}.keras", resume=True), budget])
    # Run the same script every day: one hour a day, continuing where it stopped.
    ```
    """

    def __init__(
        self,
        max_duration: float | datetime.timedelta | None = None,
        daily_budget: float | datetime.timedelta | None = None,
        *,
        timezone: str = "UTC",
        reset_hour: int = 0,
        price_per_hour: float | None = None,
        devices: int = 1,
        daily_cost_limit: float | None = None,
        run_cost_limit: float | None = None,
        ledger: str | os.PathLike | None = None,
        sync_interval: float = 60.0,
        raise_if_exhausted: bool = False,
        clock: Callable[[], float] | None = None,
        monotonic_clock: Callable[[], float] | None = None,
        verbose: int = 1,
    ) -> None:
        super().__init__()
        self.max_duration = check_seconds("max_duration", max_duration)
        self.daily_budget = check_seconds("daily_budget", daily_budget)
        check_number("price_per_hour", price_per_hour, allow_none=True, minimum=0,
                     exclusive=True)
        check_number("devices", devices, minimum=1, integer=True)
        check_number("daily_cost_limit", daily_cost_limit, allow_none=True, minimum=0,
                     exclusive=True)
        check_number("run_cost_limit", run_cost_limit, allow_none=True, minimum=0,
                     exclusive=True)
        check_number("sync_interval", sync_interval, minimum=0, exclusive=True)
        check_bool("raise_if_exhausted", raise_if_exhausted)
        check_number("verbose", verbose, minimum=0, integer=True)
        if (daily_cost_limit is not None or run_cost_limit is not None) and price_per_hour is None:
            raise ValueError("A cost limit needs `price_per_hour` (the price of one device-hour).")
        if all(v is None for v in (self.max_duration, self.daily_budget, daily_cost_limit,
                                   run_cost_limit)):
            raise ValueError("BudgetStop needs a limit: `max_duration`, `daily_budget`, "
                             "`daily_cost_limit` or `run_cost_limit`.")
        if clock is not None and not callable(clock):
            raise TypeError(f"`clock` must be a function returning POSIX seconds; got {clock!r}.")
        if monotonic_clock is not None and not callable(monotonic_clock):
            raise TypeError("`monotonic_clock` must be a function returning seconds; got "
                            f"{monotonic_clock!r}.")
        if ledger is not None and not isinstance(ledger, (str, os.PathLike)):
            raise TypeError(f"`ledger` must be a file path or None; got {ledger!r}.")
        self.days = DayClock(timezone, reset_hour)  # validates both
        self.timezone, self.reset_hour = timezone, reset_hour
        self.price_per_hour, self.devices = price_per_hour, int(devices)
        self.daily_cost_limit, self.run_cost_limit = daily_cost_limit, run_cost_limit
        self.ledger_path = os.fspath(ledger) if ledger is not None else default_ledger_path()
        self.sync_interval, self.raise_if_exhausted = float(sync_interval), raise_if_exhausted
        self.verbose = verbose
        self._clock = SteadyClock(clock, monotonic_clock)
        self._workers: multi_worker.Workers | None = None
        self.async_safe = True
        self.stop_reason: str | None = None
        self.stopped_at: tuple[int, int | None] | None = None
        self.checkpoint: str | None = None  # the path written at a stop
        self.session: dict | None = None  # this fit's ledger record, once ended

    # ------------------------------------------------------------ config
    @property
    def _price_per_second(self) -> float:
        return (self.price_per_hour or 0.0) * self.devices / 3600.0

    def get_config(self) -> dict:
        """The constructor arguments (the clocks excepted)."""
        return {"max_duration": self.max_duration, "daily_budget": self.daily_budget,
                "timezone": self.timezone, "reset_hour": self.reset_hour,
                "price_per_hour": self.price_per_hour, "devices": self.devices,
                "daily_cost_limit": self.daily_cost_limit, "run_cost_limit": self.run_cost_limit,
                "ledger": self.ledger_path, "sync_interval": self.sync_interval,
                "raise_if_exhausted": self.raise_if_exhausted, "verbose": self.verbose}

    def get_state(self) -> dict:
        """Nothing to resume: the budget lives in the ledger, never in a checkpoint."""
        return {"stop_reason": self.stop_reason}

    def set_state(self, state: dict) -> None:
        """Ignores a saved state: time already spent is in the ledger."""

    # ------------------------------------------------------------ hooks
    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        self._clock.start()  # the wall clock, read once a fit
        now = self._clock()
        self.stop_reason, self.stopped_at, self.checkpoint = None, None, None
        # Fixed for the fit (the registry is sealed by now): checked again near the
        # deadline at every step, so not recomputed there.
        self._checkpoint_callbacks = [o for o in registry.objects_for(self.model).values()
                                      if isinstance(o, ModelCheckpoint)]
        # Several workers: the chief keeps the ledger and decides; the others
        # take its decision at the same step (`_decide`).
        self._workers = multi_worker.workers_of(self.model)
        if self._workers is not None and not self._workers.is_chief:
            self._follow_from_start()
            return
        self._ledger = Ledger(self.ledger_path, self.days, self._price_per_second)
        size = sum(math.prod(v.shape) * 4 for v in self.model.variables)
        # Before a first save is timed: weights and optimizer slots at 200 MB/s.
        self._first_save_guess = (0.2 + 3 * size / 200e6) if self._checkpoint_callbacks else 0.0
        self._start = now
        run_limit = min(v for v in (self.max_duration, self._cost_as_seconds(self.run_cost_limit),
                                    math.inf) if v is not None)
        self._run_deadline = now + run_limit
        self._run_reason = ("max-duration" if self.max_duration is not None
                            and self.max_duration <= run_limit else "run-cost-limit")
        self._session = self._ledger.begin(now, {
            "daily_seconds": self.daily_budget, "daily_cost": self.daily_cost_limit,
            "timezone": self.timezone, "reset_hour": self.reset_hour,
            "price_per_hour": self.price_per_hour, "devices": self.devices})
        self._paid_until = now
        self._deadline = math.inf  # known only once the ledger cannot give more
        self._deadline_reason: str | None = None
        # First estimates: what the previous run on this ledger measured.
        timings = self._ledger.last_timings()
        self._step_time = float(timings.get("step_seconds", 0.0))
        self._val_time = float(timings.get("validation_seconds", 0.0))
        self._epoch = 0
        self._last_check = (now, None)
        self._last_batch_time = now
        self._sync(now)
        exhausted = self._paid_until <= now or now + self._lead() > self._deadline
        if self._workers is not None:
            self._workers.from_chief(float(exhausted))  # tells the others (`_follow_from_start`)
        if exhausted:
            self._exhausted_at_start(now)
        else:
            self._next_check = self._plan(now)

    def _follow_from_start(self) -> None:
        """A worker beside the chief: no ledger of its own, the chief's decisions."""
        self._session = None
        self._epoch = 0
        self._next_check = math.inf
        self._step_time = self._val_time = self._last_batch_time = 0.0
        if self._workers.from_chief(0.0):  # the chief's `exhausted`, sent in on_train_begin
            self._train_nothing("BudgetStop: the chief worker found the budget spent before "
                                "training; its ledger says why.")

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        self._last_batch_time = self._clock()
        self._last_check = (self._last_batch_time, None)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        with self.hook_lock:  # Keras's callback pool may run two steps' hooks at once
            now = self._clock()
            self._last_batch_time = now
            if self._workers is not None:
                self._decide(now, batch, logs)
            elif now >= self._next_check and self._check(now, batch):
                self._stop(now, batch, logs)

    def epoch_end(self, epoch: int, logs: dict) -> None:
        if self.stop_reason is not None:
            return
        now = self._clock()
        self._val_time = max(self._val_time, now - self._last_batch_time)
        if self._workers is not None:
            self._decide(now, None, logs)
        elif self._check(now, None):
            self._stop(now, None, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        if getattr(self, "_session", None) is None:
            return
        now = self._clock()
        if self.stop_reason is not None and self.checkpoint is None:
            written = [c.last_saved_path for c in self._checkpoints() if c.last_saved_path]
            self.checkpoint = written[0] if written else None
        timings = {"step_seconds": self._step_time, "validation_seconds": self._val_time}
        self.session = self._ledger.end(self._session, now, self.stop_reason or other_stop(
            self.model), self.checkpoint, timings, (self.daily_budget, self.daily_cost_limit))
        self._session = None
        if self.stop_reason is not None and self.stop_reason != "budget-spent-at-start":
            print_msg(self._message(now, stopped=True))

    # ------------------------------------------------------------ decisions
    def _cost_as_seconds(self, cost: float | None) -> float | None:
        if cost is None:
            return None
        return cost / self._price_per_second

    def _save_time(self) -> float:
        times = [cb.last_save_seconds for cb in self._checkpoint_callbacks
                 if cb.last_save_seconds is not None]
        return max(times) if times else self._first_save_guess

    def _checkpoints(self) -> list[ModelCheckpoint]:
        return self._checkpoint_callbacks

    def _lead(self) -> float:
        """Time needed after a step boundary: one more step, validation, the final save."""
        return self._step_time + self._val_time + self._save_time()

    def _sync(self, now: float) -> None:
        want = min(now + self.sync_interval + self._lead(), self._run_deadline)
        daily_cost = self.daily_cost_limit
        self._paid_until = self._ledger.reserve(self._session, now, want, self.daily_budget,
                                                daily_cost)
        if self._paid_until < want - 1e-6:  # the daily budget is what limits now
            self._deadline = self._paid_until
            self._deadline_reason = self._daily_reason(self._paid_until)
        elif want >= self._run_deadline:
            self._deadline = self._run_deadline
            self._deadline_reason = self._run_reason
        else:
            self._deadline = math.inf

    def _daily_reason(self, at: float) -> str:
        if self.daily_cost_limit is None:
            return "daily-budget"
        if self.daily_budget is None:
            return "daily-cost-limit"
        seconds, cost = self._ledger.used_on(self.days.day(at - 1e-6).isoformat())
        return ("daily-cost-limit" if cost >= self.daily_cost_limit - 1e-9 and
                self._cost_as_seconds(self.daily_cost_limit) < self.daily_budget
                else "daily-budget")

    def _plan(self, now: float) -> float:
        """When to look again: before the reservation or the deadline is too close."""
        lead = self._lead()
        return min(self._paid_until, self._deadline) - lead

    def _decide(self, now: float, batch: int | None, logs: dict | None) -> None:
        """Several workers: the chief checks, every worker stops where it says.

        One all-reduce per call, on every worker at the same hooks (every
        train batch end and epoch end), whatever the workers' clocks say.
        """
        stop = False
        if self._workers.is_chief and self.stop_reason is None and (
                batch is None or now >= self._next_check):
            stop = self._check(now, batch)
        reason = _REASONS.index(self._deadline_reason or "daily-budget") + 1 if stop else 0
        reason = int(round(self._workers.from_chief(reason)))
        if reason:
            self._deadline_reason = _REASONS[reason - 1]
            self._stop(now, batch, logs)

    def _check(self, now: float, batch: int | None) -> bool:
        """Updates the timings and the reservation; whether training must stop now."""
        if batch is not None and self.replaying(batch):
            # A resume replaying the batches it had trained on: nothing to decide
            # (and replays are no measure of a step's time).
            self._last_check = (now, batch)
            return False
        previous, previous_batch = self._last_check
        if batch is not None and previous_batch is not None and batch > previous_batch:
            self._step_time = (now - previous) / (batch - previous_batch)
        elif batch is not None and self._step_time == 0.0:
            self._step_time = (now - previous) / (batch + 1)
        self._last_check = (now, batch)
        if now + self._lead() > self._paid_until and self._deadline == math.inf:
            self._sync(now)
        if now + self._lead() > self._deadline:
            return True
        self._next_check = self._plan(now)
        return False

    def _stop(self, now: float, batch: int | None, logs: dict | None) -> None:
        self.stop_reason = self._deadline_reason or "daily-budget"
        done = None if batch is None else steps_done(self.params, batch)
        self.stopped_at = (self._epoch, done)
        # `_model`, not `model`: possibly on Keras's callback thread (JAX, torch).
        keras_compat.callback_model(self).stop_training = True
        self._next_check = math.inf
        if done is not None:
            steps = (self.params or {}).get("steps")
            if steps is None or done < steps:
                registry.set_cut_short(keras_compat.callback_model(self), self._epoch)
            for checkpoint in self._checkpoints():
                written = checkpoint.save_now(logs, steps_in_epoch=done)
                self.checkpoint = written or self.checkpoint
        # At an epoch end a ModelCheckpoint saves after us (it settles us
        # first); on_train_end reads which file it wrote.

    def _exhausted_at_start(self, now: float) -> None:
        message = self._message(now, stopped=False)
        if self.raise_if_exhausted:
            self._ledger.end(self._session, now, "budget-spent-at-start", None)
            self._session = None
        self._train_nothing(message)

    def _train_nothing(self, message: str) -> None:
        """The budget is spent before the first step: raise, or let `fit` train no epoch."""
        self.stop_reason = "budget-spent-at-start"
        self._next_check = math.inf
        if self.raise_if_exhausted:
            raise BudgetExhaustedError(message)
        print_msg(message)
        epochs = (self.params or {}).get("epochs")
        if epochs is not None:
            registry.start_at_epoch(self.model, epochs)

    def _message(self, now: float, stopped: bool) -> str:
        return budget_message(self, now, stopped)
