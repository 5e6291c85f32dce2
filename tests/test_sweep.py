"""Hydra multirun sweeps: one folder per job and a sweep_summary.csv written as jobs finish."""

from __future__ import annotations

import csv
import json
import multiprocessing
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
        assert r["status"] == "completed"
        # wall_s: the whole job, timed like a failed job's; summary.json's (train() alone) apart
        assert float(r["wall_s"]) >= float(r["train_wall_s"]) == pytest.approx(summary["wall_s"])
        for key, value in summary.items():
            if key != "wall_s":
                assert float(r[key]) == pytest.approx(value, rel=1e-12), key


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_others_run(tmp_path):
    p = multirun(tmp_path, "data.batch_size=0,4")
    assert p.returncode != 0  # Hydra reports the failure once every job has run
    rows = {r["job"]: r for r in csv.DictReader((tmp_path / "sweep" / "sweep_summary.csv").open())}
    assert rows["0"]["status"] == "failed"
    assert "data.batch_size=0 must be a whole number >= 1" in rows["0"]["error"]
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


# --- sweep_summary.csv bookkeeping, optimized_metric, preemption ------------------------------------


def _append_many(path: str, writer: int, n: int) -> None:
    from lmlab.sweep import append_row

    for k in range(n):
        append_row(Path(path), {"job": writer * 1000 + k, "status": "completed", f"m{writer}": k})


def test_concurrent_jobs_lose_no_summary_row(tmp_path):
    """Jobs of a SLURM sweep are separate processes that finish together: every row must stay."""
    path = tmp_path / "sweep_summary.csv"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 25)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    rows = list(csv.DictReader(path.open()))
    assert [int(r["job"]) for r in rows] == sorted(
        w * 1000 + k for w in range(6) for k in range(25)
    )
    for r in rows:  # every writer's column made it into the header, each value in its own row
        w, k = divmod(int(r["job"]), 1000)
        assert r[f"m{w}"] == str(k) and all(r[f"m{o}"] == "" for o in range(6) if o != w)
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_job_run_again_replaces_its_row(tmp_path):
    from lmlab.sweep import append_row

    path = tmp_path / "s.csv"
    append_row(path, {"job": 1, "status": "preempted", "output_dir": "/s/1"})
    append_row(path, {"job": 0, "status": "completed", "output_dir": "/s/0", "val/bpb": 2})
    append_row(path, {"job": 1, "status": "completed", "output_dir": "/s/1", "val/bpb": 3})
    append_row(path, {"job": 0, "status": "completed", "output_dir": "/s/0"}, replace=False)
    append_row(path, {"job": 1, "status": "failed", "output_dir": "/other/1"})  # another folder
    rows = [
        (r["job"], r["status"], r["output_dir"], r["val/bpb"]) for r in csv.DictReader(path.open())
    ]
    assert rows == [
        ("0", "completed", "/s/0", "2"),
        ("1", "completed", "/s/1", "3"),
        ("1", "failed", "/other/1", ""),
    ]
    # a sweep moved (or renamed) and resumed: its jobs' rows were all added again
    moved = tmp_path / "sw2" / "sweep_summary.csv"
    moved.parent.mkdir()
    append_row(moved, {"job": 0, "status": "failed", "output_dir": str(tmp_path / "sw1" / "0")})
    append_row(moved, {"job": 2, "status": "failed", "output_dir": str(tmp_path / "sw1" / "x=2")})
    append_row(moved, {"job": 0, "status": "completed", "output_dir": str(moved.parent / "0")})
    append_row(moved, {"job": 2, "status": "completed", "output_dir": str(moved.parent / "x=3")})
    rows = [
        (r["job"], r["status"], Path(r["output_dir"]).name) for r in csv.DictReader(moved.open())
    ]
    assert rows == [("0", "completed", "0"), ("2", "failed", "x=2"), ("2", "completed", "x=3")]


def job_config(sweep: Path, num: int):
    from omegaconf import OmegaConf

    out = sweep / str(num)
    out.mkdir(parents=True, exist_ok=True)
    return OmegaConf.create(
        {
            "hydra": {
                "mode": "RunMode.MULTIRUN",
                "job": {"num": num},
                "runtime": {"output_dir": str(out), "cwd": str(sweep.parent)},
                "sweep": {"dir": str(sweep)},
            }
        }
    )


