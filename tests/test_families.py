"""Encoder, encoder-decoder and prefix-LM: attention patterns, masking statistics, every pair trains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.data.base import Example
from lmlab.data.capital import CapitalWordDataModule
from lmlab.data.clm import CausalLMDataModule
from lmlab.data.collate import IGNORE, document_ids, mlm_mask
from lmlab.data.mlm import MaskedLMDataModule
from lmlab.data.prefix_lm import PrefixLMDataModule
from lmlab.data.sentences import SentenceOrderDataModule
from lmlab.data.store import build_store
from lmlab.data.tokenizers import byte_tokenizer, train_bpe, word_starts
from lmlab.errors import ConfigError
from lmlab.evaluate import evaluate
from lmlab.generate import generate
from lmlab.nn.blocks import flex_document_mask, sdpa
from lmlab.nn.decoder import Decoder, DecoderConfig, document_mask, prefix_lm_mask
from lmlab.nn.encoder import Encoder, EncoderConfig
from lmlab.nn.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from lmlab.registry import MODELS, OBJECTIVES, valid_objectives
from lmlab.train import check_compatible, train

from .conftest import command_cfg, make_text

SMALL = dict(vocab_size=100, n_layers=2, d_model=32, n_heads=4, max_seq_len=64)
SMALL_DIMS = {k: v for k, v in SMALL.items() if k != "vocab_size"}


def encoder(**kw) -> Encoder:
    torch.manual_seed(0)
    return Encoder(EncoderConfig(**(SMALL | kw))).eval()


def encdec(**kw) -> EncoderDecoder:
    torch.manual_seed(0)
    return EncoderDecoder(EncoderDecoderConfig(**(SMALL | {"n_decoder_layers": 2} | kw))).eval()


# -- encoder ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_encoder_is_bidirectional(positions):
    m = encoder(positions=positions)
    x = torch.randint(0, 100, (2, 12))
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % 100
    diff = (m(x) - m(y)).abs().amax(dim=(0, 2))  # per position
    assert (diff > 1e-5).all()  # t=5 sees t+1, and every other position sees it too


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_encoder_padding_never_changes_real_outputs(positions):
    m = encoder(positions=positions)
    x = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 8:] = False
    y = x.clone()
    y[:, 8:] = torch.randint(0, 100, (2, 4))  # different padding content
    a, b = m(x, mask), m(y, mask)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    torch.testing.assert_close(a[:, :8], m(x[:, :8]), rtol=1e-4, atol=1e-5)  # = no padding at all


def test_learned_positions_are_embedding_parameters():
    """Kaplan et al.'s non-embedding N leaves out position embeddings as well as token ones."""
    rope, learned = encoder(positions="rope"), encoder(positions="learned")
    assert learned.num_params(False) == rope.num_params(False) + 64 * 32  # max_seq_len x d_model
    assert learned.num_params(True) == rope.num_params(True)


# -- encoder-decoder --------------------------------------------------------------------------------
def test_encoder_decoder_decoder_is_causal_and_uses_the_encoder():
    m = encdec()
    src, tgt = torch.randint(0, 100, (2, 10)), torch.randint(0, 100, (2, 8))
    base = m(src, tgt)
    tgt2 = tgt.clone()
    tgt2[:, 5] = (tgt2[:, 5] + 1) % 100
    changed = m(src, tgt2)
    torch.testing.assert_close(base[:, :5], changed[:, :5], rtol=0, atol=0)
    assert (base[:, 5:] - changed[:, 5:]).abs().max() > 1e-5
    src2 = src.clone()
    src2[:, 9] = (src2[:, 9] + 1) % 100  # the last encoder token reaches every decoder position
    diff = (m(src2, tgt) - base).abs().amax(dim=(0, 2))
    assert (diff > 1e-6).all()


def test_encoder_decoder_padding_and_cached_decoding():
    m = encdec()
    src, tgt = torch.randint(0, 100, (2, 10)), torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    src2 = src.clone()
    src2[1, 6:] = 7
    torch.testing.assert_close(m(src, tgt, mask), m(src2, tgt, mask))
    # greedy cached generation equals greedy decoding with full recomputation
    out = m.generate(src, 6, start_id=1, attention_mask=mask, temperature=0)
    seq = torch.ones(2, 1, dtype=torch.long)
    for _ in range(6):
        nxt = m(src, seq, mask)[:, -1, :100].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq[:, 1:])


def test_encoder_decoder_generates_at_most_max_target_len_tokens():
    m = encdec(max_seq_len=16, max_target_len=4)  # the rotary table covers 16 positions
    src = torch.randint(0, 100, (2, 16))
    assert m.generate(src, 10, start_id=1, temperature=0).shape == (2, 4)
    none = m.generate(src, 0, start_id=1)
    assert none.shape == (2, 0) and none.dtype == torch.long
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        m.generate(src, -1, start_id=1)


def test_decoder_generates_nothing_for_zero_new_tokens():
    m = Decoder(DecoderConfig(**SMALL)).eval()
    prompt = torch.randint(0, 100, (2, 5))
    assert torch.equal(m.generate(prompt, 0), prompt)  # the prompt, not an error about room
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        m.generate(prompt, -1)


# -- prefix LM --------------------------------------------------------------------------------------
def test_prefix_lm_mask_and_model_visibility():
    T, P = 8, 3
    mask = prefix_lm_mask(torch.tensor([P]), T)[0, 0]
    for q in range(T):
        for k in range(T):
            assert bool(mask[q, k]) == (k < P or k <= q)
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(**SMALL)).eval()
    x = torch.randint(0, 100, (1, T))
    prefix = torch.tensor([P])
    base = m(x, prefix_len=prefix)
    for j in range(T):
        y = x.clone()
        y[0, j] = (y[0, j] + 1) % 100
        changed = (m(y, prefix_len=prefix) - base).abs().amax(-1)[0] > 1e-6
        # position i sees j iff j is in the prefix or j <= i
        assert changed.tolist() == [j < P or j <= i for i in range(T)], j


