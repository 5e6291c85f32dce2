from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.models.base import lr_lambda, param_groups
from lmlab.nn.blocks import (
    Attention,
    KVCache,
    RMSNorm,
    Rotary,
    SwiGLU,
    apply_rotary,
    key_padding_mask,
)
from lmlab.nn.decoder import Decoder, DecoderConfig
from lmlab.nn.sampling import sample_next


def tiny(**kw) -> Decoder:
    torch.manual_seed(0)
    cfg = dict(vocab_size=100, n_layers=2, d_model=32, n_heads=4, max_seq_len=64) | kw
    return Decoder(DecoderConfig(**cfg)).eval()


def test_shapes_and_vocab_padding():
    m = tiny()
    assert m.config.padded_vocab_size == 128
    assert m.config.mlp_hidden == 128  # 8/3 * 32 = 85 -> next multiple of 64
    x = torch.randint(0, 100, (3, 17))
    assert m(x).shape == (3, 17, 128)


def test_tied_embeddings_share_storage():
    m = tiny()
    assert m.lm_head.weight is m.embed.weight
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_params(False) == m.num_params(False) + 128 * 32


def test_config_errors_name_the_field():
    with pytest.raises(
        ValueError, match=r"model\.d_model=30 must be divisible by model\.n_heads=4"
    ):
        DecoderConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        DecoderConfig(d_model=32, n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_causal_masking(n_kv_heads):
    """Changing token t+1 leaves the logits at positions <= t unchanged (and changes later ones)."""
    m = tiny(n_kv_heads=n_kv_heads)
    x = torch.randint(0, 100, (2, 20))
    t = 9
    y = x.clone()
    y[:, t + 1] = (y[:, t + 1] + 1) % 100
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-4


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_kv_cache_matches_uncached_logits(n_kv_heads):
    m = tiny(n_kv_heads=n_kv_heads)
    x = torch.randint(0, 100, (2, 24))
    full = m(x)
    caches = m.new_caches(2, 24)
    # prefill 10, then a chunk of 5 (offset causal mask), then one token at a time
    parts = [m(x[:, :10], caches=caches), m(x[:, 10:15], caches=caches)]
    parts += [m(x[:, i : i + 1], caches=caches) for i in range(15, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


def test_greedy_generation_equals_argmax_of_uncached_forward():
    m = tiny()
    x = torch.randint(0, 100, (2, 5))
    out = m.generate(x, 10, temperature=0)
    seq = x
    for _ in range(10):
        nxt = m(seq)[:, -1, :100].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_prefix_generation_reads_the_prompt_both_ways_then_decodes_causally():
    """prefix=True: greedy tokens are the argmax of the uncached forward with the prompt as the
    prefix (prefix_len=T0, as a prefix LM trained), which a causal reading of it does not give.
    (init_std 0.2: at 0.02 the last token's own embedding decides every argmax, either way.)"""
    m = tiny(init_std=0.2)
    x = torch.randint(0, 100, (2, 6))
    out = m.generate(x, 8, temperature=0, prefix=True)
    assert not torch.equal(out, m.generate(x, 8, temperature=0))
    seq, whole = x, torch.full((2,), 6)
    for _ in range(8):
        nxt = m(seq, prefix_len=whole)[:, -1, :100].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)
    caches = m.new_caches(2, 14)
    both_ways = m.next_logits(x, caches, whole)
    causal = m.next_logits(x, m.new_caches(2, 14))
    assert (both_ways - causal).abs().max() > 1e-3
    with pytest.raises(ValueError, match="prefill it into empty caches"):
        m.next_logits(x[:, :1], caches, torch.full((2,), 1))


def test_generation_stops_at_eos_and_respects_max_len():
    m = tiny()
    x = torch.randint(0, 100, (1, 60))
    assert m.generate(x, 100, temperature=0).shape == (1, 64)  # capped by max_seq_len
    with pytest.raises(ValueError, match="no room to generate"):
        m.generate(torch.zeros(1, 64, dtype=torch.long), 5)
    first = m.generate(x[:, :5], 1, temperature=0)[0, -1].item()
    out = m.generate(x[:, :5], 10, temperature=0, eos_id=first)
    assert out.shape == (1, 6)  # stopped right after emitting eos


def test_rotary_is_a_rotation_and_relative():
    rot = Rotary(8, 32)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    # norms are preserved
    cos, sin = rot(5, 1)
    assert torch.allclose(apply_rotary(q, cos, sin).norm(), q.norm(), atol=1e-5)

    # <R_m q, R_n k> depends only on m - n
    def dot(m_, n_):
        return (apply_rotary(q, *rot(m_, 1)) * apply_rotary(k, *rot(n_, 1))).sum()

    assert torch.allclose(dot(7, 3), dot(14, 10), atol=1e-5)
    with pytest.raises(ValueError, match="beyond max_seq_len"):
        rot(30, 5)


@pytest.mark.parametrize("kv_heads", [3, 1])
def test_rotary_attention_depends_on_relative_positions_only(kv_heads):
    """The same tokens at positions 0.. and 9..: the output is the same (q and k rotated by their
    own positions along T, with one K/V head per query head or grouped), and not the output
    without RoPE."""
    torch.manual_seed(0)
    attn, rot = Attention(24, 3, kv_heads), Rotary(8, 32)
    x = torch.randn(2, 6, 24)
    at0, at9 = attn(x, rot(0, 6)), attn(x, rot(9, 6))
    torch.testing.assert_close(at9, at0, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(attn(x, None), at0, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kernel_equals_the_formula_forward_and_backward(dtype):
    """The eager kernel (one output tensor, inverse rotation as gradient) against RoPE's formula,
    on a strided view as attention passes it. In bf16 both round float32 results once, but the
    kernel's fused multiply-adds can differ from the formula's products in the last float32 bit,
    which may round to the neighbouring bf16 value: one bf16 step apart at most."""
    rot = Rotary(16, 32)
    cos, sin = rot(3, 10)
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 10, 3, 16, generator=gen).to(dtype).requires_grad_()
    x = qkv[:, :, 1:2]  # (2, 10, 1, 16): (B, T, H, hd), not contiguous
    grad = torch.randn(2, 10, 1, 16, generator=gen)

    def formula(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = cos[None, :, None], sin[None, :, None]
        return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).type_as(x)

    want = formula(x)
    (want.float() * grad).sum().backward()
    want_grad, qkv.grad = qkv.grad, None
    got = apply_rotary(x, cos, sin)
    (got.float() * grad).sum().backward()
    assert got.dtype == dtype and got.is_contiguous()
    rtol = 2**-7 if dtype == torch.bfloat16 else 0  # one bf16 step (8 significant bits)
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(qkv.grad, want_grad, rtol=rtol, atol=1e-6)


def test_rotary_tables_stay_float32_in_a_bf16_model():
    """``model.to(bf16)`` (Lightning's bf16-true) must not round the tables: RoPE of bf16
    activations is then the exact rotation rounded once to bf16, almost everywhere."""
    m = tiny(n_heads=1, max_seq_len=512).to(torch.bfloat16)
    fresh = Rotary(32, 512)
    assert m.rotary.cos.dtype == m.rotary.sin.dtype == torch.float32
    assert torch.equal(m.rotary.cos, fresh.cos) and torch.equal(m.rotary.sin, fresh.sin)
    assert m.embed.weight.dtype == torch.bfloat16 and "rotary.cos" not in m.state_dict()

    x = torch.randn(1, 512, 1, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    inv_freq = 1.0 / 10_000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    angles = torch.outer(torch.arange(512, dtype=torch.float64), inv_freq)
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = angles.cos()[:, None], angles.sin()[:, None]  # (T, 1, hd/2): x is (B, T, H, hd)
    exact = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    got = apply_rotary(x, *m.rotary(0, 512)).double()
    with_bf16_tables = apply_rotary(x, *(t.bfloat16() for t in m.rotary(0, 512))).double()
    assert (got != exact.bfloat16().double()).float().mean() < 0.01  # bf16 tables: 26%
    assert (got - exact).abs().mean() < 0.9 * (with_bf16_tables - exact).abs().mean()


@pytest.mark.parametrize("shape", [(2, 5, 24), (24,)])  # a lone vector: its backward failed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_kernel_equals_pytorchs_forward_and_backward(dtype, shape):
    norm = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 24))
    x = (3 * torch.randn(shape)).to(dtype).requires_grad_()
    grad = torch.randn(shape)

    def reference(x, weight):
        return F.rms_norm(x.float(), (24,), weight.float(), 1e-5).type_as(x)

    want = reference(x, norm.weight)
    (want.float() * grad).sum().backward()
    want_grads = x.grad, norm.weight.grad
    x.grad = norm.weight.grad = None
    got = norm(x)
    (got.float() * grad).sum().backward()
    assert got.dtype == dtype
    exact = dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6 if exact else 0.01, atol=1e-6)
    for g, w in zip((x.grad, norm.weight.grad), want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5 if exact else 0.01, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_equals_the_formula_forward_and_backward(dtype):
    """The eager gate (gradients written into one buffer, silu recomputed) against autograd through
    ``silu(gate) * up``: the same operations in the same dtype, so equal to the bit."""
    mlp = SwiGLU(16, 24).to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, 5, 16, dtype=dtype)

    def formula(x):
        gate, up = mlp.gate_up(x).chunk(2, dim=-1)
        return mlp.down(F.silu(gate) * up)

    want = formula(x)
    want.backward(grad)
    want_grads = [t.grad for t in (x, mlp.gate_up.weight, mlp.down.weight)]
    x.grad = mlp.gate_up.weight.grad = mlp.down.weight.grad = None
    got = mlp(x)
    got.backward(grad)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(
        (x.grad, mlp.gate_up.weight.grad, mlp.down.weight.grad), want_grads, strict=True
    ):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_attention_padding_mask_blocks_keys():
    torch.manual_seed(0)
    attn = Attention(16, 2, 2).eval()
    x = torch.randn(1, 6, 16)
    rope = Rotary(8, 16)(0, 6)
    mask = torch.tensor([True] * 4 + [False] * 2)[None, None, None, :]  # keys 4, 5 hidden
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 16)
    a = attn(x, rope, is_causal=False, attn_mask=mask)
    b = attn(y, rope, is_causal=False, attn_mask=mask)
    torch.testing.assert_close(a[:, :4], b[:, :4])


