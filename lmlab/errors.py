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


def refuse_unknown_top_keys(cfg, config_name: str, command: str) -> None:
    """A top-level key that the command's config (``conf/<config_name>.yaml``) does not have is
    refused: Hydra answers a misspelt key (``seqlen=32``) with "to append to your config use
    +seqlen=32", which then ran with the real key's default without a word."""
    import difflib

    from omegaconf import OmegaConf

    from lmlab.paths import CONF_DIR

    own = OmegaConf.load(CONF_DIR / f"{config_name}.yaml")
    known = {k for k in own if k != "defaults"}
    for entry in own.get("defaults", []):  # the groups: model, data, ... (their keys, if any)
        name = entry if isinstance(entry, str) else next(iter(entry))
        known.add(name.split()[-1].split("@")[0].split("/")[0])
    for key in sorted(set(cfg) - known):
        near = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise ConfigError(
            f"{key} is not a setting of {command}; {hint}`{command} --cfg job` prints them all"
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
