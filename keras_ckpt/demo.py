"""`python -m keras_ckpt demo`: one training job, killed, budgeted, poisoned, and still exact.

The job trains a small model (Dropout, BatchNorm, Adam with a schedule) with
all four callbacks: `ModelCheckpoint(resume=True)`, `EarlyStopping(patience=2,
restore_best_weights=True)`, `BudgetStop` (30 minutes a day, on a simulated
clock where a step takes 20 s) and `TerminateOnNaN(action="rollback")`. One
batch of epoch 10 has NaN targets. The same script runs, in child processes:

- once without interruption (the reference);
- on day 1 at 08:00, SIGKILLed after step 2 of epoch 3 (the 14th step);
- on day 1 at 13:00: it resumes, rolls back the NaN, and the budget stops it;
- on days 2 and 3 at 08:00: it resumes, until early stopping ends the job.

The report compares the final variables and history with the reference, bit
for bit, and a PNG shows the training curve with every event marked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

__all__ = ["run_demo"]

STEPS_PER_EPOCH = 6
SECONDS_PER_STEP = 20.0
DAILY_BUDGET = 30 * 60.0
DAY_1 = 1795330800.0  # 2026-11-22 08:00 Europe/Berlin
COMMON = ["--data", "poison", "--poison", "9:2", "--rollback", "--early-stopping", "2",
          "--min-delta", "0.02", "--epochs", "60", "--seconds-per-step", str(SECONDS_PER_STEP),
          "--sync-interval", "60"]


BACKENDS = ("tensorflow", "jax", "torch")


def choose_backend(environ: dict | None = None) -> tuple[str | None, str]:
    """(the Keras backend the demo trains on, or None; what decided it, or what is wrong).

    `KERAS_BACKEND` if set (an error if not installed), else the `backend` of
    Keras's config file (`$KERAS_HOME/keras.json`, by default
    `~/.keras/keras.json`) where installed, else the first of TensorFlow, JAX
    and torch that is: keras-ckpt itself needs none (`pip install
    'keras-ckpt[tensorflow]'`, `[jax]` or `[torch]`).
    """
    import importlib.util

    environ = os.environ if environ is None else environ
    named = environ.get("KERAS_BACKEND")
    if named:  # the user's choice: used, or an error
        if importlib.util.find_spec(named) is None:
            return None, (f"keras-ckpt demo: KERAS_BACKEND={named}, which is not installed: "
                          f"pip install 'keras-ckpt[{named}]'.")
        return named, "KERAS_BACKEND"
    # Keras writes its config file, naming TensorFlow, the first time it is imported:
    # the file's backend is taken where installed, else the first installed one.
    home = environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            named = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        named = None
    if isinstance(named, str) and named in BACKENDS and importlib.util.find_spec(named):
        return named, os.path.join(home, "keras.json")
    for name in BACKENDS:
        if importlib.util.find_spec(name) is not None:
            return name, "installed"
    return None, ("keras-ckpt demo: no Keras backend is installed; keras-ckpt needs none, the "
                  "demo needs one: pip install 'keras-ckpt[tensorflow]' (or [jax], [torch]).")


def _child(directory: str, out: str, ledger: str, budget: float, start: float,
           *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0",
           "KERAS_BACKEND": choose_backend()[0] or "tensorflow"}
    command = [sys.executable, "-m", "keras_ckpt.demo_train", directory, out, *COMMON,
               "--daily-budget", str(budget), "--ledger", ledger, "--clock-start", str(start),
               *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env)


def _load(path: str):
    import numpy as np

    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "history"}
        outcome = json.loads(data["history"].tobytes())
    return arrays, outcome


def _where(epoch: int, step: int | None) -> str:
    return f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch + 1}"


def run_demo(out: str = "keras_ckpt_demo") -> int:
    """Runs the story above in `out`; prints the report; writes `out/training.png`.

    Args:
        out: directory for checkpoints, ledgers, results and the plot.

    Returns:
        0 when the job equals the uninterrupted reference bit for bit, else 1;
        2 when `out` is a file or no Keras backend is installed (`choose_backend`).
    """
    import numpy as np

    from keras_ckpt.manager import list_checkpoints

    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"keras-ckpt demo: --out {out} is a file; give a directory (made if missing).")
        return 2
    backend, why = choose_backend()
    if backend is None:
        print(why)
        return 2
    for name in ("reference", "job"):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    for name in ("reference.json", "job.json", "reference.npz", "job.npz"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    job, ledger = os.path.join(out, "job"), os.path.join(out, "job.json")
    result = os.path.join(out, "job.npz")
    started = time.monotonic()
    print(f"keras-ckpt demo (Keras on {backend}): one training job with "
          "ModelCheckpoint(resume=True),\nEarlyStopping(patience=2, min_delta=0.02, "
          "restore_best_weights=True) (the best epoch is the last\nthat improved by 0.02), "
          "BudgetStop(30 min a day; simulated clock, 20 s a step) and\n"
          "TerminateOnNaN(action='rollback'). One batch of epoch 10 has NaN targets. Each run "
          "below is\nthe same script in a new process.\n")

    proc = _child(os.path.join(out, "reference"), os.path.join(out, "reference.npz"),
                  os.path.join(out, "reference.json"), 1e9, DAY_1)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return 1
    reference, ref = _load(os.path.join(out, "reference.npz"))
    print(f"Reference, without interruption: {len(ref['epoch'])} epochs; early stopping at "
          f"{_where(ref['stopped_epoch'], None)}, best epoch {ref['best_epoch'] + 1}; NaN at "
          + ", ".join(_where(e["epoch"], e["step"]) for e in ref["nan_events"]) + " rolled back.")

    events: dict = {"kill": [], "budget": [], "resume": [], "nan": [], "days": []}
    schedule = [("day 1, 08:00", DAY_1, ["--kill-step", "14"]),
                ("day 1, 13:00", DAY_1 + 5 * 3600, []),
                ("day 2, 08:00", DAY_1 + 86400, []),
                ("day 3, 08:00", DAY_1 + 2 * 86400, []),
                ("day 4, 08:00", DAY_1 + 3 * 86400, [])]
    outcome = None
    for label, start, extra in schedule:
        proc = _child(job, result, ledger, DAILY_BUDGET, start, *extra)
        if extra:
            saved = list_checkpoints(job)
            newest = saved[-1] if saved else None
            killed = proc.returncode == -signal.SIGKILL
            where = _where(14 // STEPS_PER_EPOCH, 14 % STEPS_PER_EPOCH)  # as every line counts
            print(f"{label}: run killed by {'SIGKILL' if killed else proc.returncode} after "
                  f"{where}; newest checkpoint "
                  + (f"{os.path.basename(newest.path)} (at {_where(newest.epoch, None)})"
                     if newest else "none") + ".")
            events["kill"].append(14 / STEPS_PER_EPOCH)
            continue
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            return 1
        _, outcome = _load(result)
        line = [f"{label}:"]
        resumed = outcome["resumed_from"]
        if resumed:
            at = resumed["epoch"] + 1 if resumed["epoch_complete"] else resumed["epoch"]
            step = 0 if resumed["epoch_complete"] else resumed["step"]
            line.append(f"resumed from {os.path.basename(resumed['path'])}, continuing at "
                        f"epoch {at + 1}, step {step + 1};")
            events["resume"].append(at + step / STEPS_PER_EPOCH)
        for e in outcome.get("nan_events", []):
            if e["epoch"] not in [n[0] for n in events["nan"]]:
                line.append(f"NaN loss at {_where(e['epoch'], e['step'])}, rolled back;")
                events["nan"].append((e["epoch"], e["step"]))
        reason = outcome.get("budget_stop_reason")
        if reason == "budget-spent-at-start":
            line.append("the day's budget was already spent: nothing trained.")
        elif reason:
            epoch, step = outcome["budget_stopped_at"]
            line.append(f"budget spent (30m): stopped after {_where(epoch, step)}, checkpoint "
                        f"{os.path.basename(outcome['budget_checkpoint'] or '-')}.")
            events["budget"].append(epoch + (step or STEPS_PER_EPOCH) / STEPS_PER_EPOCH)
        if outcome.get("stop_reason") == "patience":
            line.append(f"early stopping at {_where(outcome['stopped_epoch'], None)}; the "
                        f"weights of epoch {outcome['best_epoch'] + 1} (the best) restored.")
            print(" ".join(line))
            break
        print(" ".join(line))
    if outcome is None or outcome.get("stop_reason") != "patience":
        print("The job did not finish within the schedule.")
        return 1

    job_arrays, _ = _load(result)
    differing = [k for k in reference if not np.array_equal(reference[k], job_arrays.get(k))]
    same_history = outcome["history"] == ref["history"] and outcome["epoch"] == ref["epoch"]
    same_stop = (outcome["stopped_epoch"], outcome["best_epoch"]) == (
        ref["stopped_epoch"], ref["best_epoch"])
    ok = not differing and same_history and same_stop
    print(f"\nProof: {len(reference)} model and optimizer variables compared with the reference, "
          f"{len(differing)} differ; history identical: {same_history}; same stop and best "
          f"epoch: {same_stop}.")
    print("=> the interrupted, budgeted job is bitwise equal to the uninterrupted run." if ok
          else "=> MISMATCH: " + ", ".join(differing[:5]))
    png = os.path.join(out, "training.png")
    from keras_ckpt.plots import PlotError

    try:
        _plot(png, outcome, events)
    except PlotError as e:  # the proof stands without the picture
        png = f"not drawn ({str(e).replace('--plot', 'the plot')})"
    print(f"\nCheckpoints: {job}\n  python -m keras_ckpt inspect {job}\nBudget ledger: {ledger}\n"
          f"  python -m keras_ckpt budget {ledger}\nPlot: {png}\n"
          f"Done in {time.monotonic() - started:.0f} s.")
    return 0 if ok else 1


def _plot(path: str, outcome: dict, events: dict) -> None:
    """Writes the training curve with every event marked (and listed in the PNG's chunk)."""
    from keras_ckpt import plots

    fig, marks = demo_figure(outcome, events)
    plots.save_png(fig, path, marks)


def demo_figure(outcome: dict, events: dict):
    """(figure, marks): the demo's curve; `marks` lists what is drawn where.

    An event inside an epoch sits at its step (epoch E, step S at E - 1 + S/6).
    Budget stops are vertical lines, resumes triangles on the x axis, so a stop
    and the next day's resume at the same point stay two marks; the NaN shows
    the step it hit and the state it rolled back to; the best epoch says why
    it is not the lowest point (EarlyStopping's min_delta).
    """
    from keras_ckpt import plots

    plt = plots.pyplot()
    history = outcome["history"]
    epochs = [e + 1 for e in outcome["epoch"]]
    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=110)
    ax.plot(epochs, history["loss"], label="loss", color="tab:blue")
    ax.plot(epochs, history["val_loss"], label="val_loss", color="tab:orange")
    top = max(max(history["loss"]), max(history["val_loss"]))
    low = min(min(history["loss"]), min(history["val_loss"]))
    marks: dict = {"kind": "demo", "kill": [], "budget": [], "resume": [], "nan": [],
                   "best": None, "early_stop": None}
    for i, x in enumerate(events["kill"]):
        ax.axvline(x, color="black", linestyle="--", linewidth=1.6,
                   label="SIGKILL" if i == 0 else None)
        marks["kill"].append({"x": x, "drawn_as": "line"})
    for i, x in enumerate(events["budget"]):
        ax.axvline(x, color="tab:red", linestyle="-.", linewidth=1.6,
                   label="daily budget spent: stopped, saved" if i == 0 else None)
        marks["budget"].append({"x": x, "drawn_as": "line"})
    resumes = events["resume"]
    ax.plot(resumes, [low * 0.72] * len(resumes), marker="^", markersize=11, linestyle="none",
            color="tab:green", markeredgecolor="black", label="resumed from a checkpoint")
    marks["resume"] = [{"x": x, "drawn_as": "marker on the x axis"} for x in resumes]
    bounds = [0.0, *events["budget"], float(epochs[-1])]
    for day, (left, right) in enumerate(zip(bounds, bounds[1:], strict=False), start=1):
        ax.text((left + right) / 2, top * 1.15, f"day {day}", ha="center", fontsize=9)
    for i, (epoch, step) in enumerate(events["nan"]):
        x = epoch + step / STEPS_PER_EPOCH
        ax.axvline(x, color="tab:purple", linewidth=2,
                   label="NaN loss: rolled back" if i == 0 else None)
        back = history["loss"][epoch - 1] if epoch >= 1 else history["loss"][0]
        ax.plot([epoch], [back], marker="o", markersize=8, color="tab:purple",
                linestyle="none", label="state rolled back to" if i == 0 else None)
        y = top * 0.45
        ax.annotate("", xy=(epoch, back), xytext=(x, y),
                    arrowprops={"arrowstyle": "->", "color": "tab:purple", "linewidth": 2})
        text = (f"NaN at epoch {epoch + 1}, step {step}:\nrolled back to the end of "
                f"epoch {epoch}")
        ax.annotate(text, xy=(x, y), xytext=(x + 0.6, y * 1.25), fontsize=8,
                    color="tab:purple")
        marks["nan"].append({"x": x, "rolled_back_to": float(epoch), "text": text})
    best = outcome["best_epoch"] + 1
    best_value = history["val_loss"][outcome["best_epoch"]]
    delta = outcome.get("min_delta")
    why = (f"last to improve val_loss\nby min_delta={delta:g}" if delta else
           "the lowest val_loss")
    ax.plot([best], [best_value], marker="*", markersize=16, color="gold",
            markeredgecolor="black", linestyle="none", label=f"best epoch ({best}), restored")
    text = f"best: epoch {best},\n{why}\n(later epochs gained less)" if delta else \
        f"best: epoch {best}, {why}"
    ax.annotate(text, xy=(best, best_value), xytext=(best - 13, low * 0.8),
                fontsize=8, arrowprops={"arrowstyle": "->"})
    marks["best"] = {"epoch": best, "value": best_value, "min_delta": delta, "text": text}
    stop = outcome["stopped_epoch"] + 1
    ax.annotate(f"early stop\n(epoch {stop})", xy=(stop, history["val_loss"][-1]),
                xytext=(stop - 7, top * 0.3), arrowprops={"arrowstyle": "->"})
    marks["early_stop"] = stop
    ax.set_yscale("log")
    ax.set_ylim(bottom=low * 0.55, top=top * 1.6)
    ax.set_xlabel("epoch (an event inside an epoch is placed at its step)")
    ax.set_ylabel("mean squared error (log scale)")
    ax.set_title("keras-ckpt demo: one job across a kill, three budget days and a NaN")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig, marks
