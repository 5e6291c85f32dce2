"""Each backbone against a reference of the architecture it claims, written out here from the
papers' formulas with none of lmlab's code: given the same weights, the same logits. The decoder is
also held to Hugging Face's ``LlamaForCausalLM`` (where transformers is installed), which is what
``benchmarks/vs_hf.py`` races it against.

The reference: pre-norm blocks (Xiong et al., 2020) with RMSNorm (Zhang & Sennrich, 2019), rotary
positions as complex rotations of the pairs (x_i, x_{i + d/2}) (Su et al., 2021; the pairing of
GPT-NeoX and Hugging Face's LLaMA), attention as softmax(q k^T / sqrt(d)) v with each key/value head
shared by a contiguous group of query heads (Ainslie et al., 2023), SwiGLU (Shazeer, 2020), and for
the encoder-decoder, cross-attention without positions (Vaswani et al., 2017). Weights are drawn at
scales where every one of them moves the logits (norm gains far from one)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.nn.decoder import Decoder, DecoderConfig
from lmlab.nn.encoder import Encoder, EncoderConfig
from lmlab.nn.encoder_decoder import EncoderDecoder, EncoderDecoderConfig

V, D, H, THETA = 128, 32, 4, 500.0  # a small theta: positions far apart rotate differently


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight drawn at a scale that keeps activations O(1); norm gains around 1 +- 0.5."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            else:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


# -- the reference ----------------------------------------------------------------------------
def rms_norm(x, gain, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def rotate(x, start=0):
    """x (B, heads, T, d): the pair (x_i, x_{i+d/2}) at position p, as the complex number
    x_i + i x_{i+d/2}, times exp(i p theta^(-2i/d))."""
    T, d = x.shape[-2], x.shape[-1]
    freq = THETA ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(start, start + T, dtype=torch.float64)[:, None] * freq
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.polar(
        torch.ones_like(angle), angle
    )
    return torch.cat([z.real, z.imag], -1).float()


def attend(q, k, v, allowed):
    """q (B, H, T, d), k and v (B, KV, S, d); ``allowed`` broadcasts to (B, H, T, S)."""
    group = q.shape[1] // k.shape[1]  # query heads h share key/value head h // group
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def heads(x, n):
    B, T, _ = x.shape
    return x.view(B, T, n, -1).transpose(1, 2)


def merge(y):
    B, _, T, _ = y.shape
    return y.transpose(1, 2).reshape(B, T, -1)


def self_attention(attn, x, allowed, start=0, positions=True):
    n_q, n_kv = attn.n_heads, attn.n_kv_heads
    wq, wk, wv = attn.qkv.weight.split([n_q * D // H, n_kv * D // H, n_kv * D // H])
    q, k, v = heads(x @ wq.T, n_q), heads(x @ wk.T, n_kv), heads(x @ wv.T, n_kv)
    if positions:
        q, k = rotate(q, start), rotate(k, start)
    return merge(attend(q, k, v, allowed)) @ attn.out.weight.T


def cross_attention(cross, x, memory, allowed):
    wk, wv = cross.kv.weight.chunk(2)
    n_q, n_kv = cross.n_heads, cross.n_kv_heads
    q = heads(x @ cross.q.weight.T, n_q)
    k, v = heads(memory @ wk.T, n_kv), heads(memory @ wv.T, n_kv)
    return merge(attend(q, k, v, allowed)) @ cross.out.weight.T


def swiglu(mlp, x):
    gate, up = mlp.gate_up.weight.chunk(2)
    return (F.silu(x @ gate.T) * (x @ up.T)) @ mlp.down.weight.T


def block(b, x, allowed, positions=True):
    x = x + self_attention(b.attn, rms_norm(x, b.attn_norm.weight), allowed, positions=positions)
    return x + swiglu(b.mlp, rms_norm(x, b.mlp_norm.weight))


def causal(T, S=None, start=0):
    S = T if S is None else S
    return (torch.arange(S)[None, :] <= torch.arange(start, start + T)[:, None])[None, None]


def keys(mask):
    """(B, S) True at real tokens -> (B, 1, 1, S)."""
    return mask[:, None, None, :]


def reference_decoder(m, ids, allowed):
    x = m.embed.weight[ids]
    for b in m.blocks:
        x = block(b, x, allowed)
    return rms_norm(x, m.norm.weight) @ m.lm_head.weight.T


def reference_encoder(m, ids, mask):
    x = m.embed.weight[ids]
    learned = m.pos_embed is not None
    if learned:
        x = x + m.pos_embed.weight[: ids.shape[1]]
    for b in m.blocks:
        x = block(b, x, keys(mask), positions=not learned)
    return rms_norm(x, m.norm.weight) @ m.lm_head.weight.T


def reference_encoder_decoder(m, ids, mask, targets):
    memory = m.embed.weight[ids]
    for b in m.enc_blocks:
        memory = block(b, memory, keys(mask))
    memory = rms_norm(memory, m.enc_norm.weight)
    x = m.embed.weight[targets]
    for b in m.dec_blocks:
        x = x + self_attention(b.attn, rms_norm(x, b.attn_norm.weight), causal(x.shape[1]))
        x = x + cross_attention(b.cross, rms_norm(x, b.cross_norm.weight), memory, keys(mask))
        x = x + swiglu(b.mlp, rms_norm(x, b.mlp_norm.weight))
    return rms_norm(x, m.dec_norm.weight) @ m.lm_head.weight.T


# -- the tests --------------------------------------------------------------------------------
def dims(**kw):
    return dict(vocab_size=V, d_model=D, n_heads=H, n_layers=2, rope_theta=THETA, **kw)


def ids(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@torch.no_grad()
def test_decoder_is_the_reference_llama(n_kv_heads):
    m = randomize(Decoder(DecoderConfig(**dims(n_kv_heads=n_kv_heads, max_seq_len=24))))
    x = ids(2, 24)
    close(m(x), reference_decoder(m, x, causal(24)))


@torch.no_grad()
def test_prefix_lm_attends_both_ways_inside_the_prefix_only():
    """Raffel et al. (2020, 3.2.1): a query sees every key of its row's prefix, causally after."""
    m = randomize(Decoder(DecoderConfig(**dims(max_seq_len=16))))
    x, prefix = ids(2, 16), torch.tensor([5, 11])
    allowed = causal(16) | (torch.arange(16)[None, None, None, :] < prefix[:, None, None, None])
    close(m(x, prefix_len=prefix), reference_decoder(m, x, allowed))