def test_prefix_lm_batches_score_only_after_the_prefix(tmp_path):
    tok = byte_tokenizer(2)
    store = build_store(iter([make_text(400, 0)]), tok, tmp_path, "p")
    dm = PrefixLMDataModule(tok, store, store, seq_len=16, batch_size=4, seed=1)
    b = next(iter(dm.train_dataloader()))
    for row in range(4):
        p = int(b["prefix_len"][row])
        assert 1 <= p <= 15
        assert (b["labels"][row, : p - 1] == IGNORE).all()
        assert torch.equal(
            b["labels"][row, p - 1 :],
            b["input_ids"][row, p:].new_tensor(
                [*b["input_ids"][row, p:].tolist(), int(b["labels"][row, -1])]
            ),
        )


def test_prefix_lengths_are_uniform_over_1_to_seq_len_minus_1(tmp_path):
    """Each window's prefix is drawn uniformly from 1 .. seq_len - 1 (T5's prefix LM splits at a
    uniformly random point): over an epoch of ~7000 windows each of the 15 values is a binomial
    count (mean n / 15, sd ~21), allowed 5 sd."""
    tok = byte_tokenizer(2)
    store = build_store(iter([make_text(20_000, 0)]), tok, tmp_path, "p")
    dm = PrefixLMDataModule(tok, store, store, seq_len=16, batch_size=64, seed=1)
    drawn = torch.cat([b["prefix_len"] for b in dm.train_dataloader()])
    counts = torch.bincount(drawn, minlength=17).double()
    n, p = len(drawn), 1 / 15
    assert n > 5000 and counts[0] == counts[16] == 0
    assert ((counts[1:16] - n * p).abs() <= 5 * math.sqrt(n * p * (1 - p))).all(), counts


# -- packed documents (objective.document_mask) ---------------------------------------------------
EOS = 3
PACKED = torch.tensor(
    [
        [5, 6, 7, EOS, 8, 9, 10, 11, EOS, 12, 13, 14],  # mid-document start, two more documents
        [EOS, 20, 21, 22, 23, 24, EOS, EOS, 30, 31, 32, 33],  # an empty document (eos eos)
    ]
)


def docs_of(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(document_ids(x.numpy(), EOS))


def test_document_ids_reference_values():
    """An eos opens the document after it."""
    assert docs_of(PACKED).tolist() == [
        [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2],
        [1, 1, 1, 1, 1, 1, 2, 3, 3, 3, 3, 3],
    ]


def test_document_mask_reference_values():
    doc = [0, 0, 1, 1, 1, 2]
    mask = document_mask(torch.tensor([doc]))[0, 0]
    assert mask.tolist() == [[doc[q] == doc[k] and k <= q for k in range(6)] for q in range(6)]
    mask = document_mask(torch.tensor([doc]), prefix_len=torch.tensor([4]))[0, 0]
    want = [[doc[q] == doc[k] and (k <= q or k < 4) for k in range(6)] for q in range(6)]
    assert mask.tolist() == want


def documents(x: torch.Tensor):
    """(row, its positions of one document) for each document of each row of ``x``."""
    docs = docs_of(x)
    for b in range(len(x)):
        for d in docs[b].unique():
            yield b, (docs[b] == d).nonzero().flatten()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_packed_window_computes_each_document_alone(kv_heads):
    """With doc_ids every document's logits are those of the document run alone, from position 0
    (RoPE's scores depend on query-key distances only: no position restart is needed); without
    them, the documents see each other."""
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(**SMALL, n_kv_heads=kv_heads)).eval()
    out = m(PACKED, doc_ids=docs_of(PACKED))
    for b, idx in documents(PACKED):
        alone = m(PACKED[b, idx][None])[0]
        torch.testing.assert_close(out[b, idx], alone, atol=1e-5, rtol=1e-5)
    assert (m(PACKED) - out).abs().max() > 1e-2


def test_document_and_prefix_masks_combine_in_the_model():
    """With both, position i sees j iff they share a document and j <= i or j is in the prefix."""
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(**SMALL)).eval()
    x, prefix = PACKED[:1], torch.tensor([6])  # the prefix ends inside the second document
    docs = docs_of(x)
    base = m(x, prefix_len=prefix, doc_ids=docs)
    for j in range(x.shape[1]):
        y = x.clone()
        y[0, j] = 50 + j  # no eos: the documents stay as they are
        changed = (m(y, prefix_len=prefix, doc_ids=docs) - base).abs().amax(-1)[0] > 1e-6
        d = docs[0].tolist()
        assert changed.tolist() == [d[i] == d[j] and (j <= i or j < 6) for i in range(12)], j


def test_the_document_mask_compiles_in_one_graph():
    """compile=true: the mask is built inside the compiled backbone, without graph breaks, and
    the logits are eager mode's."""
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(**SMALL)).eval()
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(
        compiled(PACKED, doc_ids=docs_of(PACKED)), m(PACKED, doc_ids=docs_of(PACKED))
    )


