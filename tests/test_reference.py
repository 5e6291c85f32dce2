"""Each backbone against a reference of the architecture it claims, written out here from the
papers' formulas with none of lmlab's code: given the same weights, the same logits. The decoder is
also held to Hugging Face's ``LlamaForCausalLM`` (where transformers is installed), which is what
``benchmarks/vs_hf.py`` races it against.

The reference: pre-norm blocks (Xiong et al., 2020) with RMSNorm (Zhang & Sennrich, 2019), rotary
positions as complex rotations of the pairs (x_i, x_{i + d/2}) (Su et al., 2021; the pairing of
GPT-NeoX and Hugging Face's LLaMA), attention as softmax(q k^T / sqrt(d)) v with each key/value head
shared by a contiguous group of query heads (Ainslie et al., 2023), SwiGLU (Shazeer, 2020), and for
the encoder-decoder, cross-attention without positions (Vaswani et al., 2017). Weights are drawn at
scales where every one of them moves the logits (norm gains far from one).

``benchmarks/reference.py`` (issue 4's reference implementations timed on the card at hand) is held
here too: its nanoGPT-style GPT-2 is Hugging Face's ``GPT2LMHeadModel`` with the same weights, it
starts from GPT-2's init, decays nanoGPT's parameter group, and counts issue 4's FLOPs per token;
its table's derived columns follow from its measured ones."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

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


# -- benchmarks/reference.py -------------------------------------------------------------------
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# the benchmark's tiny size, wide enough in d_model for every weight to matter
GPT_DIMS = dict(vocab=512, seq_len=32, n_layer=2, n_embd=64, n_head=4)


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/reference.py imported as ``python benchmarks/reference.py`` runs it (its folder
    first on ``sys.path``, ``common`` beside it), fresh for each test."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("reference", None)
    yield importlib.import_module("reference")
    sys.modules.pop("reference", None)


def printed_table(text: str) -> list[dict[str, str]]:
    """The one Markdown table in ``text`` as {header: cell} rows."""
    lines = text.splitlines()
    (start,) = [i for i, ln in enumerate(lines) if ln.startswith("|--")]
    header = [c.strip() for c in lines[start - 1].strip("|").split("|")]
    rows = []
    for ln in lines[start + 1 :]:
        if not ln.startswith("|"):
            break
        rows.append(dict(zip(header, [c.strip() for c in ln.strip("|").split("|")], strict=True)))
    return rows


def num(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("M%"))


def run_main(bench, capsys, argv: str) -> tuple[str, BaseException | None]:
    try:
        bench.main(argv.split())
        exit_ = None
    except SystemExit as e:
        exit_ = e
    return capsys.readouterr().out, exit_


@torch.no_grad()
def test_nanogpt_model_is_hugging_face_gpt2_with_the_same_weights(bench):
    """The two contenders compute one function: the nanoGPT-style model's weights (random, every
    one moving the logits) loaded into the benchmark's GPT2LMHeadModel give the same logits.
    HF's Conv1D keeps (in, out) weights, nn.Linear (out, in): those load transposed."""
    pytest.importorskip("transformers")
    ours = randomize(bench.NanoGPT(**GPT_DIMS))
    theirs = bench.build("hf-gpt2", GPT_DIMS | dict(batch=2)).eval()
    state = {}
    for name, w in ours.state_dict().items():
        if name != "lm_head.weight":  # tied: HF's is its wte
            conv = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
            state[f"hf.transformer.{name}"] = w.T if conv else w
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"hf.lm_head.weight"}
    assert theirs.hf.lm_head.weight is theirs.hf.transformer.wte.weight
    x = torch.randint(0, GPT_DIMS["vocab"], (3, 32), generator=torch.Generator().manual_seed(1))
    close(ours(x), theirs(x))
    # and the same loss on the same next-token targets, in the same counting of N for MFU
    y = torch.roll(x, -1, 1)
    torch.testing.assert_close(ours(x, y), theirs(x, y), atol=1e-5, rtol=1e-5)
    assert ours.matmul_weights() == theirs.matmul_weights()
    assert bench.n_params(ours) == bench.n_params(theirs)


