"""lmlab.parallel in one process: activation checkpointing, meta-device init, compile, precision."""

from __future__ import annotations

import math
import shutil
import types

import pytest
import torch
from torch.nn.attention import SDPBackend

from lmlab.data.tokenizers import byte_tokenizer
from lmlab.errors import ConfigError
from lmlab.models.decoder import DecoderLM
from lmlab.models.encoder_decoder import EncoderDecoderLM
from lmlab.nn.blocks import Block, CrossBlock
from lmlab.parallel import COMPILE_MODES, FSDP, blocks, compile_mode, parallelize
from lmlab.train import resolve_ckpt_path

SMALL = dict(n_layers=3, d_model=32, n_heads=2, max_seq_len=16)
OPTIM = {"lr": 1e-3, "weight_decay": 0.1}


def decoder(**kw) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(vocab_size=100, special_ids={"eos": 0}, optim=OPTIM, **SMALL, **kw)


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (4, 17), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def loss_and_grads(model: DecoderLM) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.configure_model()
    nll, count, *_ = model.nll(batch())
    loss = nll / count
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_loss_and_gradients_and_recomputes():
    plain_loss, plain_grads = loss_and_grads(decoder())
    model = decoder(activation_checkpointing=True)
    calls = []
    for block in blocks(model.backbone):
        block.attn.register_forward_hook(lambda *_: calls.append(1))
    loss, grads = loss_and_grads(model)
    # The same operations in the same order: bit-identical on CPU.
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()  # parameter names unchanged (checkpoints match)
    for name, g in grads.items():
        assert torch.equal(g, plain_grads[name]), name
    # Each block ran twice: once in the forward, once recomputed in the backward.
    assert len(calls) == 2 * SMALL["n_layers"]
    # No recomputation (and no checkpoint overhead) without gradients.
    calls.clear()
    with torch.no_grad():
        model.nll(batch())
    assert len(calls) == SMALL["n_layers"]


def test_blocks_are_the_backbones_named_block_class():
    m = EncoderDecoderLM(
        vocab_size=100,
        special_ids={"eos": 0, "pad": 1},
        optim=OPTIM,
        n_layers=2,
        n_decoder_layers=3,
        d_model=32,
        n_heads=2,
    )
    kinds = [type(b) for b in blocks(m.backbone)]
    assert kinds == [Block, Block, CrossBlock, CrossBlock, CrossBlock]


def test_meta_init_materialises_the_same_initialisation():
    ref = decoder().backbone
    model = decoder(init_device="meta")
    assert all(p.is_meta for p in model.backbone.parameters())
    model.configure_model()  # no strategy: materialised on the CPU
    bb = model.backbone
    assert not any(p.is_meta for p in bb.parameters())
    assert not any(b.is_meta for b in bb.buffers())
    assert bb.lm_head.weight is bb.embed.weight  # the tie survives materialisation
    for name, p in bb.named_parameters():
        if p.dim() < 2:
            assert torch.equal(p, torch.ones_like(p)), name  # norm gains start at one
    for name, b in bb.named_buffers():
        assert torch.equal(b, dict(ref.named_buffers())[name]), name  # rotary tables
    # GPT-2 init: N(0, 0.02), residual output projections N(0, 0.02 / sqrt(2 L)); the sample std
    # of >= 3072 draws is within 10% of sigma with overwhelming probability.
    scaled = 0.02 / math.sqrt(2 * SMALL["n_layers"])
    for name, p in bb.named_parameters():
        if p.dim() >= 2:
            expected = scaled if name.endswith(("attn.out.weight", "mlp.down.weight")) else 0.02
            assert p.std().item() == pytest.approx(expected, rel=0.1), name
            assert abs(p.mean().item()) < expected / 5, name
    # Near-uniform predictions at the start, over the padded vocabulary, as an ordinary model's.
    loss, _ = loss_and_grads(model)
    assert loss.item() == pytest.approx(math.log(bb.config.padded_vocab_size), rel=0.02)