@pytest.mark.parametrize(("kv_heads", "prefix"), [(4, None), (2, None), (4, 6)])
def test_flex_block_masks_give_the_dense_masks_logits(kv_heads, prefix, monkeypatch):
    """attention=flex (flex_masks): the document masks as FlexAttention's block masks give the
    dense masks' logits, with grouped-query heads and with a prefix; the block mask holds the same
    pairs as the dense one. Forward only: PyTorch's FlexAttention has no backward on CPUs (the GPU
    test trains with it)."""
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(**SMALL, n_kv_heads=kv_heads)).eval()
    docs = docs_of(PACKED)
    prefix_len = None if prefix is None else torch.tensor([prefix, prefix])
    block = flex_document_mask(docs, prefix_len=prefix_len)
    dense = block.to_dense()  # (B, 1, blocks, blocks): a 12-token window is one block
    assert dense.shape[-2:] == (1, 1) and bool(dense.all())
    import lmlab.nn.blocks

    calls, flex = [], lmlab.nn.blocks.compiled_flex_attention()
    counted = lambda *a, **kw: calls.append(kw["block_mask"]) or flex(*a, **kw)
    monkeypatch.setattr(lmlab.nn.blocks, "compiled_flex_attention", lambda: counted)
    with torch.no_grad():
        want = m(PACKED, prefix_len=prefix_len, doc_ids=docs)
        assert not calls
        m.flex_masks = True
        got = m(PACKED, prefix_len=prefix_len, doc_ids=docs)
    assert len(calls) == SMALL["n_layers"]  # every layer through FlexAttention
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the mask function itself, pair by pair, is document_mask's
    b, q, k = torch.meshgrid(torch.arange(2), torch.arange(12), torch.arange(12), indexing="ij")
    pairs = block.mask_mod(b, torch.zeros_like(b), q, k)
    assert torch.equal(pairs, document_mask(docs, prefix_len)[:, 0])


