"""Exact resume: a run stopped after a checkpoint and resumed from it trains on the same batches, in
the same order, as a run that never stopped (``lmlab.data.base.ResumableLoader``)."""

from __future__ import annotations

import csv
import json
import logging
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
from lightning.fabric.utilities.types import _Stateful

from lmlab.data.base import ResumableLoader, WindowDataModule
from lmlab.data.store import TokenStore
from lmlab.train import train

from .conftest import TINY, make_text


# -- the loader, driven the way Lightning's fit loop drives it -----------------------------------
class StartsDataModule(WindowDataModule):
    """Batches are the (start, epoch) pairs of their examples: what decides their content."""

    batch_kind = "starts"

    def make_batch(self, examples):
        return [(ex.start, ex.epoch) for ex in examples]


def token_store(n: int) -> TokenStore:
    return TokenStore(Path("unused"), np.arange(n, dtype=np.int64), np.array([0, n]), n)


BATCHES_PER_EPOCH = 5


def datamodule(num_workers: int = 0, n_tokens: int = 200) -> StartsDataModule:
    # 21 windows of 9 tokens (stride 9): 5 batches of 4 per epoch (whole batches only: one window
    # is left out of each epoch, another one every time).
    return StartsDataModule(
        None,
        token_store(n_tokens),
        token_store(20),
        seq_len=9,
        batch_size=4,
        num_workers=num_workers,
        seed=5,
    )


def uninterrupted(n_epochs: int) -> list[list]:
    loader = datamodule().train_dataloader()
    epochs = []
    for epoch in range(n_epochs):
        loader.sampler.set_epoch(epoch)  # FitLoop.on_advance_start
        epochs.append(list(loader))
    return epochs


def stopped_after(epoch: int, k: int) -> dict:
    """Train ``epoch`` full epochs and k batches of the next; return what a checkpoint holds."""
    loader = datamodule().train_dataloader()
    for e in range(epoch):
        loader.sampler.set_epoch(e)
        list(loader)
    loader.sampler.set_epoch(epoch)
    it = iter(loader)
    for _ in range(k):
        next(it)
    return loader.state_dict()


def resumed(state: dict, epoch: int, num_workers: int = 0) -> ResumableLoader:
    """A fresh loader restored as Lightning restores it (FitLoop.setup_data: load_state_dict,
    iter(); on_advance_start: set_epoch); returns it with its iterator for ``epoch`` in ``.it``."""
    loader = datamodule(num_workers).train_dataloader()
    loader.load_state_dict(state)
    loader.it = iter(loader)
    loader.sampler.set_epoch(epoch)
    return loader


@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("k", range(BATCHES_PER_EPOCH))
def test_restored_loader_yields_the_rest_of_the_epoch(epoch, k):
    ref = uninterrupted(epoch + 2)
    state = stopped_after(epoch, k)
    layout = {"world": 1, "batch_size": 4}
    assert state == {"epoch": epoch, "windows": 4 * k, "epoch_windows": 20, **layout}
    loader = resumed(state, epoch)
    assert loader.state_dict() == state  # restored, not iterated yet: saved again unchanged
    assert list(loader.it) == ref[epoch][k:]
    loader.sampler.set_epoch(epoch + 1)
    assert list(loader) == ref[epoch + 1]  # and the next epoch is whole


def test_stopped_at_the_end_of_an_epoch_resumes_at_the_next():
    ref = uninterrupted(3)
    state = stopped_after(1, BATCHES_PER_EPOCH)
    assert state == {"epoch": 2, "windows": 0, "epoch_windows": 20, "world": 1, "batch_size": 4}
    loader = resumed(state, 2)  # Lightning's epoch counter also moves on to 2
    assert list(loader.it) == ref[2]


def test_position_of_an_epoch_lightning_leaves_is_dropped():
    # A checkpoint at the last batch of a `limit_train_batches`-shortened epoch: Lightning starts
    # the next epoch; the loader must not skip windows of that one.
    ref = uninterrupted(2)
    loader = resumed(stopped_after(0, 2), 1)
    assert list(loader.it) == ref[1]


def test_restored_loader_with_workers_yields_the_rest_of_the_epoch():
    # Workers draw indices as soon as their iterator exists; Lightning makes it before set_epoch.
    ref = uninterrupted(2)
    loader = resumed(stopped_after(1, 3), 1, num_workers=2)
    assert list(loader.it) == ref[1][3:]