def test_bf16_autocast_matches_fp32_within_bfloat16_precision():
    model = decoder()
    model.configure_model()
    with torch.no_grad():
        nll, count, *_ = model.nll(batch())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll16, count16, *_ = model.nll(batch())
    assert count16 == count
    # bfloat16 keeps 8 bits of mantissa (relative error 2^-8 per rounding); the loss is computed
    # in fp32 from bf16 logits, so it agrees to well under 1%.
    assert (nll16 / count16).item() == pytest.approx((nll / count).item(), rel=1e-2)
    model_bf16 = decoder().to(torch.bfloat16)
    with torch.no_grad():
        nll_b, count_b, *_ = model_bf16.nll(batch())
    assert (nll_b / count_b).item() == pytest.approx((nll / count).item(), rel=2e-2)


def test_bf16_runs_use_the_fused_adamw_and_still_clip_the_global_norm():
    model = decoder()
    model.configure_model()
    model._trainer = types.SimpleNamespace(precision="bf16-mixed", max_steps=10)
    optimizer = model.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True
    nll, count, *_ = model.nll(batch())
    (1000 * nll / count).backward()  # gradients far above the clip value
    params = [p for p in model.parameters() if p.grad is not None]
    norm = lambda: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert norm() > 10
    model.configure_gradient_clipping(optimizer, 1.0, "norm")
    assert norm().item() == pytest.approx(1.0, rel=1e-4)


def test_bf16_runs_clip_by_value_and_leave_gradients_alone_without_a_clip_value():
    """gradient_clip_algorithm=value under bf16-mixed (the fused AdamW): Lightning's own path
    refused the fused optimizer at the first step. A clip value of 0 (or null) clips nothing."""
    model = decoder()
    model.configure_model()
    model._trainer = types.SimpleNamespace(precision="bf16-mixed", max_steps=10)
    optimizer = model.configure_optimizers()["optimizer"]
    nll, count, *_ = model.nll(batch())
    (1000 * nll / count).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    before = [p.grad.clone() for p in params]
    model.configure_gradient_clipping(optimizer, 0, "norm")
    model.configure_gradient_clipping(optimizer, None, "value")
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before, strict=True))
    assert max(g.abs().max() for g in before) > 0.01
    model.configure_gradient_clipping(optimizer, 0.01, "value")
    for p, g in zip(params, before, strict=True):
        assert torch.equal(p.grad, g.clamp(-0.01, 0.01))