def test_flex_block_masks_compiled_with_the_model_give_the_dense_masks_logits():
    """compile=true with attention=flex: the block mask built inside the compiled graph, three
    documents over two 128-token blocks, grouped-query heads: the dense masks' logits (the
    transposed views of RoPE's outputs once gave FlexAttention logits off by ~0.5 here)."""
    torch.manual_seed(0)
    T = 256
    m = Decoder(DecoderConfig(**SMALL_DIMS | dict(vocab_size=256, max_seq_len=T), n_kv_heads=2))
    docs = torch.zeros(2, T, dtype=torch.long)
    docs[:, 40:] += 1
    docs[:, 180:] += 1
    ids = torch.randint(0, 256, (2, T))
    with torch.no_grad():
        want = m.eval()(ids, doc_ids=docs)
        m.flex_masks = True
        got = torch.compile(m, fullgraph=True)(ids, doc_ids=docs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flex_block_masks_skip_the_blocks_across_documents():
    """Two documents of 256 tokens in a 512-token window: of the 4 x 4 blocks of 128, the causal
    ones inside each document are kept (3 + 3), none across them."""
    docs = torch.tensor([[0] * 256 + [1] * 256])
    kept = flex_document_mask(docs).to_dense()[0, 0].bool()
    assert kept.tolist() == [[k <= q and k // 2 == q // 2 for k in range(4)] for q in range(4)]


def test_cached_decoding_refuses_document_ids():
    m = Decoder(DecoderConfig(**SMALL))
    with pytest.raises(ValueError, match="not for cached decoding"):
        m(PACKED, caches=m.new_caches(2, 16), doc_ids=docs_of(PACKED))


def test_bidirectional_document_ids_end_each_document_at_its_eos():
    """For encoders an eos belongs to the document it ends (the store's "text eos")."""
    assert document_ids(PACKED.numpy(), EOS, eos_opens=False).tolist() == [
        [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2],
        [0, 1, 1, 1, 1, 1, 1, 2, 3, 3, 3, 3],
    ]


@pytest.mark.parametrize("compiled", [False, True])
def test_encoder_flex_block_masks_give_the_dense_masks_outputs(compiled, monkeypatch):
    """attention=flex in the encoder: its document masks (bidirectional, padding keys left out)
    as FlexAttention block masks give the dense masks' logits, eager and compiled with the model
    (fullgraph), over three documents in two 128-token blocks with a padded row end."""
    T = 256
    m = encoder(max_seq_len=T, n_kv_heads=2)
    ids = torch.randint(0, 100, (2, T))
    docs = torch.zeros(2, T, dtype=torch.long)
    docs[:, 40:] += 1
    docs[:, 180:] += 1
    pad = torch.ones(2, T, dtype=torch.bool)
    pad[1, -30:] = False
    import lmlab.nn.blocks

    calls, flex = [], lmlab.nn.blocks.compiled_flex_attention()
    counted = lambda *a, **kw: calls.append(1) or flex(*a, **kw)
    monkeypatch.setattr(lmlab.nn.blocks, "compiled_flex_attention", lambda: counted)
    with torch.no_grad():
        want = m(ids, pad, doc_ids=docs)
        m.flex_masks = True
        got = (torch.compile(m, fullgraph=True) if compiled else m)(ids, pad, doc_ids=docs)
    assert len(calls) == (0 if compiled else SMALL["n_layers"])  # compiled: flex_attention itself
    torch.testing.assert_close(got[pad], want[pad], atol=1e-5, rtol=1e-5)
    block = flex_document_mask(docs, causal=False, keys=pad)
    b, q, k = torch.meshgrid(torch.arange(2), torch.arange(T), torch.arange(T), indexing="ij")
    same = (docs[:, :, None] == docs[:, None, :]) & pad[:, None, :]
    assert torch.equal(block.mask_mod(b, torch.zeros_like(b), q, k), same)


def test_an_encoder_row_of_packed_documents_computes_each_alone():
    """Rotary positions: each document's outputs are the document's own, run alone, padding or
    not; learned positions keep the documents apart (a change in one moves no other's outputs)
    but tell where in the window each sits."""
    torch.manual_seed(0)
    m = encoder().eval()
    x = PACKED.clone()
    docs = torch.from_numpy(document_ids(x.numpy(), EOS, eos_opens=False))
    pad = torch.ones_like(x, dtype=torch.bool)
    pad[1, -2:] = False  # the second row's last document is two tokens shorter
    out = m(x, pad, doc_ids=docs)
    for b in range(2):
        for d in docs[b].unique():
            idx = ((docs[b] == d) & pad[b]).nonzero().flatten()
            alone = m(x[b, idx][None])[0]
            torch.testing.assert_close(out[b, idx], alone, atol=1e-5, rtol=1e-5)
    assert (m(x, pad) - out)[pad].abs().max() > 1e-2
    learned = encoder(positions="learned").eval()
    y = x.clone()
    y[0, 1] = 50  # inside the first row's first document
    moved = (learned(y, doc_ids=docs) - learned(x, doc_ids=docs)).abs().amax(-1) > 1e-6
    assert moved[0].tolist() == (docs[0] == 0).tolist() and not moved[1].any()


@pytest.fixture
def short_documents(tmp_path):
    tok = byte_tokenizer(2)
    texts = [make_text(8 * (1 + seed % 2), seed) for seed in range(20)]  # 40-100 bytes each
    return tok, build_store(iter(texts), tok, tmp_path, "d")


@pytest.mark.parametrize(
    ("klass", "eos_opens"),
    [
        (CausalLMDataModule, True),
        (PrefixLMDataModule, True),
        (MaskedLMDataModule, False),
        (CapitalWordDataModule, False),
    ],
)
def test_packed_windows_carry_document_ids_with_document_mask(short_documents, klass, eos_opens):
    """objective.document_mask: the batches carry the document ids of their rows (eos is special:
    an MLM never masks it nor draws it as a replacement); an eos opens the next document for the
    decoder's objectives and ends its own for the encoder's; without the setting, no ids."""
    tok, store = short_documents
    plain = next(iter(klass(tok, store, store, seq_len=64, batch_size=8).train_dataloader()))
    assert "doc_ids" not in plain
    dm = klass(tok, store, store, seq_len=64, batch_size=8, document_mask=True)
    for b in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        rows = b["input_ids"].numpy()
        assert (rows == tok.eos_id).sum() > 4  # several documents per batch
        want = document_ids(rows, tok.eos_id, eos_opens=eos_opens)
        assert torch.equal(b["doc_ids"], torch.from_numpy(want))


@pytest.mark.parametrize(
    "klass", [CausalLMDataModule, PrefixLMDataModule, MaskedLMDataModule, CapitalWordDataModule]
)
def test_bad_document_mask_settings_are_refused(short_documents, klass):
    tok, store = short_documents
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match=r"objective\.document_mask must be true or false"):
            klass(tok, store, store, seq_len=32, batch_size=8, document_mask=bad)
    with pytest.raises(ConfigError, match=r"objective=sop builds each input from its own segments"):
        SentenceOrderDataModule(tok, store, store, seq_len=64, batch_size=8, document_mask=True)


def test_grouped_heads_repeated_for_a_masked_call_attend_as_shared_ones():
    """lmlab.nn.blocks.sdpa: repeating the key/value heads (what a masked call on CUDA does)
    computes what SDPA's enable_gqa does: query head h reads key/value head h // (H / KV)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 10, 8, generator=gen)
    k, v = torch.randn(2, 2, 10, 8, generator=gen), torch.randn(2, 2, 10, 8, generator=gen)
    mask = document_mask(docs_of(PACKED[:, :10]))
    shared = sdpa(q, k, v, mask, repeat_kv=False)
    torch.testing.assert_close(sdpa(q, k, v, mask, repeat_kv=True), shared)
    by_hand = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask
    )
    torch.testing.assert_close(shared, by_hand)


def test_encoder_lm_scores_packed_documents_as_if_alone():
    """EncoderLM hands doc_ids to its backbone: a packed row's masked-LM NLL is the sum of its
    documents' own, each run alone."""
    from lmlab.models.encoder import EncoderLM

    torch.manual_seed(0)
    dims = dict(n_layers=2, d_model=32, n_heads=4, max_seq_len=64)
    m = EncoderLM(vocab_size=100, special_ids={"eos": EOS}, optim={}, **dims)
    m.set_token_bytes(torch.ones(100, dtype=torch.long))
    m.eval()
    x = PACKED
    labels = torch.where(
        torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.4, x, -100
    )
    labels[x == EOS] = -100
    docs = torch.from_numpy(document_ids(x.numpy(), EOS, eos_opens=False))
    total = m.nll({"input_ids": x, "labels": labels, "doc_ids": docs})[0]
    alone = 0
    for b in range(2):
        for d in docs[b].unique():
            idx = (docs[b] == d).nonzero().flatten()
            alone += m.nll({"input_ids": x[b, idx][None], "labels": labels[b, idx][None]})[0]
    torch.testing.assert_close(total, alone, atol=1e-4, rtol=1e-6)
    assert abs(m.nll({"input_ids": x, "labels": labels})[0] - total) > 1e-2


def test_encoder_samples_keep_documents_apart_as_training_did(short_documents, monkeypatch):
    """The fill-mask samples written at validation of a document-masked run attend as its
    training did: the backbone gets the sample window's doc_ids (an eos ends its document)."""
    from lmlab.models.encoder import EncoderLM

    tok, store = short_documents
    dm = MaskedLMDataModule(tok, store, store, seq_len=64, batch_size=4, document_mask=True)
    m = EncoderLM(vocab_size=tok.vocab_size, special_ids=tok.special, optim={}, **SMALL_DIMS)
    m.set_token_bytes(torch.as_tensor(tok.token_bytes()))
    seen = []
    real = Encoder.forward
    monkeypatch.setattr(
        Encoder,
        "forward",
        lambda self, x, *a, **k: seen.append((x, k["doc_ids"])) or real(self, x, *a, **k),
    )
    m.samples(tok, dm, max_new_tokens=64)
    assert len(seen) == 2 and any((x == tok.eos_id).any() for x, _ in seen)
    for x, docs in seen:
        want = document_ids(x.numpy(), tok.eos_id, eos_opens=False)
        assert docs is not None and torch.equal(docs, torch.from_numpy(want))


def test_decoder_lm_scores_a_packed_batch_as_its_documents_alone():
    """DecoderLM hands doc_ids to its backbone: the summed NLL of a packed batch is the sum of its
    documents' own (each document's targets, predicted from itself alone)."""
    from lmlab.models.decoder import DecoderLM

    torch.manual_seed(0)
    m = DecoderLM(special_ids={"eos": EOS}, optim={}, **SMALL)
    m.set_token_bytes(torch.ones(100, dtype=torch.long))
    m.eval()
    x, labels = PACKED[:, :-1], PACKED[:, 1:]
    total = m.nll({"input_ids": x, "labels": labels, "doc_ids": docs_of(x)})[0]
    alone = sum(
        m.nll({"input_ids": x[b, idx][None], "labels": labels[b, idx][None]})[0]
        for b, idx in documents(x)
    )
    torch.testing.assert_close(total, alone, atol=1e-4, rtol=1e-6)
    assert abs(m.nll({"input_ids": x, "labels": labels})[0] - total) > 1e-2


# -- masked LM --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def masking():
    tok = byte_tokenizer(4)
    special = np.zeros(tok.vocab_size, dtype=bool)
    special[tok.special_ids] = True
    return tok, special, np.flatnonzero(~special)


def keys_for(n: int, seed: int = 0) -> np.ndarray:
    """n per-example keys of the counter-based generator (as example_keys makes them)."""
    return np.random.default_rng(seed).integers(0, 2**64, size=n, dtype=np.uint64)


def test_mlm_selection_statistics(masking):
    tok, special, random_ids = masking
    rng = np.random.default_rng(0)
    n_draws, L = 4000, 130
    ids = rng.choice(random_ids, size=(n_draws, L))
    for row in ids:
        row[rng.choice(L, int(rng.integers(0, 20)), replace=False)] = tok.eos_id  # specials
    ids[:, 0], ids[:, -1] = tok.cls_id, tok.sep_id
    ids[-1, 1:-1] = tok.pad_id  # a row with nothing to mask
    inputs, labels, sel = mlm_mask(
        ids, keys_for(n_draws), special=special, mask_id=tok.mask_id, random_ids=random_ids
    )
    eligible = ~special[ids]
    assert not (sel & ~eligible).any()  # special tokens are never selected
    assert (labels[~sel] == IGNORE).all() and (labels[sel] == ids[sel]).all()
    assert (inputs[~sel] == ids[~sel]).all()
    # exact count per sequence: round(0.15 * n) of the n eligible positions, at least one, none of 0
    n = eligible.sum(axis=1)
    assert sel.sum(axis=1).tolist() == [max(1, round(0.15 * int(m))) if m else 0 for m in n]
    assert n[-1] == 0  # the empty row is exercised
    # 80/10/10: each selected token is an independent categorical draw, so each share is a binomial
    # proportion with standard deviation sqrt(p (1 - p) / n); allow 5 of them (false alarm < 1e-6).
    # A random replacement equals the original with probability 1/256, counted as "same".
    x, orig = inputs[sel], ids[sel]
    counts = {
        "mask": int((x == tok.mask_id).sum()),
        "same": int((x == orig).sum()),
        "other": int(((x != orig) & (x != tok.mask_id)).sum()),
    }
    total = len(x)
    assert total > 70_000
    p_same = 0.1 + 0.1 / len(random_ids)
    for key, p in (("mask", 0.8), ("other", 0.1 - 0.1 / len(random_ids)), ("same", p_same)):
        assert abs(counts[key] / total - p) <= 5 * math.sqrt(p * (1 - p) / total), key
    assert not special[x[x != tok.mask_id]].any()  # replacements are never special


def test_mlm_selection_is_uniform_over_positions_and_subsets(masking):
    tok, special, random_ids = masking
    # 128 maskable positions between cls and sep: 19 selected (round(19.2)), so each position is
    # selected with probability 19/128. Over R = 6000 rows a position's count is Binomial(R, 19/128):
    # mean 890.6, sd 27.5; 5 sd bounds every one of the 128.
    R = 6000
    ids = np.random.default_rng(1).choice(random_ids, size=(R, 130))
    ids[:, 0], ids[:, -1] = tok.cls_id, tok.sep_id
    _, _, sel = mlm_mask(
        ids, keys_for(R, 1), special=special, mask_id=tok.mask_id, random_ids=random_ids
    )
    per_position = sel[:, 1:-1].sum(axis=0)
    assert np.abs(per_position - R * 19 / 128).max() <= 5 * math.sqrt(R * 19 / 128 * 109 / 128)
    # Whole subsets: 2 of 4 maskable tokens (mask_prob 0.5), C(4, 2) = 6 subsets, each Binomial(R, 1/6)
    # (mean 1000, sd 28.9): a uniform choice of subset, not just of positions.
    ids = np.array([[tok.cls_id, 65, 66, tok.eos_id, 67, 68, tok.sep_id]] * R)
    _, _, sel = mlm_mask(
        ids,
        keys_for(R, 2),
        special=special,
        mask_id=tok.mask_id,
        random_ids=random_ids,
        mask_prob=0.5,
    )
    codes = sel[:, [1, 2, 4, 5]] @ np.array([1, 2, 4, 8])
    counts = np.bincount(codes, minlength=16)
    assert sorted(np.flatnonzero(counts).tolist()) == [3, 5, 6, 9, 10, 12]  # the 2-subsets
    assert np.abs(counts[counts > 0] - 1000).max() <= 5 * 28.9


def test_mlm_random_replacements_are_uniform(masking):
    tok, special, random_ids = masking
    # p_random = 1: every selected token is replaced, by a uniformly random id of random_ids. Over
    # ~76,000 draws each of the 256 ids is expected ~297 times; the counts' chi-square (255 degrees
    # of freedom: mean 255, sd 22.6) stays below 255 + 6 sd.
    R = 4000
    ids = np.full((R, 130), 65)
    ids[:, 0], ids[:, -1] = tok.cls_id, tok.sep_id
    inputs, _, sel = mlm_mask(
        ids,
        keys_for(R, 3),
        special=special,
        mask_id=tok.mask_id,
        random_ids=random_ids,
        p_mask=0.0,
        p_random=1.0,
    )
    counts = np.bincount(inputs[sel], minlength=tok.vocab_size)
    assert counts[special].sum() == 0
    expected = sel.sum() / len(random_ids)
    chi2 = ((counts[random_ids] - expected) ** 2 / expected).sum()
    assert chi2 <= 255 + 6 * 22.6


def test_mlm_budget_rounds_half_to_even(masking):
    tok, special, random_ids = masking
    # mask_prob 0.25 of 2, 6, 10 and 0 maskable tokens: round(0.5) = 0 -> at least 1, round(1.5) = 2,
    # round(2.5) = 2 (half to even, as Python's round), and nothing to mask -> 0.
    ids = np.full((4, 12), tok.eos_id)
    ids[:, 0], ids[:, -1] = tok.cls_id, tok.sep_id
    for row, n in enumerate([2, 6, 10, 0]):
        ids[row, 1 : 1 + n] = 70 + np.arange(n)
    _, _, sel = mlm_mask(
        ids,
        keys_for(4),
        special=special,
        mask_id=tok.mask_id,
        random_ids=random_ids,
        mask_prob=0.25,
    )
    assert sel.sum(axis=1).tolist() == [1, 2, 2, 0]


def test_word_starts_match_the_pre_tokenizer():
    text = make_text(400, 3) + " It's 1599, ok?!  Twice--spaced\nlines\tand naïve café words."
    tok = train_bpe([text * 3], 400, 2)
    enc = tok.tk.encode(text, add_special_tokens=False)
    pieces = tok.tk.pre_tokenizer.pre_tokenize_str(text)
    piece_starts = {start for _, (start, _) in pieces}
    expected = [start in piece_starts for start, _ in enc.offsets]
    special = np.zeros(tok.vocab_size, dtype=bool)
    special[tok.special_ids] = True
    got = word_starts(np.array(enc.ids), tok.word_start_table(), special)
    assert got.tolist() == expected


def test_whole_word_masking_selects_whole_words(masking):
    tok = train_bpe([make_text(3000, 0)], 300, 2)  # few merges: most words take several tokens
    special = np.zeros(tok.vocab_size, dtype=bool)
    special[tok.special_ids] = True
    table = tok.word_start_table()
    ids = np.array([tok.cls_id, *tok.encode(make_text(200, 5)), tok.sep_id])
    starts = word_starts(ids, table, special)
    word = np.cumsum(starts)
    assert len(np.unique(word)) < len(ids)  # some words span several tokens
    budget = round(0.15 * (~special[ids]).sum())
    kw = dict(special=special, mask_id=tok.mask_id, random_ids=np.flatnonzero(~special))
    batch = np.tile(ids, (50, 1))
    _, _, sel = mlm_mask(batch, keys_for(50), word_start=np.tile(starts, (50, 1)), **kw)
    eligible = ~special[ids]
    sizes = {w: int(((word == w) & eligible).sum()) for w in np.unique(word[eligible])}
    for row in sel:
        for w in np.unique(word[row]):
            assert row[word == w].all()  # all of a selected word's tokens are selected
        # the greedy fill stops short of the budget only when no word left out would still fit
        short = budget - int(row.sum())
        assert short >= 0
        assert all(size > short for w, size in sizes.items() if not row[word == w].any())
    assert len({row.tobytes() for row in sel}) == 50
    # With every token its own word, the greedy fill takes the budget's smallest keys: plain masking.
    one_each = mlm_mask(batch, keys_for(50), word_start=np.ones_like(batch, dtype=bool), **kw)
    plain = mlm_mask(batch, keys_for(50), **kw)
    assert all(np.array_equal(a, b) for a, b in zip(one_each, plain, strict=True))


@pytest.mark.parametrize("whole_word", [False, True])
def test_mlm_example_masks_the_same_in_any_batch(tmp_path, whole_word):
    # Per-example randomness: a row depends only on (seed, epoch, start) and the tokens, never on
    # the batch it is in, its place there or the padding (what makes resumed and multi-process runs
    # exact); mask_example gives that same row without padding.
    tok = byte_tokenizer(2)
    store = build_store(iter([make_text(400, 0), make_text(300, 1)]), tok, tmp_path, "m")
    dm = MaskedLMDataModule(tok, store, store, seq_len=32, batch_size=4, whole_word=whole_word)
    exs = [
        Example(s, np.asarray(store.tokens[s : s + 30], dtype=np.int64), epoch=s % 2)
        for s in range(0, 300, 30)
    ]
    exs += [Example(900, np.asarray(store.tokens[900:905], dtype=np.int64))]  # a short one

    def rows(batch) -> list[tuple[list[int], list[int]]]:
        real = batch["attention_mask"]
        return [
            (batch["input_ids"][r][real[r]].tolist(), batch["labels"][r][real[r]].tolist())
            for r in range(len(real))
        ]

    alone = {id(ex): rows(dm.make_batch([ex]))[0] for ex in exs}
    for ex in exs:
        inputs, labels = dm.mask_example(ex)
        assert (inputs.tolist(), labels.tolist()) == alone[id(ex)]
    for batch in (exs[:4], exs[::-1], [exs[-1], *exs[3:7]]):
        b = dm.make_batch(batch)
        assert rows(b) == [alone[id(ex)] for ex in batch]
        pad = ~b["attention_mask"]
        assert (b["input_ids"][pad] == tok.pad_id).all() and (b["labels"][pad] == IGNORE).all()
    assert len({str(r) for r in alone.values()}) == len(alone)


def test_mlm_datamodule_batches_and_errors(tmp_path):
    tok = byte_tokenizer(2)
    store = build_store(iter([make_text(400, 0), make_text(300, 1)]), tok, tmp_path, "m")
    dm = MaskedLMDataModule(tok, store, store, seq_len=32, batch_size=4, whole_word=True)
    b = next(iter(dm.val_dataloader()))
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (4, 32)
    assert (b["input_ids"][:, 0] == tok.cls_id).all() and (
        b["input_ids"][:, -1] == tok.sep_id
    ).all()
    # validation batches are identical every time (masks seeded by window position)
    assert torch.equal(next(iter(dm.val_dataloader()))["input_ids"], b["input_ids"])
    with pytest.raises(ConfigError, match="mask_prob must be in"):
        MaskedLMDataModule(tok, store, store, seq_len=32, batch_size=4, mask_prob=1.5)
    # NaN passed "p_mask < 0 or ...": every selected token was then left unchanged and scored
    for bad in (
        {"p_mask": float("nan")},
        {"p_random": float("nan")},
        {"p_mask": 0.9, "p_random": 0.2},
    ):
        with pytest.raises(ConfigError, match="must be >= 0 and sum to at most 1"):
            MaskedLMDataModule(tok, store, store, seq_len=32, batch_size=4, **bad)
    ex = Example(0, np.asarray(store.tokens[:30], dtype=np.int64))
    inputs, labels = dm.mask_example(ex)
    assert len(inputs) == 32 and (labels != IGNORE).sum() >= 1


# -- every pair -------------------------------------------------------------------------------------
PAIRS = [(m, o) for m in MODELS for o in valid_objectives(m)]


def test_compatibility_table_covers_the_families():
    assert valid_objectives("decoder") == ["clm", "prefix_lm"]
    assert valid_objectives("encoder") == [
        "mlm",
        "sop",
        "nsp",
        "sentence_distance",
        "deshuffle",
        "discourse",
        "capital_word",
        "tlm",
        "ir_relevance",
        "mcp",
    ]
    assert set(valid_objectives("encoder_decoder")) == {
        o for o in OBJECTIVES if o in ("span", "denoise")
    }


@pytest.mark.parametrize(("model", "objective"), PAIRS)
def test_every_valid_pair_trains(tiny_cfg, parallel_file, table_files, model, objective):
    # tlm and ir_relevance train on pairs of texts, mcp on tables
    pairs = objective in ("tlm", "ir_relevance")
    data = [f"data.train={parallel_file}", "data.text_field=[en,xx]"] if pairs else []
    if objective == "mcp":
        data = [f"data.train={table_files}/*.csv", "seq_len=64"]
    metrics, objects = train(
        tiny_cfg(
            f"model={model}",
            f"objective={objective}",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            *data,
        )
    )
    for key in ("val/loss", "val/ppl", "val/bpb", "val/acc", "train/loss"):
        assert math.isfinite(metrics[key]), key
    assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)
    assert 0 <= metrics["val/acc"] <= 1
    assert (objects["output_dir"] / "samples.txt").read_text().strip()
    # the checkpoint evaluates to the same validation numbers and generates
    ckpt = str(objects["output_dir"] / "checkpoints" / "last.ckpt")
    cfg = objects["cfg"]
    m = evaluate(
        command_cfg(
            "evaluate",
            ckpt_path=ckpt,
            limit_batches=cfg.trainer.limit_val_batches,
            device="cpu",
            **{"paths.cache_dir": cfg.paths.cache_dir},
        )
    )
    # every validation metric (a sentence head's too) as the run's last validation had it
    scored = {k.removeprefix("val/"): v for k, v in metrics.items() if k.startswith("val/")}
    assert set(scored) <= set(m)
    for key, value in scored.items():
        assert m[key] == pytest.approx(value, rel=1e-4), key
    prompt = {
        "clm": "The king",
        "prefix_lm": "The king",
        "mlm": "The <|mask|> king",
        "sop": "The <|mask|> king",
        "nsp": "The <|mask|> king",
        "sentence_distance": "The <|mask|> king",
        "deshuffle": "The <|mask|> king",
        "discourse": "The <|mask|> king",
        "capital_word": "The <|mask|> king",
        "tlm": "The <|mask|> king",
        "ir_relevance": "The <|mask|> king",
        "mcp": "The <|mask|> king",
        "span": "The <extra_id_0> king",
        "denoise": "The <|mask|> king",
    }[objective]
    (text,) = generate(
        command_cfg(
            "generate", ckpt_path=ckpt, prompt=prompt, max_new_tokens=5, temperature=0, device="cpu"
        )
    )
    if model == "decoder":
        assert text.startswith("The king")
    elif model == "encoder":  # the mask is filled, and its candidates listed
        start = "the" if objective == "capital_word" else "The"  # it read lowercase text only
        assert text.splitlines()[0].startswith(start) and "<|mask|>" not in text.splitlines()[0]
        # "The", " ", mask (lowercased, "the" may be split; a BPE of two languages may split
        # "The" too, and one trained on tables); no special tokens proposed
        split = objective in ("capital_word", "tlm", "ir_relevance", "mcp")
        split = split and "mask at token 2: " not in text
        where = len(objects["tokenizer"].encode(f"{start} ")) if split else 2
        assert f"mask at token {where}: " in text and "'<|" not in text
    elif objective == "span":
        assert text.startswith("The") and "(decoder output:" in text
    else:
        assert isinstance(text, str)


@pytest.mark.parametrize(
    ("model", "objective"),
    [(m, o) for m in MODELS for o in OBJECTIVES if o not in valid_objectives(m)],
)
def test_every_invalid_pair_is_refused(compose_cfg, model, objective):
    cfg = compose_cfg(f"model={model}", f"objective={objective}")
    valid = ", ".join(valid_objectives(model))
    with pytest.raises(
        ConfigError,
        match=rf"model={model} cannot train on objective={objective}"
        rf".*Valid objectives for model={model}: {valid}",
    ):
        check_compatible(cfg)


def test_mlm_targets_counted_on_the_host_select_what_a_boolean_mask_selects():
    """The count taken in on_before_batch_transfer gives the same targets, in the same order, as
    boolean indexing (so the same loss and gradients), and one graph without breaks to compile."""
    import torch._dynamo

    from lmlab.models.encoder import EncoderLM, selected_rows

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 90, (3, 16), generator=g)
    labels = torch.where(torch.rand(3, 16, generator=g) < 0.3, ids, IGNORE)
    batch = {"input_ids": ids, "labels": labels}
    torch.manual_seed(0)
    m = EncoderLM(
        vocab_size=90, special_ids={}, optim={}, n_layers=1, d_model=16, n_heads=2, max_seq_len=16
    )
    m.set_token_bytes(torch.ones(90, dtype=torch.long))
    prepared = m.on_before_batch_transfer(dict(batch), 0)
    assert prepared["n_targets"] == int((labels != IGNORE).sum()) > 0

    hidden = m.backbone(ids, head=False)
    selected = labels != IGNORE
    n = int(selected.sum())
    for b in (batch, prepared):
        got_hidden, got_labels = m.hidden_states(b)
        # the targets first, in order, then ignored positions up to the rounded row count
        assert len(got_labels) == selected_rows(n, labels.numel()) > n
        torch.testing.assert_close(got_hidden[:n], hidden[selected], rtol=0, atol=0)
        assert torch.equal(got_labels[:n], labels[selected])
        assert (got_labels[n:] == IGNORE).all()

    def loss_and_grads(b):
        m.zero_grad()
        nll, count, *_ = m.nll(b)
        (nll / count).backward()
        return nll.detach(), [p.grad.clone() for p in m.parameters()]

    (want, want_grads), (got, got_grads) = loss_and_grads(batch), loss_and_grads(prepared)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads, strict=True))
    # and what boolean indexing gives: the head and the cross-entropy on the targets alone
    m.zero_grad()
    logits = m.backbone.lm_head(m.backbone(ids, head=False)[selected])
    reference = F.cross_entropy(logits.float(), labels[selected], reduction="sum")
    (reference / n).backward()
    torch.testing.assert_close(got, reference.detach())
    for a, p in zip(got_grads, m.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)

    # a batch without targets: one step of ignored rows, a zero loss over zero targets
    none = m.on_before_batch_transfer({"input_ids": ids, "labels": torch.full_like(ids, IGNORE)}, 0)
    nll, count, n_bytes, _ = m.nll(none)
    assert (nll.item(), count.item(), n_bytes.item()) == (0.0, 0, 0.0)

    m.loss_chunk_size = 0  # as on a GPU: the plain head and F.cross_entropy
    explained = torch._dynamo.explain(m.nll)(prepared)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    assert torch._dynamo.explain(m.nll)(batch).graph_break_count > 0  # counting on the device


