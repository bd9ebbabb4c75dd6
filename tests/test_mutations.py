"""A few hundred damaged copies of real checkpoints: each is refused with keras-ckpt's error.

CI's subset of benchmarks/adversarial (which runs thousands, with resume and the
CLI as well): tests/mutation_child.py flips bits, truncates, zeroes pages,
appends garbage and splices bytes from another checkpoint into `.weights.h5`
and `.keras` files, and reads each with `read_meta`, `read` and `restore`.
"""

from __future__ import annotations

import json
import os
import sys

import forkserver
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_damaged_copies_are_refused_never_loaded_wrong_and_never_hang(tmp_path):
    proc = forkserver.run([sys.executable, os.path.join(HERE, "mutation_child.py"),
                           str(tmp_path), "300", "7"],
                          capture_output=True, text=True, timeout=240)  # a hang fails here
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    tally = json.loads(lines[-1][len("RESULT "):])
    assert tally["cases"] == 300 and len(tally["kinds"]) == 6
    assert tally["foreign"] == []  # every failure is CorruptCheckpointError
    assert tally["silent_wrong"] == []  # no read returned other arrays than the file's
    assert tally["changed_then_raised"] == []  # restore changes nothing unless it succeeds
    # Most copies are damaged where it matters; some only where nothing reads.
    assert tally["outcomes"].get("read:CorruptCheckpointError", 0) >= 150, tally["outcomes"]
