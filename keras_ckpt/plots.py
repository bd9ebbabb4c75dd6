"""The command line's pictures: a budget ledger by day, a checkpoint directory by value.

Each picture is a PNG drawn with matplotlib (`pip install 'keras-ckpt[demo]'`).
What it marks is also written into the file, as JSON in its `keras-ckpt` text
chunk, so that a script (or a test) can read the events back without looking
at pixels: `read_png_events(path)`.

    keras-ckpt budget budget.json --plot budget.png
    keras-ckpt inspect checkpoints/ --plot checkpoints.png
"""

from __future__ import annotations

import datetime
import json
import os
import struct
import sys
import zlib
from typing import Any

__all__ = ["PlotError", "budget_events", "checkpoint_events", "draw", "plot_budget",
           "plot_checkpoints", "pyplot", "read_png_events", "save_png"]

PNG_KEY = "keras-ckpt"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_PNG_BYTES = 64 * 2**20


class PlotError(RuntimeError):
    """A picture could not be drawn (matplotlib missing), written, or read back."""


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend; PlotError if not installed."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'keras-ckpt[demo]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str, events: dict) -> None:
    """Writes `fig` to `path` as PNG with `events` in its `keras-ckpt` text chunk."""
    plt = pyplot()
    try:
        fig.savefig(path, format="png", metadata={PNG_KEY: json.dumps(events, allow_nan=False)})
    except OSError as e:
        raise PlotError(f"cannot write the picture {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def read_png_events(path: str) -> dict:
    """The events a keras-ckpt PNG marks, from its `keras-ckpt` text chunk.

    Raises:
        PlotError: the file is not a PNG, is larger than 64 MiB, or holds no
            keras-ckpt chunk.
    """
    with open(path, "rb") as f:
        data = f.read(_MAX_PNG_BYTES + 1)
    if len(data) > _MAX_PNG_BYTES or not data.startswith(_PNG_SIGNATURE):
        raise PlotError(f"{path} is not a keras-ckpt picture (not a PNG of at most 64 MiB)")
    at = len(_PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        at += 12 + length
        if kind in (b"tEXt", b"zTXt", b"iTXt") and body.startswith(PNG_KEY.encode() + b"\0"):
            text = body[len(PNG_KEY) + 1:]
            try:
                if kind == b"zTXt":
                    text = zlib.decompressobj().decompress(text[1:], _MAX_PNG_BYTES)
                elif kind == b"iTXt":  # flag, method, language\0, translated keyword\0, text
                    compressed, rest = text[0], text[2:]
                    rest = rest.split(b"\0", 2)[2]
                    text = zlib.decompress(rest) if compressed else rest
                return json.loads(text.decode("utf-8" if kind == b"iTXt" else "latin-1"))
            except (ValueError, IndexError, zlib.error) as e:
                raise PlotError(f"{path}: its keras-ckpt chunk is damaged ({e})") from None
    raise PlotError(f"{path} holds no keras-ckpt chunk: not a picture keras-ckpt drew")


def draw(path: str | None, quiet: bool, plot: Any, *args: Any) -> int:
    """The CLI's `--plot PATH`: `plot(*args, PATH)` (`plot_budget`, ...); 0, or 4 if it fails.

    Prints `Plot: PATH` unless `quiet` (the `--json` output stays JSON); a
    failure is one line on stderr.
    """
    if path is None:
        return 0
    try:
        plot(*args, path)
    except PlotError as e:
        print(f"keras-ckpt: {e}", file=sys.stderr)
        return 4
    if not quiet:
        print(f"Plot: {path}")
    return 0


# ------------------------------------------------------------------ the budget ledger
def budget_events(report: dict, tz: datetime.tzinfo) -> dict:
    """What `plot_budget` draws: the time used on each day and every session's end.

    Args:
        report: `Ledger.summary(now)`.
        tz: the ledger's time zone (the days are its days).

    Returns:
        `{"daily_seconds", "timezone", "days": [{"day", "seconds", "overrun"}],
        "events": [{"day", "time", "kind", "reason"}]}`: every day from the
        first charged to the last (days without training have 0 s); one event
        per session, `kind` `"stop"` (with its reason, `"finished"` when none
        was given) or `"killed or running"` (a session never ended).
        `plot_budget` adds each event's height in the picture (`y_minutes`):
        the events of one day are stacked, never drawn over each other.
    """
    charged = report.get("days") or {}
    events = []
    for s in report.get("sessions") or []:
        end = s.get("end")
        moment = datetime.datetime.fromtimestamp(end if end is not None else s["paid_until"], tz)
        events.append({"day": moment.date().isoformat(), "time": moment.isoformat(),
                       "kind": "stop" if end is not None else "killed or running",
                       "reason": (s.get("stop_reason") or "finished") if end is not None
                       else None})
    known = sorted({*charged, *(e["day"] for e in events)})
    days = []
    if known:
        day, last = datetime.date.fromisoformat(known[0]), datetime.date.fromisoformat(known[-1])
        while day <= last:
            entry = charged.get(day.isoformat(), {})
            days.append({"day": day.isoformat(), "seconds": float(entry.get("seconds", 0.0)),
                         "overrun": float(entry.get("overrun", 0.0))})
            day += datetime.timedelta(days=1)
    return {"kind": "budget", "timezone": report.get("timezone"),
            "daily_seconds": report.get("daily_seconds"), "days": days, "events": events}


def plot_budget(report: dict, tz: datetime.tzinfo, path: str) -> dict:
    """Draws the time used per day against the daily budget, stops and kills marked.

    Returns the events drawn (`budget_events`), also written into the PNG.
    """
    events = budget_events(report, tz)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 4.2), dpi=100)
    days = events["days"]
    xs = list(range(len(days)))
    minutes = [d["seconds"] / 60 for d in days]
    ax.bar(xs, minutes, color="tab:blue", alpha=0.75, label="time used")
    over = [d["overrun"] / 60 for d in days]
    if any(over):
        ax.bar(xs, over, bottom=minutes, color="tab:orange", label="overrun (slower steps)")
    budget = events["daily_seconds"]
    if budget is not None:
        ax.axhline(budget / 60, color="tab:red", linestyle="--", label="daily budget")
    top = max([*minutes, (budget or 0) / 60, 1.0])
    index = {d["day"]: i for i, d in enumerate(days)}
    per_day: dict[str, int] = {}
    for e in events["events"]:
        i = index[e["day"]]
        k = per_day[e["day"]] = per_day.get(e["day"], -1) + 1  # stacked: never drawn over
        y = e["y_minutes"] = minutes[i] + top * (0.06 + 0.09 * k)
        stop = e["kind"] == "stop"
        ax.plot([i], [y], marker="v" if stop else "X", markersize=9, linestyle="none",
                color="tab:green" if stop else "black",
                label=("session end" if stop else "killed or running")
                if not any(h.get_label() == ("session end" if stop else "killed or running")
                           for h in ax.get_lines()) else None)
        ax.annotate(e["reason"] if stop else "killed or running",
                    xy=(i, y), xytext=(8, -3), textcoords="offset points", fontsize=8)
    ax.set_ylim(0, top * (1.25 + 0.09 * max(per_day.values(), default=0)))
    ax.set_xticks(xs, [d["day"] for d in days], rotation=30 if len(days) > 6 else 0,
                  fontsize=8)
    ax.set_ylabel("minutes")
    ax.set_title(f"BudgetStop ledger: time used per day ({events['timezone']})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, events)
    return events


# ------------------------------------------------------------------ a checkpoint directory
def checkpoint_events(rows: list[dict]) -> dict:
    """What `plot_checkpoints` draws, from `inspect.describe(directory)`'s rows.

    Returns:
        `{"monitor", "points": [{"file", "x", "epoch", "step", "epoch_end",
        "value", "status", "latest", "best", "best_by"}]}`: one point per file in the listing's
        order (`x` counts from 1); `status` is `"kept"` (a valid checkpoint),
        `"corrupt"`, `"foreign"` or `"non-finite"` (a valid file whose state
        resume would not take); `value` is the monitored value or None.
    """
    import math

    points, monitors = [], []
    for x, row in enumerate(rows, start=1):
        value = row.get("monitor_value")
        if row.get("valid"):
            status = "kept" if value is None or math.isfinite(value) else "non-finite"
        else:
            status = "foreign" if row.get("kind") == "foreign" else "corrupt"
        if status == "kept" and value is not None:
            monitors.append(row.get("monitor"))
        points.append({"file": os.path.basename(row["path"]), "x": x, "epoch": row.get("epoch"),
                       "step": row.get("step"), "epoch_end": bool(row.get("epoch_complete")),
                       "status": status,
                       "value": value if status == "kept" else None,
                       "latest": bool(row.get("latest")), "best": bool(row.get("best")),
                       "best_by": row.get("best_by")})
    return {"kind": "checkpoints", "monitor": monitors[-1] if monitors else None,
            "points": points}


def plot_checkpoints(rows: list[dict], directory: str, path: str) -> dict:
    """Draws the monitored value per checkpoint: kept, best, latest and corrupt files marked.

    Returns the events drawn (`checkpoint_events`), also written into the PNG.
    """
    events = checkpoint_events(rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=100)
    points = events["points"]
    scored = [p for p in points if p["value"] is not None]
    if scored:
        ax.plot([p["x"] for p in scored], [p["value"] for p in scored], marker="o",
                color="tab:blue", label="kept checkpoint")
        low, high = min(p["value"] for p in scored), max(p["value"] for p in scored)
    else:
        low, high = 0.0, 1.0
    floor = low - 0.08 * ((high - low) or 1.0)
    unscored = [p for p in points if p["value"] is None and p["status"] == "kept"]
    if unscored:
        ax.plot([p["x"] for p in unscored], [floor] * len(unscored), marker="o",
                linestyle="none", color="tab:blue", fillstyle="none",
                label="kept, no monitored value")
    marks = [("corrupt", "X", "tab:red", "corrupt: resume skips it"),
             ("foreign", "X", "tab:gray", "not a keras-ckpt checkpoint"),
             ("non-finite", "^", "tab:orange", "non-finite state: resume skips it")]
    for status, marker, color, label in marks:
        chosen = [p for p in points if p["status"] == status]
        if chosen:
            ax.plot([p["x"] for p in chosen], [floor] * len(chosen), marker=marker,
                    markersize=10, linestyle="none", color=color, label=label)
    for key, marker, size, color, label in [("best", "*", 18, "gold", "best"),
                                            ("latest", "o", 14, "black", "latest (resumes)")]:
        chosen = [p for p in points if p[key]]
        if chosen:
            p = chosen[-1]
            y = p["value"] if p["value"] is not None else floor
            by = f" by {p['best_by']}" if key == "best" and p.get("best_by") else ""
            ax.plot([p["x"]], [y], marker=marker, markersize=size, linestyle="none",
                    color=color, markeredgecolor="black",
                    fillstyle="full" if key == "best" else "none", label=label + by)
    step = max(1, len(points) // 20)
    ax.set_xticks([p["x"] for p in points][::step],
                  [_tick(p) for p in points][::step], rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("checkpoint (epoch, or epoch:step mid-epoch)")
    ax.set_ylabel(events["monitor"] or "monitored value")
    ax.set_title(f"Checkpoints in {directory}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, events)
    return events


def _tick(point: dict) -> str:
    if point["epoch"] is None:
        return point["file"]
    epoch = str(point["epoch"] + 1)
    return epoch if point["epoch_end"] else f"{epoch}:{point['step']}"
