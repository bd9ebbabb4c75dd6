"""README's commands, the demo, `inspect`, and the public API's shape."""

from __future__ import annotations

import json
import os
import re
import sys

import forkserver

import keras_ckpt

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_gives_two_set_up_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    demo, tests = commands
    assert "keras_ckpt demo" in demo and "pytest" in tests
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert tests in ci.splitlines()


# `python -m keras_ckpt demo`, forked by the fork server (tests/forkserver.py): the
# same `cli.main`, and the demo's own runs (a `subprocess.run` each) forked too.
DEMO = """
import sys, types
import forkserver
from keras_ckpt import cli, demo
demo.subprocess = types.SimpleNamespace(run=forkserver.run)
sys.exit(cli.main(["demo", "--out", sys.argv[1]]))
"""


def test_demo_resumes_bitwise(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **forkserver.address()}
    proc = forkserver.run([sys.executable, "-c", DEMO, str(tmp_path)], cwd=HERE,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    out = proc.stdout
    assert "killed by SIGKILL after epoch 3, step 2;" in out  # steps counted within an epoch
    assert "rolled back" in out and "budget spent" in out
    assert "early stopping at the end of epoch" in out
    assert "EarlyStopping(patience=2, min_delta=0.02," in out  # what explains the best epoch
    assert "bitwise equal to the uninterrupted run" in out
    png = tmp_path / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    from keras_ckpt.plots import read_png_events

    marks = read_png_events(str(png))
    # A budget stop and the next day's resume happen at the same point: two marks.
    budget = {m["x"] for m in marks["budget"]}
    resumed = [m for m in marks["resume"] if m["x"] in budget]
    assert resumed and {m["drawn_as"] for m in resumed}.isdisjoint(
        {m["drawn_as"] for m in marks["budget"]})
    (nan,) = marks["nan"]  # where it hit, and the state it went back to
    assert nan["rolled_back_to"] < nan["x"] and "rolled back to the end of epoch" in nan["text"]
    assert marks["best"]["min_delta"] == 0.02 and "min_delta=0.02" in marks["best"]["text"]
    assert marks["early_stop"] > marks["best"]["epoch"]


def test_the_base_install_needs_no_backend_and_each_backend_is_an_extra():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = {re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"]}
    assert names == {"keras", "h5py", "numpy", "tzdata"}
    extras = project["optional-dependencies"]
    for backend in ("tensorflow", "jax", "torch"):
        assert any(d.startswith(backend) for d in extras[backend])
        assert any(d.startswith(backend) for d in extras["test"])
    assert not any(d.startswith("tensorflow") for d in extras["jax"] + extras["test-jax"])
    readme_demo = readme_commands()[0]
    assert "tensorflow" in readme_demo  # the demo command installs a backend to run on


def test_the_demo_trains_on_the_backend_keras_would_use_or_says_what_to_install(
        tmp_path, monkeypatch, capsys):
    from keras_ckpt.cli import main
    from keras_ckpt.demo import choose_backend

    assert choose_backend({"KERAS_BACKEND": "jax"}) == ("jax", "KERAS_BACKEND")
    (tmp_path / "keras.json").write_text('{"backend": "torch"}')
    assert choose_backend({"KERAS_HOME": str(tmp_path)})[0] == "torch"
    (tmp_path / "keras.json").write_text('{"backend": "nosuch"}')  # else the first installed
    assert choose_backend({"KERAS_HOME": str(tmp_path)}) == ("tensorflow", "installed")
    monkeypatch.setenv("KERAS_BACKEND", "nosuchbackend")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "KERAS_BACKEND=nosuchbackend, which is not installed: pip install" in \
        capsys.readouterr().out
    assert not (tmp_path / "demo").exists()  # nothing was started


def test_the_console_script_says_its_own_name():
    import subprocess

    script = os.path.join(os.path.dirname(sys.executable), "keras-ckpt")
    assert os.path.exists(script), "pip install -e . installs the keras-ckpt console script"
    done = subprocess.run([script, "budget", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: keras-ckpt budget")
    assert "exit status: 0 reported, 1 no such ledger, 3" in " ".join(done.stdout.split())


def test_demo_out_naming_a_file_is_one_clear_line(tmp_path, capsys):
    from keras_ckpt.cli import main

    (tmp_path / "report.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "report.txt")]) == 2
    assert "is a file; give a directory" in capsys.readouterr().out
    assert (tmp_path / "report.txt").read_text() == "keep me"


def test_inspect_labels_valid_partial_and_corrupt(tmp_path, capsys):
    from conftest import make_data, make_model

    model = make_model()
    x, y = make_data(32)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, validation_split=0.25,
              callbacks=[keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"))])
    (tmp_path / ".e3.keras.tmp-1-ab.keras").write_bytes(b"partial")  # a write in progress
    broken = bytearray((tmp_path / "e1.keras").read_bytes())
    broken[-2000] ^= 0xFF
    (tmp_path / "e1.keras").write_bytes(bytes(broken))
    from keras_ckpt.cli import main

    assert main(["inspect", str(tmp_path), "--json"]) == 0
    rows = {os.path.basename(r["path"]): r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"e1.keras", "e2.keras"}  # the partial write is not a checkpoint
    # Where the flipped byte lands (a stored or a deflated member) varies with the
    # metadata's length: a checksum fails, or the compressed data is damaged.
    assert not rows["e1.keras"]["valid"]
    assert re.search("CRC|checksum|damaged", rows["e1.keras"]["error"])
    assert rows["e2.keras"]["valid"] and rows["e2.keras"]["latest"]
    assert rows["e2.keras"]["epoch"] == 2  # counted from 1, as the table and the file name
    assert rows["e2.keras"]["best"]  # the only valid one: its val_loss is the best
    assert main(["inspect", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"e1\.keras .* corrupt", table)
    assert re.search(r"e2\.keras +2 .* valid latest best", table)


def test_inspect_marks_best_what_early_stopping_holds_best(tmp_path, capsys):
    # min_delta no later epoch meets: EarlyStopping's best stays epoch 1, while the
    # lowest monitored value is a later epoch's.
    from conftest import make_data, make_model

    from keras_ckpt.cli import main

    x, y = make_data(32)
    make_model().fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[
        keras_ckpt.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), monitor="loss"),
        keras_ckpt.EarlyStopping("loss", patience=5, min_delta=1000.0)])
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    rows = {os.path.basename(r["path"]): r for r in json.loads(capsys.readouterr().out)}
    assert rows["e3.keras"]["monitor_value"] < rows["e1.keras"]["monitor_value"]
    assert [n for n, r in rows.items() if r["best"]] == ["e1.keras"]
    assert rows["e1.keras"]["best_by"] == "EarlyStopping (loss)"


def test_public_api():
    for name in keras_ckpt.__all__:
        assert getattr(keras_ckpt, name) is not None
    assert keras_ckpt.ModelCheckpoint.__doc__.splitlines()[0].strip()
    assert "Example" in keras_ckpt.ModelCheckpoint.__doc__


def test_inspect_on_a_file_or_an_empty_directory_says_so(tmp_path, capsys):
    from keras_ckpt.cli import main

    assert main(["inspect", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"No keras-ckpt checkpoints in {tmp_path}."
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    (tmp_path / "c.keras").write_bytes(b"x")
    assert main(["inspect", str(tmp_path / "c.keras")]) == 1
    assert f"inspect {tmp_path}" in capsys.readouterr().out
