"""Sweep bookkeeping: a Hydra callback that keeps ``<sweep dir>/sweep_summary.csv`` up to date.

One row per job, written as soon as the job ends (so an interrupted sweep still shows what finished):
job number, overrides, status (completed / failed / preempted), the error of a failed or preempted
job, wall time, and the final metrics of the job's ``summary.json``. A job that runs again into the
same folder (a resumed sweep, a requeued SLURM job) replaces its earlier row: the row is the job's
latest outcome; a finished job that a resumed sweep finds (``train`` trains nothing) keeps its row.

A preemption stops the whole sweep (:func:`record_preempted`); re-running the same command with
``ckpt_path=auto`` and the sweep's ``hydra.sweep.dir`` resumes it: the preempted job continues from
its ``last.ckpt``, finished jobs are skipped, the others run.

``wall_s`` is the job's wall time as the launcher sees it, from Hydra's job start to its end (setup,
training, the final validation, closing the loggers), measured here for every status, so completed
and failed rows compare; ``summary.json``'s own ``wall_s`` (``lmlab.train.train`` alone) becomes the
``train_wall_s`` column.

Also the one list of the metrics ``optimized_metric`` may name (:data:`METRICS`), checked before
any training by ``python -m lmlab`` and by the Optuna search.
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
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import ConfigError, Preempted, RunKept
from lmlab.paths import file_lock

log = logging.getLogger(__name__)

FIRST = ["job", "status", "overrides", "wall_s", "error", "output_dir"]

# What `optimized_metric` may name: the final metrics lmlab.train.train returns (and writes to
# summary.json) that lmlab itself logs under val/ and train/: LMModule (lmlab/models/base.py) and
# lmlab.callbacks.Throughput. Every run has them except train/mfu (only where the device's peak
# FLOP/s is known or given) and train/skipped_nonfinite (only with trainer.skip_nonfinite=true,
# after a skipped batch). tests/test_sweep.py checks this list against those files' log calls
# (and the keys of LMModule.latest_train_metrics, which it logs together).
METRICS = (
    "val/loss",
    "val/ppl",
    "val/bpb",
    "val/acc",
    "train/loss",
    "train/ppl",
    "train/bpb",
    "train/tokens",
    "train/tokens_seen",
    "train/tokens_per_sec",
    "train/mfu",
    "train/skipped_nonfinite",
)
# An auxiliary head's metrics (the objectives of lmlab.data.sentences, .discourse, .relevance and
# .capital), which LMModule logs as val/<objective>_loss, val/<objective>_acc and
# train/<objective>_loss
AUX_TASKS = (
    "sop",
    "nsp",
    "sentence_distance",
    "deshuffle",
    "discourse",
    "ir_relevance",
    "capital_word",
)


def aux_metrics(task: str) -> tuple[str, ...]:
    """The metrics an auxiliary head of ``task`` (its objective's name) is logged under."""
    return tuple(
        f"{split}/{task}_{kind}"
        for split, kind in (("val", "loss"), ("val", "acc"), ("train", "loss"))
    )


AUX_METRICS = tuple(m for task in AUX_TASKS for m in aux_metrics(task))
METRICS += AUX_METRICS
# Which way each is better, for a search's direction; the token counts are neither.
HIGHER_IS_BETTER = ("val/acc", "train/tokens_per_sec", "train/mfu")
HIGHER_IS_BETTER += tuple(m for m in AUX_METRICS if m.endswith("_acc"))
LOWER_IS_BETTER = tuple(
    m
    for m in METRICS
    if m not in HIGHER_IS_BETTER and m not in ("train/tokens", "train/tokens_seen")
)

# job number -> (time.perf_counter(), time.time()) at Hydra's job start, for this process's jobs
_started: dict[int, tuple[float, float]] = {}


def check_optimized_metric(
    name: str | None, *, required: bool = False, cfg: DictConfig | None = None
) -> None:
    """Refuse an ``optimized_metric`` that no run reports, before any training: a misspelt name
    would otherwise be noticed only once every trial had trained (a search), or never (a sweep
    whose jobs all return None). ``null`` is allowed where nothing is optimised (``required``:
    a search needs one). With the run's ``cfg``: an auxiliary head's metric is refused for a run
    of another objective (it has no such head), and ``train/mfu`` on CPUs without
    ``callbacks.throughput.peak_flops`` (no peak to divide by: every value nan)."""
    if name is None or name == "":
        if required:
            raise ConfigError(
                f"optimized_metric is null but the search needs a metric to optimise; set "
                f"optimized_metric to one of {', '.join(METRICS)}"
            )
        return
    if name not in METRICS:
        raise ConfigError(
            f"optimized_metric={name!r} is not a metric lmlab reports; use one of "
            f"{', '.join(METRICS)}"
        )
    if cfg is None:
        return
    from lmlab.train import uses_cuda

    peak = OmegaConf.select(cfg, "callbacks.throughput.peak_flops")
    if name == "train/mfu" and not peak and not uses_cuda(cfg.trainer):
        raise ConfigError(
            "optimized_metric=train/mfu needs the device's peak FLOP/s, which lmlab knows for "
            "GPUs only (lmlab/flops.py): set callbacks.throughput.peak_flops=<FLOP/s>, or "
            "optimise train/tokens_per_sec"
        )
    objective = OmegaConf.select(cfg, "objective.name")
    head = next((t for t in AUX_TASKS if name in aux_metrics(t)), None)
    if head and objective and head != objective:
        raise ConfigError(
            f"optimized_metric={name} is reported by objective={head}'s auxiliary head only; "
            f"this run trains objective={objective}: optimise a metric it reports (val/bpb, ...)"
        )


def sweep_dir(hydra_cfg) -> Path:
    """The sweep folder; a relative ``hydra.sweep.dir`` is the launch folder's (under
    ``hydra.job.chdir=true`` the job runs in its own folder when Hydra calls back)."""
    return Path(hydra_cfg.runtime.get("cwd") or ".") / hydra_cfg.sweep.dir


class SweepSummary(Callback):
    def __init__(self, filename: str = "sweep_summary.csv") -> None:
        self.filename = filename

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        _started[_job_num(config)] = (time.perf_counter(), time.time())

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        error = job_return._return_value if job_return.status != JobStatus.COMPLETED else None
        num, out = _job_num(config), Path(config.hydra.runtime.output_dir)
        started = _started.get(num, (0.0, 0.0))[1]
        summary = out / "summary.json"
        # a finished job that a resumed sweep found (train() trained nothing) keeps its row
        trained = error is not None or not summary.is_file() or summary.stat().st_mtime >= started
        row = job_row(num, out, job_return.overrides or [], error)
        # a start refused in a job's folder (a fresh start where a run is, or a resume with
        # other settings) changed nothing: its row stays
        replace = trained and not isinstance(error, RunKept)
        append_row(sweep_dir(config.hydra) / self.filename, row, replace=replace)


def job_row(num: int, out: Path, overrides: list[str], error: BaseException | None) -> dict:
    """The sweep_summary.csv row of job ``num`` (run folder ``out``), ending now with ``error``
    (None: completed)."""
    status = "completed" if error is None else "failed"
    if isinstance(error, Preempted):
        status = "preempted"
    row: dict[str, Any] = {
        "job": num,
        "status": status,
        "overrides": " ".join(overrides),
        "wall_s": round(time.perf_counter() - _started.pop(num, (time.perf_counter(), 0))[0], 3),
        "error": "" if error is None else f"{type(error).__name__}: {error}",
        "output_dir": str(out),
    }
    summary = out / "summary.json"
    if error is None and summary.is_file():
        metrics = json.loads(summary.read_text())
        if "wall_s" in metrics:  # train() alone: kept apart from the job's wall time above
            metrics["train_wall_s"] = metrics.pop("wall_s")
        row.update(metrics)
    return row


def record_preempted(error: Preempted) -> str:
    """Record the current multirun job as preempted (when the sweep keeps a summary) and return
    what to tell the user: the sweep stops here, and how to resume it.

    Called instead of letting Hydra record the job: the sweep must stop (the scheduler is about to
    kill the process, and a job started now would die mid-step with nothing resuming it), and the
    only way out of Hydra's launcher loop is an exit, after which Hydra calls no callback."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    for cb in (hc.callbacks or {}).values():
        if cb and cb.get("_target_") == f"{__name__}.{SweepSummary.__name__}":
            path = sweep_dir(hc) / cb.get("filename", "sweep_summary.csv")
            row = job_row(hc.job.num, Path(hc.runtime.output_dir), list(hc.overrides.task), error)
            append_row(path, row)
    if "submitit" in str(hc.launcher.get("_target_", "")):
        # one SLURM job per sweep job: the others go on; this one resumes as the error says
        return f"sweep job {hc.job.num}: {error}"
    cause = str(error).split("; ", 1)[0]  # "stopped by a preemption signal after step k"
    last = Path(hc.runtime.output_dir) / "checkpoints" / "last.ckpt"
    return (
        f"sweep job {hc.job.num} {cause}; {last} holds it. The sweep stopped here: resume it by "
        f"re-running the same command with ckpt_path=auto hydra.sweep.dir={hc.sweep.dir} (this "
        "job continues from its last.ckpt, finished jobs are skipped, the others run)"
    )


def _job_num(config: DictConfig) -> int:
    return int(config.hydra.job.get("num", 0) or 0)


def same_job_folder(old: dict[str, str], new: dict[str, str], path: Path) -> bool:
    """Whether two rows of ``path``'s summary name the same job folder: the same output_dir, or,
    for a folder inside the summary's own, the same place in it (a sweep moved or renamed since
    the old row was written, then resumed: its rows were all added again)."""
    was, now = old.get("output_dir"), new.get("output_dir")
    if was == now or not was or not now:
        return was == now
    try:
        tail = Path(now).resolve().relative_to(path.parent.resolve()).parts
    except ValueError:
        return False
    return Path(was).parts[-len(tail) :] == tail


def append_row(path: Path, row: dict[str, Any], replace: bool = True) -> None:
    """Add ``row`` to the CSV at ``path``, widening the header when it brings new columns; a row of
    the same job and job folder (:func:`same_job_folder`; the job ran again: resumed, requeued) is
    replaced, or, with ``replace=False``, kept instead of ``row``.

    Safe across processes: jobs of a SLURM sweep (or trials of a shared Optuna study) finish
    together, and each reads, changes and rewrites the file, so the update holds an exclusive
    ``flock`` on ``.<name>.lock`` beside it (locks work on local disks and, on Linux, on NFS). The
    file is rewritten to a temporary name and renamed, so a reader never sees half of it."""
    new = {k: str(v) for k, v in row.items()}
    with file_lock(path.with_name(f".{path.name}.lock"), f"sweep summary {path} written"):
        rows = []
        if path.is_file():
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        ours = [r.get("job") == new["job"] and same_job_folder(r, new, path) for r in rows]
        if any(ours) and not replace:
            return
        rows = [r for r, mine in zip(rows, ours, strict=True) if not mine] + [new]
        keys = list(dict.fromkeys(FIRST + [k for r in rows for k in r]))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(sorted(rows, key=lambda r: int(r["job"])))
        os.replace(tmp, path)
