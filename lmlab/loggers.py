"""Logger classes and factories used by conf/logger/*.yaml."""

from __future__ import annotations

import csv
from collections.abc import Sequence

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


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


def wandb_logger(
    *, tags: Sequence[str] = (), extra_tags: Sequence[str] = (), **kwargs
) -> WandbLogger:
    """Lightning's ``WandbLogger`` with the automatic tags (model, objective, …) plus the user's."""
    return WandbLogger(tags=list(dict.fromkeys([*tags, *extra_tags])), **kwargs)
