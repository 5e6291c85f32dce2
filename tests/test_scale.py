"""Multi-process training: trainer=ddp_sim (2 CPU processes, gloo) matches one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import make_text

COMMON = [
    "data=files",
    "data.train=d*.txt",
    "seq_len=32",
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "++tokenizer.vocab_size=400",
    "++tokenizer.num_sentinels=4",
    "trainer.max_steps=6",
    "trainer.val_check_interval=6",
    "trainer.limit_val_batches=3",
    "optim.warmup_steps=2",
    "callbacks.samples=null",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "trainer.precision=32-true",
]


@pytest.mark.slow
def test_ddp_sim_matches_one_process_with_the_same_global_batch(tmp_path):
    for i in range(4):
        (tmp_path / f"d{i}.txt").write_text(make_text(800, i))
    env = dict(os.environ, LMLAB_CACHE=str(tmp_path / "cache"), WANDB_MODE="offline")

    def run(name, *extra):
        p = subprocess.run(
            [sys.executable, "-m", "lmlab", *COMMON, *extra, f"hydra.run.dir={tmp_path / name}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads((tmp_path / name / "summary.json").read_text())

    one = run("one", "trainer=cpu", "data.batch_size=4")
    two = run("two", "trainer=ddp_sim", "data.batch_size=2")
    # Same global batch: Lightning's distributed sampler deals the same windows to the two ranks
    # (rank r takes every other window), gradients are averaged (= the mean over the 4 sequences,
    # all of equal length) and the first 12 validation windows are split 6 + 6. Only the order of
    # floating-point sums differs (all-reduce), so after 6 steps the numbers agree to ~1e-6; 1e-4
    # leaves room without hiding a wrong batch (a different batch moves val/loss by ~1e-2).
    assert two["trainer/global_step"] == one["trainer/global_step"] == 6
    for key in ("val/loss", "val/bpb", "val/acc"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert (tmp_path / "two" / "checkpoints" / "last.ckpt").is_file()
