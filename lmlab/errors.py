"""User-facing errors: raised before any expensive work, printed as one line by the entry points."""

from __future__ import annotations

import logging
import sys


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


def show_warnings() -> None:
    """lmlab's warnings on stderr, for the commands whose conf turns Hydra's job logging off so
    that stdout holds their result alone (``lmlab.evaluate``'s line, ``lmlab.generate``'s text):
    that sets the root logger to ERROR and disables the loggers that exist then, lmlab's among
    them, and would swallow what a user must hear (evaluated documents that are not the ones the
    run held out; a prompt cut to fit the model's positions)."""
    log = logging.getLogger("lmlab")
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (name == "lmlab" or name.startswith("lmlab.")) and isinstance(logger, logging.Logger):
            logger.disabled = False
    log.disabled = False
    log.setLevel(logging.WARNING)
    if not any(isinstance(h, logging.StreamHandler) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        log.addHandler(handler)