def test_only_the_training_loader_is_stateful():
    dm = datamodule()
    assert isinstance(dm.train_dataloader(), _Stateful)  # Lightning saves and restores its state
    assert not isinstance(dm.val_dataloader(), _Stateful)


def test_resuming_on_a_changed_split_warns(caplog):
    loader = datamodule(n_tokens=240).train_dataloader()  # 24 windows per epoch
    with caplog.at_level(logging.WARNING, logger="lmlab.data.base"):
        loader.load_state_dict(stopped_after(0, 2))
    assert "the checkpoint's epoch had 20 training windows, this run's has 24" in caplog.text


def test_resuming_with_another_process_count_or_batch_size_warns_so(caplog):
    state = stopped_after(0, 2)
    for changed in ({"world": 2}, {"batch_size": 8}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lmlab.data.base"):
            datamodule().train_dataloader().load_state_dict({**state, **changed})
        assert "continues only approximately" in caplog.text
        assert "training windows" not in caplog.text  # not blamed on the data
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmlab.data.base"):
        old = {k: v for k, v in state.items() if k not in ("world", "batch_size")}
        datamodule().train_dataloader().load_state_dict(old)  # checkpoints from before the keys
    assert caplog.text == ""


def test_another_sampler_warns_and_restarts_the_epoch(caplog):
    # What Lightning's DistributedSamplerWrapper (several devices) would be: not our order.
    loader = ResumableLoader(list(range(10)), batch_size=4, sampler=range(10))
    with caplog.at_level(logging.WARNING, logger="lmlab.data.base"):
        loader.load_state_dict({"epoch": 0, "windows": 4, "epoch_windows": 10})
    assert "the training sampler is a range, not lmlab's own" in caplog.text
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# -- whole runs -----------------------------------------------------------------------------------
MAX_STEPS = 12
RUN_BATCHES_PER_EPOCH = 5
# Three train documents of 185 words: 20 to 23 windows of 33 tokens, so 5 whole batches of 4 per
# epoch (the test checks it), and the runs cross epoch boundaries at steps 5 and 10. last.ckpt every 2 steps, and a
# validation at step 7. Validation does not touch training: one batch, no samples, to save time.
ARGS = [
    *TINY,
    "trainer.precision=32-true",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.val_check_interval=7",
    "trainer.limit_val_batches=1",
    "callbacks.samples=null",
    "callbacks.last_checkpoint.every_n_train_steps=2",
    "++logger.csv.flush_logs_every_n_steps=1",
]


def write_corpus(d: Path) -> list[Path]:
    paths = [d / f"d{i}.txt" for i in range(4)]  # three train documents, one validation document
    for i, p in enumerate(paths):
        p.write_text(make_text(185, i))
    return paths


def train_rows(path: Path) -> dict[int, tuple[str, str]]:
    """step -> (epoch, train/loss) as written (the last row of each step: a resumed run appends)."""
    with path.open(newline="") as f:
        rows = csv.DictReader(f)
        return {int(r["step"]): (r["epoch"], r["train/loss"]) for r in rows if r.get("train/loss")}


def epoch_tokens(path: Path) -> dict[int, float]:
    """step -> train/tokens (the epoch's target tokens, logged at each epoch's end)."""
    with path.open(newline="") as f:
        return {
            int(r["step"]): float(r["train/tokens"])
            for r in csv.DictReader(f)
            if r.get("train/tokens")
        }


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def assert_loader_state(path: Path, epoch: int, batches: int) -> None:
    """The checkpoint holds the loader's position as Lightning's fit loop saved it: the epoch, and
    the windows of it already trained on (4 per batch)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    (state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert (state["epoch"], state["windows"]) == (epoch, 4 * batches)


def assert_continues_exactly(ref: Path, run: Path, step: int) -> None:
    """Rows ``step`` .. MAX_STEPS-1 (the steps trained after a checkpoint at global step ``step``)
    of the resumed run equal the uninterrupted run's, epoch and loss, bit for bit: same code and
    inputs, same threads, fp32 on CPU; the checkpoint holds weights, optimizer and schedule exactly,
    and nothing in training draws from the global RNG (no dropout; example_rng is per example)."""
    expected, got = train_rows(ref / "metrics.csv"), train_rows(run / "metrics.csv")
    assert sorted(expected) == list(range(MAX_STEPS))
    after = range(step, MAX_STEPS)
    assert {s: got.get(s) for s in after} == {s: expected[s] for s in after}
    # and each epoch's target tokens: the resumed epoch's count goes on from the checkpoint's
    expected, got = epoch_tokens(ref / "metrics.csv"), epoch_tokens(run / "metrics.csv")
    assert len(expected) >= 2  # the runs cross epoch boundaries
    assert {s: got.get(s) for s in expected if s >= step} == {
        s: v for s, v in expected.items() if s >= step
    }


class Stop(Exception):
    pass


class StopAt(L.Callback):
    """Stops the run (an exception, like a crash) when the next step would be step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Stop


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """(compose(out, *overrides) -> a config on the small corpus, an uninterrupted run's folder)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from lmlab.paths import CONF_DIR

    tmp = tmp_path_factory.mktemp("resume")
    files = ",".join(str(p) for p in write_corpus(tmp))

    def _compose(out: Path, *overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                "train", overrides=["data=files", f"data.train=[{files}]", *ARGS, *overrides]
            )
        GlobalHydra.instance().clear()
        with open_dict(cfg):
            cfg.paths.output_dir, cfg.paths.cache_dir = str(out), str(tmp / "cache")
        return cfg

    refs: dict[tuple[str, ...], Path] = {}

    def _reference(*overrides: str) -> Path:
        if overrides not in refs:
            refs[overrides] = tmp / f"uninterrupted-{len(refs)}"
            train(_compose(refs[overrides], *overrides))
        return refs[overrides]

    return _compose, _reference


@pytest.mark.parametrize(
    ("overrides", "step", "position"),
    [
        pytest.param((), 7, (1, 2), id="saved-by-validation-mid-epoch"),
        pytest.param((), 10, (2, 0), id="saved-after-the-last-batch-of-an-epoch"),
        # Epochs cut to whole optimizer steps (4 of the 5 batches): steps after batches 2 and 4 of
        # each epoch; the validation's checkpoint at step 7 is after batch 2 of epoch 3.
        pytest.param(("trainer.accumulate_grad_batches=2",), 7, (3, 2), id="gradient-accumulation"),
        # bf16 weights: the checkpoint's model weights are the fp32 masters rounded; the masters
        # themselves come back from the optimizer's state (lmlab/optim.py)
        pytest.param(
            ("trainer.precision=bf16-true", "optim.master_weights=true"),
            7,
            (1, 2),
            id="bf16-weights-with-fp32-masters",
        ),
    ],
)
def test_stop_after_a_checkpoint_then_resume_matches_the_uninterrupted_run(
    small_runs, overrides, step, position
):
    compose, reference = small_runs
    ref = reference(*overrides)
    if not overrides:  # the corpus gives the epoch boundaries described above ARGS
        epochs = [epoch for epoch, _ in train_rows(ref / "metrics.csv").values()]
        assert epochs.count("0") == RUN_BATCHES_PER_EPOCH
    run = ref.parent / f"stopped-{ref.name}-{step}"
    stop = [f"+callbacks.stop._target_={__name__}.StopAt", f"+callbacks.stop.step={step}"]
    with pytest.raises(Stop):
        train(compose(run, *overrides, *stop))
    # The checkpoint written at `step`: last.ckpt after a periodic save; best.ckpt (and
    # last-v1.ckpt) after the validation at 7: both ModelCheckpoint callbacks save a "last", and
    # Lightning gives the second one to save a versioned name, so the validation's does not refresh
    # last.ckpt.
    (ckpt, *_) = [p for p in sorted((run / "checkpoints").glob("*.ckpt")) if ckpt_step(p) == step]
    assert_loader_state(ckpt, *position)
    train(compose(run, *overrides, f"ckpt_path={ckpt}"))
    assert_continues_exactly(ref, run, step)


class PauseAt(L.Callback):
    """Writes ``<marker>`` and waits, when the next step would be step ``step``: the test kills the
    run there, at a known point after its checkpoint, however fast or loaded the machine is."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.marker.touch()
            time.sleep(600)


def start(tmp: Path, out: Path, *extra: str) -> subprocess.Popen:
    # One thread per run: the runs compute identically whatever the machine's load, and two of them
    # fit side by side on a small CPU. PYTHONPATH: the run to kill imports PauseAt from this file.
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, LMLAB_CACHE=str(tmp / "cache"), WANDB_MODE="offline")
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=path)
    args = ["data=files", "data.train=d*.txt", *ARGS, *extra, f"hydra.run.dir={out}"]
    with (tmp / f"{out.name}.log").open("a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "lmlab", *args], cwd=tmp, env=env, stdout=log, stderr=log
        )