@pytest.mark.parametrize("family", ["decoder", "prefix_lm", "encoder", "encoder_decoder"])
@pytest.mark.parametrize("loss_chunk_size", [0, 5])
def test_training_loss_traces_to_one_graph(family, loss_chunk_size):
    """What compile=true compiles (LMModule.nll, the batch as on_before_batch_transfer leaves it)
    is one graph without breaks for every family, padded encoder inputs and MLM targets included:
    a break splits the compiled step and usually means a value read from the device."""
    import torch._dynamo

    from lmlab.models.encoder import EncoderLM

    cls = {"encoder": EncoderLM, "encoder_decoder": EncoderDecoderLM}.get(family, DecoderLM)
    torch.manual_seed(0)
    model = cls(
        vocab_size=100, special_ids={}, optim=OPTIM, loss_chunk_size=loss_chunk_size, **SMALL
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 100, (2, 16), generator=g)
    raw = {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
    if family == "prefix_lm":
        raw["prefix_len"] = torch.tensor([3, 7])
    if family == "encoder":
        raw["labels"] = torch.where(torch.rand(2, 16, generator=g) < 0.3, ids, -100)
    if family == "encoder_decoder":
        mask = torch.ones(2, 16, dtype=torch.bool)
        mask[1, 12:] = False  # padding: the mask stays and reaches the attention
        raw |= {"decoder_input_ids": ids[:, :8], "labels": ids[:, 1:9], "attention_mask": mask}
    batch = model.on_before_batch_transfer(raw, 0)
    explained = torch._dynamo.explain(model.nll)(batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), [
        r.reason for r in explained.break_reasons
    ]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="torch.compile on CPU (inductor) needs a C compiler",
)
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_training_step_matches_eager(scope):
    eager_loss, eager_grads = loss_and_grads(decoder())
    model = decoder(compile=True, compile_scope=scope)
    loss, grads = loss_and_grads(model)
    if scope == "model":
        assert hasattr(model.nll, "_torchdynamo_orig_callable")  # forward + loss compiled
    else:  # each block, and the head + loss
        assert not hasattr(model.nll, "_torchdynamo_orig_callable")
        assert hasattr(model.head_loss, "_torchdynamo_orig_callable")
        assert all(b._compiled_call_impl is not None for b in blocks(model.backbone))
    assert not any("_orig_mod" in n for n in model.state_dict())  # checkpoint keys unchanged
    assert grads.keys() == eager_grads.keys()
    # Inductor fuses and reorders float operations: equal to float32 rounding, not bit for bit.
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_compile_setting_names_a_torch_compile_mode():
    assert compile_mode(False) is None and compile_mode(None) is None
    assert compile_mode(True) == "default"
    for mode in COMPILE_MODES:
        assert compile_mode(mode) == mode
    for bad in ("fast", 1, "true"):
        with pytest.raises(ValueError, match="is not a setting; use false, true"):
            compile_mode(bad)


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """The loss computation (one process), or each block and the head + loss (compile_scope=blocks,
    and always under FSDP), are compiled in the configured mode."""
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append((getattr(fn, "__name__", None), kwargs.get("mode")))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = decoder(compile="max-autotune-no-cudagraphs")
    model.configure_model()
    assert calls == [("nll", "max-autotune-no-cudagraphs")]
    calls.clear()
    parallelize(decoder().backbone, compile_blocks="reduce-overhead")
    assert calls == [("_call_impl", "reduce-overhead")] * SMALL["n_layers"]
    calls.clear()
    decoder(compile="max-autotune", compile_scope="blocks").configure_model()
    assert calls == [("_call_impl", "max-autotune")] * SMALL["n_layers"] + [
        ("head_loss", "max-autotune")
    ]
    calls.clear()
    decoder(compile=False).configure_model()
    decoder(compile=False, compile_scope="blocks").configure_model()
    assert calls == []

    class Sharding(FSDP):  # records the sharding instead of doing it (no process group here)
        root_device = torch.device("cpu")

        def shard(self, backbone):
            calls.append(("shard", None))

    for scope in ("model", "blocks"):  # FSDP: each block (inside its hooks), then head + loss
        calls.clear()
        model = decoder(compile="reduce-overhead", compile_scope=scope)
        model._trainer = types.SimpleNamespace(strategy=Sharding())
        model.configure_model()
        blocks_then_shard = [("_call_impl", "reduce-overhead")] * SMALL["n_layers"] + [
            ("shard", None)
        ]
        assert calls == [*blocks_then_shard, ("head_loss", "reduce-overhead")], scope
    with pytest.raises(ValueError, match="compile_scope='layers' is not a setting; use model or"):
        decoder(compile=True, compile_scope="layers")


