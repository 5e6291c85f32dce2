"""Preemption, safe checkpoints, non-finite losses, concurrent caches, refused resumes."""

from __future__ import annotations

import csv
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import lmlab.models.base as base_mod
from lmlab.callbacks import Preemption
from lmlab.checkpoint import read_checkpoint
from lmlab.checkpoint_io import AtomicCheckpointIO
from lmlab.data.store import TokenStore, build_store
from lmlab.data.tokenizers import byte_tokenizer
from lmlab.errors import ConfigError, NonFiniteLoss, Preempted, ResumeRefused
from lmlab.parallel import cpu_fsdp_supported
from lmlab.train import train

from .conftest import TINY, make_text


def losses_by_step(path: Path) -> dict[int, float]:
    """train/loss per step; a step logged twice (killed run, then resumed) keeps its last value."""
    out = {}
    for row in csv.DictReader(path.open()):
        if row.get("train/loss"):
            out[int(row["step"])] = float(row["train/loss"])
    return out


# -- SIGTERM ----------------------------------------------------------------------------------------
class PauseUntilSignal(L.Callback):
    """Before step ``step`` (or with ``validation``, before the first batch of the validation
    after ``step`` steps): writes its process id to ``marker`` and waits until the run's
    ``Preemption`` callback has recorded a signal, so the signal lands at a known point however
    fast or loaded the machine is. With ``rank``, only that process pauses."""

    def __init__(
        self, step: int, marker: str, rank: int | None = None, validation: bool = False
    ) -> None:
        self.step, self.marker, self.rank, self.validation = step, Path(marker), rank, validation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.validation:
            self._pause(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.validation and batch_idx == 0 and not trainer.sanity_checking:
            self._pause(trainer)

    def _pause(self, trainer) -> None:
        if trainer.global_step != self.step or self.rank not in (None, trainer.global_rank):
            return
        (preemption,) = (c for c in trainer.callbacks if isinstance(c, Preemption))
        self.marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while preemption.requested is None and time.monotonic() < deadline:
            time.sleep(0.02)


def sigterm_run(
    tmp_path,
    *overrides: str,
    pause_rank: int | None = None,
    steps: int = 40,
    validation: bool = False,
):
    """A ``python -m lmlab`` run of ``steps`` steps (TINY, 3 files) that gets SIGTERM before step 5
    (with ``validation``: during the validation after step 5, one every 5 steps) in the process of
    ``pause_rank`` (the only one when None); then the same run resumed, and an uninterrupted
    reference. Returns the stopped run's output, the step of the checkpoint it left, and the losses
    by step of the resumed run and of the reference."""
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text(make_text(600, i))
    common = [
        *TINY,
        "data=files",
        "data.train=d*.txt",
        "trainer.precision=32-true",
        "logger.csv.flush_logs_every_n_steps=1",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={5 if validation else steps}",
        "callbacks.samples=null",
        *overrides,
    ]
    root = str(Path(__file__).resolve().parents[1])  # so the run can import PauseUntilSignal
    env = dict(
        os.environ,
        LMLAB_CACHE=str(tmp_path / "cache"),
        WANDB_MODE="offline",
        PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
    )

    def start(run: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "lmlab", *common, f"hydra.run.dir={tmp_path / run}", *extra],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    marker = tmp_path / "paused"
    p = start(
        "stopped",
        f"+callbacks.pause._target_={__name__}.PauseUntilSignal",
        "+callbacks.pause.step=5",
        f"+callbacks.pause.marker={marker}",
        f"+callbacks.pause.rank={'null' if pause_rank is None else pause_rank}",
        f"+callbacks.pause.validation={validation}",
    )
    deadline = time.time() + 240
    while not (marker.is_file() and marker.read_text()) and p.poll() is None:
        assert time.time() < deadline, "the run never reached step 5"
        time.sleep(0.05)
    os.kill(int(marker.read_text()), signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    saved_step = read_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.ckpt")["global_step"]
    metrics = tmp_path / "stopped" / "metrics.csv"
    # steps 0..5 logged (0..4 when stopped in the validation after 5 steps), none after the save
    assert max(losses_by_step(metrics)) == saved_step - 1
    resumed = start("stopped", "ckpt_path=last")
    reference = start("reference")
    for q in (resumed, reference):
        q_out, _ = q.communicate(timeout=300)
        assert q.returncode == 0, q_out[-3000:]
    return (
        out,
        saved_step,
        losses_by_step(metrics),
        losses_by_step(tmp_path / "reference" / "metrics.csv"),
    )


def test_sigterm_saves_a_fresh_checkpoint_exits_cleanly_and_resumes(tmp_path):
    out, saved_step, got, want = sigterm_run(tmp_path)
    assert "stopped by a preemption signal after step 6" in out
    # a fresh checkpoint: saved at the end of the step the signal interrupted (none was due before)
    assert saved_step == 6
    assert sorted(got) == sorted(want) == list(range(40))
    # same process layout, fp32 on CPU: the resumed steps repeat the uninterrupted run exactly
    assert [got[s] for s in range(40)] == [want[s] for s in range(40)]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_and_resumes(tmp_path):
    """A signal that reaches one rank only (a preempted node; here rank 1, the process Lightning
    started) stops every rank after the same step, with one checkpoint, and the resumed run repeats
    the uninterrupted one: each rank skips the windows of its shard it had trained on. Lightning's
    own handler ends this in mismatched collectives and no checkpoint."""
    out, saved_step, got, want = sigterm_run(tmp_path, "trainer=ddp_sim", pause_rank=1, steps=24)
    assert out.count("stopped by a preemption signal after step 6") == 2, out[-3000:]
    assert "SIGTERM: saved" in out and "another process's signal: saved" in out
    assert saved_step == 6
    assert sorted(got) == sorted(want) == list(range(24))
    assert [got[s] for s in range(24)] == [want[s] for s in range(24)]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_during_a_validation_saves_its_step_and_stops_before_the_next(tmp_path, processes):
    """A signal that lands in the validation after step 5 (with two processes: in rank 1's) saves
    step 5 during that validation, lets it finish and stops without training step 6; the resumed
    run repeats the uninterrupted one."""
    ddp = ["trainer=ddp_sim"] if processes == 2 else []
    out, saved_step, got, want = sigterm_run(
        tmp_path, *ddp, pause_rank=processes - 1, steps=12, validation=True
    )
    assert out.count("stopped by a preemption signal after step 5") == processes, out[-3000:]
    assert saved_step == 5
    stopped, reference = (
        [float(r["val/loss"]) for r in csv.DictReader(path.open()) if r.get("val/loss")]
        for path in (tmp_path / "stopped" / "metrics.csv", tmp_path / "reference" / "metrics.csv")
    )
    assert stopped[0] == reference[0]  # the interrupted validation was finished and logged
    assert sorted(got) == sorted(want) == list(range(12))
    assert [got[s] for s in range(12)] == [want[s] for s in range(12)]


def test_stop_vote_answers_with_the_vote_lag_calls_earlier():
    from lmlab.callbacks import StopVote

    late = StopVote(torch.device("cpu"), lag=2)  # as on a GPU: read two steps after it was cast
    assert [late(f) for f in (False, True, False, False, False)] == [
        False,
        False,
        False,
        True,
        False,
    ]
    now = StopVote(torch.device("cpu"))  # on a CPU the collective runs on the host: no lag
    assert now.lag == 0 and [now(False), now(True), now(False)] == [False, True, False]


def test_the_private_lightning_names_lmlab_relies_on_are_there():
    """lmlab reaches into Lightning where it has no public way (lmlab.callbacks: the preemption
    vote, the accumulation boundary, logging steps; lmlab.train: the step counter of a final
    validation): a Lightning release that renames one fails here, by name, rather than deep in a
    run."""
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    epoch_loop = trainer.fit_loop.epoch_loop
    assert isinstance(type(trainer._logger_connector).should_update_logs, property)
    assert isinstance(trainer._signal_connector.received_sigterm, bool)
    assert callable(epoch_loop._should_accumulate)
    assert isinstance(epoch_loop._batches_that_stepped, int)
    from lightning.pytorch.callbacks import ModelCheckpoint  # lmlab.train.keep_best

    assert callable(ModelCheckpoint._save_topk_checkpoint)
    assert callable(ModelCheckpoint._save_last_checkpoint)
    assert callable(ModelCheckpoint._monitor_candidates)
    assert ModelCheckpoint()._last_global_step_saved == 0  # lmlab.callbacks.last_saved_at_step
    # lmlab.callbacks.PeriodicCheckpoint / validation_follows
    assert ModelCheckpoint()._defer_save_until_validation is False
    assert epoch_loop._skip_next_val is False and callable(epoch_loop._should_check_val_fx)
    assert hasattr(trainer.fit_loop, "_data_fetcher")
    from lightning.pytorch.loggers import TensorBoardLogger  # lmlab.train.purge_tensorboard

    board = TensorBoardLogger("unused", purge_step=None)
    assert board._experiment is None and board._kwargs == {"purge_step": None}


def test_preemption_switches_off_lightnings_per_step_sigterm_broadcast_for_the_run():
    """With several processes, Lightning's epoch loop broadcasts a SIGTERM flag and reads it back at
    every step (a wait for the device); the vote replaces it during training, and the loop gets its
    own method back afterwards."""
    from types import SimpleNamespace

    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    assert hasattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor")  # what is switched off

    class Loop:
        calls = 0

        def _broadcast_sigterm_tensor(self):
            Loop.calls += 1

    loop = Loop()
    trainer = SimpleNamespace(
        world_size=2,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        fit_loop=SimpleNamespace(epoch_loop=loop),
        received_sigterm=False,
    )
    callback = Preemption("unused")
    before = signal.getsignal(signal.SIGTERM)
    callback.on_train_start(trainer, None)
    try:
        loop._broadcast_sigterm_tensor()
        assert Loop.calls == 0 and callback._vote is not None
        assert signal.getsignal(signal.SIGTERM) == callback._request
    finally:
        callback.on_train_end(trainer, None)
    loop._broadcast_sigterm_tensor()
    assert Loop.calls == 1 and signal.getsignal(signal.SIGTERM) is before


def test_preempted_is_raised_by_train_and_names_the_resume_command(tiny_cfg, monkeypatch):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def sigterm_at_step_2(self, batch, batch_idx):
        if self.global_step == 2:
            self.trainer._signal_connector.received_sigterm = True
        return original(self, batch, batch_idx)

    original = base_mod.LMModule.training_step
    monkeypatch.setattr(base_mod.LMModule, "training_step", sigterm_at_step_2)
    cfg = tiny_cfg()
    with pytest.raises(Preempted, match=r"signal after step 3; .*ckpt_path=last"):
        train(cfg)
    ckpt = read_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert SIGTERMException  # the exception Lightning raises, turned into Preempted


# -- safe checkpoints -------------------------------------------------------------------------------
def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    import lightning.fabric.plugins.io.torch_io as torch_io

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def dies_half_way(checkpoint, filepath):
        Path(filepath).write_bytes(b"PK\x03\x04 half a zip")  # what a kill mid-write leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(torch_io, "_atomic_save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path)["global_step"] == 1  # the previous checkpoint is intact
    assert list(tmp_path.iterdir()) == [path]  # and no temporary file is left behind


def test_a_broken_sharded_folder_and_its_metadata_file_are_clear_errors(tmp_path):
    """torch's CheckpointException is a BaseException: it went past every handler as a traceback.
    The folder's meta.pt alone holds no weights: the message points at the folder."""
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    torch.save({"lmlab": {}, "global_step": 3}, folder / "meta.pt")
    (folder / ".metadata").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match=r"last\.ckpt is not a readable PyTorch checkpoint"):
        read_checkpoint(folder)
    assert read_checkpoint(folder, weights=False)["global_step"] == 3
    with pytest.raises(ConfigError, match=r"no weights .*; pass the sharded folder .*last\.ckpt$"):
        read_checkpoint(folder / "meta.pt")


def test_consolidate_into_a_folder_writes_the_file_inside_it(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    from lmlab.checkpoint import consolidate

    folder = (
        tmp_path / "last.ckpt"
    )  # a sharded checkpoint as Lightning writes one: shards + meta.pt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no_dist's deprecation
        dcp.save(
            {"state_dict": {"w": torch.ones(2)}},
            storage_writer=dcp.FileSystemWriter(folder),
            no_dist=True,
        )
    torch.save({"lmlab": {}}, folder / "meta.pt")
    before = [p.name for p in folder.iterdir()]
    (tmp_path / "out").mkdir()
    written = consolidate(folder, tmp_path / "out")
    assert written == tmp_path / "out" / "last.ckpt.consolidated.ckpt"
    assert torch.equal(read_checkpoint(written)["state_dict"]["w"], torch.ones(2))
    with pytest.raises(ConfigError, match=r"missing does not exist; create it"):
        consolidate(folder, tmp_path / "missing" / "x.ckpt")
    for inside in (folder, folder / "x.ckpt"):
        with pytest.raises(ConfigError, match=r"is inside the sharded checkpoint it would be made"):
            consolidate(folder, inside)
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)  # nothing written there


def test_checkpoint_data_reaches_the_disk_before_its_rename_and_stale_temporaries_go(
    tmp_path, monkeypatch
):
    """A machine crash after the rename must not leave a path whose data was still in memory: the
    temporary file is synced, then renamed, then its folder synced. A temporary file a killed save
    left (another process id) goes at the next save of the same path."""
    import lmlab.checkpoint_io as checkpoint_io

    path = tmp_path / "last.ckpt"
    stale = tmp_path / ".last.ckpt.tmp99999999"
    stale.write_bytes(b"PK\x03\x04 a killed save's")
    other = tmp_path / ".best.ckpt.tmp99999999"  # another target's: not this save's business
    other.write_bytes(b"x")
    (tmp_path / ".last.ckpt.tmp").mkdir()  # a killed sharded save's folder: lmlab.parallel's
    events = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        fsync(fd)

    def record_replace(src, dst):
        events.append(("replace", Path(src).name, Path(dst).name))
        replace(src, dst)

    monkeypatch.setattr(checkpoint_io.os, "fsync", record_fsync)
    monkeypatch.setattr(checkpoint_io.os, "replace", record_replace)
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)
    tmp = f".last.ckpt.tmp{os.getpid()}"
    assert events == [("fsync", tmp), ("replace", tmp, "last.ckpt"), ("fsync", tmp_path.name)]
    assert torch.load(path)["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".best.ckpt.tmp99999999",
        ".last.ckpt.tmp",
        "last.ckpt",
    ]


