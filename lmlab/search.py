"""``python -m lmlab hparams_search=optuna``: an Optuna study over any config keys.

Each trial copies the composed config, writes the sampled values over it, trains into
``<run dir>/trials/<n>`` and reports ``optimized_metric``. The study is stored in SQLite under the run
dir (or any Optuna storage URL), so an interrupted search resumes where it stopped. Every trial also
gets a row in ``<run dir>/sweep_summary.csv`` and ``.hydra`` files, so ``python -m lmlab.report <run
dir>`` compares the trials like a sweep.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from lmlab.errors import ConfigError, Preempted
from lmlab.loggers import sweep_identity
from lmlab.paths import file_lock
from lmlab.report import PER_TOKEN
from lmlab.sweep import HIGHER_IS_BETTER, LOWER_IS_BETTER, append_row

log = logging.getLogger("lmlab")


def suggest(trial, name: str, spec: dict) -> Any:
    kind = spec.get("type")
    if kind == "float":
        return trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
    if kind == "int":
        return trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
    if kind == "categorical":
        return trial.suggest_categorical(name, list(spec["choices"]))
    raise ConfigError(f"hparams_search.params.{name}.type={kind!r}; use float, int or categorical")


class _TrialFailed(Exception):
    """A trial's training failed (recorded in sweep_summary.csv): the search goes on. Everything
    else the objective raises (a preemption, a bug of the search itself) stops it."""


def run_search(cfg: DictConfig) -> dict[str, Any]:
    """Run the study described by ``cfg.hparams_search``; returns the best trial's value and params.

    A preemption (:class:`~lmlab.errors.Preempted`: the trial saved ``last.ckpt`` and stopped)
    stops the whole search at once: the scheduler kills the process soon, and a next trial would
    die mid-step. The preempted trial is recorded as ``preempted`` in sweep_summary.csv and, in the
    study, as failed with the user attribute ``preempted``; it does not count towards ``n_trials``.
    An interruption (Ctrl-C) is recorded alike (``interrupted`` in sweep_summary.csv) and raised as
    a ``KeyboardInterrupt``.
    Re-running the search (same command and run dir) first resumes it: a new trial with the same
    parameters (enqueued, user attribute ``resumes``: the folder's number) continues in the
    preempted trial's folder from its ``last.ckpt``, and its row replaces the preempted one.
    """
    import optuna

    from lmlab.sweep import check_optimized_metric
    from lmlab.train import train

    hs = cfg.hparams_search
    root = Path(cfg.paths.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    metric = cfg.optimized_metric
    check_optimized_metric(metric, required=True, cfg=cfg)  # before any trial trains
    if hs.direction not in ("minimize", "maximize"):
        raise ConfigError(f"hparams_search.direction={hs.direction!r}; use minimize or maximize")
    right = {
        **dict.fromkeys(HIGHER_IS_BETTER, "maximize"),
        **dict.fromkeys(LOWER_IS_BETTER, "minimize"),
    }
    if metric in right and hs.direction != right[metric]:
        better = "higher" if right[metric] == "maximize" else "lower"
        raise ConfigError(
            f"optimized_metric={metric} is better {better}, but hparams_search.direction="
            f"{hs.direction}; set hparams_search.direction={right[metric]}"
        )
    tokenizing = sorted(str(k) for k in hs.params if str(k).startswith("tokenizer."))
    if tokenizing and metric in PER_TOKEN:
        raise ConfigError(
            f"hparams_search.params searches {', '.join(tokenizing)}, but optimized_metric="
            f"{metric} is per token and does not compare across tokenizers (a coarser one has "
            "fewer, harder tokens); optimize bits per byte: optimized_metric=val/bpb"
        )
    for key in hs.params:
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"hparams_search.params has {key!r}, which is not a config key")
    check_ranges(cfg)
    study = optuna.create_study(
        study_name=hs.study_name,
        storage=hs.storage or f"sqlite:///{root / 'optuna.db'}",
        direction=hs.direction,
        sampler=optuna.samplers.TPESampler(seed=hs.sampler_seed),
        load_if_exists=True,
    )
    stored = study.user_attrs.get("optimized_metric")
    direction = (
        "maximize" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "minimize"
    )
    if study.trials and (stored not in (None, metric) or direction != hs.direction):
        # a study keeps its direction: trials of another metric would be ranked with its values
        raise ConfigError(
            f"the study {hs.study_name!r} in {hs.storage or root / 'optuna.db'} optimizes "
            f"{stored or 'another metric'} ({direction}); this search asks for {metric} "
            f"({hs.direction}): continue it with optimized_metric={stored or '...'} "
            f"hparams_search.direction={direction}, or start a new one in another folder "
            "(hydra.run.dir=...)"
        )
    held = root / "trials"
    if not study.trials and held.is_dir() and any(held.iterdir()):
        # its trial 0 would write over theirs (.hydra files first, then the summary's row)
        raise ConfigError(
            f"{held} holds the trials of another study; the new study {hs.study_name!r} would "
            "number its trials from 0 into the same folders: start it in another folder "
            "(hydra.run.dir=...), or continue the study that is there (its "
            "hparams_search.study_name)"
        )
    study.set_user_attr("optimized_metric", metric)
    if hs.sampler_seed is not None and study.trials:
        # A resumed search: a sampler seeded as at the start would draw the first trials' random
        # values again (TPE samples at random until it has enough trials); offset by the trials
        # so far, it stays reproducible and draws new ones.
        study.sampler = optuna.samplers.TPESampler(seed=hs.sampler_seed + len(study.trials))

    def objective(trial) -> float:
        values = {k: suggest(trial, k, dict(spec)) for k, spec in hs.params.items()}
        folder = trial.user_attrs.get("resumes", trial.number)  # a preempted trial's, resumed
        # A resumed trial continues in the preempted one's folder, also where a process of a shared
        # study (another run dir) picks it up; its row goes to the summary beside that folder.
        out = Path(trial.user_attrs.get("resume_dir") or root / "trials" / str(folder))
        summary = out.parent.parent / "sweep_summary.csv"
        trial.set_user_attr("output_dir", str(out))
        trial_cfg = cfg.copy()
        with open_dict(trial_cfg):
            del trial_cfg["hparams_search"]
            for k, v in values.items():
                OmegaConf.update(trial_cfg, k, v, merge=False)
            trial_cfg.paths.output_dir = str(out)
            if "resumes" in trial.user_attrs and (out / "checkpoints" / "last.ckpt").exists():
                trial_cfg.ckpt_path = "last"
        overrides = [f"{k}={v}" for k, v in values.items()]
        if "wandb" in (trial_cfg.get("logger") or {}):
            # as a multirun's jobs (lmlab.loggers.wandb_logger): one group for the search (its run
            # folder; lmlab.report finds it in each trial's saved config), named by the values
            with open_dict(trial_cfg):
                if OmegaConf.select(trial_cfg, "logger.wandb.group") is None:
                    trial_cfg.logger.wandb.group = sweep_identity(str(root.resolve()), "")[0]
                trial_cfg.logger.wandb.trial = ",".join(overrides)
        (out / ".hydra").mkdir(parents=True, exist_ok=True)
        (out / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
        OmegaConf.save(trial_cfg, out / ".hydra" / "config.yaml")
        t0 = time.perf_counter()

        def record(status: str, fields: dict) -> None:
            """The trial's row of sweep_summary.csv (its wall time: the whole trial)."""
            row = {"job": folder, "overrides": " ".join(overrides)}
            wall = round(time.perf_counter() - t0, 3)
            append_row(
                summary, row | fields | {"status": status, "wall_s": wall, "output_dir": str(out)}
            )

        try:
            metrics, _ = train(trial_cfg)
        except Exception as e:  # a failed trial is recorded; the search goes on unless preempted
            preempted = isinstance(e, Preempted)
            record("preempted" if preempted else "failed", {"error": f"{type(e).__name__}: {e}"})
            if preempted:
                trial.set_user_attr("preempted", True)
                raise Preempted(
                    f"search stopped: trial {trial.number} ({out}) {str(e).split('; ', 1)[0]}; "
                    f"{out / 'checkpoints' / 'last.ckpt'} holds it: resume the search by re-running "
                    f"the same command with hydra.run.dir={root} (the trial continues from its "
                    "last.ckpt, then the remaining trials run)"
                ) from e
            raise _TrialFailed(f"{type(e).__name__}: {e}") from e
        except (KeyboardInterrupt, SystemExit) as e:
            # Ctrl-C: Lightning stops training and exits (SystemExit), which Optuna does not catch:
            # the trial stayed RUNNING in the study for ever. Recorded like a preemption instead,
            # so that re-running the search resumes it first (from its last.ckpt, if one was saved).
            record("interrupted", {"error": "KeyboardInterrupt"})
            trial.set_user_attr("preempted", True)
            raise KeyboardInterrupt(  # Optuna records the trial as failed and raises it again
                f"search interrupted in trial {trial.number} ({out}): resume it by re-running the "
                f"same command with hydra.run.dir={root} (the trial starts again, from its "
                "last.ckpt where one was saved, then the remaining trials run)"
            ) from e
        metrics = dict(metrics)
        if "wall_s" in metrics:  # train() alone: kept apart from the trial's wall time
            metrics["train_wall_s"] = metrics.pop("wall_s")
        record("completed", metrics)
        value = metrics.get(metric, math.nan)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{metric} is {value}")
        return value

    resume_preempted(study, root)
    done = sum(t.state.is_finished() and not t.user_attrs.get("preempted") for t in study.trials)
    study.optimize(objective, n_trials=max(0, hs.n_trials - done), catch=(_TrialFailed,))
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise ConfigError(f"no trial of the search completed; see {root / 'sweep_summary.csv'}")
    best = {
        "value": study.best_value,
        "params": study.best_params,
        "trial": study.best_trial.number,
        "output_dir": study.best_trial.user_attrs.get("output_dir"),
        "metric": metric,
        "n_trials": len(study.trials),
    }
    (root / "best.json").write_text(json.dumps(best, indent=2))
    log.info("Best %s = %.4f (trial %d): %s", metric, best["value"], best["trial"], best["params"])
    return best


class _Once(logging.Filter):
    """Lets each distinct log message through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        new = key not in self.seen
        self.seen.add(key)
        return new


def check_ranges(cfg: DictConfig) -> None:
    """Each parameter's range ends (and categories), one at a time, through the settings checks
    a trial makes, before any trial: a range the run cannot take (optim.warmup_steps up to 200
    under debug=fast's 20 steps) failed trial after trial instead. A warning the checks give is
    shown once, not once per probe."""
    filters = {handler: _Once() for handler in logging.getLogger().handlers}  # one per handler:
    for handler, once in filters.items():  # each sees every record
        handler.addFilter(once)
    try:
        _check_ranges(cfg)
    finally:
        for handler, once in filters.items():
            handler.removeFilter(once)


def _check_ranges(cfg: DictConfig) -> None:
    from lmlab.train import check_settings

    for key, spec in cfg.hparams_search.params.items():
        kind = spec.get("type")
        values = list(spec.get("choices") or []) if kind == "categorical" else []
        values = values or [spec.get("low"), spec.get("high")]
        for value in values:
            probe = cfg.copy()
            with open_dict(probe):
                del probe["hparams_search"]
                OmegaConf.update(probe, key, value, merge=False)
            try:
                check_settings(probe)
            except ConfigError as e:
                raise ConfigError(
                    f"hparams_search.params.{key}: a trial with {key}={value} would be refused "
                    f"({e}); narrow the range"
                ) from None


def resume_preempted(study, root: Path) -> None:
    """Enqueue a resumption of every preempted trial not resumed yet: Optuna runs enqueued trials
    first, with their parameters fixed; ``resumes`` names the folder's number (the first trial's,
    also when a resumption was preempted in turn) and ``resume_dir`` the folder itself, which may
    lie in another process's run dir (``root``) when processes share the study's storage.
    Processes sharing the study (SLURM jobs of one search) take turns under a lock in the search
    folder that holds the trial's folder, so a trial is queued once."""
    for t in study.get_trials(deepcopy=False):
        if not t.user_attrs.get("preempted"):
            continue
        folder = t.user_attrs.get("resumes", t.number)
        where = Path(t.user_attrs.get("output_dir") or root / "trials" / str(folder))
        with file_lock(where.parent.parent / ".resume_preempted.lock", "preempted trials queued"):
            resumed = (  # read again under the lock: another process may have queued it
                u.number > t.number and u.user_attrs.get("resumes") == folder
                for u in study.get_trials(deepcopy=False)
            )
            if not any(resumed):
                study.enqueue_trial(
                    t.params, user_attrs={"resumes": folder, "resume_dir": str(where)}
                )
                log.info("Resuming preempted trial %d (%s) first", t.number, where)