def test_mlm_head_on_selected_positions_equals_full_logits(tmp_path):
    from lmlab.models.base import LMModule
    from lmlab.models.encoder import EncoderLM

    tok = byte_tokenizer(2)
    store = build_store(iter([make_text(300, 0)]), tok, tmp_path, "e")
    dm = MaskedLMDataModule(tok, store, store, seq_len=32, batch_size=4)
    batch = next(iter(dm.val_dataloader()))
    torch.manual_seed(0)
    m = EncoderLM(
        vocab_size=tok.vocab_size,
        special_ids=tok.special,
        optim={},
        n_layers=2,
        d_model=32,
        n_heads=2,
        max_seq_len=32,
    )
    m.set_token_bytes(tok.token_bytes())
    m.eval()  # so accuracy is counted too
    fast, full = m.nll(batch), LMModule.nll(m, batch)  # head on selected rows vs on every row
    torch.testing.assert_close(fast[0], full[0], rtol=1e-5, atol=1e-4)
    assert [int(x) for x in fast[1:]] == [int(x) for x in full[1:]]


def test_mlm_selected_rows_cover_the_targets_in_few_distinct_counts():
    """The MLM head's row count: at least the targets, at most the positions, and two or three
    values over a run's batches (masked counts drawn position by position are binomial: a
    rounding step is more than 5 of their standard deviations)."""
    from lmlab.models.encoder import selected_rows

    assert selected_rows(0, 128) == 32  # one step: the same shape as a batch with a few targets
    assert selected_rows(2458, 32 * 512) == 2560
    assert selected_rows(97, 100) == 100  # never more rows than positions
    g = torch.Generator().manual_seed(0)
    for positions in (128, 4096, 16384, 65536):
        counts = torch.binomial(torch.full((2000,), float(positions)), torch.tensor(0.15), g)
        rows = {selected_rows(int(c), positions) for c in counts}
        assert all(selected_rows(int(c), positions) >= c for c in counts)
        assert len(rows) <= 3 and max(rows) <= positions, (positions, rows)