def test_truncated_or_foreign_checkpoint_as_ckpt_path(tiny_cfg, tmp_path, monkeypatch):
    """Refused before any data work (a cold cache trains the BPE first)."""
    import lmlab.train

    def no_data_work(cfg):
        raise AssertionError("data work before the checkpoint was read")

    monkeypatch.setattr(lmlab.train, "prepare_data", no_data_work)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ResumeRefused, match="not a readable PyTorch checkpoint"):  # a sweep's row
        train(tiny_cfg(f"ckpt_path={bad}"))
    text = tmp_path / "tokenizer.json"  # a run folder's other files (pickle's own error)
    text.write_text('{"version": "1.0"}')
    with pytest.raises(ConfigError, match=r"not a readable PyTorch checkpoint .*UnpicklingError"):
        read_checkpoint(text)
    torch.save({"model": 1}, bad)
    with pytest.raises(ResumeRefused, match="not an lmlab checkpoint"):
        train(tiny_cfg(f"ckpt_path={bad}"))


def test_resume_refuses_another_tokenizer_or_model_shape(tiny_cfg, tmp_path):
    """Refused, and the run's tokenizer.json stays its own (the refusal tells the user to resume
    with it; it was overwritten by the refused attempt's tokenizer)."""
    out = tmp_path / "run"
    train(tiny_cfg(output_dir=out))
    saved = (out / "tokenizer.json").read_bytes()
    with pytest.raises(ConfigError, match=r"model\.n_layers is 2 in the checkpoint but 3 now"):
        train(tiny_cfg("ckpt_path=last", "model.n_layers=3", output_dir=out))
    with pytest.raises(ResumeRefused, match="different tokenizer"):  # a sweep keeps its row
        train(tiny_cfg("ckpt_path=last", "tokenizer=byte", output_dir=out))
    assert (out / "tokenizer.json").read_bytes() == saved
    # the advice of the message works
    train(
        tiny_cfg(
            "ckpt_path=last",
            "tokenizer=pretrained",
            f"tokenizer.path={out / 'tokenizer.json'}",
            "trainer.max_steps=7",
            output_dir=out,
        )
    )


