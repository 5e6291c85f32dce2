"""User-facing errors: raised before any expensive work, printed as one line by the entry points."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad configuration or input; the message names the problem and the fix."""


def refuse_unknown_keys(group: str, values, known, of: str | None = None) -> None:
    """A key of config group ``group`` that nothing reads (``+optim.momentum=0.9``) is refused,
    naming the ones that are read (the settings ``of`` a group's option, e.g. ``data=files``)."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{group}.{unknown[0]} is not a setting of {of or group}; its settings are "
            f"{', '.join(known)}"
        )


class RunKept(ConfigError):
    """A start refused before it changed anything in the run folder: the run there is left as it
    was (a sweep keeps its job's row)."""


class RunExists(RunKept):
    """A fresh start refused in a folder that holds a run's checkpoint; that run is left as it was."""


class ResumeRefused(RunKept):
    """A resume refused (another tokenizer, model shape or held-out documents); the run is left as
    it was."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run stops, keeping its last good checkpoint."""


class Preempted(RuntimeError):
    """The run received SIGTERM, saved ``last.ckpt`` and stopped; ``ckpt_path=last`` resumes it."""
