"""Logger classes and factories used by conf/logger/*.yaml."""

from __future__ import annotations

import csv
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

RUN_ID_FILE = "wandb_run_id"  # in the run dir: a resumed run continues the same W&B run


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; a resumed run must
    keep the steps it already logged, so this one appends (adopting the existing header)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the run's metrics.csv instead of replacing it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def drop_rows_from(self, step: int) -> int:
        """Remove the rows of metrics.csv (and of the writer's unsaved buffer) whose ``step`` is
        ``step`` or later; returns how many rows of the file went.

        A run that crashed after its last checkpoint logged steps that the resumed run trains and
        logs again: without this, metrics.csv holds both copies. Lightning's ``step`` column is the
        number of optimizer steps finished *before* the row's step (the rows of global step k+1,
        train and validation, say ``step`` k), so after a restore at ``trainer.global_step`` k the
        crashed run's rows from ``step`` k on are the ones to drop. The file is rewritten to a
        temporary name and renamed (a crash leaves the old file or the new one, never half of
        one), keeping its header; rows without a readable step are kept. Works before and after
        the writer was created (it is created lazily, at the first metrics)."""
        if self._experiment is not None:
            self._experiment.metrics = [
                m for m in self._experiment.metrics if not _at_or_after(m.get("step"), step)
            ]
        path = os.path.join(self.log_dir, _AppendingWriter.NAME_METRICS_FILE)
        if not os.path.isfile(path):
            return 0
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fieldnames = list(reader.fieldnames or [])
            rows = list(reader)
        kept = [r for r in rows if not _at_or_after(r.get("step"), step)]
        if len(kept) == len(rows):
            return 0
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)
        return len(rows) - len(kept)


def _at_or_after(value, step: int) -> bool:
    """Whether a CSV row's ``step`` cell (a string in the file, an int in the buffer) is >= step."""
    try:
        return int(float(value)) >= step
    except (TypeError, ValueError):
        return False


def sweep_identity(sweep_dir: str, override_dirname: str) -> tuple[str, str | None]:
    """(W&B group, run name) of a multirun job: the group is the sweep folder (fixed at launch,
    shared by every job), the name the job's overrides (``optim.lr=0.001,model.n_layers=2``)."""
    parts = [p for p in Path(sweep_dir).parts if p not in ("/", ".", "")]
    group = re.sub(r"[^A-Za-z0-9_.=-]+", "-", "-".join(parts[-3:]))
    return group, override_dirname or None


def wandb_logger(
    *,
    save_dir: str,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    extra_tags: Sequence[str] = (),
    trial: str | None = None,
    **kwargs,
) -> WandbLogger:
    """Lightning's ``WandbLogger`` with lmlab's conventions:

    - tags: the automatic ones (model, objective, data, tokenizer) plus the user's;
    - in a Hydra multirun, the group defaults to the sweep and the name to the job's overrides;
    - a search trial (``trial``: its sampled values, set by :mod:`lmlab.search`) is named by them,
      after the job's overrides in a multirun of searches;
    - the W&B run id is kept in ``<run dir>/wandb_run_id``, so resuming the run (``ckpt_path=last``
      into the same folder) continues the same W&B run instead of starting a new one.
    """
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN":
        hc = HydraConfig.get()
        # the absolute folder (a relative sweep.dir is the launch folder's, also under
        # hydra.job.chdir=true), as report.wandb_group finds it from the run folder on disk
        sweep_dir = str((Path(hc.runtime.cwd) / hc.sweep.dir).resolve())
        sweep_group, job_name = sweep_identity(sweep_dir, hc.job.override_dirname)
        group, name = group or sweep_group, job_name or name
        if trial and job_name:
            trial = f"{job_name} {trial}"
    name = trial or name
    id_file = Path(save_dir) / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B run ids: lowercase letters and digits
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    logger = WandbLogger(
        save_dir=save_dir,
        name=name,
        group=group,
        id=run_id,
        resume="allow",
        # one tag given alone (`tags=baseline`) is a string: one tag, not one per letter
        tags=list(dict.fromkeys([*_listed(tags), *_listed(extra_tags)])),
        **kwargs,
    )
    # Lightning passes wandb.init anonymous=None unless told otherwise, and wandb >= 0.19 warns at
    # every run that the (deprecated) setting "has no effect": not passed unless it is set
    if logger._wandb_init.get("anonymous", False) is None:
        del logger._wandb_init["anonymous"]
    return logger


def _listed(tags) -> list[str]:
    return [tags] if isinstance(tags, str) else [str(t) for t in tags or ()]