def test_a_fresh_start_where_a_run_has_a_checkpoint_is_refused_and_keeps_it(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(output_dir=out))
    last = out / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a run .*ckpt_path=last \(or auto\)"):
        train(tiny_cfg(output_dir=out))
    assert last.read_bytes() == before


def test_a_fresh_start_after_an_attempt_without_checkpoint_logs_anew(tiny_cfg, tmp_path):
    """An attempt that ended before its first checkpoint (a job re-run with ckpt_path=auto starts
    fresh in its folder): its metrics.csv rows, W&B run id and TensorBoard events are not this
    run's (the rows were appended to and the W&B run continued, mixing two attempts' curves)."""
    from lmlab.loggers import RUN_ID_FILE

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("epoch,step,train/loss\n0,0,9.5\n0,1,9.4\n0,2,9.3\n")
    (out / RUN_ID_FILE).write_text("0ld1d000\n")
    (out / "tensorboard").mkdir()
    attempt = out / "tensorboard" / "events.out.tfevents.1.host.1.0"
    attempt.write_bytes(b"an attempt's curves")
    train(tiny_cfg(output_dir=out))
    assert not attempt.exists()  # TensorBoard showed both attempts' curves as one run's
    with (out / "metrics.csv").open(newline="") as f:
        losses = [(int(r["step"]), r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]
    assert [s for s, _ in losses] == list(range(6))  # this run's steps, once each
    assert all(loss not in ("9.5", "9.4", "9.3") for _, loss in losses)
    assert not (out / RUN_ID_FILE).exists() or (out / RUN_ID_FILE).read_text() != "0ld1d000\n"


def test_the_final_validation_competes_for_the_best_checkpoint(tiny_cfg, tmp_path):
    """A last step that is not a validation step is validated after fit (trainer.validate), where
    ModelCheckpoint does nothing: best.ckpt stayed at the earlier validation however much better
    the final one was."""
    out = tmp_path / "run"
    metrics, _ = train(
        tiny_cfg("trainer.max_steps=8", "trainer.val_check_interval=3", output_dir=out)
    )
    with (out / "metrics.csv").open(newline="") as f:
        val = {int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(f) if r["val/loss"]}
    assert sorted(val) == [2, 5, 7]  # validations after steps 3 and 6 in fit, 8 after it
    best_step = {2: 3, 5: 6, 7: 8}[min(val, key=val.get)]
    assert best_step == 8  # the tiny model still learns: the last validation is the best
    assert read_checkpoint(out / "checkpoints" / "best.ckpt")["global_step"] == best_step
    assert metrics["val/loss"] == pytest.approx(val[7])


@pytest.mark.parametrize(
    ("dropped", "steps", "interval", "best"),
    [
        # ModelCheckpoint gone: the final step was validated but nobody wrote last.ckpt there
        ("callbacks.model_checkpoint=null", 5, 5, None),
        # PeriodicCheckpoint gone: the final validation after fit wrote best.ckpt, not last.ckpt
        ("callbacks.last_checkpoint=null", 5, 2, 5),
    ],
)
def test_last_ckpt_holds_the_final_step_whichever_checkpoint_callback_is_dropped(
    tiny_cfg, tmp_path, dropped, steps, interval, best
):
    out = tmp_path / "run"
    common = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={interval}"]
    if "last_checkpoint" not in dropped:
        common.append("callbacks.last_checkpoint.every_n_train_steps=2")  # saves at 2 and 4
    train(tiny_cfg(dropped, *common, output_dir=out))
    folder = out / "checkpoints"
    assert read_checkpoint(folder / "last.ckpt", weights=False)["global_step"] == steps
    if best is not None:
        assert read_checkpoint(folder / "best.ckpt", weights=False)["global_step"] == best


def test_a_run_without_validations_keeps_its_final_steps_last_ckpt(tiny_cfg, tmp_path):
    """No validation in fit: the periodic save at the final step stays last.ckpt. Lightning's
    best-checkpoint callback, which had saved nothing, replaced it at the end of training with a
    save made after the epoch was closed (one epoch ahead, its target count gone): a run resumed
    from it skipped the rest of the data epoch."""
    out = tmp_path / "run"
    common = ["trainer.val_check_interval=100", "callbacks.last_checkpoint.every_n_train_steps=2"]
    train(tiny_cfg(*common, "trainer.max_steps=4", output_dir=out))
    ckpt = read_checkpoint(out / "checkpoints" / "last.ckpt", weights=False)
    assert (ckpt["global_step"], ckpt["epoch"]) == (4, 0)
    assert ckpt["lmlab_counters"]["epoch_targets"][0] == 0
    loader = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader["epoch"], loader["windows"]) == (0, 16)  # 4 steps x 4 windows, epoch 0 goes on


