"""GPU-only checks (marker ``gpu``): skipped without CUDA; ``benchmarks/gpu.sh`` runs them on a GPU.

bf16 autocast with the fused AdamW, ``compile=true``, ``bf16-true``, MFU on a known device, and FSDP on
one GPU with FSDP's own bf16 mixed precision, compile and activation checkpointing together.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.flops import peak_flops
from lmlab.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# trainer.accelerator=gpu: the shared TINY overrides pin the CPU.
GPU = ["trainer=gpu", "trainer.accelerator=gpu", "trainer.devices=1"]
GPU += ["trainer.max_steps=30", "trainer.val_check_interval=30"]


def test_bf16_compile_trains_with_the_fused_optimizer_and_logs_mfu(tiny_cfg):
    metrics, objects = train(tiny_cfg(*GPU, "compile=true"))
    trainer = objects["trainer"]
    # The run's device (Lightning moves the module back to the CPU at teardown).
    assert trainer.strategy.root_device.type == "cuda"
    assert trainer.optimizers[0].defaults["fused"] is True
    assert math.isfinite(metrics["val/loss"]) and metrics["val/loss"] < metrics["train/loss"] + 1
    if peak_flops(trainer.strategy.root_device):  # a device of lmlab.flops' table: MFU logged
        assert 0 < metrics["train/mfu"] < 1


def test_compile_matches_eager_on_the_gpu(tiny_cfg, tmp_path):
    fp32 = [
        *GPU,
        "trainer.precision=32-true",
        "trainer.max_steps=5",
        "trainer.val_check_interval=5",
    ]
    eager, _ = train(tiny_cfg(*fp32, output_dir=tmp_path / "eager"))
    compiled, _ = train(tiny_cfg(*fp32, "compile=true", output_dir=tmp_path / "compiled"))
    # Inductor's fused kernels reorder float32 sums (and TF32 is off by default): close, not equal.
    assert compiled["val/loss"] == pytest.approx(eager["val/loss"], rel=1e-3)


def test_bf16_true_trains(tiny_cfg):
    metrics, objects = train(tiny_cfg(*GPU, "trainer.precision=bf16-true"))
    assert next(objects["model"].backbone.parameters()).dtype == torch.bfloat16
    assert math.isfinite(metrics["val/loss"])


def test_fsdp_on_one_gpu_equals_plain_training(tiny_cfg, tmp_path):
    fp32 = ["trainer.precision=32-true", "trainer.max_steps=5", "trainer.val_check_interval=5"]
    plain, _ = train(tiny_cfg(*GPU, *fp32, output_dir=tmp_path / "plain"))
    fsdp = ["trainer=fsdp", "trainer.accelerator=gpu", "trainer.devices=1", *fp32]
    sharded, _ = train(tiny_cfg(*fsdp, output_dir=tmp_path / "fsdp"))
    assert sharded["val/loss"] == pytest.approx(plain["val/loss"], rel=1e-4)


def test_fsdp_bf16_params_compile_and_checkpointing_together(tiny_cfg, tmp_path):
    metrics, _ = train(
        tiny_cfg(
            "trainer=fsdp",
            "trainer.accelerator=gpu",
            "trainer.devices=1",
            "trainer.precision=32-true",
            "trainer.strategy.param_dtype=bf16",
            "trainer.strategy.meta_init=true",
            "compile=true",
            "activation_checkpointing=true",
            "trainer.max_steps=30",
            "trainer.val_check_interval=30",
        )
    )
    assert math.isfinite(metrics["val/loss"])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