def test_compiled_mlm_step_is_compiled_once_per_row_count_not_per_target_count():
    """compile=true with masked LM: 12 batches with at least 8 different target counts compile
    once per row count of the head (one or two here). Before the row count was rounded, each new
    target count compiled the step again (under the fused loss, the CPU's default, up to torch's
    limit of 8; then the step ran uncompiled)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from lmlab.models.encoder import EncoderLM

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    m = EncoderLM(
        vocab_size=90,
        special_ids={},
        optim={},
        compile=True,
        n_layers=1,
        d_model=16,
        n_heads=2,
        max_seq_len=64,
    )
    m.set_token_bytes(torch.ones(90, dtype=torch.long))
    m.configure_model()
    g = torch.Generator().manual_seed(0)
    counts, rows = set(), set()
    for _ in range(12):
        ids = torch.randint(6, 90, (4, 64), generator=g)
        labels = torch.where(torch.rand(4, 64, generator=g) < 0.15, ids, IGNORE)
        batch = m.on_before_batch_transfer({"input_ids": ids, "labels": labels}, 0)
        counts.add(batch["n_targets"])
        rows.add(batch["target_rows"])
        nll, count, *_ = m.nll(batch)
        nll.backward()
        assert count == batch["n_targets"]
    assert len(counts) >= 8 and len(rows) <= 2
    assert counters["stats"]["unique_graphs"] == len(rows)
    torch._dynamo.reset()