@torch.no_grad()
def test_decoder_generation_is_the_references_greedy_continuation():
    """The KV cache and the rotary offsets of incremental decoding against the reference's full
    recomputation at every step."""
    m = randomize(Decoder(DecoderConfig(**dims(n_kv_heads=2, max_seq_len=20))))
    prompt = ids(2, 7)
    out = m.generate(prompt, 9, temperature=0.0)
    seq = prompt
    for _ in range(9):
        logits = reference_decoder(m, seq, causal(seq.shape[1]))[:, -1, :V]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("positions", ["rope", "learned"])
@torch.no_grad()
def test_encoder_is_the_reference_bidirectional_stack(positions):
    m = randomize(Encoder(EncoderConfig(**dims(n_kv_heads=2, max_seq_len=16, positions=positions))))
    x = ids(3, 16)
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, 10:] = mask[2, 3:] = False  # padding at the ends of two rows
    close(m(x, mask), reference_encoder(m, x, mask))


@torch.no_grad()
def test_encoder_decoder_is_the_reference_with_cross_attention():
    c = EncoderDecoderConfig(**dims(n_kv_heads=2, max_seq_len=16), n_decoder_layers=2)
    m = randomize(EncoderDecoder(c))
    x, y = ids(2, 16), ids(2, 9, seed=2)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, 12:] = False
    close(m(x, y, mask), reference_encoder_decoder(m, x, mask, y))


@torch.no_grad()
def test_encoder_decoder_generation_is_the_references_greedy_continuation():
    c = EncoderDecoderConfig(**dims(max_seq_len=16), n_decoder_layers=2, max_target_len=12)
    m = randomize(EncoderDecoder(c))
    x = ids(2, 16)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 9:] = False
    out = m.generate(x, 8, start_id=1, attention_mask=mask, temperature=0.0)
    y = torch.ones(2, 1, dtype=torch.long)
    for _ in range(8):
        logits = reference_encoder_decoder(m, x, mask, y)[:, -1, :V]
        y = torch.cat([y, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, y[:, 1:])


@pytest.mark.parametrize("n_kv_heads", [4, 1])
@torch.no_grad()
def test_decoder_equals_hugging_face_llama_with_the_same_weights(n_kv_heads):
    """The model vs_hf.py races lmlab's decoder against computes the same function."""
    transformers = pytest.importorskip("transformers")
    m = randomize(Decoder(DecoderConfig(**dims(n_kv_heads=n_kv_heads, max_seq_len=24))))
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=m.config.mlp_hidden,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=24,
        rms_norm_eps=1e-6,
        rope_theta=THETA,
        tie_word_embeddings=True,
    )
    ref = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    rope = getattr(ref.model.rotary_emb, "inv_freq", None)
    if rope is not None:  # the theta that reached it, whichever way this version takes it
        torch.testing.assert_close(rope, THETA ** (-torch.arange(0, D // H, 2).float() / (D // H)))
    q, kv = H * D // H, n_kv_heads * D // H
    state = {"model.embed_tokens.weight": m.embed.weight, "model.norm.weight": m.norm.weight}
    for i, b in enumerate(m.blocks):
        wq, wk, wv = b.attn.qkv.weight.split([q, kv, kv])
        gate, up = b.mlp.gate_up.weight.chunk(2)
        for name, w in {
            "self_attn.q_proj": wq,
            "self_attn.k_proj": wk,
            "self_attn.v_proj": wv,
            "self_attn.o_proj": b.attn.out.weight,
            "mlp.gate_proj": gate,
            "mlp.up_proj": up,
            "mlp.down_proj": b.mlp.down.weight,
            "input_layernorm": b.attn_norm.weight,
            "post_attention_layernorm": b.mlp_norm.weight,
        }.items():
            state[f"model.layers.{i}.{name}.weight"] = w
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    x = ids(2, 24)
    close(m(x), ref(x).logits)