def test_a_resumed_run_saves_nothing_inside_its_first_optimizer_step(
    tiny_cfg, tmp_path, monkeypatch
):
    """With gradient accumulation, the periodic save due at the resumed step (every_n_train_steps
    divides it) fell at the step's first micro-batch: Lightning's record of the last save is not
    in the checkpoint. That checkpoint's loader counted a micro-batch whose gradient it lacked."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = tmp_path / "run"
    common = [
        "trainer.accumulate_grad_batches=2",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "trainer.val_check_interval=100",
        "optim.warmup_steps=0",
    ]
    train(tiny_cfg(*common, "trainer.max_steps=2", output_dir=out))
    saves = []
    original = ModelCheckpoint._save_checkpoint

    def spy(self, trainer, filepath):
        loop = trainer.fit_loop.epoch_loop
        saves.append((trainer.global_step, loop._should_accumulate()))
        original(self, trainer, filepath)

    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", spy)
    train(tiny_cfg(*common, "trainer.max_steps=4", "ckpt_path=last", output_dir=out))
    assert saves and set(saves) == {(4, False)}  # last.ckpt at 4, best.ckpt after fit


def test_tensorboard_of_a_resumed_run_shows_each_step_once(tiny_cfg, tmp_path):
    """A run resumed from an earlier checkpoint (a crash after it) logs its steps again: TensorBoard
    showed the attempt's points and the resumed run's at the same steps, as one curve."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    common = ["logger=tensorboard", "callbacks.last_checkpoint.every_n_train_steps=3"]
    train(tiny_cfg(*common, "trainer.max_steps=3", output_dir=out))
    at_3 = tmp_path / "step3.ckpt"
    shutil.copy(out / "checkpoints" / "last.ckpt", at_3)
    train(tiny_cfg(*common, "ckpt_path=last", "trainer.max_steps=6", output_dir=out))
    train(tiny_cfg(*common, f"ckpt_path={at_3}", "trainer.max_steps=6", output_dir=out))
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert sorted(steps) == list(range(6))


def test_resume_applies_changed_optim_settings(tiny_cfg, tmp_path):
    """Resuming with another optim.lr / weight_decay / length: the resumed steps follow the new
    settings from their first step, at the schedule's position in the checkpoint (Lightning loads
    the checkpoint's optimizer and scheduler state over the configured ones: the old learning
    rate and weight decay went on)."""
    import csv

    from lmlab.models.base import lr_lambda

    out = tmp_path / "run"
    train(tiny_cfg(output_dir=out))  # 6 steps, warmup 2
    new = ("optim.lr=1e-4", "optim.weight_decay=0", "trainer.max_steps=10")
    _, objects = train(tiny_cfg("ckpt_path=last", *new, output_dir=out))
    optimizer = objects["trainer"].optimizers[0]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0]
    with (out / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["lr-AdamW/pg1"]]  # pg2: gains, biases (same lr)
        lrs = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in rows}
    min_ratio = objects["model"].optim_cfg.get("min_lr_ratio", 0.1)
    for step in range(6, 10):
        assert lrs[step] == pytest.approx(1e-4 * lr_lambda(step, 2, 10, min_ratio), rel=1e-6), step


def test_resume_accepts_other_runtime_settings_and_checkpoints_from_before_compile_scope(
    tiny_cfg, tmp_path
):
    """How the model is executed may change between a run and its resumption (RUNTIME_SETTINGS);
    a checkpoint saved before a runtime setting existed (here compile_scope) resumes too."""
    out = tmp_path / "run"
    train(tiny_cfg(output_dir=out))
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    del ckpt["hyper_parameters"]["compile_scope"]
    torch.save(ckpt, last)
    changed = ("compile_scope=blocks", "activation_checkpointing=true", "loss_chunk_size=0")
    metrics, _ = train(tiny_cfg("ckpt_path=last", "trainer.max_steps=12", *changed, output_dir=out))
    assert metrics["trainer/global_step"] == 12
    assert read_checkpoint(last)["global_step"] == 12


