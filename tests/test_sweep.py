"""Hydra multirun sweeps: one folder per job and a sweep_summary.csv written as jobs finish."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from .conftest import TINY, make_text


def multirun(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text(make_text(600, i))
    env = dict(os.environ, LMLAB_CACHE=str(tmp_path / "cache"), WANDB_MODE="offline")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lmlab",
            "-m",
            "data=files",
            "data.train=d*.txt",
            *TINY,
            "callbacks.samples=null",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *overrides,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_two_by_two_sweep_writes_four_runs_and_the_summary(tmp_path):
    p = multirun(tmp_path, "optim.lr=1e-3,3e-3", "model.n_layers=1,2")
    assert p.returncode == 0, p.stderr[-3000:]
    sweep = tmp_path / "sweep"
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]

    def swept(r):  # the job's overrides, the last one of each key winning, as Hydra applies them
        kv = dict(o.split("=", 1) for o in r["overrides"].split())
        return float(kv["optim.lr"]), int(kv["model.n_layers"])

    assert sorted(swept(r) for r in rows) == [(1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)]
    for r in rows:
        job_dir = sweep / r["job"]
        assert (job_dir / "checkpoints" / "last.ckpt").is_file() and (
            job_dir / "metrics.csv"
        ).is_file()
        summary = json.loads((job_dir / "summary.json").read_text())
        assert r["status"] == "completed" and float(r["wall_s"]) > 0
        for key, value in summary.items():
            assert float(r[key]) == pytest.approx(value, rel=1e-12), key


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_others_run(tmp_path):
    p = multirun(tmp_path, "data.batch_size=0,4")
    assert p.returncode != 0  # Hydra reports the failure once every job has run
    rows = {r["job"]: r for r in csv.DictReader((tmp_path / "sweep" / "sweep_summary.csv").open())}
    assert rows["0"]["status"] == "failed"
    assert "data.batch_size must be >= 1" in rows["0"]["error"]
    assert rows["1"]["status"] == "completed" and float(rows["1"]["val/loss"]) > 0
    assert (tmp_path / "sweep" / "1" / "summary.json").is_file()
