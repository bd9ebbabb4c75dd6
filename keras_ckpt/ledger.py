"""The budget ledger: training time and cost per day, shared by runs, crash-safe and locked.

The ledger is one JSON file. Every change happens under an exclusive lock
(`flock` on `LEDGER.lock`, released by the kernel if the process dies), reads
the file, changes it, and replaces it atomically (temporary file, fsync,
rename). A run charges time in advance: at each sync it pays for the time
used since its last sync and reserves the next interval, but never more than
what is left. So two runs sharing a budget can never spend more than it
between them, and a run killed mid-interval has been charged up to the end
of the interval it was in. A step cannot be stopped halfway: time a run
spends past what it had paid for (a step slower than projected) is charged
while the day has budget left, and beyond that recorded as `overrun`, per
session and per day, never hidden and never counted twice. A run that ends
cleanly gets the unused part of its last reservation back; resuming an older
checkpoint never refunds anything, because the ledger lives outside the
checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import math
import os
import secrets
import zoneinfo
from collections.abc import Iterator
from typing import Any

from keras_ckpt import atomic

__all__ = ["Ledger", "LedgerError", "DayClock", "default_ledger_path", "format_duration"]

_VERSION = 1


class LedgerError(ValueError):
    """The ledger cannot be read or is not a keras-ckpt ledger; it is left untouched."""


def format_duration(seconds: float | None) -> str:
    """`12.5s` under two minutes, else `45m` or `1h05m`; `-` for None."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def default_ledger_path() -> str:
    """`$KERAS_CKPT_LEDGER`, else `~/.keras_ckpt/budget_ledger.json`."""
    return os.environ.get("KERAS_CKPT_LEDGER") or os.path.join(
        os.path.expanduser("~"), ".keras_ckpt", "budget_ledger.json")


class DayClock:
    """Maps POSIX times to budget days: calendar days in `timezone`, starting at `reset_hour`.

    Args:
        timezone: an IANA time zone name, e.g. `"Europe/Berlin"`.
        reset_hour: the local hour (0-23) at which a new budget day begins.

    Raises:
        ValueError: unknown time zone or reset hour out of range.
    """

    def __init__(self, timezone: str = "UTC", reset_hour: int = 0) -> None:
        if not isinstance(timezone, str):
            raise TypeError(f"`timezone` must be an IANA name such as 'Europe/Berlin'; got "
                            f"{timezone!r}.")
        try:
            self.tz = zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"`timezone` {timezone!r} is not a known IANA time zone (for "
                             "example 'UTC', 'Europe/Berlin', 'America/New_York').") from None
        if isinstance(reset_hour, bool) or not isinstance(reset_hour, int) or not (
                0 <= reset_hour <= 23):
            raise ValueError(f"`reset_hour` must be an integer from 0 to 23; got {reset_hour!r}.")
        self.timezone = timezone
        self.reset_hour = reset_hour

    def day(self, t: float) -> datetime.date:
        """The budget day that POSIX time `t` falls in."""
        local = datetime.datetime.fromtimestamp(t, self.tz)
        return (local - datetime.timedelta(hours=self.reset_hour)).date()

    def start(self, day: datetime.date) -> float:
        """The POSIX time at which budget day `day` begins."""
        local = datetime.datetime.combine(day, datetime.time(self.reset_hour), tzinfo=self.tz)
        return local.timestamp()

    def next_start(self, t: float) -> float:
        """The POSIX time at which the budget day after the one `t` is in begins."""
        return self.start(self.day(t) + datetime.timedelta(days=1))

    def split(self, t0: float, t1: float) -> Iterator[tuple[str, float]]:
        """Yields (day, seconds) for the parts of [t0, t1) in each budget day."""
        while t0 < t1:
            end = min(t1, self.next_start(t0))
            yield self.day(t0).isoformat(), end - t0
            t0 = end

    def format(self, t: float) -> str:
        """Local time of `t` as `YYYY-MM-DD HH:MM`."""
        return datetime.datetime.fromtimestamp(t, self.tz).strftime("%Y-%m-%d %H:%M")


@dataclasses.dataclass
class Session:
    """One run's record in the ledger (times are POSIX seconds)."""

    id: str
    start: float
    paid_until: float
    end: float | None = None
    seconds: float = 0.0
    cost: float = 0.0
    stop_reason: str | None = None
    checkpoint: str | None = None


