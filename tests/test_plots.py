"""`budget --plot`, `inspect --plot` and the demo's picture: checked by what they mark.

Every keras-ckpt PNG carries the events it draws as JSON in a text chunk
(`keras_ckpt.plots.read_png_events`); the tests open the file as an image
(Pillow, which matplotlib installs) and read those events back.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import pytest
from conftest import make_data, make_model
from PIL import Image

import keras_ckpt
from keras_ckpt import plots
from keras_ckpt.cli import main
from keras_ckpt.ledger import DayClock, Ledger

BERLIN = datetime.timezone(datetime.timedelta(hours=1))


def at(day, hour, minute=0):
    return datetime.datetime(2026, 11, day, hour, minute, tzinfo=BERLIN).timestamp()


def three_days(path):
    """Day 22: a run killed at 08:05, then one stopped by the budget; day 23: nothing;
    day 24: one ended by early stopping. 30 minutes a day."""
    ledger = Ledger(path, DayClock("Europe/Berlin"))
    config = {"daily_seconds": 1800.0, "timezone": "Europe/Berlin", "reset_hour": 0}
    killed = ledger.begin(at(22, 8), config)
    ledger.reserve(killed, at(22, 8), at(22, 8, 5), 1800.0, None)
    budget = ledger.begin(at(22, 13), config)
    ledger.reserve(budget, at(22, 13), at(22, 13, 25), 1800.0, None)
    ledger.end(budget, at(22, 13, 25), "daily-budget", "ckpt-15.keras", limits=(1800.0, None))
    done = ledger.begin(at(24, 8), config)
    ledger.reserve(done, at(24, 8), at(24, 8, 12), 1800.0, None)
    ledger.end(done, at(24, 8, 12), "early-stopping", None, limits=(1800.0, None))


def png_events(path):
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.width > 400 and image.height > 200
    return plots.read_png_events(path)


def test_budget_plot_marks_each_day_against_the_budget_and_every_stop_and_kill(
        tmp_path, capsys):
    ledger, png = tmp_path / "budget.json", tmp_path / "budget.png"
    three_days(ledger)
    assert main(["budget", str(ledger), "--now", "2026-11-24T20:00", "--plot", str(png)]) == 0
    assert f"Plot: {png}" in capsys.readouterr().out
    events = png_events(png)
    assert events["daily_seconds"] == 1800.0
    days = {d["day"]: d["seconds"] for d in events["days"]}
    assert days == {"2026-11-22": pytest.approx(30 * 60), "2026-11-23": 0.0,
                    "2026-11-24": pytest.approx(12 * 60)}  # the day without training is shown
    marked = [(e["day"], e["kind"], e["reason"]) for e in events["events"]]
    assert marked == [("2026-11-22", "killed or running", None),
                      ("2026-11-22", "stop", "daily-budget"),
                      ("2026-11-24", "stop", "early-stopping")]
    first, second = events["events"][:2]  # the same day: stacked, not drawn over each other
    assert second["y_minutes"] > first["y_minutes"]


def test_inspect_plot_marks_kept_best_latest_and_corrupt_files(tmp_path, capsys):
    run = tmp_path / "run"
    x, y = make_data(32)
    make_model().fit(x, y, epochs=4, batch_size=8, verbose=0, validation_split=0.25,
                     callbacks=[keras_ckpt.ModelCheckpoint(str(run / "e{epoch}.keras"))])
    broken = bytearray((run / "e2.keras").read_bytes())
    broken[-2000] ^= 0xFF
    (run / "e2.keras").write_bytes(bytes(broken))
    (run / "notes.keras").write_bytes(b"not a checkpoint")
    assert main(["inspect", str(run), "--json"]) == 0
    rows = {os.path.basename(r["path"]): r for r in json.loads(capsys.readouterr().out)}
    png = tmp_path / "inspect.png"
    assert main(["inspect", str(run), "--plot", str(png)]) == 0
    assert f"Plot: {png}" in capsys.readouterr().out
    events = png_events(png)
    assert events["monitor"] == "val_loss"
    points = {p["file"]: p for p in events["points"]}
    assert set(points) == set(rows)
    assert points["e2.keras"]["status"] == "corrupt" and points["e2.keras"]["value"] is None
    assert points["notes.keras"]["status"] in ("foreign", "corrupt")
    for name in ("e1.keras", "e3.keras", "e4.keras"):
        assert points[name]["status"] == "kept"
        assert points[name]["value"] == pytest.approx(rows[name]["monitor_value"])
        assert points[name]["best"] == rows[name]["best"]
    assert points["e4.keras"]["latest"] and rows["e4.keras"]["latest"]
    assert sum(p["best"] for p in points.values()) == 1


def test_a_plot_that_cannot_be_written_is_exit_4_and_the_report_still_printed(
        tmp_path, capsys, monkeypatch):
    ledger = tmp_path / "budget.json"
    three_days(ledger)
    missing = tmp_path / "no-such-dir" / "b.png"
    assert main(["budget", str(ledger), "--plot", str(missing)]) == 4
    out, err = capsys.readouterr()
    assert "sessions (start, end" in out and "cannot write the picture" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    assert main(["budget", str(ledger), "--plot", str(tmp_path / "b.png")]) == 4
    assert "pip install 'keras-ckpt[demo]'" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()
    with pytest.raises(plots.PlotError, match="no keras-ckpt chunk|not a keras-ckpt picture"):
        plots.read_png_events(str(ledger))


# A new user's commands on a fresh interpreter where no backend can be imported (as after
# `pip install keras-ckpt`, which installs none): nothing on stderr (TensorFlow's and
# JAX's log lines go there), with the log level left alone.
FRESH = """
import sys
for name in ("tensorflow", "jax", "torch"):  # as if not installed: an import raises
    sys.modules[name] = None
from keras_ckpt.cli import main
codes = [main(["budget", sys.argv[1], "--plot", sys.argv[2]]),
         main(["inspect", sys.argv[3], "--plot", sys.argv[4]])]
print("codes", codes, "backends", [m for m in ("tensorflow", "jax", "torch", "keras")
                                   if sys.modules.get(m) is not None])
"""


def test_the_cli_plots_import_no_backend_and_print_no_log_lines(tmp_path):
    ledger, run = tmp_path / "budget.json", tmp_path / "run"
    three_days(ledger)
    x, y = make_data(16)
    make_model().fit(x, y, epochs=2, batch_size=8, verbose=0,
                     callbacks=[keras_ckpt.ModelCheckpoint(str(run / "e{epoch}.keras"))])
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", FRESH, str(ledger), str(tmp_path / "b.png"),
                           str(run), str(tmp_path / "i.png")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "codes [0, 0] backends []" in done.stdout
    assert done.stderr == ""
    assert png_events(tmp_path / "b.png")["events"] and png_events(tmp_path / "i.png")["points"]
