"""Hydra multirun sweeps: one folder per job and a sweep_summary.csv written as jobs finish."""

from __future__ import annotations

import csv
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import TINY, make_text


def multirun(
    tmp_path, *overrides: str, sweep_dir: str | None = None, **env: str
) -> subprocess.CompletedProcess:
    """A tiny multirun into ``sweep_dir`` (default ``<tmp_path>/sweep``; "" = conf/hydra's own)."""
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text(make_text(600, i))
    env = dict(os.environ, LMLAB_CACHE=str(tmp_path / "cache"), WANDB_MODE="offline", **env)
    sweep_dir = str(tmp_path / "sweep") if sweep_dir is None else sweep_dir
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lmlab",
            "-m",
            "data=files",
            "data.train=d*.txt",
            *TINY,
            "callbacks.samples=null",
            *([f"hydra.sweep.dir={sweep_dir}"] if sweep_dir else []),
            *overrides,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_two_by_two_sweep_writes_four_runs_and_the_summary(tmp_path):
    p = multirun(tmp_path, "optim.lr=1e-3,3e-3", "model.n_layers=1,2")
    assert p.returncode == 0, p.stderr[-3000:]
    sweep = tmp_path / "sweep"
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]

    def swept(r):  # the job's overrides, the last one of each key winning, as Hydra applies them
        kv = dict(o.split("=", 1) for o in r["overrides"].split())
        return float(kv["optim.lr"]), int(kv["model.n_layers"])

    assert sorted(swept(r) for r in rows) == [(1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)]
    for r in rows:
        job_dir = sweep / r["job"]
        assert (job_dir / "checkpoints" / "last.ckpt").is_file() and (
            job_dir / "metrics.csv"
        ).is_file()
        summary = json.loads((job_dir / "summary.json").read_text())
        assert r["status"] == "completed" and float(r["wall_s"]) > 0
        for key, value in summary.items():
            assert float(r[key]) == pytest.approx(value, rel=1e-12), key


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_others_run(tmp_path):
    p = multirun(tmp_path, "data.batch_size=0,4")
    assert p.returncode != 0  # Hydra reports the failure once every job has run
    rows = {r["job"]: r for r in csv.DictReader((tmp_path / "sweep" / "sweep_summary.csv").open())}
    assert rows["0"]["status"] == "failed"
    assert "data.batch_size must be >= 1" in rows["0"]["error"]
    assert rows["1"]["status"] == "completed" and float(rows["1"]["val/loss"]) > 0
    assert (tmp_path / "sweep" / "1" / "summary.json").is_file()


@pytest.mark.slow
def test_multi_process_jobs_are_refused_up_front_by_the_in_process_launcher(tmp_path):
    p = multirun(tmp_path, "trainer=ddp_sim,cpu")
    assert p.returncode != 0
    rows = {r["job"]: r for r in csv.DictReader((tmp_path / "sweep" / "sweep_summary.csv").open())}
    assert rows["0"]["status"] == "failed"
    assert "hydra/launcher=slurm" in rows["0"]["error"]
    assert "re-run the whole sweep" in rows["0"]["error"]
    # Refused before any work: no tokenizer, store or checkpoint in the job's folder.
    assert not (tmp_path / "sweep" / "0" / "tokenizer.json").exists()
    assert rows["1"]["status"] == "completed"  # one-process jobs of the same sweep run


def test_slurm_launcher_preset_is_sized_from_the_trainer(compose_cfg):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmlab.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "hydra/launcher=slurm",
                "trainer=ddp",
                "trainer.devices=8",
                "trainer.num_nodes=2",
                "hydra.launcher.partition=gpu",
            ],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.startswith("hydra_plugins.hydra_submitit_launcher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.partition == "gpu" and launcher.max_num_timeout > 0
    assert launcher.signal_delay_s == 120  # submitit's USR2, which Preemption hands over


def test_a_requeued_slurm_job_resumes_its_folder(tmp_path, monkeypatch):
    """submitit requeues a job with the same overrides into the same folder (Hydra keeps the sweep's
    resolved launch time in the pickled config); without a ckpt_path it continues from last.ckpt."""
    from lmlab.train import resolve_ckpt_path

    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert resolve_ckpt_path(None, tmp_path) is None  # a first start
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resolve_ckpt_path(None, tmp_path) == str(last)
    last.unlink()
    assert resolve_ckpt_path(None, tmp_path) is None  # requeued before its first checkpoint


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (``run-<id>.wandb``).

    wandb >= 0.2x writes it from its Go core and no longer ships a Python reader
    (``wandb.sdk.internal.datastore``); the format is LevelDB's log: a 7-byte header (":W&B", 0xBEE1,
    version 0), then 32 KiB blocks of chunks, each ``crc32 (4) | length (2, LE) | type (1)`` + data,
    type 1 = a whole record, 2/3/4 = its first / middle / last piece."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", f"unknown W&B run file format: {data[:7]!r}"
    block, pos, pieces, records = 32768, 7, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or kind == 0:  # a block's zero padding
            pos += left
            continue
        pieces.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(pieces))
            records.append(record)
            pieces = []
    return records


@pytest.mark.slow  # about 20 s on 2 cores
def test_offline_wandb_runs_of_one_sweep_share_the_group_and_the_resolved_config(tmp_path):
    from lmlab.loggers import sweep_identity
    from lmlab.report import collect_runs, wandb_group

    # conf/hydra's default sweep folder (multirun/<date>/<time>, under LMLAB_ROOT): the group must be
    # fixed at launch although ${now:...} is resolved in every job
    p = multirun(
        tmp_path,
        "logger=wandb",
        "model.n_layers=1,2",
        sweep_dir="",
        LMLAB_ROOT=str(tmp_path),
        WANDB_DIR=str(tmp_path / "wandb"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    group = sweep_identity(str(sweep), "")[0]
    assert re.fullmatch(r"multirun-\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d", group)
    runs = {}
    for job in ("0", "1"):
        (run_file,) = (sweep / job / "wandb").glob("offline-run-*/run-*.wandb")
        records = wandb_records(run_file)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        config = {  # every config update, in order: lmlab's flat resolved config, then Lightning's
            u.key: json.loads(u.value_json)
            for r in records
            if r.WhichOneof("record_type") == "config"
            for u in r.config.update
        }
        runs[job] = (run, config)
        hydra_job = yaml.safe_load((sweep / job / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert run.run_group == group
        assert run.run_id == (sweep / job / "wandb_run_id").read_text().strip()
        assert run.display_name == hydra_job["job"]["override_dirname"]  # the job's overrides
        assert f"model.n_layers={int(job) + 1}" in run.display_name.split(",")
        assert run.project == "lmlab"
        assert set(run.tags) >= {"model:decoder", "objective:clm", "data:files", "tokenizer:bpe"}
        assert config["model.n_layers"] == int(job) + 1  # flat keys, resolved values
        assert config["seq_len"] == 32 and config["data.batch_size"] == 4
        assert config["optim.warmup_steps"] == 2 and config["trainer.max_steps"] == 6
        assert config["paths.output_dir"] == str(sweep / job)  # ${hydra:runtime.output_dir}
        assert config["logger.wandb.group"] is None and config["wandb_group"] is None
        assert not [k for k, v in config.items() if "${" in json.dumps(v)]  # nothing unresolved
        assert wandb_group(sweep / job) == group  # what lmlab.report looks for on W&B
    assert runs["0"][0].display_name != runs["1"][0].display_name
    assert runs["0"][0].run_id != runs["1"][0].run_id
    assert {r.name for r in collect_runs(sweep)} == {"model.n_layers=1", "model.n_layers=2"}