def test_summary_rows_time_every_job_alike_and_mark_preemptions(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus

    from lmlab.errors import Preempted
    from lmlab.sweep import SweepSummary

    cb, sweep = SweepSummary(), tmp_path / "sweep"
    for num in (0, 1):
        cb.on_job_start(job_config(sweep, num))
    (sweep / "0" / "summary.json").write_text(json.dumps({"val/bpb": 1.5, "wall_s": 1000.0}))
    done = JobReturn(overrides=["a=1"], status=JobStatus.COMPLETED)
    done.return_value = 1.5
    cb.on_job_end(job_config(sweep, 0), done)
    stopped = JobReturn(overrides=["a=2"], status=JobStatus.FAILED)
    stopped._return_value = Preempted("stopped by a preemption signal after step 3")
    cb.on_job_end(job_config(sweep, 1), stopped)
    r0, r1 = csv.DictReader((sweep / "sweep_summary.csv").open())
    # wall_s is the job's own time for both; summary.json's train() time is train_wall_s
    assert (r0["status"], r0["train_wall_s"], r0["val/bpb"]) == ("completed", "1000.0", "1.5")
    assert 0 <= float(r0["wall_s"]) < 60 and 0 <= float(r1["wall_s"]) < 60
    assert r1["status"] == "preempted" and r1["error"].startswith("Preempted: stopped by")


def test_a_skipped_finished_job_keeps_its_row_and_a_failed_rerun_replaces_it(tmp_path):
    from hydra.core.utils import JobReturn, JobStatus

    from lmlab.sweep import SweepSummary

    cb, sweep = SweepSummary(), tmp_path / "sweep"
    cb.on_job_start(job_config(sweep, 0))
    summary = sweep / "0" / "summary.json"
    summary.write_text(json.dumps({"val/bpb": 1.5, "wall_s": 1000.0}))
    done = JobReturn(overrides=["a=1"], status=JobStatus.COMPLETED)
    cb.on_job_end(job_config(sweep, 0), done)
    (first,) = csv.DictReader((sweep / "sweep_summary.csv").open())
    os.utime(summary, (summary.stat().st_mtime - 100,) * 2)  # written before the next start
    cb.on_job_start(job_config(sweep, 0))  # the resumed sweep skips it: summary.json is old
    cb.on_job_end(
        job_config(sweep, 0),
        JobReturn(overrides=["a=1", "ckpt_path=auto"], status=JobStatus.COMPLETED),
    )
    assert list(csv.DictReader((sweep / "sweep_summary.csv").open())) == [first]
    cb.on_job_start(job_config(sweep, 0))
    failed = JobReturn(overrides=["a=1"], status=JobStatus.FAILED)
    failed._return_value = RuntimeError("boom")
    cb.on_job_end(job_config(sweep, 0), failed)
    (row,) = csv.DictReader((sweep / "sweep_summary.csv").open())
    assert (row["status"], row["error"], row.get("val/bpb")) == (
        "failed",
        "RuntimeError: boom",
        None,
    )


@pytest.mark.parametrize("refusal", ["RunExists", "ResumeRefused"])
def test_a_refused_start_keeps_the_finished_jobs_row(tmp_path, refusal):
    """Re-running a sweep into its folder without ckpt_path (RunExists), or resuming it with
    settings its checkpoints do not fit (ResumeRefused: its row became 'failed' with the refused
    overrides): each job is refused and changes nothing, its completed row included."""
    from hydra.core.utils import JobReturn, JobStatus

    from lmlab import errors
    from lmlab.sweep import SweepSummary

    cb, sweep = SweepSummary(), tmp_path / "sweep"
    cb.on_job_start(job_config(sweep, 0))
    (sweep / "0" / "summary.json").write_text(json.dumps({"val/bpb": 1.5}))
    cb.on_job_end(job_config(sweep, 0), JobReturn(overrides=["a=1"], status=JobStatus.COMPLETED))
    (first,) = csv.DictReader((sweep / "sweep_summary.csv").open())
    cb.on_job_start(job_config(sweep, 0))
    refused = JobReturn(overrides=["a=2"], status=JobStatus.FAILED)
    refused._return_value = getattr(errors, refusal)("refused")
    cb.on_job_end(job_config(sweep, 0), refused)
    assert list(csv.DictReader((sweep / "sweep_summary.csv").open())) == [first]
    assert first["status"] == "completed"


def test_a_relative_sweep_dir_is_the_launch_folders_under_job_chdir(tmp_path, monkeypatch):
    """Hydra calls on_job_end before it changes back from the job's folder (hydra.job.chdir=true):
    the summary went to <job>/<sweep dir>/, one per job."""
    from hydra.core.utils import JobReturn, JobStatus

    from lmlab.sweep import SweepSummary

    config = job_config(tmp_path / "sw", 0)
    config.hydra.sweep.dir = "sw"
    config.hydra.runtime.cwd = str(tmp_path)
    monkeypatch.chdir(tmp_path / "sw" / "0")  # the job's folder
    cb = SweepSummary()
    cb.on_job_start(config)
    cb.on_job_end(config, JobReturn(overrides=["a=1"], status=JobStatus.COMPLETED))
    assert (tmp_path / "sw" / "sweep_summary.csv").is_file()
    assert not (tmp_path / "sw" / "0" / "sw").exists()


@pytest.mark.slow
def test_a_sweep_run_again_into_its_folder_is_refused_and_changes_nothing(tmp_path):
    """Hydra writes each job's .hydra files before lmlab refuses the fresh start: the jobs' own
    come back, so reports still label the runs by their values (they showed the refused ones)."""
    import yaml

    assert multirun(tmp_path, "optim.lr=1e-3,3e-3").returncode == 0
    sweep = tmp_path / "sweep"
    before = {p: p.read_text() for p in sorted(sweep.glob("*/.hydra/*.yaml"))}
    rows = (sweep / "sweep_summary.csv").read_text()
    again = multirun(tmp_path, "optim.lr=5e-2,7e-2")
    assert again.returncode != 0 and "already holds a run" in again.stderr
    assert {p: p.read_text() for p in before} == before
    assert (sweep / "sweep_summary.csv").read_text() == rows
    overrides = yaml.safe_load((sweep / "1" / ".hydra" / "overrides.yaml").read_text())
    assert "optim.lr=0.003" in overrides and "optim.lr=0.07" not in overrides


@pytest.mark.slow
def test_a_multirun_of_searches_records_a_failing_search_and_runs_the_others(tmp_path):
    p = multirun(tmp_path, "hparams_search=optuna", "hparams_search.direction=sideways", "seed=1,2")
    assert p.returncode != 0
    rows = list(csv.DictReader((tmp_path / "sweep" / "sweep_summary.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "failed"), ("1", "failed")]
    assert "hparams_search.direction='sideways'" in rows[1]["error"]


def test_metric_list_is_what_lmlab_logs():
    """sweep.METRICS is kept by hand: it must name exactly the val/ and train/ metrics that the
    model and the callbacks log (the names check_optimized_metric accepts): named in a `log`
    call, or as keys of the step metrics the model logs together (`latest_train_metrics`)."""
    from lmlab.paths import CONF_DIR
    from lmlab.sweep import AUX_METRICS, METRICS

    pkg = Path(CONF_DIR).parent / "lmlab"
    sources = [pkg / "models" / "base.py", pkg / "callbacks" / "__init__.py"]
    name = r"\"((?:val|train)/[a-z_]+)\""
    logged = {
        in_call or as_key
        for src in sources
        for in_call, as_key in re.findall(rf"\.log\(\s*{name}|{name}: ", src.read_text())
    }
    assert logged and set(METRICS) - set(AUX_METRICS) == logged


def test_aux_metrics_cover_every_objective_with_an_auxiliary_head():
    from hydra.utils import get_class

    from lmlab.data.base import WindowDataModule
    from lmlab.registry import OBJECTIVES
    from lmlab.sweep import AUX_METRICS, AUX_TASKS, HIGHER_IS_BETTER

    own = WindowDataModule.model_settings
    heads = {o for o, p in OBJECTIVES.items() if get_class(p).model_settings is not own}
    heads.remove("prefix_lm")  # its model setting is how the decoder reads prompts, not a head
    assert heads == set(AUX_TASKS)
    assert heads == {
        "sop",
        "nsp",
        "sentence_distance",
        "deshuffle",
        "discourse",
        "ir_relevance",
        "capital_word",
    }
    assert set(AUX_METRICS) == {
        f"{k}/{t}_{m}"
        for t in heads
        for k, m in (("val", "loss"), ("val", "acc"), ("train", "loss"))
    }
    assert "val/sop_acc" in HIGHER_IS_BETTER and "val/sop_loss" not in HIGHER_IS_BETTER


@pytest.mark.parametrize("name", ["val/bpbb", "loss", "lr-AdamW"])
def test_check_optimized_metric_names_the_choices(name):
    from lmlab.errors import ConfigError
    from lmlab.sweep import METRICS, check_optimized_metric

    with pytest.raises(ConfigError, match=rf"optimized_metric='{name}' is not .*val/loss, val/ppl"):
        check_optimized_metric(name)
    for ok in METRICS:
        check_optimized_metric(ok)
    check_optimized_metric(None)  # nothing to optimise: a plain run


def test_a_misspelt_optimized_metric_is_refused_before_training(tmp_path):
    p = multirun(tmp_path, "optimized_metric=val/bpbb", "model.n_layers=1,2")
    assert p.returncode != 0
    rows = list(csv.DictReader((tmp_path / "sweep" / "sweep_summary.csv").open()))
    assert [r["status"] for r in rows] == ["failed", "failed"]
    for r in rows:
        assert "optimized_metric='val/bpbb' is not a metric lmlab reports" in r["error"]
        assert "val/bpb" in r["error"].split("use one of")[1]
        assert not (Path(r["output_dir"]) / "tokenizer.json").exists()  # no work was done
    env = dict(os.environ, LMLAB_CACHE=str(tmp_path / "cache"))
    single = subprocess.run(
        [sys.executable, "-m", "lmlab", "optimized_metric=val/bpbb", f"hydra.run.dir={tmp_path}/r"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 2 and "Traceback" not in single.stdout + single.stderr
    assert "optimized_metric='val/bpbb' is not a metric" in single.stdout + single.stderr
    assert not (tmp_path / "r" / "tokenizer.json").exists()


SIGNAL_ONCE = """
import os, signal
import lightning as L


class SignalOnce(L.Callback):
    \"\"\"SIGTERM to this process at the start of global step `step`, once (marker file).\"\"\"

    def __init__(self, step, marker):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGTERM)
"""


@pytest.mark.slow  # three tiny trainings, about 40 s on 2 cores
def test_a_preemption_stops_the_sweep_and_ckpt_path_auto_resumes_it(tmp_path):
    (tmp_path / "sigcb.py").write_text(SIGNAL_ONCE)
    signal = [  # job 1 is signalled at step 3 (the others' steps are never reached), once
        "+callbacks.sig._target_=sigcb.SignalOnce",
        "+callbacks.sig.step=98,3,99",
        f"+callbacks.sig.marker={tmp_path / 'signalled'}",
    ]
    sweep = tmp_path / "sweep"
    p = multirun(tmp_path, *signal)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (sweep / "2").exists()  # the sweep stopped: no job started after the preemption
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()
    assert not (sweep / "1" / "summary.json").exists()
    before = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [(r["job"], r["status"]) for r in before] == [("0", "completed"), ("1", "preempted")]
    assert before[1]["error"].startswith("Preempted: stopped by a preemption signal after step 4")
    assert f"ckpt_path=auto hydra.sweep.dir={sweep}" in p.stdout + p.stderr
    summary0 = (sweep / "0" / "summary.json").read_bytes()

    p = multirun(tmp_path, *signal, "ckpt_path=auto")  # the same command, resumed
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [(str(n), "completed") for n in range(3)]
    assert rows[0] == {k: before[0].get(k, "") for k in rows[0]}  # job 0 was skipped
    assert (sweep / "0" / "summary.json").read_bytes() == summary0
    for n in (1, 2):
        summary = json.loads((sweep / str(n) / "summary.json").read_text())
        assert (
            summary["trainer/global_step"] == 6 and float(rows[n]["val/bpb"]) == summary["val/bpb"]
        )
    assert "Restoring states from the checkpoint" in (sweep / "1" / "__main__.log").read_text()