def test_key_padding_mask_reads_mask_values_on_the_host_only():
    assert key_padding_mask(None) is None
    assert key_padding_mask(torch.ones(2, 3, dtype=torch.bool)) is None  # no padding: fused kernels
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.equal(key_padding_mask(mask), mask[:, None, None, :])
    # Elsewhere (a GPU) the mask is used as it is, without reading it: a meta tensor has no values
    # to read, so a read would raise here.
    on_device = key_padding_mask(torch.ones(2, 3, dtype=torch.bool, device="meta"))
    assert on_device.shape == (2, 1, 1, 3) and on_device.device.type == "meta"


def test_kv_cache_overflow_is_an_error():
    c = KVCache(1, 1, 4, 2, device="cpu", dtype=torch.float32)
    c.append(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(ValueError, match="KV cache full"):
        c.append(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


def test_sampling_top_k_and_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...
    assert probs[0] < 0.7 < probs[:2].sum()
    assert set(sample_next(logits, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.5, generator=g).tolist()) == {0}
    assert sample_next(logits[:1], temperature=0).item() == 0
    # plain sampling follows the softmax: token 0 about 64% of 2000 draws (sd ~ 1.1%)
    freq = (sample_next(logits, generator=g) == 0).float().mean().item()
    assert abs(freq - probs[0].item()) < 0.05
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, top_p=0)


def test_top_k_and_top_p_keep_the_most_likely_tokens_wherever_they_are():
    """The same logits in another vocabulary order: the kept set is the most likely ids (logits in
    descending order could not tell those from the first ids)."""
    logits = torch.tensor([[-1.0, 1.0, 3.0, 0.0, 2.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {2, 4}
    assert set(sample_next(logits, top_p=0.7, generator=g).tolist()) == {2, 4}
    assert set(sample_next(logits, top_p=0.9, generator=g).tolist()) == {1, 2, 4}  # 0.64+0.24 < 0.9


def test_temperature_divides_the_logits():
    """Sampling at temperature t draws from softmax(logits / t): token 0 of [3, 2, 1, 0, -1] is
    drawn with probability 0.865 at t = 0.5, 0.64 at t = 1 and 0.42 at t = 2 (4000 draws: sd
    under 0.008); with the same generator state, temperature t on the logits equals 1 on
    logits / t, draw for draw."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    for t in (0.5, 1.0, 2.0):
        g = torch.Generator().manual_seed(1)
        freq = (sample_next(logits, temperature=t, generator=g) == 0).float().mean().item()
        assert freq == pytest.approx((logits[0] / t).softmax(-1)[0].item(), abs=0.03)
        a = sample_next(logits, temperature=t, generator=torch.Generator().manual_seed(2))
        b = sample_next(logits / t, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b)


def test_top_k_keeps_exactly_k_tokens_when_logits_tie():
    g = torch.Generator().manual_seed(0)
    # all equal: top_k=1 is one fixed token, not a uniform draw over the vocabulary
    assert len(set(sample_next(torch.zeros(1000, 5), top_k=1, generator=g).tolist())) == 1
    # bf16 logits where 6 tokens tie for first place: 3 of them stay (each drawn ~1/3 of the time)
    logits = torch.tensor([[1.0] * 6 + [0.0] * 4], dtype=torch.bfloat16).repeat(2000, 1)
    drawn = set(sample_next(logits, top_k=3, generator=g).tolist())
    assert len(drawn) == 3 and drawn <= set(range(6))


def test_param_groups_decay_only_matrices():
    m = tiny()
    decay, no_decay = param_groups(m, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == m.num_params(non_embedding=False)  # tied weight counted once


def test_lr_schedule_warmup_then_cosine():
    f = [lr_lambda(s, 10, 110, 0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[4] == pytest.approx(0.5)  # linear warmup: step s at (s + 1) / warmup
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    # a quarter and three quarters of the way: the cosine's values (a linear decay gives 0.775
    # and 0.325 there)
    assert f[35] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert f[85] == pytest.approx(0.1 + 0.45 * (1 + math.cos(3 * math.pi / 4)))
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(f[9:]))  # non-increasing after warmup


def test_scaled_init_of_residual_projections():
    m = tiny(n_layers=8, d_model=64, n_heads=4)
    std_out = m.blocks[0].attn.out.weight.std().item()
    std_qkv = m.blocks[0].attn.qkv.weight.std().item()
    assert std_qkv == pytest.approx(0.02, rel=0.05)
    assert std_out == pytest.approx(0.02 / 4, rel=0.1)  # 1 / sqrt(2 * 8)


def test_scaled_init_counts_both_stacks_of_an_encoder_decoder():
    """GPT-2's 1/sqrt(2 L) with L the residual blocks of both stacks (3 + 5 here: 0.02 / 4), on
    every projection that writes into a residual stream, cross-attention's included; the others
    at 0.02."""
    from lmlab.nn.encoder_decoder import EncoderDecoder, EncoderDecoderConfig

    c = EncoderDecoderConfig(vocab_size=256, d_model=64, n_heads=4, n_layers=3, n_decoder_layers=5)
    m = EncoderDecoder(c)
    for block in [*m.enc_blocks, *m.dec_blocks]:
        cross = [block.cross.out] if hasattr(block, "cross") else []
        for layer in [block.attn.out, block.mlp.down, *cross]:
            assert layer.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.dec_blocks[0].cross.q.weight.std().item() == pytest.approx(0.02, rel=0.1)