def test_nanogpt_model_has_gpt2_init_and_a_tied_head(bench):
    L = 8
    torch.manual_seed(0)
    m = bench.NanoGPT(vocab=512, seq_len=64, n_layer=L, n_embd=256, n_head=4)
    assert m.lm_head.weight is m.wte.weight
    assert sum(p is m.wte.weight for p in m.parameters()) == 1
    residual = 0.02 / math.sqrt(2 * L)
    for b in m.h:  # 65K and 262K samples: sample stds within 1% of the population's
        for lin, std in [
            (b.attn.c_attn, 0.02),
            (b.attn.c_proj, residual),
            (b.mlp.c_fc, 0.02),
            (b.mlp.c_proj, residual),
        ]:
            assert lin.weight.std().item() == pytest.approx(std, rel=0.02)
            assert abs(lin.weight.mean().item()) < 0.05 * std
            assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        for ln in (b.ln_1, b.ln_2):
            assert torch.equal(ln.weight, torch.ones(256)) and torch.equal(
                ln.bias, torch.zeros(256)
            )
    for emb in (m.wte, m.wpe):
        assert emb.weight.std().item() == pytest.approx(0.02, rel=0.02)


def test_gpt2_124m_counts_match_issue_4(bench):
    """At GPT-2 124M (vocabulary 50304): 124.48M parameters (nanoGPT's 123.69M plus the position
    embeddings it leaves out of its count), and lmlab's FLOPs per token are the ones behind
    issue 4's 470K tokens/s = 40.6% of 989 TFLOP/s (to its 0.1% rounding)."""
    with torch.device("meta"):
        m = bench.build("nanogpt", bench.GPT2)
    V, T, L, d = 50304, 1024, 12, 768
    assert bench.n_params(m) == V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d == 124_475_904
    per_token = bench.flops.flops_per_token(m.matmul_weights(), L, d, T)
    assert per_token == 6 * (12 * L * d * d + V * d) + 12 * L * d * T
    assert bench.flops.mfu(470e3, per_token, 989e12) == pytest.approx(0.406, abs=0.0005)


@pytest.mark.parametrize("name", ["nanogpt", "hf-gpt2"])
def test_weight_decay_on_exactly_the_matrices_and_embeddings(bench, name):
    if name == "hf-gpt2":
        pytest.importorskip("transformers")
    m = bench.build(name, GPT_DIMS)
    opt = bench.optimizer(m, torch.device("cpu"))
    decay, rest = opt.param_groups
    named = dict(m.named_parameters())  # each Parameter once: the tied head under wte's name
    decayed = {n for n, p in named.items() if any(p is q for q in decay["params"])}
    kept = {n for n, p in named.items() if any(p is q for q in rest["params"])}
    assert decayed == {n for n, p in named.items() if p.dim() >= 2}
    assert kept == set(named) - decayed
    assert len(decay["params"]) + len(rest["params"]) == len(named)
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.1, 0.0)
    # the matrices and both embeddings; no bias, no LayerNorm
    assert all(n.endswith("weight") and ".ln_" not in n and "ln_f" not in n for n in decayed)
    assert sum("wte" in n or "wpe" in n for n in decayed) == 2
    assert all(g["lr"] == 6e-4 and g["betas"] == (0.9, 0.95) for g in opt.param_groups)


def test_tiny_run_prints_both_contenders_and_consistent_columns(bench, capsys):
    pytest.importorskip("transformers")
    out, exit_ = run_main(bench, capsys, "--tiny --device cpu --warmup 1 --steps 3")
    assert exit_ is None, out
    assert "compile=False" in out and "FAILED" not in out
    rows = printed_table(out)
    assert [r["contender"] for r in rows] == ["nanogpt", "hf-gpt2"]
    assert rows[0]["parameters"] == rows[1]["parameters"]  # one architecture, counted alike
    tiny = bench.NanoGPT(vocab=512, seq_len=64, n_layer=2, n_embd=64, n_head=2)
    assert rows[0]["parameters"] == f"{bench.n_params(tiny) / 1e6:.2f}M"
    for r, ref in zip(rows, ["470K (40.6%)", "385K"], strict=True):
        assert r["batch"] == "2 x 64"
        assert (r["MFU"], r["ratio to H100 ref"], r["H100 ref (issue 4)"]) == ("-", "-", ref)
        ms, tokens_s = num(r["mean step ms"]), num(r["tokens/s"])
        assert 128e3 / (ms + 0.05) - 0.5 <= tokens_s <= 128e3 / (ms - 0.05) + 0.5
        assert num(r["warm-up s"]) >= 0 and num(r["median step ms"]) > 0
    assert "scaled to this card" not in out  # --tiny: no scaled target


