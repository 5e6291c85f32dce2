"""hparams_search=optuna: a persistent Optuna study over config keys."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from lmlab.errors import ConfigError
from lmlab.search import run_search


def small_space(cfg, params):
    with open_dict(cfg):
        cfg.hparams_search.params = OmegaConf.create(params)
    return cfg


def test_two_trial_search_reports_its_best_value_and_resumes(tiny_cfg):
    cfg = small_space(
        tiny_cfg("hparams_search=optuna", "hparams_search.n_trials=2"),
        {
            "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "model.n_layers": {"type": "int", "low": 1, "high": 2},
        },
    )
    best = run_search(cfg)
    root = Path(cfg.paths.output_dir)
    rows = list(csv.DictReader((root / "sweep_summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    values = [float(r["val/bpb"]) for r in rows]
    for r in rows:  # each trial's row is its summary.json, and its overrides its sampled values
        summary = json.loads((Path(r["output_dir"]) / "summary.json").read_text())
        assert float(r["val/bpb"]) == pytest.approx(summary["val/bpb"], rel=1e-12)
        saved = OmegaConf.load(Path(r["output_dir"]) / ".hydra" / "config.yaml")
        assert f"model.n_layers={saved.model.n_layers}" in r["overrides"]
        assert 1e-4 <= saved.optim.lr <= 1e-2 and "hparams_search" not in saved
    assert best["value"] == min(values) and best["n_trials"] == 2
    assert json.loads((root / "best.json").read_text())["value"] == best["value"]
    assert (root / "optuna.db").is_file()
    # the study is persistent: asking for 3 trials runs one more, not three
    with open_dict(cfg):
        cfg.hparams_search.n_trials = 3
    assert run_search(cfg)["n_trials"] == 3
    assert len(list(csv.DictReader((root / "sweep_summary.csv").open()))) == 3
    assert math.isfinite(best["value"])


def test_unknown_search_key_is_refused(tiny_cfg):
    cfg = small_space(
        tiny_cfg("hparams_search=optuna"),
        {"optim.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}},
    )
    with pytest.raises(ConfigError, match=r"'optim\.lrr', which is not a config key"):
        run_search(cfg)