@pytest.fixture
def graphs(monkeypatch):
    """torch.compile traced with the "eager" backend (what is compiled, not how fast: inductor's
    code generation is what test_compiled_training_step_matches_eager runs); returns dynamo's
    counters (``counters["stats"]["unique_graphs"]``: graphs traced so far), cleared before and
    after the test."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    try:
        yield counters
    finally:
        torch._dynamo.reset()
        counters.clear()


@pytest.mark.parametrize(("family", "kinds"), [("decoder", 1), ("encoder_decoder", 2)])
def test_compile_scope_blocks_compiles_one_graph_per_kind_of_block(graphs, family, kinds):
    """compile_scope=blocks: however many blocks, one graph per kind of block (the
    encoder-decoder's encoder blocks and its decoder blocks with cross-attention), and one for the
    head + loss, each traced once for training and once for validation (no gradients)."""
    torch.manual_seed(0)
    dims = dict(SMALL, n_layers=5)
    if family == "encoder_decoder":
        dims |= dict(n_decoder_layers=4, max_target_len=8)
    cls = EncoderDecoderLM if family == "encoder_decoder" else DecoderLM
    model = cls(
        vocab_size=100, special_ids={}, optim=OPTIM, compile=True, compile_scope="blocks", **dims
    )
    model.configure_model()
    b = batch()
    if family == "encoder_decoder":
        b |= {"decoder_input_ids": b["input_ids"][:, :8], "labels": b["labels"][:, :8]}
    eager = cls(vocab_size=100, special_ids={}, optim=OPTIM, **dims)
    eager.load_state_dict(model.state_dict())
    for _ in range(3):
        nll, count, *_ = model.nll(b)
        (nll / count).backward()
        assert nll.item() == pytest.approx(eager.nll(b)[0].item(), rel=1e-5)
    assert graphs["stats"]["unique_graphs"] == kinds + 1
    model.eval()
    for _ in range(2):
        with torch.no_grad():
            model.nll(b)
    assert graphs["stats"]["unique_graphs"] == 2 * (kinds + 1)  # the same again, for validation
    assert sum(graphs["graph_break"].values()) == 0


@pytest.mark.parametrize("torch_2_5", [False, True])
def test_generation_runs_the_compiled_blocks_eager(graphs, monkeypatch, torch_2_5):
    """Generation (the samples at each validation) calls the blocks that compile_scope=blocks
    compiled, with a KV cache one token longer at each call: it runs them uncompiled, so it traces
    no graph (before, every generated token compiled the blocks again, until torch's recompile
    limit, shared by all blocks, after which new training shapes ran uncompiled), and generates
    what the uncompiled model does. (torch 2.5 has no torch.compiler.set_stance: the fallback.)"""
    if torch_2_5:
        monkeypatch.delattr(torch.compiler, "set_stance")
    tok = byte_tokenizer(num_sentinels=4)
    kw = dict(vocab_size=tok.vocab_size, special_ids=tok.special, optim=OPTIM, **SMALL)
    torch.manual_seed(0)
    model = DecoderLM(compile=True, compile_scope="blocks", **kw)
    model.configure_model()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    nll, count, *_ = model.nll({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    (nll / count).backward()
    traced = graphs["stats"]["unique_graphs"]
    assert traced == 2  # the block and the head + loss
    texts = model.generate_text(tok, ["to be", ""], max_new_tokens=12, temperature=0.0)
    assert graphs["stats"]["unique_graphs"] == traced
    plain = DecoderLM(**kw)
    plain.load_state_dict(model.state_dict())
    assert texts == plain.generate_text(tok, ["to be", ""], max_new_tokens=12, temperature=0.0)
    model.nll({"input_ids": ids[:1, :-1], "labels": ids[:1, 1:]})  # a new shape still compiles
    assert graphs["stats"]["unique_graphs"] > traced


def test_ckpt_path_auto_resumes_when_last_exists_and_starts_fresh_otherwise(tmp_path):
    assert resolve_ckpt_path("auto", tmp_path) is None
    # last is a resume: without a last.ckpt it is refused, never a silent fresh start
    with pytest.raises(ConfigError, match=r"ckpt_path=last but .*last\.ckpt does not exist"):
        resolve_ckpt_path("last", tmp_path)
    with pytest.raises(ConfigError, match=r"ckpt_path=.*nope\.ckpt does not exist"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert resolve_ckpt_path("auto", tmp_path) == str(last)
    assert resolve_ckpt_path("last", tmp_path) == str(last)
    # A sharded (fsdp) checkpoint is a folder.
    last.unlink()
    last.mkdir()
    assert resolve_ckpt_path("auto", tmp_path) == str(last)


def test_a_padding_mask_without_padding_is_dropped_on_the_host():
    model = decoder()
    ids = torch.zeros(2, 4, dtype=torch.long)
    full = model.on_before_batch_transfer({"input_ids": ids, "attention_mask": ids == 0}, 0)
    assert "attention_mask" not in full  # the fused attention path, no device sync for the mask
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    padded = model.on_before_batch_transfer({"input_ids": ids, "attention_mask": mask}, 0)
    assert padded["attention_mask"] is mask


def test_bf16_true_trains_on_the_cpu(tiny_cfg):
    from lmlab.train import train

    metrics, objects = train(tiny_cfg("trainer.precision=bf16-true"))
    weights = {p.dtype for p in objects["model"].backbone.parameters()}
    assert weights == {torch.bfloat16}  # weights, activations and optimizer state in bfloat16
    assert math.isfinite(metrics["val/loss"])
    assert metrics["val/loss"] < math.log(objects["model"].config.padded_vocab_size)  # it learned


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_finite_flag_reads_the_loss_it_was_made_from(device):
    from lmlab.models.base import FiniteFlag

    values = [1.5, float("nan"), float("inf"), -float("inf")]
    flags = [FiniteFlag(torch.tensor(v, device=device), step=0) for v in values]
    assert [f.value() for f in flags] == [True, False, False, False]


def test_replace_folder_swaps_a_sharded_checkpoint_whole(tmp_path):
    from lmlab.parallel import replace_folder

    dst, src = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.tmp"
    for folder, text in ((dst, "old"), (src, "new")):
        folder.mkdir()
        (folder / "meta.pt").write_text(text)
        (folder / f"__{text}.distcp").write_text(text)
    replace_folder(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in dst.iterdir()) == ["__new.distcp", "meta.pt"]  # no old shard
    assert (dst / "meta.pt").read_text() == "new"
    # A single-file checkpoint at the target (save_distributed_checkpoint was false before).
    dst2, src2 = tmp_path / "best.ckpt", tmp_path / ".best.ckpt.tmp"
    dst2.write_text("file")
    src2.mkdir()
    replace_folder(src2, dst2)
    assert dst2.is_dir() and not src2.exists()


@pytest.mark.parametrize("written", [True, False])
def test_a_sharded_save_killed_between_its_renames_is_recovered_before_resuming(
    tmp_path, caplog, written
):
    """The window of replace_folder: last.ckpt moved to .last.ckpt.old, the new save (whole) not
    yet renamed. ckpt_path=last (and auto, which would otherwise start afresh over the run) finds
    the new save; where the new folder is not whole, the previous checkpoint comes back."""
    from lmlab.train import resolve_ckpt_path

    folder = tmp_path / "checkpoints"
    old, new = folder / ".last.ckpt.old", folder / ".last.ckpt.tmp"
    for path, text in ((old, "old"), (new, "new")):
        path.mkdir(parents=True)
        (path / "__0_0.distcp").write_text(text)
    if written:
        (new / ".metadata").write_text("new")
        (new / "meta.pt").write_text("new")
    for how in ("auto", "last"):
        assert resolve_ckpt_path(how, tmp_path) == str(folder / "last.ckpt")
    kept = "new" if written else "old"
    assert (folder / "last.ckpt" / "__0_0.distcp").read_text() == kept
    assert not old.exists() and new.exists() != written
    assert "recovered it from that save's folders" in caplog.text


def test_a_fresh_start_over_a_sharded_save_killed_between_its_renames_is_refused(tmp_path):
    """Without ckpt_path the folder was not recovered: no last.ckpt, so the fresh start went on,
    and its first save deleted .last.ckpt.old, the run's only checkpoint."""
    from lmlab.errors import RunExists
    from lmlab.train import check_fresh_start

    old = tmp_path / "checkpoints" / ".last.ckpt.old"
    old.mkdir(parents=True)
    (old / "__0_0.distcp").write_text("old")
    with pytest.raises(RunExists, match="already holds a run"):
        check_fresh_start(tmp_path)
    assert (tmp_path / "checkpoints" / "last.ckpt" / "__0_0.distcp").read_text() == "old"


def test_a_fresh_start_over_checkpoints_without_last_ckpt_is_refused(tmp_path):
    """Only last.ckpt stopped a fresh start: a folder holding another run's best.ckpt (or a run
    whose last.ckpt was removed) was trained over, and ModelCheckpoint's saves replaced it."""
    from lmlab.errors import RunExists
    from lmlab.train import check_fresh_start

    check_fresh_start(tmp_path)  # an empty folder: a fresh start
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    check_fresh_start(tmp_path)
    (tmp_path / "checkpoints" / "best.ckpt").write_bytes(b"another run's")
    with pytest.raises(
        RunExists,
        match=r"holds a run \(best\.ckpt in .*\); resume from one of them .*no last\.ckpt",
    ):
        check_fresh_start(tmp_path)
    assert (tmp_path / "checkpoints" / "best.ckpt").read_bytes() == b"another run's"


def test_tf32_setting_reaches_cuda_matmuls_only(tiny_cfg, tmp_path):
    """tf32 (default true) switches CUDA's float32 matmuls and convolutions to TF32; false keeps
    full fp32; oneDNN's CPU matmuls keep their precision either way."""
    from lmlab.train import train

    def onednn_precision():  # its own setting from torch 2.9 on
        onednn = getattr(torch.backends.mkldnn, "matmul", None)
        return onednn and onednn.fp32_precision

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    product = a @ b  # bf16 products (`set_float32_matmul_precision("medium")`) change it here
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    cpu = onednn_precision()
    try:
        for setting in (True, False):
            out = tmp_path / f"tf32-{setting}"
            train(tiny_cfg(f"tf32={str(setting).lower()}", "trainer.max_steps=3", output_dir=out))
            assert torch.backends.cuda.matmul.allow_tf32 is setting
            assert torch.backends.cudnn.allow_tf32 is setting
            assert onednn_precision() == cpu and torch.equal(a @ b, product)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_attention_setting_parses_and_refuses_unknown_or_missing_kernels():
    from lmlab.parallel import attention_kernels

    assert attention_kernels("auto", cuda=False) is None and attention_kernels(None, False) is None
    assert attention_kernels("math", cuda=False) == ["math"]
    assert attention_kernels(["cudnn", "flash"], cuda=True) == ["cudnn", "flash"]
    assert attention_kernels("flex", cuda=True) == ["flex"]
    with pytest.raises(
        ValueError, match=r"fast is not a kernel; use auto, flex, one of cudnn, flash"
    ):
        attention_kernels(["flash", "fast"], cuda=True)
    with pytest.raises(ValueError, match=r"an empty list is not a kernel"):
        attention_kernels([], cuda=True)
    with pytest.raises(ValueError, match=r"efficient attention needs a CUDA GPU; on CPUs use auto"):
        attention_kernels(["flash", "efficient"], cuda=False)


@pytest.mark.parametrize("setting", ["math", "flash", "[flash,math]"])
def test_attention_setting_picks_the_kernel_during_training_only(tiny_cfg, monkeypatch, setting):
    """The kernel SDPA picks for attention inputs like the run's, asked inside a training step and
    a validation step, is the one set (or the first of the list); afterwards PyTorch's own choice
    is back."""
    import lmlab.models.base as base_mod
    from lmlab.train import train

    q = torch.randn(2, 2, 8, 16)  # what the blocks pass: (B, H, T, head_dim), no mask
    picked = []

    def wrap(original):
        def step(self, batch, batch_idx):
            picked.append(SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)))
            return original(self, batch, batch_idx)

        return step

    for name in ("training_step", "validation_step"):
        monkeypatch.setattr(base_mod.LMModule, name, wrap(getattr(base_mod.LMModule, name)))
    auto = SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True))
    assert auto == SDPBackend.FLASH_ATTENTION  # the CPU's own first choice
    train(tiny_cfg(f"attention={setting}", "trainer.max_steps=3"))
    first = SDPBackend.MATH if setting == "math" else SDPBackend.FLASH_ATTENTION
    assert len(picked) > 3 and set(picked) == {first}
    assert SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)) == auto


def test_samples_at_validation_may_use_every_attention_kernel(tiny_cfg, monkeypatch):
    """Generation is not a training step: under attention=math the samples written at validation
    get PyTorch's own choice back, its kernels and their order (on a GPU, attention=cudnn alone
    cannot take their float32 calls: SDPA raised "No available kernel")."""
    from lmlab.train import train

    q = torch.randn(2, 2, 8, 16)

    def order():  # torch >= 2.6
        return tuple(getattr(torch._C, "_get_sdp_priority_order", tuple)())

    default_order, picked = order(), []
    original = DecoderLM.samples

    def samples(self, *args, **kwargs):
        picked.append((SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)), order()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DecoderLM, "samples", samples)
    train(tiny_cfg("attention=math", "trainer.max_steps=3"))
    assert picked and set(picked) == {(SDPBackend.FLASH_ATTENTION, default_order)}
