"""The scenario matrix: 40-odd real training scripts, each killed three ways and resumed.

Each script of tests/scenarios.py (optimizers, model kinds, inputs, fit
arguments, Keras callbacks beside ours) runs as real processes forked by the
fork server (tests/matrix_child.py): once uninterrupted without keras-ckpt's
ModelCheckpoint (the run the user would have had without us), and once as a chain
SIGKILLed as epoch 2 begins, SIGKILLed after step 3 of epoch 3 (its newest
checkpoint is after step 2) and SIGTERMed at the first validation batch of
epoch 3, each run resuming the last, to the end of epoch 4. The chain's end
must equal the uninterrupted run bitwise (every model and optimizer variable,
the history), or, for a script whose input cannot resume exactly, every
resumed run must have said so at train begin.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import forkserver
import numpy as np
import pytest
import scenarios
from conftest import BACKEND

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "matrix_child.py")
KILLS = [("start@1", -signal.SIGKILL), ("mid@2:{step}", -signal.SIGKILL), ("val@2", 143)]
# Also on JAX and torch (tests/test_backends.py): one of each kind.
ON_EVERY_BACKEND = {"dropout-batchnorm", "pydataset-indexed", "reduce-lr-on-plateau"}


def run(name, directory, out, kill=None, plain=False):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONHASHSEED": "0"}
    command = [sys.executable, CHILD, name, str(directory), str(out)]
    command += (["--kill", kill] if kill else []) + (["--plain"] if plain else [])
    return forkserver.run(command, capture_output=True, text=True, env=env, timeout=300)


def load(path):
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "outcome"}
        outcome = json.loads(data["outcome"].tobytes())
    return arrays, outcome


def _params():
    for name in scenarios.SCRIPTS:
        if BACKEND not in scenarios.BACKENDS[name]:
            continue
        marks = [pytest.mark.backends] if name in ON_EVERY_BACKEND else []
        yield pytest.param(name, marks=marks, id=name)


def test_the_matrix_has_forty_scripts_across_the_categories():
    assert len(scenarios.SCRIPTS) >= 40
    modules = {scenarios.SCRIPTS[n].__module__ for n in scenarios.SCRIPTS}
    assert modules == {"scripts_optimizers", "scripts_models", "scripts_inputs"}
    assert sum(1 for n in scenarios.SCRIPTS if scenarios.WARNS[n]) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_params()))
def test_killed_three_ways_the_script_resumes_bitwise_or_says_why_not(name, tmp_path):
    warns = scenarios.WARNS[name]
    chain, out = tmp_path / "chain", tmp_path / "chain.npz"
    chain.mkdir()
    for i, (kill, code) in enumerate(KILLS):
        kill = kill.format(step=scenarios.MID_STEP[name])
        proc = run(name, chain, out, kill)
        assert proc.returncode == code, f"{kill}: {proc.returncode}\n{proc.stderr[-4000:]}"
        if warns and i:
            assert _said(warns, proc.stderr), proc.stderr[-3000:]
    proc = run(name, chain, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed, outcome = load(out)
    assert outcome["resumed_from"] is not None and outcome["epoch"] == [0, 1, 2, 3]
    if warns:
        assert _said(warns, proc.stderr), proc.stderr[-3000:]
        return
    assert "differs from an uninterrupted one" not in proc.stderr, proc.stderr[-3000:]
    reference = tmp_path / "reference"
    reference.mkdir()
    proc = run(name, reference, tmp_path / "reference.npz", plain=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    straight, expected = load(tmp_path / "reference.npz")
    assert straight.keys() == resumed.keys()
    for key in straight:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)
    assert outcome["history"] == expected["history"]


def _said(pattern, stderr):
    import re

    return re.search(pattern, stderr) is not None
