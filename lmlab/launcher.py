"""SLURM jobs through Hydra's submitit launcher, resumable after a requeue.

``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml) submits every job of a sweep (or a single
run with ``-m``) as one SLURM job with ``trainer.num_nodes`` nodes and ``trainer.devices`` tasks and
GPUs per node, so Lightning finds one SLURM task per device and starts no processes itself.

Preemption and time limits, one owner each:
  * SLURM signals the job (``USR2``, ``signal_delay_s`` before the limit; SIGTERM on preemption).
  * ``lmlab.callbacks.Preemption`` (which listens to SIGTERM, SIGUSR1 and, in this preset, SIGUSR2)
    writes ``last.ckpt`` at the end of the current step, then hands the signal to submitit.
  * submitit requeues the job (``scontrol requeue``), calling :meth:`SlurmLauncher.checkpoint`, which
    pins the job's folder and adds ``ckpt_path=auto``: the requeued job continues the same run folder
    (the sweep folder's default name holds the launch time, which a restart would otherwise re-read)
    from that checkpoint, with the same W&B run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as SubmititSlurmLauncher,
)

PINNED = ("hydra.sweep.dir", "hydra.sweep.subdir", "ckpt_path")


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_overrides(overrides: list[str], output_dir: str | Path) -> list[str]:
    """The job's overrides, plus what makes a restart continue ``output_dir`` from its last.ckpt."""
    out = Path(output_dir)
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in PINNED]
    return [
        *kept,
        f"hydra.sweep.dir={_quoted(str(out.parent))}",
        f"hydra.sweep.subdir={_quoted(out.name)}",
        "ckpt_path=auto",
    ]


class SlurmLauncher(SubmititSlurmLauncher):
    """Hydra's submitit SLURM launcher whose requeued jobs resume their own run folder."""

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        output_dir = HydraConfig.get().runtime.output_dir
        return super().checkpoint(resume_overrides(sweep_overrides, output_dir), *args, **kwargs)
