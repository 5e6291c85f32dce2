"""Both notebooks run top to bottom (tiny settings), with their outputs stripped in the repo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TINY, make_text

# The dev extra's; skipped without them (a GPU image running `pytest -m gpu` may lack them)
nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, parameters: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert first_code.source.startswith("# parameters")
    first_code.source = parameters
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    return nb


def text_output(nb) -> str:
    return "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )


def test_notebooks_are_stored_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's run folder (tempfile.mkdtemp)
    (tmp_path / "d.txt").write_text(make_text(3000, 0))
    overrides = ["data=files", f"data.train={tmp_path / 'd.txt'}", *TINY]
    overrides = [
        o
        for o in overrides
        if not o.startswith(
            (
                "trainer.max_steps",
                "trainer.val_check",
                "trainer.enable_progress",
                "callbacks.progress",
                "trainer.log_every_n_steps",  # the notebook's own: fewer STEPS than the default 10
            )
        )
    ]
    nb = execute("quickstart.ipynb", f"STEPS = 4\nOVERRIDES = {overrides!r}", tmp_path)
    out = text_output(nb)
    assert "val/bpb" in out and "ROMEO:" in out


@pytest.mark.slow
def test_compare_runs_runs_on_a_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    (tmp_path / "d.txt").write_text(make_text(3000, 0))
    env = dict(os.environ, LMLAB_CACHE=str(tmp_path / "cache"), WANDB_MODE="offline")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lmlab",
            "-m",
            "data=files",
            "data.train=d.txt",
            *TINY,
            "callbacks.samples=null",
            "optim.lr=1e-3,1e-2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    nb = execute(
        "compare_runs.ipynb",
        f"SWEEP_DIR = {str(tmp_path / 'sweep')!r}\nMETRIC = 'val/bpb'",
        tmp_path,
    )
    out = text_output(nb)
    assert "2 runs; swept: optim.lr" in out
    assert out.count("finished") == 2
    # a higher-is-better metric ranks best first too (it was listed worst first)
    nb = execute(
        "compare_runs.ipynb",
        f"SWEEP_DIR = {str(tmp_path / 'sweep')!r}\nMETRIC = 'val/acc'",
        tmp_path,
    )
    rows = [line.split(" | ") for line in text_output(nb).splitlines() if " | finished | " in line]
    accuracies = [float(row[2]) for row in rows]
    assert len(accuracies) == 2 and accuracies == sorted(accuracies, reverse=True)
