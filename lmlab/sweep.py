"""Sweep bookkeeping: a Hydra callback that keeps ``<sweep dir>/sweep_summary.csv`` up to date.

One row per job, written as soon as the job ends (so an interrupted sweep still shows what finished):
job number, overrides, status (completed / failed), the error of a failed job, wall time, and the
final metrics of the job's ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

FIRST = ["job", "status", "overrides", "wall_s", "error", "output_dir"]


class SweepSummary(Callback):
    def __init__(self, filename: str = "sweep_summary.csv") -> None:
        self.filename = filename
        self._start: dict[int, float] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start[_job_num(config)] = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        num = _job_num(config)
        out = Path(config.hydra.runtime.output_dir)
        row: dict[str, Any] = {
            "job": num,
            "status": "completed" if job_return.status == JobStatus.COMPLETED else "failed",
            "overrides": " ".join(job_return.overrides or []),
            "wall_s": round(time.perf_counter() - self._start.pop(num, time.perf_counter()), 3),
            "error": ""
            if job_return.status == JobStatus.COMPLETED
            else f"{type(job_return._return_value).__name__}: {job_return._return_value}",
            "output_dir": str(out),
        }
        summary = out / "summary.json"
        if summary.is_file():
            row.update(json.loads(summary.read_text()))
        append_row(Path(config.hydra.sweep.dir) / self.filename, row)


def _job_num(config: DictConfig) -> int:
    return int(config.hydra.job.get("num", 0) or 0)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Add ``row`` to the CSV at ``path``, widening the header when it brings new columns; the file
    is rewritten to a temporary name and renamed, so a reader never sees half of it."""
    rows = list(csv.DictReader(path.open())) if path.is_file() else []
    rows.append({k: str(v) for k, v in row.items()})
    keys = list(dict.fromkeys(FIRST + [k for r in rows for k in r]))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: int(r["job"])))
    os.replace(tmp, path)