def test_resume_and_evaluate_check_the_held_out_documents(tiny_cfg, tmp_path, caplog):
    """Checkpoints record which documents were held out. Resuming with data settings that hold
    out others is refused (it would validate on other text, and could train on what it validated
    on); evaluating the run's data when they differ, or a checkpoint from before the record,
    warns."""
    import logging

    from omegaconf import open_dict

    from lmlab.evaluate import evaluate

    from .conftest import command_cfg

    out = tmp_path / "run"
    byte = ["tokenizer=byte"]  # the same tokenizer whatever the split: the documents decide
    train(tiny_cfg(*byte, output_dir=out))
    with pytest.raises(ConfigError, match="held out other validation documents"):
        train(tiny_cfg(*byte, "ckpt_path=last", "data.val_fraction=0.6", output_dir=out))
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    del ckpt["lmlab"]["val_docs"]  # as written before the record
    torch.save(ckpt, last)
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        train(tiny_cfg(*byte, "ckpt_path=last", "trainer.max_steps=7", output_dir=out))
    assert "does not record its validation documents" in caplog.text
    caplog.clear()
    ecfg = command_cfg("evaluate", ckpt_path=last, device="cpu", limit_batches=1)
    with open_dict(ecfg):
        ecfg.paths.cache_dir = str(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        evaluate(ecfg)  # the resumed run's checkpoint records them again: no warning
    assert "validation documents" not in caplog.text and "not the ones" not in caplog.text


# -- non-finite losses ------------------------------------------------------------------------------
@pytest.fixture
def nan_at_step_4(monkeypatch):
    original = base_mod.LMModule.nll

    def nll(self, batch):
        out = original(self, batch)
        if self.training and self.global_step == 4:
            return (out[0] * float("nan"), *out[1:])
        return out

    monkeypatch.setattr(base_mod.LMModule, "nll", nll)


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_cfg, nan_at_step_4):
    cfg = tiny_cfg()
    with pytest.raises(NonFiniteLoss, match=r"training loss is nan at step 4: stopping"):
        train(cfg)
    ckpt = read_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3  # written at the step-3 validation, untouched since


def test_nan_loss_skipped_and_counted(tiny_cfg, nan_at_step_4):
    metrics, _ = train(tiny_cfg("trainer.skip_nonfinite=true"))
    assert metrics["train/skipped_nonfinite"] == 1
    assert metrics["trainer/global_step"] == 6 and np.isfinite(metrics["val/loss"])


def test_skip_nonfinite_with_several_processes_is_refused_before_data_work(tiny_cfg, tmp_path):
    """Lightning raises at a skipped step in distributed training: refused up front instead."""
    cfg = tiny_cfg("trainer=ddp_sim", "trainer.skip_nonfinite=true")
    with pytest.raises(ConfigError, match=r"trainer\.skip_nonfinite=true needs one process"):
        train(cfg)
    assert not Path(cfg.paths.cache_dir).exists()  # no tokenizer trained, nothing tokenized


def test_skipped_nonfinite_count_goes_on_after_a_resume(tiny_cfg, tmp_path, monkeypatch):
    original = base_mod.LMModule.nll

    def nll(self, batch):  # non-finite at steps 4 and 7
        out = original(self, batch)
        if self.training and self.global_step in (4, 7):
            return (out[0] * float("nan"), *out[1:])
        return out

    monkeypatch.setattr(base_mod.LMModule, "nll", nll)
    out = tmp_path / "run"
    first, _ = train(tiny_cfg("trainer.skip_nonfinite=true", output_dir=out))
    assert first["train/skipped_nonfinite"] == 1
    resumed, _ = train(
        tiny_cfg(
            "trainer.skip_nonfinite=true", "ckpt_path=last", "trainer.max_steps=9", output_dir=out
        )
    )
    assert resumed["train/skipped_nonfinite"] == 2  # the run's count, not the resumed part's (1)


# -- concurrent caches ------------------------------------------------------------------------------
def _build(cache: str, text: str) -> str:
    store = build_store(iter([text] * 50), byte_tokenizer(2), cache, "same-key")
    return store.tokens.tobytes().hex()[:64] + str(len(store))


def test_two_processes_building_one_store(tmp_path):
    text = make_text(20_000, 0)
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        a, b = pool.starmap(_build, [(str(tmp_path), text), (str(tmp_path), text)])
    assert a == b
    stores = [p for p in (tmp_path / "stores").iterdir() if p.name != ".same-key.lock"]
    assert [s.name for s in stores] == ["same-key"]  # no half-written folder left over
    s = TokenStore.open(stores[0])
    assert len(s) == 50 * (len(text.encode()) + 1) and s.n_docs == 50


# -- W&B credentials --------------------------------------------------------------------------------
def test_wandb_online_without_credentials_is_refused(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no saved key
    out = tmp_path / "wb"
    with pytest.raises(ConfigError, match=r"run `wandb login`.*WANDB_MODE=offline"):
        train(tiny_cfg("logger=wandb", output_dir=out))
    assert not out.exists()  # refused before any work
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    os.chmod(tmp_path / "netrc", 0o600)
    from lmlab.train import check_wandb_login

    check_wandb_login(tiny_cfg("logger=wandb"))  # a saved key is enough


def test_sigusr1_also_saves_and_stops_with_the_other_callbacks_state_of_its_step(
    tiny_cfg, monkeypatch
):
    """SLURM's warning before the time limit. The checkpoint is written after the other callbacks
    updated their state for the step (Throughput's token count); step 4 has no validation, whose
    own save would come after them anyway."""

    def usr1_at_step_3(self, batch, batch_idx):
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, batch, batch_idx)

    original = base_mod.LMModule.training_step
    monkeypatch.setattr(base_mod.LMModule, "training_step", usr1_at_step_3)
    cfg = tiny_cfg()
    with pytest.raises(Preempted, match=r"signal after step 4"):
        train(cfg)
    ckpt = read_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    assert ckpt["callbacks"]["Throughput"]["tokens_seen"] == 4 * 4 * 32  # 4 batches of 4 x 32