def _amount(value: Any) -> bool:
    """A finite number of seconds or money, at least 0."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def _time(value: Any) -> bool:
    """A finite POSIX time."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _schema_problem(data: dict) -> str | None:
    """What in a ledger's contents is not what keras-ckpt writes, or None.

    Checked on every read, so before anything is written: a malformed ledger
    is never charged, and no session is opened in it.
    """
    days, sessions, config = data.get("days"), data.get("sessions"), data.get("config", {})
    if not isinstance(days, dict):
        return "`days` is not a mapping of days"
    for day, entry in days.items():
        try:
            datetime.date.fromisoformat(day)
        except (TypeError, ValueError):
            return f"the day {day!r} is not an ISO date"
        if not isinstance(entry, dict) or not all(
                _amount(entry.get(k, 0.0)) for k in ("seconds", "cost", "overrun")):
            return f"day {day}: {entry!r} is not seconds and cost of at least 0"
    if not isinstance(sessions, list):
        return "`sessions` is not a list"
    for record in sessions:
        if not (isinstance(record, dict) and isinstance(record.get("id"), str)
                and _time(record.get("start")) and _time(record.get("paid_until"))
                and (record.get("end") is None or _time(record["end"]))
                and all(_time(record.get(k, 0.0)) for k in ("seconds", "cost"))
                and _amount(record.get("overrun", 0.0))):
            return f"the session {record!r} is not a session record"
    if not isinstance(config, dict):
        return "`config` is not a mapping"
    hour = config.get("reset_hour", 0)
    if not isinstance(config.get("timezone", "UTC"), str) or not (
            isinstance(hour, int) and not isinstance(hour, bool) and 0 <= hour <= 23):
        return f"the configuration's time zone or reset hour is {config!r}"
    for name in ("daily_seconds", "daily_cost"):
        if config.get(name) is not None and not _amount(config[name]):
            return f"the configuration's {name} is {config[name]!r}"
    return None