def test_derived_columns_with_a_peak_and_the_scaled_target(bench, capsys, monkeypatch):
    """Off --tiny (here a tiny model under the full run's reporting): MFU from lmlab's formula over
    --peak-flops, the ratio to the H100 figure, and the scaled target line."""
    monkeypatch.setattr(bench, "GPT2", dict(GPT_DIMS, batch=2))
    out, exit_ = run_main(
        bench, capsys, "--contender nanogpt --device cpu --no-compile --warmup 1 --steps 2 "
        "--peak-flops 1e11"
    )  # fmt: skip
    assert exit_ is None, out
    (r,) = printed_table(out)
    tokens_s = num(r["tokens/s"])
    m = bench.NanoGPT(**GPT_DIMS)
    per_token = bench.flops.flops_per_token(m.matmul_weights(), 2, 64, 32)
    assert num(r["MFU"]) == pytest.approx(100 * tokens_s * per_token / 1e11, abs=0.05 + 1e-3)
    assert num(r["ratio to H100 ref"]) == pytest.approx(tokens_s / 470e3, abs=0.005 + 1e-4)
    line = [ln for ln in out.splitlines() if "scaled to this card by nanoGPT" in ln]
    (scaled,) = [float(ln.split(": ")[1].split()[0].replace(",", "")) for ln in line]
    assert scaled == pytest.approx(520e3 * tokens_s / 470e3, abs=1.5)


def test_a_failing_contender_is_reported_and_the_next_runs(bench, capsys, monkeypatch):
    def broken(**kw):
        raise RuntimeError("no such model")

    monkeypatch.setattr(bench, "hf_model", broken)
    out, exit_ = run_main(bench, capsys, "--tiny --device cpu --warmup 1 --steps 1")
    assert "hf-gpt2: FAILED: RuntimeError: no such model" in out
    rows = printed_table(out)
    assert [r["contender"] for r in rows] == ["nanogpt", "hf-gpt2"]
    assert rows[1]["tokens/s"] == "failed" and num(rows[0]["tokens/s"]) > 0
    assert exit_ is not None and exit_.code not in (0, None)


