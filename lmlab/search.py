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

from lmlab.errors import ConfigError
from lmlab.sweep import append_row

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


def run_search(cfg: DictConfig) -> dict[str, Any]:
    """Run the study described by ``cfg.hparams_search``; returns the best trial's value and params."""
    import optuna

    from lmlab.train import train

    hs = cfg.hparams_search
    root = Path(cfg.paths.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    metric = cfg.optimized_metric
    for key in hs.params:
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"hparams_search.params has {key!r}, which is not a config key")
    study = optuna.create_study(
        study_name=hs.study_name,
        storage=hs.storage or f"sqlite:///{root / 'optuna.db'}",
        direction=hs.direction,
        sampler=optuna.samplers.TPESampler(seed=hs.sampler_seed),
        load_if_exists=True,
    )

    def objective(trial) -> float:
        values = {k: suggest(trial, k, dict(spec)) for k, spec in hs.params.items()}
        out = root / "trials" / str(trial.number)
        trial_cfg = cfg.copy()
        with open_dict(trial_cfg):
            del trial_cfg["hparams_search"]
            for k, v in values.items():
                OmegaConf.update(trial_cfg, k, v, merge=False)
            trial_cfg.paths.output_dir = str(out)
        overrides = [f"{k}={v}" for k, v in values.items()]
        (out / ".hydra").mkdir(parents=True, exist_ok=True)
        (out / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
        OmegaConf.save(trial_cfg, out / ".hydra" / "config.yaml")
        t0, row = time.perf_counter(), {"job": trial.number, "overrides": " ".join(overrides)}
        try:
            metrics, _ = train(trial_cfg)
        except Exception as e:  # a failed trial is recorded and the search goes on
            append_row(
                root / "sweep_summary.csv",
                row
                | {
                    "status": "failed",
                    "error": f"{type(e).__name__}: {e}",
                    "wall_s": round(time.perf_counter() - t0, 3),
                    "output_dir": str(out),
                },
            )
            raise
        append_row(
            root / "sweep_summary.csv",
            row
            | metrics
            | {
                "status": "completed",
                "output_dir": str(out),
            },
        )
        value = metrics.get(metric, math.nan)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{metric} is {value}")
        return value

    done = sum(t.state.is_finished() for t in study.trials)
    study.optimize(objective, n_trials=max(0, hs.n_trials - done), catch=(Exception,))
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise ConfigError(f"no trial of the search completed; see {root / 'sweep_summary.csv'}")
    best = {
        "value": study.best_value,
        "params": study.best_params,
        "trial": study.best_trial.number,
        "metric": metric,
        "n_trials": len(study.trials),
    }
    (root / "best.json").write_text(json.dumps(best, indent=2))
    log.info("Best %s = %.4f (trial %d): %s", metric, best["value"], best["trial"], best["params"])
    return best
