"""Command line: `python -m keras_ckpt demo | inspect DIR | budget LEDGER`."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "run_budget"]


def _build_parser() -> argparse.ArgumentParser:
    import os

    # The console script `keras-ckpt`, or `python -m keras_ckpt`.
    console = os.path.basename(sys.argv[0]) == "keras-ckpt"
    parser = argparse.ArgumentParser(
        prog="keras-ckpt" if console else "python -m keras_ckpt",
        description="keras-ckpt: Keras callbacks that make training safe to interrupt and "
                    "exact to resume.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="kill, budget-stop and NaN-poison a small training job; prove it exact")
    demo.add_argument("--out", default="keras_ckpt_demo",
                      help="directory for the demo's checkpoints and report")
    inspect = commands.add_parser(
        "inspect", help="list the checkpoints in a directory",
        epilog="Epochs count from 1 in the table and in --json, as in Keras's progress bar "
               "and the {epoch} of file names; step is the steps done in that epoch. "
               "exit status: 0 listed, 1 no such directory (or a file), 4 the --plot picture "
               "could not be written (2: wrong arguments).")
    inspect.add_argument("directory", help="a checkpoint directory")
    inspect.add_argument("--json", action="store_true", help="print JSON for scripts")
    inspect.add_argument("--meta-only", action="store_true",
                         help="read each file's metadata only (fast; damaged data not seen)")
    inspect.add_argument("--plot", metavar="PNG", default=None,
                         help="also draw the monitored value per checkpoint (kept, best, "
                              "latest and corrupt files marked) into this PNG")
    budget = commands.add_parser(
        "budget", help="today's use of a BudgetStop ledger, what remains, the sessions",
        epilog="exit status: 0 reported, 1 no such ledger, 3 a ledger that cannot be read, "
               "4 the --plot picture could not be written (2: wrong arguments). Times are "
               "H:MM:SS.")
    budget.add_argument("ledger", help="the ledger file BudgetStop writes")
    budget.add_argument("--json", action="store_true", help="print JSON for scripts")
    budget.add_argument("--now", default=None,
                        help="report as of this time: POSIX seconds, or ISO 8601 such as "
                             "2026-11-22T12:00 (in the ledger's time zone unless it has an "
                             "offset); default: now")
    budget.add_argument("--plot", metavar="PNG", default=None,
                        help="also draw the time used per day against the daily budget, "
                             "with every session's stop and kill, into this PNG")
    return parser


def clock(seconds: float | None) -> str:
    """`H:MM:SS` (rounded to the second); `-` for None."""
    if seconds is None:
        return "-"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _moment(text: str | float | None, tz) -> float | None:
    """`--now`: POSIX seconds or ISO 8601 (naive: in `tz`); None for now."""
    import datetime

    if text is None or isinstance(text, (int, float)):
        return text
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--now {text!r} is neither POSIX seconds nor an ISO 8601 time "
                         "(e.g. 2026-11-22T12:00).") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=tz)).timestamp()


def run_budget(path: str, as_json: bool = False, now: str | float | None = None,
               plot: str | None = None) -> int:
    """Prints a ledger's report; returns 1 if it does not exist, 3 if it cannot be read.

    `plot`: also draw it into this PNG (`keras_ckpt.plots.plot_budget`); 4 if
    that fails.
    """
    import datetime
    import json
    import os
    import time

    from keras_ckpt.ledger import DayClock, Ledger, LedgerError
    from keras_ckpt.plots import draw, plot_budget

    if not os.path.isfile(path):
        print(f"No such ledger: {path}")
        return 1
    try:
        config = Ledger(path, DayClock()).config()
        days = DayClock(config.get("timezone", "UTC"), config.get("reset_hour", 0))
        at = _moment(now, days.tz)
        report = Ledger(path, days).summary(time.time() if at is None else at)
    except LedgerError as e:
        print(e)
        return 3
    except ValueError as e:  # --now
        print(e)
        return 2
    if as_json:
        print(json.dumps(report, indent=2, allow_nan=False))
        return draw(plot, as_json, plot_budget, report, days.tz)

    budget = report["daily_seconds"]
    line = f"{report['today']} ({report['timezone']}): used {clock(report['used_seconds'])}"
    if budget is not None:
        line += f" of {clock(budget)}, {clock(report['remaining_seconds'])} left"
    else:
        line += " (no daily time limit)"
    if report["overrun_seconds"]:
        line += f" (+{clock(report['overrun_seconds'])} overrun: steps slower than projected)"
    if report["daily_cost"] is not None:
        line += f"; spent {report['used_cost']:.2f} of {report['daily_cost']:.2f}"
    print(f"Ledger {path}\n{line}; next window opens {report['next_window']}")
    print("\nsessions (start, end, time, cost, stop reason, checkpoint):")
    for s in report["sessions"]:
        start = datetime.datetime.fromtimestamp(s["start"], days.tz).strftime("%Y-%m-%d %H:%M")
        end = ("running or killed" if s["end"] is None else
               datetime.datetime.fromtimestamp(s["end"], days.tz).strftime("%H:%M"))
        print(f"  {start}  {end:<17}  {clock(s['seconds']):>8}  {s['cost']:8.2f}  "
              f"{s['stop_reason'] or '-':<22}  {s['checkpoint'] or '-'}")
    return draw(plot, as_json, plot_budget, report, days.tz)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        from keras_ckpt.demo import run_demo

        return run_demo(out=args.out)
    if args.command == "inspect":
        from keras_ckpt.inspect import run_inspect

        return run_inspect(args.directory, as_json=args.json, verify=not args.meta_only,
                           plot=args.plot)
    if args.command == "budget":
        return run_budget(args.ledger, as_json=args.json, now=args.now, plot=args.plot)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
