"""Every notebook in notebooks/ runs headless, top to bottom; a failing cell fails the build."""

from __future__ import annotations

import os

import forkserver
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NAMES = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))


def test_there_are_four_notebooks():
    assert len(NAMES) == 4


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
    import jupyter_client.launcher
    import nbformat
    from nbclient import NotebookClient

    # The kernel (`python -m ipykernel_launcher ...`, a session of its own) is
    # forked by the fork server (tests/forkserver.py): Keras is imported already.
    monkeypatch.setattr(jupyter_client.launcher, "Popen", forkserver.Popen)

    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    os.environ["MPLBACKEND"] = "Agg"
    client.execute()  # raises CellExecutionError, naming the cell, if one fails
