"""lmlab.loggers.ResumableCSVLogger on real metrics.csv files (no training)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lmlab.loggers import ResumableCSVLogger


def csv_logger(run_dir: Path) -> ResumableCSVLogger:
    return ResumableCSVLogger(save_dir=str(run_dir), name="", version="")  # as conf/logger/csv.yaml


def log_steps(logger: ResumableCSVLogger, steps: range, scale: float, val_every: int = 3) -> None:
    """What a run logs: lr, then train rows at each step, a val row (with tokens seen) at every
    ``val_every``-th; Lightning's ``step`` is the number of optimizer steps finished before."""
    for s in steps:
        logger.log_metrics({"lr-AdamW": 1e-3}, step=s)
        logger.log_metrics({"epoch": 0, "train/loss": scale / (s + 1)}, step=s)
        if (s + 1) % val_every == 0:
            logger.log_metrics(
                {"epoch": 0, "val/bpb": scale / (s + 2), "train/tokens_seen": 128.0 * (s + 1)},
                step=s,
            )
    logger.save()


def read(run_dir: Path) -> tuple[list[str], list[dict]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_drop_rows_from_before_the_writer_exists_leaves_no_duplicate_after_a_resume(tmp_path):
    log_steps(csv_logger(tmp_path), range(8), 9.0)  # the crashed run: steps 0..7
    header, crashed = read(tmp_path)
    resumed = csv_logger(tmp_path)  # a new process, restored at global_step 4
    assert resumed._experiment is None
    assert resumed.drop_rows_from(4) == sum(int(r["step"]) >= 4 for r in crashed)
    assert resumed._experiment is None  # nothing created: the writer adopts the file when it starts
    kept_header, kept = read(tmp_path)
    assert kept_header == header and kept == [r for r in crashed if int(r["step"]) < 4]
    assert {r["step"] for r in kept if r["val/bpb"]} == {"2"}  # the val row of step 3 stays
    log_steps(resumed, range(4, 8), 1.0)
    header_after, rows = read(tmp_path)
    assert header_after == header
    train = [(int(r["step"]), float(r["train/loss"])) for r in rows if r["train/loss"]]
    assert train == [(s, 9.0 / (s + 1)) for s in range(4)] + [
        (s, 1.0 / (s + 1)) for s in range(4, 8)
    ]
    val = [(int(r["step"]), float(r["val/bpb"])) for r in rows if r["val/bpb"]]
    assert val == [(2, 9.0 / 4), (5, 1.0 / 7)]
    assert len(rows) == len(crashed)  # the same rows as an uninterrupted run


def test_drop_rows_from_with_a_started_writer_drops_unsaved_rows_too(tmp_path):
    logger = csv_logger(tmp_path)
    log_steps(logger, range(6), 1.0)
    logger.log_metrics({"train/loss": 0.5}, step=6)  # buffered, not yet saved
    logger.log_metrics({"train/loss": 0.25}, step=1)  # a buffered row before the cut stays
    assert logger.drop_rows_from(3) == 7  # steps 3, 4, 5: lr + train each, one val row at 5
    assert [m["step"] for m in logger.experiment.metrics] == [1]
    logger.save()
    header, rows = read(tmp_path)
    assert header == ["epoch", "lr-AdamW", "step", "train/loss", "train/tokens_seen", "val/bpb"]
    assert [int(r["step"]) for r in rows] == [0, 0, 1, 1, 2, 2, 2, 1]
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed over metrics.csv


def test_drop_rows_from_without_a_file_does_nothing(tmp_path):
    logger = csv_logger(tmp_path / "run")
    assert logger.drop_rows_from(0) == 0
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_a_resumed_sweep_jobs_name_leaves_out_ckpt_path():
    """The W&B name of a multirun job is Hydra's override_dirname: re-running the sweep with
    ckpt_path=auto (as the preemption message advises) renamed every job's run."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmlab.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train", overrides=["optim.lr=0.001", "ckpt_path=auto"], return_hydra_config=True
        )
    GlobalHydra.instance().clear()
    assert cfg.hydra.job.override_dirname == "optim.lr=0.001"


def test_a_multirun_with_a_relative_sweep_dir_groups_by_its_absolute_folder(tmp_path, monkeypatch):
    """The W&B group of a multirun job is the last three parts of the sweep folder resolved
    against the launch folder, as lmlab.report finds it from the run folder on disk: a relative
    sweep dir of fewer than three parts gave the logger "sw3-07-57-09" and the report
    "<parent>-sw3-07-57-09", so the report's filter matched no run. Under hydra.job.chdir=true
    the job runs in its own folder: the launch folder is Hydra's runtime.cwd."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig

    from lmlab.loggers import sweep_identity, wandb_logger

    hc = SimpleNamespace(
        mode="RunMode.MULTIRUN",
        sweep=SimpleNamespace(dir="sw3/07-57-09"),
        job=SimpleNamespace(override_dirname="optim.lr=0.001"),
        runtime=SimpleNamespace(cwd=str(tmp_path)),
    )
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hc))
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "sw3" / "07-57-09" / "0").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "sw3" / "07-57-09" / "0")  # hydra.job.chdir=true
    logger = wandb_logger(save_dir=str(tmp_path / "sw3" / "07-57-09" / "0"), project="p")
    group = sweep_identity(str(tmp_path / "sw3" / "07-57-09"), "")[0]
    assert logger._wandb_init["group"] == group and group.endswith("-sw3-07-57-09")
    assert logger._wandb_init["name"] == "optim.lr=0.001"
    # a trial of a search run as a multirun job: the job's overrides, then the trial's values
    trial = wandb_logger(save_dir=str(tmp_path / "t"), project="p", trial="model.n_layers=3")
    assert trial._wandb_init["name"] == "optim.lr=0.001 model.n_layers=3"
    assert trial._wandb_init["group"] == group
    # the sweep is the group's default only: a wandb_group the user sets wins
    mine = wandb_logger(save_dir=str(tmp_path / "m"), project="p", group="mine")
    assert mine._wandb_init["group"] == "mine"


def test_one_tag_given_alone_is_one_wandb_tag(tmp_path, monkeypatch):
    """`tags=baseline` is a string, which became one tag per letter (b, a, s, e, ...)."""
    from lmlab.loggers import wandb_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    auto = ["model:decoder", "objective:clm"]
    for extra, want in (("baseline", ["baseline"]), (["a", "b", "a"], ["a", "b"]), ([], [])):
        logger = wandb_logger(save_dir=str(tmp_path), project="p", tags=auto, extra_tags=extra)
        assert logger._wandb_init["tags"] == auto + want


def test_wandb_init_gets_no_anonymous_setting_unless_one_is_set(tmp_path, monkeypatch):
    """Lightning passed anonymous=None, which wandb >= 0.19 warns at every run has no effect."""
    import wandb

    from lmlab.loggers import wandb_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    seen = []

    def init(**kwargs):
        seen.append(kwargs)
        raise KeyboardInterrupt  # what wandb.init received is all this test needs

    monkeypatch.setattr(wandb, "init", init)
    for settings, want in (({}, None), ({"anonymous": True}, "allow")):
        logger = wandb_logger(save_dir=str(tmp_path), project="p", **settings)
        with pytest.raises(KeyboardInterrupt):
            _ = logger.experiment
        assert seen[-1]["project"] == "p" and seen[-1].get("anonymous") == want
        assert ("anonymous" in seen[-1]) == (want is not None)
