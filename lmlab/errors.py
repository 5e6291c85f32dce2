"""User-facing errors: raised before any expensive work, printed as one line by the entry points."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad configuration or input; the message names the problem and the fix."""


class RunExists(ConfigError):
    """A fresh start refused in a folder that holds a run's checkpoint; that run is left as it was."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run stops, keeping its last good checkpoint."""


class Preempted(RuntimeError):
    """The run received SIGTERM, saved ``last.ckpt`` and stopped; ``ckpt_path=last`` resumes it."""