def finish(p: subprocess.Popen, tmp: Path, out: Path) -> str:
    p.wait(timeout=300)
    log = (tmp / f"{out.name}.log").read_text()
    assert p.returncode == 0, log[-4000:]
    return log


def test_sigkill_after_a_checkpoint_then_resume_matches_the_uninterrupted_run(tmp_path):
    write_corpus(tmp_path)
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = run = start(tmp_path, ref_dir)
    try:
        # The run to kill starts once the first has cached the tokenizer and token stores (two runs
        # writing the cache at once could race), then runs beside it.
        deadline = time.monotonic() + 120
        while not (ref_dir / "tokenizer.json").is_file():
            assert ref.poll() is None, (tmp_path / "uninterrupted.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the first run did not start in time"
            time.sleep(0.05)
        # Paused before step 10: last.ckpt holds step 8 (every 2 steps), and the run logged step 9
        # too (its row says step 8: Lightning's step column counts the steps done before it).
        marker = tmp_path / "paused"
        pause = [f"+callbacks.pause._target_={__name__}.PauseAt", "+callbacks.pause.step=9"]
        run = start(tmp_path, run_dir, *pause, f"+callbacks.pause.marker={marker}")
        while not marker.is_file():
            assert run.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the run to kill did not reach step 9 in time"
            time.sleep(0.05)
        run.send_signal(signal.SIGKILL)
        assert run.wait(timeout=60) == -signal.SIGKILL
    except BaseException:
        for p in (ref, run):  # nothing left running (or sleeping) when the test fails here
            p.kill()
        raise
    last = run_dir / "checkpoints" / "last.ckpt"
    step = ckpt_step(last)
    assert step == 8
    assert_loader_state(last, *divmod(step, RUN_BATCHES_PER_EPOCH))

    resumed_log = finish(start(tmp_path, run_dir, "ckpt_path=last"), tmp_path, run_dir)
    finish(ref, tmp_path, ref_dir)
    # The killed run logged a step after its checkpoint; the resumed run dropped that row before
    # logging the step again: one row per step, as in the uninterrupted run.
    assert_continues_exactly(ref_dir, run_dir, step)
    for d in (ref_dir, run_dir):
        steps = [r["step"] for r in csv.DictReader((d / "metrics.csv").open()) if r["train/loss"]]
        assert len(steps) == len(set(steps)) == MAX_STEPS
    assert "dataloader is not resumable" not in resumed_log


def test_a_sharded_checkpoint_is_refused_without_fsdp_before_any_data_work(
    tiny_cfg, tmp_path, monkeypatch
):
    """A sharded (trainer=fsdp) last.ckpt resumed by one process: Lightning failed on the folder
    with a bare IsADirectoryError, after the data work and with the run's .hydra overrides
    replaced by the refused attempt's."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig

    import lmlab.train as train_mod
    from lmlab.errors import ResumeRefused

    out = tmp_path / "run"
    folder = out / "checkpoints" / "last.ckpt"
    folder.mkdir(parents=True)
    (folder / "meta.pt").write_bytes(b"")  # what makes a folder a sharded checkpoint
    # the run's own .hydra files, kept by its start; Hydra has just written the refused attempt's
    for sub, overrides in ((train_mod.HYDRA_KEPT, "- trainer=fsdp\n"), (".hydra", "- x=1\n")):
        (out / sub).mkdir()
        (out / sub / "overrides.yaml").write_text(overrides)
    hc = SimpleNamespace(
        mode="RunMode.RUN",
        output_subdir=".hydra",
        runtime=SimpleNamespace(output_dir=str(out), cwd=str(tmp_path)),
        job=SimpleNamespace(override_dirname="", num=0),
    )
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hc))

    def no_data(cfg):
        raise AssertionError("data prepared before the refusal")

    monkeypatch.setattr(train_mod, "prepare_data", no_data)
    with pytest.raises(
        ResumeRefused, match=r"is a sharded checkpoint \(trainer=fsdp\): resume it "
    ):
        train(tiny_cfg("ckpt_path=last", output_dir=out))
    assert (out / ".hydra" / "overrides.yaml").read_text() == "- trainer=fsdp\n"  # restored


def test_a_one_file_checkpoint_is_refused_under_fsdp_before_any_data_work(
    tiny_cfg, tmp_path, monkeypatch
):
    """Its optimizer state is keyed by position in lmlab's groups (matrices first); Lightning's
    FSDP maps positions in the module's parameter order: a review saw a shape error, and where
    shapes agree the moments would land on other weights silently."""
    import lmlab.train as train_mod
    from lmlab.errors import ResumeRefused

    fp32 = ["trainer.precision=32-true", "callbacks.samples=null"]
    _, objects = train(tiny_cfg(*fp32, "trainer.max_steps=3", output_dir=tmp_path / "ddp"))
    ckpt = objects["output_dir"] / "checkpoints" / "last.ckpt"

    def no_data(cfg):
        raise AssertionError("data prepared before the refusal")

    monkeypatch.setattr(train_mod, "prepare_data", no_data)
    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", *fp32]
    with pytest.raises(ResumeRefused, match="is a one-file checkpoint of a run without FSDP"):
        train(
            tiny_cfg(*fsdp, "trainer.max_steps=4", f"ckpt_path={ckpt}", output_dir=tmp_path / "f")
        )


class _CrashInValidation(L.Callback):
    """A crash (out of memory, a killed node) during the validation after step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        fit = trainer.state.fn == "fit" and not trainer.sanity_checking
        if fit and trainer.global_step == self.step:
            raise RuntimeError(f"crash in the validation of step {self.step}")


def test_a_crash_in_a_validation_at_a_periodic_save_still_validates_that_step(tiny_cfg, tmp_path):
    """The periodic last.ckpt of step 4 was written before step 4's validation: a crash during
    it resumed past it (Lightning's restart takes it for done), and step 4 was never validated nor
    ranked for best.ckpt. The save now comes after the validation."""
    common = ["trainer.max_steps=8", "trainer.val_check_interval=4"]
    common += ["callbacks.last_checkpoint.every_n_train_steps=2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(tiny_cfg(*common, output_dir=ref))
    crash = [f"+callbacks.crash._target_={__name__}._CrashInValidation", "+callbacks.crash.step=4"]
    with pytest.raises(RuntimeError, match="crash in the validation of step 4"):
        train(tiny_cfg(*common, *crash, output_dir=run))
    train(tiny_cfg(*common, "ckpt_path=last", output_dir=run))

    def val_losses(out):
        with (out / "metrics.csv").open(newline="") as f:
            return {
                int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(f) if r["val/loss"]
            }

    want = val_losses(ref)
    assert sorted(want) == [3, 7]  # after steps 4 and 8
    assert val_losses(run) == pytest.approx(want, rel=1e-5)


class _CrashAtStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def test_an_extended_run_that_fails_leaves_no_summary_of_its_earlier_finish(tiny_cfg, tmp_path):
    """A finished run extended (ckpt_path=last, more steps) whose attempt then failed kept the
    earlier finish's summary.json: the sweep report listed it as finished, ranked by old values."""
    out = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=4", output_dir=out))
    assert (out / "summary.json").is_file()
    crash = [f"+callbacks.crash._target_={__name__}._CrashAtStep", "+callbacks.crash.step=5"]
    with pytest.raises(RuntimeError, match="crash at step 5"):
        train(tiny_cfg("trainer.max_steps=8", "ckpt_path=last", *crash, output_dir=out))
    assert not (out / "summary.json").exists()
    train(tiny_cfg("trainer.max_steps=8", "ckpt_path=last", output_dir=out))
    assert json.loads((out / "summary.json").read_text())["trainer/global_step"] == 8


def test_a_resume_with_nothing_left_to_train_still_summarises_the_training(tiny_cfg, tmp_path):
    """A crash in the validation after fit leaves last.ckpt at max_steps and no summary.json: the
    resumed run trains nothing, and its summary had no train/loss (a sweep or search optimising
    it got nothing)."""
    out = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=6", output_dir=out))
    first = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()  # as the crash left it
    metrics, _ = train(tiny_cfg("trainer.max_steps=6", "ckpt_path=last", output_dir=out))
    assert metrics["trainer/global_step"] == 6
    for key in ("train/loss", "train/ppl", "train/bpb", "train/tokens_per_sec"):
        assert metrics[key] == pytest.approx(first[key], rel=1e-5), key
