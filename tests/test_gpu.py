"""GPU-only checks (marker ``gpu``): skipped without CUDA; ``benchmarks/gpu.sh`` runs them on a GPU.

bf16 autocast with the fused AdamW, ``compile=true``, ``bf16-true``, MFU on a known device, no host-device
synchronisation between logging steps, and FSDP on one GPU with FSDP's own bf16 mixed precision,
compile and activation checkpointing together, the preemption vote of multi-process runs, the
cuDNN attention kernel, document masks (compiled, bf16) and FlexAttention's block masks for them
(attention=flex) against the dense ones, and experiment=gpt2_124m_1gpu trained end to end.
"""

from __future__ import annotations

import math
import warnings

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


def test_training_steps_let_the_host_run_ahead_between_log_steps(tiny_cfg, monkeypatch):
    """No step waits for the GPU except those whose metrics Lightning writes (every
    log_every_n_steps; the tests run without a progress bar). CUDA's sync debug mode reports each
    synchronising call (not event waits, which FiniteFlag uses); it is on during steps 5..39
    except the writing ones (19 and 39) and the epoch's end, and must report nothing. Before the fixes it reported
    four per step: three `log` calls of Python numbers and the progress-bar `.item()`."""
    from lightning.pytorch.trainer import call

    traced = []
    call_hooks = call._call_callback_hooks

    def call_callback_hooks(trainer, hook_name, *args, **kwargs):
        # Set before any callback's hook runs (lr_monitor, first in the list, writes the learning
        # rate to the device on the writing steps). Lightning's check looks one step ahead here.
        if hook_name == "on_train_batch_start":
            on = 5 <= trainer.global_step < 40 and not trainer._logger_connector.should_update_logs
            torch.cuda.set_sync_debug_mode("warn" if on else 0)
            if on:
                traced.append(trainer.global_step)
        elif hook_name == "on_train_epoch_end":  # the epoch's metrics are written: a wait, once
            torch.cuda.set_sync_debug_mode(0)  # an epoch (38 steps of this corpus: after step 37)
        return call_hooks(trainer, hook_name, *args, **kwargs)

    monkeypatch.setattr(call, "_call_callback_hooks", call_callback_hooks)
    overrides = ["trainer.max_steps=45", "trainer.val_check_interval=45"]
    overrides += ["trainer.log_every_n_steps=20"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(tiny_cfg(*GPU, *overrides))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(traced) == 33 and 19 not in traced and 39 not in traced
    syncs = [w for w in caught if "synchronizing CUDA operation" in str(w.message)]
    assert not syncs, [f"{w.filename}:{w.lineno}" for w in syncs]


@pytest.mark.parametrize(
    ("mode", "scope"), [("true", "model"), ("reduce-overhead", "model"), ("true", "blocks")]
)
def test_compile_matches_eager_on_the_gpu(tiny_cfg, tmp_path, monkeypatch, mode, scope):
    """compile=true, compile=reduce-overhead (the loss computation replayed as CUDA graphs under
    Lightning's loop) and compile_scope=blocks (each block, then the head + loss) train as eager
    does, compiled: training and validation traced (two graphs or more), torch's recompile limit
    never reached (the samples generated at validation run eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    fp32 = [
        *GPU,
        "trainer.precision=32-true",
        "trainer.max_steps=5",
        "trainer.val_check_interval=5",
    ]
    eager, _ = train(tiny_cfg(*fp32, output_dir=tmp_path / "eager"))
    torch._dynamo.reset()
    counters.clear()
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):  # torch >= 2.6
        monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    compiled, _ = train(
        tiny_cfg(*fp32, f"compile={mode}", f"compile_scope={scope}", output_dir=tmp_path / "c")
    )
    assert counters["stats"]["unique_graphs"] >= 2
    # Inductor's fused kernels reorder float32 sums (and TF32 is off by default): close, not equal.
    assert compiled["val/loss"] == pytest.approx(eager["val/loss"], rel=1e-3)


@pytest.mark.parametrize("compile", [False, True])
def test_fused_head_and_loss_match_the_plain_head_under_bf16(compile):
    """lmlab.nn.loss on CUDA with bf16 autocast, eager and compiled: loss and gradients equal the
    plain head + cross-entropy to bf16 rounding."""
    from lmlab.nn.loss import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", generator=g)
    weight = torch.randn(50304, 256, device="cuda", generator=g) * 0.05
    labels = torch.randint(0, 50257, (3000,), device="cuda", generator=g)
    labels[::7] = -100

    def plain(h, w):
        return torch.nn.functional.cross_entropy((h @ w.t()).float(), labels, reduction="sum")

    def fused(h, w):
        return linear_cross_entropy(h, w, labels, chunk_size=1024)[0]

    results = []
    for fn in (plain, torch.compile(fused) if compile else fused):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    (want, want_h, want_w), (got, got_h, got_w) = results
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
    # bf16 products round each at 2^-8 relative: compare to 1% of the gradient's scale
    for got_grad, want_grad in ((got_h, want_h), (got_w, want_w)):
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0.01 * want_grad.abs().max())


def test_cudnn_attention_trains_like_the_default_kernel(tiny_cfg, tmp_path):
    """attention=cudnn alone (no fallback: SDPA raises if cuDNN cannot take a call) trains to the
    validation loss of PyTorch's own choice, up to bf16 kernel differences."""
    auto, _ = train(tiny_cfg(*GPU, output_dir=tmp_path / "auto"))
    cudnn, _ = train(tiny_cfg(*GPU, "attention=cudnn", output_dir=tmp_path / "cudnn"))
    assert abs(cudnn["val/loss"] - auto["val/loss"]) < 0.05


def test_document_mask_compiles_in_bf16_and_keeps_documents_apart(tiny_cfg):
    """objective.document_mask on a GPU, with grouped-query attention: the masked calls take the
    memory-efficient kernel (flash takes no mask; efficient takes no enable_gqa, so lmlab.nn.blocks
    repeats the key/value heads for it), compiled, under bf16 autocast; each document of a packed
    window computes what it does alone (to bf16's rounding: the two runs take other kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmlab.nn.decoder import Decoder, DecoderConfig

    gqa = ["model.n_kv_heads=1", "attention=efficient"]
    metrics, _ = train(tiny_cfg(*GPU, "compile=true", "objective.document_mask=true", *gqa))
    assert math.isfinite(metrics["val/loss"]) and metrics["val/loss"] < metrics["train/loss"] + 1
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=100, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2)
    m = Decoder(config).cuda().eval()
    x = torch.randint(4, 100, (2, 48), device="cuda")
    x[0, [10, 30]] = x[1, [0, 25]] = 3  # eos: documents of 10, 20, 18 and 25, 23 tokens
    docs = torch.cumsum(x == 3, dim=1)
    with torch.autocast("cuda", torch.bfloat16), torch.no_grad():
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            out = m(x, doc_ids=docs)
        for b in range(2):
            for d in docs[b].unique():
                idx = (docs[b] == d).nonzero().flatten()
                alone = m(x[b, idx][None])[0]
                torch.testing.assert_close(out[b, idx], alone, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("masters", [False, True])
def test_bf16_true_trains(tiny_cfg, masters):
    settings = ["trainer.precision=bf16-true", f"optim.master_weights={str(masters).lower()}"]
    metrics, objects = train(tiny_cfg(*GPU, *settings))
    assert next(objects["model"].backbone.parameters()).dtype == torch.bfloat16
    assert math.isfinite(metrics["val/loss"])
    if masters:  # fp32, stepped on the GPU, then moved off it at the end of fit
        (optimizer,) = objects["trainer"].optimizers
        assert all(m.device.type == "cpu" and m.dtype == torch.float32 for m in optimizer.masters)


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


def test_stop_vote_on_the_gpu_answers_two_steps_late():
    """The multi-process preemption vote (lmlab.callbacks.StopVote) on a CUDA device: each answer is
    the vote cast two calls earlier (read from pinned host memory once its event completed)."""
    from lmlab.callbacks import StopVote

    vote = StopVote(torch.device("cuda"))
    assert vote.lag == 2
    answers = []
    for flag in (False, True, False, False, False):
        torch.cuda._sleep(10_000_000)  # keep the device busy: the vote is queued behind this
        answers.append(vote(flag))
    assert answers == [False, False, False, True, False]


def test_the_compiled_master_weight_step_matches_the_eager_one_without_a_host_sync():
    """optim.master_weights under compile=true on the GPU (Triton kernels): the masters the
    compiled step gives equal the eager step's to fp32 rounding, through clipping and a changing
    learning rate, and once compiled a step (pull, clip, step) never waits for the device."""
    from lmlab.optim import MasterWeightAdamW

    shapes = [(256, 64), (64,), (64,)]
    gen = torch.Generator("cuda").manual_seed(0)
    start = [torch.randn(s, generator=gen, device="cuda").bfloat16() for s in shapes]
    grads = [
        [torch.randn(s, generator=gen, device="cuda").bfloat16() for s in shapes] for _ in range(4)
    ]
    masters = []
    for compiled in (True, False):
        weights = [w.clone() for w in start]
        groups = [
            {"params": weights[:2], "weight_decay": 0.1},
            {"params": weights[2:], "weight_decay": 0.0},
        ]
        opt = MasterWeightAdamW(groups, compiled=compiled, lr=1e-2, fused=True)
        for step, step_grads in enumerate(grads):
            for w, g in zip(weights, step_grads, strict=True):
                w.grad = g
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (step + 1)
            torch.cuda.set_sync_debug_mode("error" if compiled and step > 0 else "default")
            try:
                opt.pull_grads()
                opt.clip_grad_norm_(5.0)
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert all(torch.equal(w, m.bfloat16()) for w, m in zip(weights, opt.masters, strict=True))
        assert all(opt.state[m]["step"].device.type == "cuda" for m in opt.masters)
        masters.append(opt.masters)
    for a, b in zip(*masters, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_the_one_gpu_gpt2_preset_trains_validates_and_resumes(tiny_cfg, tmp_path):
    """experiment=gpt2_124m_1gpu at tiny sizes, as a user runs it: bf16 weights stepped through
    fp32 masters, CUDA graphs (compile=reduce-overhead), the fused head + loss; two validations
    with their samples, last.ckpt with the masters, and a resume that goes on from it."""
    from lmlab.optim import MasterWeightAdamW

    preset = ["experiment=gpt2_124m_1gpu", *GPU, "trainer.val_check_interval=15"]
    first, objects = train(tiny_cfg(*preset, output_dir=tmp_path))
    model, trainer = objects["model"], objects["trainer"]
    assert next(model.backbone.parameters()).dtype == torch.bfloat16
    assert isinstance(trainer.optimizers[0], MasterWeightAdamW) and model.loss_chunk_size == 16384
    assert math.isfinite(first["val/loss"]) and first["val/loss"] < math.log(400)
    samples = (tmp_path / "samples.txt").read_text()
    assert "=== step 15 sample 0 ===" in samples and "=== step 30 sample 0 ===" in samples
    saved = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert saved["global_step"] == 30 and "master_weights" in saved["optimizer_states"][0]
    more, objects = train(
        tiny_cfg(*preset, "ckpt_path=last", "trainer.max_steps=40", output_dir=tmp_path)
    )
    assert objects["trainer"].global_step == 40 and math.isfinite(more["val/loss"])


@pytest.mark.parametrize("mode", [None, "default", "reduce-overhead"])
@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_flex_document_masks_give_the_dense_masks_logits_and_gradients(family, mode):
    """attention=flex on a GPU, where FlexAttention has its backward: documents of ~64 tokens in
    512-token windows (blocks skipped and blocks cut by a document's edge), grouped-query heads,
    float32 without TF32: the block masks' logits and weight gradients are the dense masks', in
    the decoder (causal) and the encoder (bidirectional), eager (flex_attention compiled alone),
    compiled with the model, and under CUDA graphs."""
    from lmlab.nn.decoder import Decoder, DecoderConfig
    from lmlab.nn.encoder import Encoder, EncoderConfig

    torch.manual_seed(0)
    T = 512
    dims = dict(vocab_size=256, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2)
    cls, config = (Decoder, DecoderConfig) if family == "decoder" else (Encoder, EncoderConfig)
    m = cls(config(**dims)).cuda()  # max_seq_len 1024 >= T
    ids = torch.randint(0, 256, (2, T), device="cuda")
    docs = (torch.rand(2, T, device="cuda") < 1 / 64).cumsum(1)

    def step(flex: bool):
        m.flex_masks = flex
        m.zero_grad()
        model = m if mode is None else torch.compile(m, mode=mode)
        logits = model(ids, doc_ids=docs)
        logits.float().square().mean().backward()
        return logits.detach().clone(), [p.grad.clone() for p in m.parameters()]

    tf32 = torch.backends.cuda.matmul.allow_tf32  # training's tf32=true may have set it
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        dense, flex = step(False), step(True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.testing.assert_close(flex[0], dense[0], atol=1e-4, rtol=1e-4)
    for got, want in zip(flex[1], dense[1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)


def test_attention_flex_reaches_the_model_in_training(tiny_cfg, tmp_path):
    """attention=flex through lmlab.train: the backbone takes block masks, and a run with CUDA
    graphs (experiment=gpt2_124m_1gpu's compile) trains to a finite validation loss."""
    flex = [*GPU, "objective.document_mask=true", "attention=flex", "compile=reduce-overhead"]
    metrics, objects = train(tiny_cfg(*flex, output_dir=tmp_path))
    assert objects["model"].backbone.flex_masks is True
    assert math.isfinite(metrics["val/loss"])