def test_a_signal_inside_gradient_accumulation_saves_after_the_optimizer_step(
    tiny_cfg, monkeypatch
):
    """With two micro-batches per step, a signal during the first one is acted on after the second,
    when the optimizer has stepped: the checkpoint never holds half an accumulated gradient."""
    micro_batches = []

    def usr1_in_step_2(self, batch, batch_idx):
        micro_batches.append(self.global_step)
        if micro_batches.count(2) == 1 and self.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # during the first of step 2's micro-batches
        return original(self, batch, batch_idx)

    original = base_mod.LMModule.training_step
    monkeypatch.setattr(base_mod.LMModule, "training_step", usr1_in_step_2)
    cfg = tiny_cfg("data.batch_size=2", "global_batch_size=4")
    with pytest.raises(Preempted, match=r"signal after step 3"):
        train(cfg)
    assert micro_batches == [0, 0, 1, 1, 2, 2]
    ckpt = read_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3


def test_a_signal_during_the_sanity_check_stops_after_the_first_step(tiny_cfg, monkeypatch):
    handlers = []

    def term_in_sanity_check(self, batch, batch_idx):
        if self.trainer.sanity_checking and batch_idx == 0:
            handlers.append(signal.getsignal(signal.SIGTERM))
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    original = base_mod.LMModule.validation_step
    monkeypatch.setattr(base_mod.LMModule, "validation_step", term_in_sanity_check)
    cfg = tiny_cfg("trainer.num_sanity_val_steps=1")
    with pytest.raises(Preempted, match=r"signal after step 1"):
        train(cfg)
    # Preemption's handler, not Lightning's (which broadcasts from inside the handler)
    assert isinstance(getattr(handlers[0], "__self__", None), Preemption)
    ckpt = read_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 1


def test_a_signal_during_the_final_validation_lets_the_run_finish(tiny_cfg, monkeypatch):
    """train() validates once more after fit when the last step was not validated; a SIGTERM then
    meets Preemption's handler (Lightning's would broadcast from inside it) and the run ends as it
    would have, a moment later."""
    handlers = []

    def term_in_final_validation(self, batch, batch_idx):
        if self.trainer.state.fn == "validate" and batch_idx == 0:
            handlers.append(signal.getsignal(signal.SIGTERM))
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    original = base_mod.LMModule.validation_step
    monkeypatch.setattr(base_mod.LMModule, "validation_step", term_in_final_validation)
    before = signal.getsignal(signal.SIGTERM)
    metrics, _ = train(tiny_cfg("trainer.val_check_interval=4"))  # 6 steps: step 6 not validated
    assert metrics["trainer/global_step"] == 6 and math.isfinite(metrics["val/loss"])
    assert isinstance(getattr(handlers[0], "__self__", None), Preemption)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("signalled_in", ["validation", "step before it"])
def test_a_signal_before_or_during_a_validation_saves_at_once_and_stops_when_it_ends(
    tiny_cfg, monkeypatch, signalled_in
):
    """SIGTERM in the first batch of the validation after step 3, or in step 3 itself: last.ckpt
    holds step 3 while the validation goes on, the validation's metrics are logged, and no fourth
    training step runs."""
    cfg = tiny_cfg()  # validation every 3 steps, 3 batches
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved_during, steps = [], []

    def validation_step(self, batch, batch_idx):
        if self.trainer.state.fn == "fit" and self.global_step == 3:
            if batch_idx == 0 and signalled_in == "validation":
                os.kill(os.getpid(), signal.SIGTERM)
            elif batch_idx > 0:
                saved_during.append(read_checkpoint(last)["global_step"])
        return original_val(self, batch, batch_idx)

    def training_step(self, batch, batch_idx):
        steps.append(self.global_step)
        if self.global_step == 2 and signalled_in == "step before it":
            os.kill(os.getpid(), signal.SIGTERM)
        return original_train(self, batch, batch_idx)

    original_val = base_mod.LMModule.validation_step
    original_train = base_mod.LMModule.training_step
    monkeypatch.setattr(base_mod.LMModule, "validation_step", validation_step)
    monkeypatch.setattr(base_mod.LMModule, "training_step", training_step)
    with pytest.raises(Preempted, match=r"signal after step 3;"):
        train(cfg)
    assert saved_during == [3, 3]  # written before the validation's second batch
    assert steps == [0, 1, 2]
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "metrics.csv").open()))
    # logged, under the index of the step it follows (step 2 is the third), as every validation
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [2]
    assert read_checkpoint(last)["global_step"] == 3


