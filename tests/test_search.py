"""hparams_search=optuna: a persistent Optuna study over config keys."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from lmlab.errors import ConfigError, Preempted
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


class FakeTrain:
    """Stands in for lmlab.train.train: the first call is preempted after saving last.ckpt (as
    train() raises it), later calls finish at once with val/bpb = the sampled lr."""

    def __init__(self, preempt_first: bool = True):
        self.calls: list = []
        self.preempt_first = preempt_first

    def __call__(self, cfg):
        out = Path(cfg.paths.output_dir)
        self.calls.append((out, cfg.get("ckpt_path"), cfg.optim.lr))
        if self.preempt_first and len(self.calls) == 1:
            (out / "checkpoints").mkdir(parents=True)
            (out / "checkpoints" / "last.ckpt").write_bytes(b"x")
            raise Preempted(
                f"stopped by a preemption signal after step 3; {out}/checkpoints/last.ckpt holds "
                f"it: resume with ckpt_path=last hydra.run.dir={out}"
            )
        return {"val/bpb": cfg.optim.lr, "wall_s": 1000.0}, {}


LR_SPACE = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}


def test_trials_logged_to_wandb_share_the_searchs_group_and_are_named_by_their_values(
    tiny_cfg, monkeypatch
):
    """As the jobs of a multirun: one W&B group (the search's folder), names from the values; each
    trial had the same name and no group. lmlab.report finds the group in the trials' configs."""
    from lmlab.loggers import sweep_identity
    from lmlab.report import wandb_group

    seen = []

    def fake(cfg):
        seen.append((cfg.logger.wandb.group, cfg.logger.wandb.trial, cfg.optim.lr))
        return {"val/bpb": cfg.optim.lr}, {}

    monkeypatch.setattr("lmlab.train.train", fake)
    cfg = tiny_cfg("hparams_search=optuna", "hparams_search.n_trials=2", "logger=wandb")
    run_search(small_space(cfg, LR_SPACE))
    root = Path(cfg.paths.output_dir)
    group = sweep_identity(str(root.resolve()), "")[0]
    assert [(g, n) for g, n, _ in seen] == [(group, f"optim.lr={lr}") for *_, lr in seen]
    assert seen[0][2] != seen[1][2]
    assert wandb_group(root / "trials" / "1") == group


def test_a_preempted_trial_stops_the_search_and_is_resumed_first(tiny_cfg, monkeypatch):
    import optuna

    fake = FakeTrain()
    monkeypatch.setattr("lmlab.train.train", fake)
    cfg = small_space(tiny_cfg("hparams_search=optuna", "hparams_search.n_trials=2"), LR_SPACE)
    root = Path(cfg.paths.output_dir)
    with pytest.raises(Preempted, match=rf"trial 0 .*hydra\.run\.dir={root} "):
        run_search(cfg)
    assert len(fake.calls) == 1  # no next trial was started
    (row,) = csv.DictReader((root / "sweep_summary.csv").open())
    assert (row["job"], row["status"]) == ("0", "preempted")
    assert row["output_dir"] == str(root / "trials" / "0")
    study = optuna.load_study(study_name="lmlab", storage=f"sqlite:///{root / 'optuna.db'}")
    (t0,) = study.trials
    assert t0.state == optuna.trial.TrialState.FAIL and t0.user_attrs["preempted"] is True

    best = run_search(cfg)  # the same command again: resumes the search
    first_lr = fake.calls[0][2]
    # the preempted trial continues in its folder from last.ckpt with its parameters, then the
    # one trial still owed runs: the preempted attempt counts towards nothing
    assert fake.calls[1] == (root / "trials" / "0", "last", first_lr)
    assert fake.calls[2][:2] == (root / "trials" / "2", None) and len(fake.calls) == 3
    assert fake.calls[2][2] != first_lr  # a resumed search samples anew, not trial 0's values
    assert not (root / "trials" / "1").exists()
    rows = list(csv.DictReader((root / "sweep_summary.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("2", "completed")]
    assert float(rows[0]["val/bpb"]) == first_lr  # the resumed trial's row replaced the preempted
    states = [t.state for t in optuna.load_study(study_name="lmlab", storage=study._storage).trials]
    assert states == [optuna.trial.TrialState.FAIL] + [optuna.trial.TrialState.COMPLETE] * 2
    assert best["n_trials"] == 3 and best["value"] == min(first_lr, fake.calls[2][2])
    assert run_search(cfg)["n_trials"] == 3  # nothing left to resume or run


def test_trial_rows_measure_wall_time_alike_whatever_the_status(tiny_cfg, monkeypatch):
    fake = FakeTrain(preempt_first=False)
    monkeypatch.setattr("lmlab.train.train", fake)
    cfg = small_space(tiny_cfg("hparams_search=optuna", "hparams_search.n_trials=1"), LR_SPACE)
    run_search(cfg)
    (row,) = csv.DictReader((Path(cfg.paths.output_dir) / "sweep_summary.csv").open())
    # wall_s: the trial as the search timed it (a failed trial's too); summary.json's own is apart
    assert float(row["train_wall_s"]) == 1000.0 and 0 <= float(row["wall_s"]) < 60


@pytest.mark.parametrize("name", ["val/bpbb", "bpb", None])
def test_an_unknown_optimized_metric_is_refused_before_any_trial(tiny_cfg, monkeypatch, name):
    def train(cfg):
        raise AssertionError("no trial may train")

    monkeypatch.setattr("lmlab.train.train", train)
    cfg = small_space(tiny_cfg("hparams_search=optuna"), LR_SPACE)
    with open_dict(cfg):
        cfg.optimized_metric = name
    with pytest.raises(ConfigError, match=r"optimized_metric.*one of val/loss, .*val/bpb, "):
        run_search(cfg)
    assert not (Path(cfg.paths.output_dir) / "optuna.db").exists()


@pytest.mark.parametrize(
    ("metric", "direction", "message"),
    [
        ("val/acc", "minimize", r"val/acc is better higher, .*hparams_search\.direction=maximize"),
        ("val/bpb", "maximize", r"val/bpb is better lower, .*hparams_search\.direction=minimize"),
        ("val/bpb", "down", r"hparams_search\.direction='down'; use minimize or maximize"),
    ],
)
def test_a_search_direction_against_its_metric_is_refused_before_any_trial(
    tiny_cfg, monkeypatch, metric, direction, message
):
    def train(cfg):
        raise AssertionError("no trial may train")

    monkeypatch.setattr("lmlab.train.train", train)
    cfg = small_space(tiny_cfg("hparams_search=optuna"), LR_SPACE)
    with open_dict(cfg):
        cfg.optimized_metric, cfg.hparams_search.direction = metric, direction
    with pytest.raises(ConfigError, match=message):
        run_search(cfg)
    assert not (Path(cfg.paths.output_dir) / "optuna.db").exists()


def test_continuing_a_study_with_another_metric_is_refused(tiny_cfg, monkeypatch):
    """A study keeps its direction and its trials' values: continued with another metric, the new
    trials' accuracies were ranked with the old bits per byte, the lowest accuracy best."""
    fake = FakeTrain(preempt_first=False)
    monkeypatch.setattr("lmlab.train.train", fake)
    cfg = small_space(tiny_cfg("hparams_search=optuna", "hparams_search.n_trials=1"), LR_SPACE)
    run_search(cfg)
    with open_dict(cfg):
        cfg.optimized_metric, cfg.hparams_search.direction = "val/acc", "maximize"
        cfg.hparams_search.n_trials = 2
    with pytest.raises(ConfigError, match=r"optimizes val/bpb \(minimize\); this search asks "):
        run_search(cfg)
    with open_dict(cfg):
        cfg.optimized_metric, cfg.hparams_search.direction = "val/loss", "minimize"
    with pytest.raises(ConfigError, match=r"continue it with optimized_metric=val/bpb "):
        run_search(cfg)
    assert len(fake.calls) == 1  # refused before any trial


def test_a_new_study_in_a_folder_with_another_studys_trials_is_refused(tiny_cfg, monkeypatch):
    """Another study_name in the same folder numbered its trials from 0 again: each refused start
    had already written its .hydra files over the first study's trial, and the report then gave
    the first study's results under the second's values."""
    fake = FakeTrain(preempt_first=False)
    monkeypatch.setattr("lmlab.train.train", fake)
    cfg = small_space(tiny_cfg("hparams_search=optuna", "hparams_search.n_trials=1"), LR_SPACE)
    run_search(cfg)
    trial = Path(cfg.paths.output_dir) / "trials" / "0" / ".hydra" / "overrides.yaml"
    before = trial.read_text()
    with open_dict(cfg):
        cfg.hparams_search.study_name, cfg.hparams_search.sampler_seed = "second", 7
    with pytest.raises(ConfigError, match=r"trials holds the trials of another study; .* another "):
        run_search(cfg)
    assert trial.read_text() == before and len(fake.calls) == 1


def test_a_search_over_the_tokenizer_by_a_per_token_metric_is_refused(tiny_cfg, monkeypatch):
    """val/loss picked the 512-token vocabulary over the 4096 one whose bits per byte were lower:
    per-token figures do not compare across tokenizers (lmlab.report warns of it too)."""
    fake = FakeTrain(preempt_first=False)
    monkeypatch.setattr("lmlab.train.train", fake)
    space = {"tokenizer.vocab_size": {"type": "categorical", "choices": [512, 4096]}}
    cfg = small_space(tiny_cfg("hparams_search=optuna", "optimized_metric=val/loss"), space)
    with pytest.raises(ConfigError, match=r"searches tokenizer.vocab_size, but optimized_metric="
                                          r"val/loss is per token .* optimized_metric=val/bpb"):  # fmt: skip
        run_search(cfg)
    assert not fake.calls


def test_an_auxiliary_heads_metric_is_refused_for_a_run_without_the_head(tiny_cfg, monkeypatch):
    """val/sop_acc for a clm run: every trial trained, then was pruned as nan."""
    fake = FakeTrain(preempt_first=False)
    monkeypatch.setattr("lmlab.train.train", fake)
    cfg = tiny_cfg("hparams_search=optuna", "hparams_search.n_trials=1")
    with open_dict(cfg):
        cfg.optimized_metric, cfg.hparams_search.direction = "val/sop_acc", "maximize"
    cfg = small_space(cfg, LR_SPACE)
    with pytest.raises(ConfigError, match=r"val/sop_acc is reported by objective=sop's auxiliary "
                                          r"head only; this run trains objective=clm"):  # fmt: skip
        run_search(cfg)
    # train/mfu on a CPU without a peak to divide by: every trial's value was nan
    with open_dict(cfg):
        cfg.optimized_metric = "train/mfu"
        cfg.trainer.accelerator = "cpu"
    with pytest.raises(ConfigError, match=r"train/mfu needs the device's peak FLOP/s, .* set "
                                          r"callbacks.throughput.peak_flops"):  # fmt: skip
        run_search(cfg)
    assert not fake.calls
    with open_dict(cfg):
        cfg.callbacks.throughput.peak_flops = 1e12
    with pytest.raises(ConfigError, match="no trial of the search completed"):
        run_search(cfg)  # a peak given: accepted (the fake training reports no train/mfu)
    assert len(fake.calls) == 1


def test_processes_sharing_a_study_queue_a_preempted_trial_once(tmp_path, monkeypatch):
    """Two jobs of one search starting together: each looks for preempted trials to resume, and
    only one queues the resumption (each enqueue here takes 0.3 s, so without the lock both would
    find none queued yet)."""
    import threading

    import optuna

    from lmlab.search import resume_preempted

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)})
    trial.set_user_attr("preempted", True)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    enqueue = optuna.Study.enqueue_trial

    def slow_enqueue(self, *args, **kwargs):
        time.sleep(0.3)
        return enqueue(self, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "enqueue_trial", slow_enqueue)
    jobs = [
        threading.Thread(
            target=resume_preempted,
            args=(optuna.load_study(study_name=study.study_name, storage=study._storage), tmp_path),
        )
        for _ in range(2)
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(30)
    waiting = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.WAITING]
    assert [t.user_attrs["resumes"] for t in waiting] == [0]


def test_an_interrupted_trial_is_recorded_and_resumed_first(tiny_cfg, monkeypatch):
    """Ctrl-C: Lightning stops training and exits (SystemExit), which Optuna does not catch: the
    trial stayed RUNNING in the study for ever, with no row. Now it is recorded like a preemption
    and the search stops with a KeyboardInterrupt that says how to resume."""
    import optuna

    calls = []

    def interrupted_first(cfg):
        calls.append((Path(cfg.paths.output_dir), cfg.get("ckpt_path"), cfg.optim.lr))
        if len(calls) == 1:
            raise SystemExit(1)  # what Lightning's KeyboardInterrupt handler does
        return {"val/bpb": cfg.optim.lr}, {}

    monkeypatch.setattr("lmlab.train.train", interrupted_first)
    cfg = small_space(tiny_cfg("hparams_search=optuna", "hparams_search.n_trials=1"), LR_SPACE)
    root = Path(cfg.paths.output_dir)
    with pytest.raises(KeyboardInterrupt, match=rf"trial 0 .*hydra\.run\.dir={root} "):
        run_search(cfg)
    (row,) = csv.DictReader((root / "sweep_summary.csv").open())
    assert (row["job"], row["status"]) == ("0", "interrupted")
    study = optuna.load_study(study_name="lmlab", storage=f"sqlite:///{root / 'optuna.db'}")
    (t0,) = study.trials
    assert t0.state == optuna.trial.TrialState.FAIL and t0.user_attrs["preempted"] is True

    best = run_search(cfg)
    # no checkpoint was saved: the trial starts again in its folder, with its values
    assert calls[1] == (root / "trials" / "0", None, calls[0][2]) and len(calls) == 2
    (row,) = csv.DictReader((root / "sweep_summary.csv").open())
    assert (row["job"], row["status"]) == ("0", "completed")
    assert best["value"] == calls[0][2]


def test_a_study_shared_by_two_run_dirs_resumes_a_preempted_trial_in_its_own_folder(
    tiny_cfg, monkeypatch, tmp_path
):
    """Processes sharing one study through its storage, each with its own run dir (SLURM jobs of
    one search with default run folders): the trial preempted in A's folder was resumed by B from
    scratch in B/trials/0, and A's summary kept it preempted. Now B continues it from A's
    last.ckpt, and A's row becomes the completed one."""
    fake = FakeTrain()
    monkeypatch.setattr("lmlab.train.train", fake)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = tmp_path / "a", tmp_path / "b"
    cfgs = {}
    for root in (a, b):
        cfg = small_space(tiny_cfg("hparams_search=optuna", "hparams_search.n_trials=1"), LR_SPACE)
        with open_dict(cfg):
            cfg.paths.output_dir, cfg.hparams_search.storage = str(root), storage
        cfgs[root] = cfg
    with pytest.raises(Preempted):
        run_search(cfgs[a])
    run_search(cfgs[b])
    assert fake.calls[1] == (a / "trials" / "0", "last", fake.calls[0][2]) and len(fake.calls) == 2
    (row,) = csv.DictReader((a / "sweep_summary.csv").open())
    assert (row["job"], row["status"], row["output_dir"]) == ("0", "completed", str(a / "trials/0"))
    assert not (b / "trials").exists() and not (b / "sweep_summary.csv").exists()


def test_the_range_checks_show_a_warning_once(tiny_cfg, caplog):
    """Every probe of the ranges runs the settings checks, which warn here (tokenizer=byte has no
    vocab_size): the warning appears once, not once per range end (4 here), and the filter is gone
    afterwards."""
    from lmlab.search import check_ranges

    space = {
        "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2},
        "model.n_layers": {"type": "int", "low": 1, "high": 2},
    }
    cfg = small_space(tiny_cfg("hparams_search=optuna", "tokenizer=byte"), space)
    with caplog.at_level(logging.WARNING):
        check_ranges(cfg)
    said = [r for r in caplog.records if "tokenizer.vocab_size is a setting" in r.getMessage()]
    assert len(said) == 1
    assert not any(f for h in logging.getLogger().handlers for f in h.filters)
    with caplog.at_level(logging.WARNING):
        check_ranges(cfg)  # a later search warns again
    said = [r for r in caplog.records if "tokenizer.vocab_size is a setting" in r.getMessage()]
    assert len(said) == 2


def test_a_range_a_trial_cannot_take_is_refused_before_any_trial(tiny_cfg, monkeypatch):
    """optim.warmup_steps up to 200 under a 6-step run: every trial that drew more than 5 failed,
    one after the other, and the search ended with none completed."""
    fake = FakeTrain(preempt_first=False)
    monkeypatch.setattr("lmlab.train.train", fake)
    space = {"optim.warmup_steps": {"type": "int", "low": 0, "high": 200}}
    cfg = small_space(tiny_cfg("hparams_search=optuna", "hparams_search.n_trials=2"), space)
    with pytest.raises(
        ConfigError,
        match=r"hparams_search\.params\.optim\.warmup_steps: a trial with optim\.warmup_steps=200 "
        r"would be refused \(optim\.warmup_steps=200 must be below trainer\.max_steps=6; .*\); "
        r"narrow the range",
    ):
        run_search(cfg)
    assert not fake.calls
    space["optim.warmup_steps"]["high"] = 5
    run_search(small_space(cfg, space))
    assert len(fake.calls) == 2