class Ledger:
    """A budget ledger file.

    Args:
        path: the JSON file (created on first write, with its directory).
        day_clock: how times map to budget days.
        price_per_second: cost of one second of this run (price per hour x
            devices / 3600), or 0.

    Raises:
        LedgerError: the file exists but is not a readable keras-ckpt ledger.

    Example:
    >>> import tempfile, os
    >>> ledger = Ledger(os.path.join(tempfile.mkdtemp(), "l.json"), DayClock("UTC"))
    >>> ledger.used_on("2026-11-22")
    (0.0, 0.0)
    """

    def __init__(self, path: str | os.PathLike, day_clock: DayClock,
                 price_per_second: float = 0.0) -> None:
        self.path = os.fspath(path)
        self.days = day_clock
        self.price_per_second = float(price_per_second)
        self._read()  # fail early on a corrupt ledger

    # ------------------------------------------------------------ file
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            lock = open(self.path + ".lock", "a")
        except OSError as e:
            raise LedgerError(f"Cannot open the budget ledger {self.path!r}: {e}.") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            yield data
            self._write(data)

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return {"format": "keras-ckpt-ledger", "version": _VERSION, "days": {},
                    "sessions": [], "config": {}}
        except OSError as e:
            raise LedgerError(f"Cannot read the budget ledger {self.path!r}: {e}.") from None
        except UnicodeDecodeError:
            raise LedgerError(f"The budget ledger {self.path!r} is not text (a binary file?). "
                              "It was left as it is.") from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise LedgerError(
                f"The budget ledger {self.path!r} is not valid JSON ({e}). It was left as it is: "
                "repair or move it; keras-ckpt never resets a ledger by itself.") from None
        if not isinstance(data, dict) or data.get("format") != "keras-ckpt-ledger":
            raise LedgerError(f"{self.path!r} is not a keras-ckpt budget ledger; it was left "
                              "as it is.")
        version = data.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise LedgerError(f"The budget ledger {self.path!r}: `version` is {version!r}; it "
                              "was left as it is.")
        if version > _VERSION:
            raise LedgerError(f"The budget ledger {self.path!r} has version {data['version']}; "
                              f"this keras-ckpt reads version {_VERSION}. Upgrade keras-ckpt.")
        problem = _schema_problem(data)
        if problem is not None:
            raise LedgerError(f"The budget ledger {self.path!r} is malformed: {problem}. It was "
                              "left as it is: repair or move it; keras-ckpt never resets a "
                              "ledger by itself.")
        return data

    def _write(self, data: dict) -> None:
        # The temporary name carries this process's id (atomic's format): a
        # run cleaning the directory leaves a write in flight alone.
        text = json.dumps(data, indent=1, allow_nan=False)
        atomic.write_bytes(self.path, text.encode())

    # ------------------------------------------------------------ queries
    def used_on(self, day: str) -> tuple[float, float]:
        """(seconds, cost) charged to budget day `day` (ISO date), by all runs."""
        entry = self._read()["days"].get(day, {})
        return float(entry.get("seconds", 0.0)), float(entry.get("cost", 0.0))

    def last_timings(self) -> dict:
        """The timings the most recent finished session recorded (or {})."""
        for record in reversed(self._read()["sessions"]):
            if record.get("end") is not None and "step_seconds" in record:
                return {k: record[k] for k in ("step_seconds", "validation_seconds")
                        if k in record}
        return {}

    def sessions(self) -> list[dict]:
        """Every session record, oldest first."""
        return list(self._read()["sessions"])

    def config(self) -> dict:
        """The budget configuration the last run wrote (for `python -m keras_ckpt budget`)."""
        return dict(self._read().get("config", {}))

    # ------------------------------------------------------------ charges
    def _charge(self, data: dict, t0: float, t1: float) -> None:
        for day, seconds in self.days.split(t0, t1):
            entry = data["days"].setdefault(day, {"seconds": 0.0, "cost": 0.0})
            entry["seconds"] = entry["seconds"] + seconds
            entry["cost"] = entry["cost"] + seconds * self.price_per_second

    def _charge_late(self, data: dict, record: dict, t0: float, t1: float,
                     limits: tuple[float | None, float | None]) -> None:
        """Charges time already spent, within each day's budget; the rest is overrun."""
        daily_seconds, daily_cost = limits
        for day, seconds in self.days.split(t0, t1):
            entry = data["days"].setdefault(day, {"seconds": 0.0, "cost": 0.0})
            room = seconds
            if daily_seconds is not None:
                room = min(room, max(0.0, daily_seconds - entry["seconds"]))
            if daily_cost is not None and self.price_per_second > 0:
                room = min(room, max(0.0, (daily_cost - entry["cost"]) / self.price_per_second))
            entry["seconds"] += room
            entry["cost"] += room * self.price_per_second
            if seconds > room:
                entry["overrun"] = entry.get("overrun", 0.0) + seconds - room
                record["overrun"] = record.get("overrun", 0.0) + seconds - room

    def _find(self, data: dict, session_id: str) -> dict:
        for record in data["sessions"]:
            if record["id"] == session_id:
                return record
        raise LedgerError(f"Session {session_id} is not in the ledger {self.path!r}.")

    def begin(self, now: float, config: dict) -> str:
        """Opens a session at `now`; returns its id."""
        session_id = f"{int(now)}-{os.getpid()}-{secrets.token_hex(3)}"
        with self._locked() as data:
            data["config"] = config
            data["sessions"].append(dataclasses.asdict(Session(session_id, now, now)))
        return session_id

    def reserve(self, session_id: str, now: float, want_until: float,
                daily_seconds: float | None, daily_cost: float | None) -> float:
        """Pays for this session up to at most `want_until`; returns the time paid up to.

        Under the lock: the time since the session's last payment is charged
        (it has been spent), then more is reserved, limited by what is left of
        each day's budget (time and cost) among all runs.
        """
        with self._locked() as data:
            record = self._find(data, session_id)
            paid = max(record["paid_until"], record["start"])
            if now > paid:  # spent beyond what was reserved (a late check)
                self._charge_late(data, record, paid, now, (daily_seconds, daily_cost))
                paid = now
            until = paid
            while until < want_until:
                day = self.days.day(until)
                entry = data["days"].get(day.isoformat(), {"seconds": 0.0, "cost": 0.0})
                room = want_until - until
                if daily_seconds is not None:
                    room = min(room, daily_seconds - entry["seconds"])
                if daily_cost is not None and self.price_per_second > 0:
                    room = min(room, (daily_cost - entry["cost"]) / self.price_per_second)
                room = min(room, self.days.next_start(until) - until)
                if room <= 1e-9:
                    break
                self._charge(data, until, until + room)
                until += room
            record["paid_until"] = until
            record["seconds"] = until - record["start"] - record.get("overrun", 0.0)
            record["cost"] = record["seconds"] * self.price_per_second
            return until

    def end(self, session_id: str, now: float, stop_reason: str | None,
            checkpoint: str | None, timings: dict | None = None,
            limits: tuple[float | None, float | None] = (None, None)) -> dict:
        """Closes the session: charges up to `now`, refunds the unused reservation.

        `timings` (e.g. the measured step time) are kept with the session, for
        the next run's first estimate; `limits` are the daily (seconds, cost)
        budgets that late time is charged within.
        """
        with self._locked() as data:
            record = self._find(data, session_id)
            paid = record["paid_until"]
            if now > paid:
                self._charge_late(data, record, paid, now, limits)
            elif now < paid:  # clean end: the unused reservation goes back
                for day, seconds in self.days.split(now, paid):
                    entry = data["days"].get(day)
                    if entry is None:  # never charged (a file edited meanwhile)
                        continue
                    entry["seconds"] = max(0.0, entry["seconds"] - seconds)
                    entry["cost"] = max(0.0, entry["cost"] - seconds * self.price_per_second)
            charged = now - record["start"] - record.get("overrun", 0.0)
            record.update(end=now, paid_until=now, seconds=charged,
                          cost=charged * self.price_per_second,
                          stop_reason=stop_reason, checkpoint=checkpoint, **(timings or {}))
            return dict(record)

    def summary(self, now: float) -> dict[str, Any]:
        """Today's use, what remains, when the next window opens, and the sessions."""
        data = self._read()
        config = data.get("config", {})
        today = self.days.day(now).isoformat()
        entry = data["days"].get(today, {"seconds": 0.0, "cost": 0.0})
        budget = config.get("daily_seconds")
        return {
            "ledger": self.path, "timezone": self.days.timezone,
            "reset_hour": self.days.reset_hour, "today": today,
            "used_seconds": entry["seconds"], "used_cost": entry["cost"],
            "overrun_seconds": entry.get("overrun", 0.0),
            "daily_seconds": budget, "daily_cost": config.get("daily_cost"),
            "remaining_seconds": None if budget is None else max(0.0, budget - entry["seconds"]),
            "next_window": self.days.format(self.days.next_start(now)),
            "days": data["days"], "sessions": data["sessions"],
        }