def test_sigusr2_saves_then_hands_over_to_the_earlier_handler(tiny_cfg, monkeypatch):
    """submitit's USR2 handler (requeue, then exit) runs only once last.ckpt holds the step."""
    cfg = tiny_cfg()
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    seen = []

    def submitit_like(signum, frame):
        seen.append((signum, read_checkpoint(last)["global_step"]))

    def usr2_at_step_2(self, batch, batch_idx):
        if self.global_step == 2:
            os.kill(os.getpid(), signal.SIGUSR2)
        return original(self, batch, batch_idx)

    original = base_mod.LMModule.training_step
    monkeypatch.setattr(base_mod.LMModule, "training_step", usr2_at_step_2)
    previous = signal.signal(signal.SIGUSR2, submitit_like)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Preempted, match=r"signal after step 3"):
            train(cfg)
        assert signal.getsignal(signal.SIGUSR2) is submitit_like  # restored after training
        assert signal.getsignal(signal.SIGTERM) is sigterm
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [(signal.SIGUSR2, 3)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainer.accelerator=cpu", "trainer.devices=4096"],
            "trainer.devices=4096 but this machine has",
        ),
        pytest.param(
            ["trainer.accelerator=gpu", "trainer.devices=64"],
            "trainer.devices=64 but this machine has",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_more_devices_than_the_machine_has(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(tiny_cfg(*overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA GPUs")
@pytest.mark.parametrize("preset", ["gpu", "ddp", "fsdp"])
def test_gpu_presets_without_a_gpu_are_refused_before_any_work(tiny_cfg, preset):
    """trainer=ddp and trainer=fsdp ask for every GPU (devices=auto): on a machine with none, the
    refusal names the setting and the CPU presets, before a tokenizer or token store is built."""
    cfg = tiny_cfg(f"trainer={preset}", "trainer.accelerator=gpu")  # the preset's (TINY pins cpu)
    with pytest.raises(
        ConfigError, match=r"trainer.accelerator=gpu but this machine has no CUDA GPU"
    ) as e:
        train(cfg)
    assert "use trainer=cpu, or trainer=ddp_sim" in str(e.value)
    assert not (Path(cfg.paths.output_dir) / "tokenizer.json").exists()


def test_fsdp_in_cpu_processes_on_a_torch_without_it_is_refused_before_any_work(
    tiny_cfg, monkeypatch
):
    """torch 2.5 and 2.6 fail inside FSDP2's stream handling on CPUs: named before the data; GPU
    runs on such a torch are left alone."""
    from omegaconf import OmegaConf
    from torch.torch_version import TorchVersion

    from lmlab.train import check_strategy

    assert not cpu_fsdp_supported("2.6.0+cu124") and cpu_fsdp_supported("2.13.0+cpu")
    assert cpu_fsdp_supported("2.10.1")  # compared as versions, not as text
    assert cpu_fsdp_supported("2.7.0rc1") and cpu_fsdp_supported("2.7.0a0+git1234")  # 2.7 builds
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.6.0+cu124"))
    cfg = tiny_cfg("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1")
    with pytest.raises(
        ConfigError,
        match=r"trainer=fsdp in CPU processes needs torch >= 2\.\d+ .*this is torch 2\.6\.0",
    ):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "tokenizer.json").exists()

    fsdp = {"_target_": "lmlab.parallel.FSDP"}
    check_strategy(OmegaConf.create({"accelerator": "gpu", "strategy": fsdp}))  # no error
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_strategy(OmegaConf.create({"accelerator": "auto", "strategy": fsdp}))  # no error


def test_gpu_on_a_mac_is_left_to_lightning_which_picks_mps(monkeypatch):
    from omegaconf import OmegaConf

    from lmlab.train import check_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    check_devices(OmegaConf.create({"accelerator": "gpu", "devices": 1}))  # no error


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # the objective's check_settings
        (["model=encoder", "objective=mlm", "objective.mask_prob=2"], r"mask_prob must be in"),
        (
            ["model=encoder", "objective=mlm", "+objective.mask_rate=0.2"],
            r"objective.mask_rate is not a setting of objective=mlm; .*mask_prob",
        ),
        (
            ["model=encoder_decoder", "objective=span", "objective.noise_density=1.5"],
            r"noise_density=1.5 must be in \(0, 1\)",
        ),
        (  # 32 raw tokens at density 0.5 and spans of 1 need 10 sentinels; TINY's tokenizer has 4
            [
                "model=encoder_decoder",
                "objective=span",
                "objective.noise_density=0.5",
                "objective.mean_span_length=1",
            ],
            r"needs \d+ sentinel tokens per example, but the tokenizer has 4",
        ),
        (
            ["model=encoder_decoder", "objective=denoise", "objective.poisson_lambda=0"],
            r"poisson_lambda=0 must be > 0",
        ),
        (  # fast_dev_run trains one step (debug=default sets no warmup)
            ["+trainer.fast_dev_run=true", "optim.warmup_steps=2"],
            r"optim.warmup_steps=2 must be below trainer.fast_dev_run=1",
        ),
        (
            ["trainer=ddp_sim", "trainer.use_distributed_sampler=true"],
            r"use_distributed_sampler=true with 2 processes would shard lmlab's already sharded",
        ),
        # values of the wrong type or range, named instead of met as a TypeError later
        (["optim.lr=abc"], r"optim.lr='abc' is not a finite number"),
        # NaN passes every "x < 0" check: refused as not finite (it trained NaN weights)
        (["optim.weight_decay=nan"], r"optim.weight_decay=nan must be >= 0"),
        (["trainer.gradient_clip_val=inf"], r"trainer.gradient_clip_val=inf must be >= 0"),
        (["model.init_std=nan"], r"model.init_std=nan is not a finite number"),
        (["+model.norm_eps=-1e-6"], r"model.norm_eps must be a finite number >= 0, got -1e-06"),
        (["sample.temperature=nan"], r"sample.temperature must be a finite number >= 0"),
        (["model.n_layers=two"], r"model.n_layers='two' is not an integer"),
        (["global_batch_size=-16"], r"global_batch_size=-16 must be >= 1"),
        # the key typed, not model.max_seq_len (${seq_len}), whose check came first
        (["seq_len=-5"], r"^seq_len must be >= 1, got -5"),
        (["trainer.max_steps=-1"], r"trainer.max_steps=-1: training needs a length"),
        # module settings checked by their own parsers
        (["attention=cudnn"], r"attention='cudnn': cudnn attention needs a CUDA GPU"),
        (["attention=[flash,fast]"], r"fast is not a kernel; use auto, flex, one of cudnn"),
        (  # FlexAttention: document masks only, on GPUs only (no backward on CPUs), alone
            ["attention=flex", "objective.document_mask=true"],
            r"attention=flex: FlexAttention has no backward pass on CPUs .* attention=auto",
        ),
        (
            ["trainer.accelerator=gpu", "attention=flex"],
            r"takes the document masks of objective.document_mask=true, which this run does not",
        ),
        (
            [
                "trainer.accelerator=gpu",
                "attention=flex",
                "model=encoder_decoder",
                "objective=span",
            ],
            r"for the document masks of the decoder and the encoder; model=encoder_decoder has",
        ),
        (["attention=[flex,cudnn]"], r"flex stands alone .* use attention=flex"),
        (  # GPUs' flash kernel takes no mask (refused before check_devices looks for a GPU)
            ["trainer.accelerator=gpu", "attention=flash", "objective.document_mask=true"],
            r"attention=flash: on GPUs the flash kernel takes no attention mask, which "
            r"objective.document_mask needs in every step; use attention=auto",
        ),
        (
            ["trainer.accelerator=gpu", "attention=[flash]", "objective=prefix_lm"],
            r"which objective=prefix_lm's prefix needs in every step; .* attention=efficient",
        ),
        (["cpu_matmul=mkl"], r"cpu_matmul='mkl' is not a route .* use onednn .* or blas"),
        # the model's config dataclass
        (["model.n_heads=3"], r"model.d_model=32 must be divisible by model.n_heads=3"),
        (["+model.n_layer=3"], r"model.n_layer is not a setting of model=decoder; .*n_layers"),
        (
            ["model=encoder_decoder", "objective=span", "model.n_decoder_layers=0"],
            r"model.n_decoder_layers must be >= 1",
        ),
        (
            ["model=encoder_decoder", "objective=span", "model.max_target_len=0"],
            r"model.max_target_len must be >= 1",
        ),
        # Lightning's and the strategy's own checks, when the Trainer is built
        pytest.param(
            ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.strategy.param_dtype=fp8"],
            r"the trainer settings are refused: .*param_dtype='fp8' is not one of",
            marks=pytest.mark.skipif(
                not cpu_fsdp_supported(), reason="trainer=fsdp on CPUs is refused before"
            ),
        ),
        (
            ["trainer.precision=fp7"],
            r"the trainer settings are refused: Precision 'fp7' is invalid",
        ),
    ],
)
def test_settings_are_refused_before_any_data_work(tiny_cfg, overrides, message):
    """Refused before the tokenizer and the token stores are built (minutes on a real corpus):
    nothing is written to the run folder or the cache."""
    cfg = tiny_cfg(*overrides)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "tokenizer.json").exists()
    assert not Path(cfg.paths.cache_dir).exists() or not any(Path(cfg.paths.cache_dir).iterdir())