def test_without_transformers_hf_gpt2_is_skipped(bench, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError
    out, exit_ = run_main(bench, capsys, "--tiny --device cpu --warmup 1 --steps 1")
    assert exit_ is None and "hf-gpt2: skipped" in out
    assert [r["contender"] for r in printed_table(out)] == ["nanogpt"]


def test_trace_steps_profile_after_the_timed_window(bench, capsys, monkeypatch, tmp_path):
    """--trace-steps 2: each contender runs 2 more steps after its timed ones, under the profiler,
    writes <trace-dir>/<contender>.json.gz and prints timeline.py's summary of it; the table's
    figures are those of the timed window alone."""
    has_hf = importlib.util.find_spec("transformers") is not None
    forwards, windows = {}, {}
    build, timed_loop = bench.build, bench.common.timed_loop

    def counting_build(name, dims):
        model = build(name, dims)
        forwards[name] = 0

        def count(*_):
            forwards[name] += 1

        model.register_forward_hook(count)
        return model

    def recording_loop(step, stream, warmup, device):
        times, total = timed_loop(step, stream, warmup, device)
        name = list(forwards)[-1]  # the contender being built last is the one timed
        windows[name] = dict(stream=len(stream), warmup=warmup, ran=forwards[name], total=total)
        return times, total

    monkeypatch.setattr(bench, "build", counting_build)
    monkeypatch.setattr(bench.common, "timed_loop", recording_loop)
    trace_dir = tmp_path / "traces"  # made by the script
    out, exit_ = run_main(
        bench, capsys, "--tiny --device cpu --warmup 1 --steps 3 --trace-steps 2 "
        f"--trace-dir {trace_dir}"
    )  # fmt: skip
    assert exit_ is None, out
    assert "the profiler failed" not in out and "could not read it" not in out
    names = ["nanogpt", "hf-gpt2"] if has_hf else ["nanogpt"]
    rows = printed_table(out)
    assert [r["contender"] for r in rows] == names
    assert "3 timed steps + 2 profiled" in out
    for name, r in zip(names, rows, strict=True):
        path = trace_dir / f"{name}.json.gz"
        assert path.is_file()
        assert f"    trace: {path}\n" in out
        summary = bench.timeline.report(bench.timeline.summarize(bench.timeline.load(path), 2))
        assert summary.startswith("no device kernels in the trace (a CPU run)")  # no GPU here
        assert bench.textwrap.indent(summary, "    ") in out
        # warm-up and timed steps in the timed loop, the profiled ones after it returned
        w = windows[name]
        assert (w["warmup"], w["stream"], w["ran"], forwards[name]) == (1, 4, 4, 6)
        # the figures follow from the timed window's 3 steps alone
        step_ms = 1e3 * w["total"] / 3
        assert num(r["mean step ms"]) == pytest.approx(step_ms, abs=0.05 + 1e-9)
        assert num(r["tokens/s"]) == pytest.approx(128 / (w["total"] / 3), abs=0.5 + 1e-6)


@pytest.mark.parametrize("fails", ["start", "export", "summary"])
def test_a_failing_profiler_costs_no_figures(bench, capsys, monkeypatch, tmp_path, fails):
    """A profiler that cannot start or export, or a trace timeline.py cannot read: one line per
    contender, both rows measured, exit 0, and no profiler left running."""
    pytest.importorskip("transformers")
    real = bench.profile

    def broken_start(**kw):
        raise RuntimeError("no CUPTI here")

    def broken_export(**kw):
        p = real(**kw)

        def export(path):
            raise OSError("disk full")

        p.export_chrome_trace = export
        return p

    def broken_load(path):
        raise ValueError("not a trace")

    if fails == "start":
        monkeypatch.setattr(bench, "profile", broken_start)
    elif fails == "export":
        monkeypatch.setattr(bench, "profile", broken_export)
    else:
        monkeypatch.setattr(bench.timeline, "load", broken_load)
    out, exit_ = run_main(
        bench, capsys, "--tiny --device cpu --warmup 1 --steps 1 --trace-steps 1 "
        f"--trace-dir {tmp_path}"
    )  # fmt: skip
    assert exit_ is None, out
    expected = {
        "start": "    trace: the profiler failed (RuntimeError: no CUPTI here); no trace",
        "export": "    trace: the profiler failed (OSError: disk full); no trace",
        "summary": "    (timeline.py could not read it: ValueError: not a trace)",
    }[fails]
    assert out.count(expected) == 2, out
    rows = printed_table(out)
    assert [r["contender"] for r in rows] == ["nanogpt", "hf-gpt2"]
    assert all(num(r["tokens/s"]) > 0 for r in rows) and "FAILED" not in out
    assert not torch.autograd.profiler._is_profiler_enabled


def test_trace_dir_that_is_a_file_is_refused_before_any_run(bench, capsys, tmp_path):
    file = tmp_path / "traces"
    file.write_text("not a folder")
    out, exit_ = run_main(bench, capsys, f"--tiny --device cpu --trace-steps 1 --trace-dir {file}")
    assert exit_ is not None and "--trace-dir" in str(exit_.code)
    assert "is a file" in str(exit_.code) and "name a folder" in str(exit_.code)
    assert out == ""  # no header, no contender: refused before anything ran
    assert file.read_text() == "not a folder"


def test_negative_trace_steps_are_refused(bench, capsys):
    out, exit_ = run_main(bench, capsys, "--tiny --device cpu --trace-steps -1")
    assert exit_ is not None and "--trace-steps" in str(exit_.code)
    assert out == ""