def test_flash_attention_with_masks_is_refused_only_where_it_cannot_take_them(tiny_cfg):
    from lmlab.train import check_attention_masks

    gpu, doc = "trainer.accelerator=gpu", "objective.document_mask=true"
    for overrides, kernels in [
        ([gpu, doc], ["flash", "efficient"]),  # efficient takes the masked calls
        ([gpu, doc], None),  # auto
        (["trainer.accelerator=cpu", doc], ["flash"]),  # CPUs' flash takes masks
        ([gpu], ["flash"]),  # no mask
    ]:
        check_attention_masks(tiny_cfg(*overrides), kernels)
    with pytest.raises(ConfigError, match="attention=flash"):
        check_attention_masks(tiny_cfg(gpu, doc), ["flash"])


def test_cuda_graphs_with_several_processes_are_said_before_any_work(tiny_cfg, caplog):
    """compile=reduce-overhead under several processes (experiment=gpt2_124m_1gpu trainer=ddp):
    a warning that names the tested preset; one process, or another compile mode: nothing."""
    from lmlab.train import check_cuda_graphs

    for overrides in (
        ["compile=reduce-overhead", "trainer.devices=1", "trainer.num_nodes=1"],
        ["compile=true", "trainer.devices=2"],
    ):
        check_cuda_graphs(tiny_cfg(*overrides))
    assert not caplog.records
    check_cuda_graphs(
        tiny_cfg("compile=reduce-overhead", "trainer.devices=1", "trainer.num_nodes=4")
    )
    (said,) = caplog.records
    assert said.levelname == "WARNING" and "with 4 processes is untested" in said.getMessage()
    assert "experiment=gpt2_124m (compile=true)" in said.getMessage()


def test_several_nodes_without_a_launcher_are_refused_instead_of_waiting_forever(
    tiny_cfg, monkeypatch
):
    from lmlab.train import check_nodes

    for name in list(os.environ):
        if name.startswith(("SLURM_", "TORCHELASTIC_", "LSB_", "OMPI_", "PMI_")) or name in (
            "NODE_RANK",
            "WORLD_SIZE",
            "RANK",
            "MASTER_ADDR",
        ):
            monkeypatch.delenv(name)
    cfg = tiny_cfg("trainer.num_nodes=2")
    with pytest.raises(ConfigError, match=r"trainer.num_nodes=2 but no multi-node launcher") as e:
        train(cfg)
    assert "torchrun --nnodes=2" in str(e.value)
    assert not (Path(cfg.paths.output_dir) / "tokenizer.json").exists()  # before any work
    monkeypatch.setenv("NODE_RANK", "1")  # started by hand on each node: Lightning's own launch
    check_nodes(cfg.trainer)
    monkeypatch.delenv("NODE_RANK")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # torchrun
    check_nodes(cfg.trainer)


def test_unknown_experiment_is_hydras_clear_message(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "lmlab", "experiment=nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert p.returncode != 0
    assert "Could not find 'experiment/nope'" in p.stderr and "gpt2_124m" in p.stderr


def test_a_run_extended_from_last_ckpt_knows_the_best_of_the_final_validation(tiny_cfg, tmp_path):
    """last.ckpt is written at the final step before the validation after fit, which then made a
    better best.ckpt: last.ckpt kept the earlier best score, and a run extended from it let a
    worse validation replace best.ckpt. Now last.ckpt records the final ranking."""
    out = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=8", "trainer.val_check_interval=3", output_dir=out))
    folder = out / "checkpoints"
    best = read_checkpoint(folder / "best.ckpt", weights=False)
    last = read_checkpoint(folder / "last.ckpt", weights=False)
    assert best["global_step"] == last["global_step"] == 8
    (state,) = [v for k, v in last["callbacks"].items() if v.get("best_k_models")]
    scores = [float(s) for s in state["best_k_models"].values()]
    with (out / "metrics.csv").open(newline="") as f:
        final = [float(r["val/loss"]) for r in csv.DictReader(f) if r["val/loss"]][-1]
    assert scores == [pytest.approx(final)] and float(state["best_model_score"]) == scores[0]
    # the rest of last.ckpt is the one saved in the final step (it resumes exactly)
    assert set(last) >= {"loops", "optimizer_states", "state_dict", "lmlab"}


def test_a_checkpoint_read_without_its_weights_is_mapped_not_read(tmp_path, monkeypatch):
    """Every process of a resume checks the checkpoint (read_checkpoint(weights=False)) before
    Lightning loads it: a full read cost each process the file's size in memory (weights and
    optimizer state) at once."""
    calls = []
    load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **kw: calls.append(kw.get("mmap")) or load(*a, **kw)
    )
    path = tmp_path / "x.ckpt"
    torch.save({"lmlab": {}, "state_dict": {"w": torch.ones(3)}}, path)
    assert read_checkpoint(path, weights=False)["state_dict"]["w"].tolist() == [1.0] * 3
    assert read_checkpoint(path)["state_dict"]["w"].sum() == 3
    assert calls == [True, False]


def test_the_checkpoint_folder_warning_is_quiet_on_resumes_only():
    """ModelCheckpoint's "exists and is not empty" names the run's own checkpoints at every resume
    (noise there), but on a fresh start it is news (a checkpoint folder, set by its dirpath, that
    holds other files: one holding checkpoints is refused by train.check_fresh_start)."""
    import warnings

    from lmlab.train import resuming_quietly

    said = "Checkpoint directory /run/checkpoints exists and is not empty."
    for ckpt_path, shown in ((None, True), ("/run/checkpoints/last.ckpt", False)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with resuming_quietly(ckpt_path):
                warnings.warn(said, UserWarning, stacklevel=1)
                warnings.warn("another warning", UserWarning, stacklevel=1)
        assert [str(w.message) for w in seen] == [said] * shown + ["another warning"]
