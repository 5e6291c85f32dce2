"""Encoder, encoder-decoder and prefix-LM: attention patterns, masking statistics, every pair trains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmlab.data.base import Example
from lmlab.data.collate import IGNORE, mlm_mask
from lmlab.data.mlm import MaskedLMDataModule
from lmlab.data.prefix_lm import PrefixLMDataModule
from lmlab.data.store import build_store
from lmlab.data.tokenizers import byte_tokenizer, train_bpe, word_starts
from lmlab.errors import ConfigError
from lmlab.evaluate import evaluate
from lmlab.generate import generate
from lmlab.nn.decoder import Decoder, DecoderConfig, prefix_lm_mask
from lmlab.nn.encoder import Encoder, EncoderConfig
from lmlab.nn.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from lmlab.registry import MODELS, OBJECTIVES, valid_objectives
from lmlab.train import check_compatible, train

from .conftest import command_cfg, make_text

SMALL = dict(vocab_size=100, n_layers=2, d_model=32, n_heads=4, max_seq_len=64)


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


# -- masked LM --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def masking():
    tok = byte_tokenizer(4)
    special = np.zeros(tok.vocab_size, dtype=bool)
    special[tok.special_ids] = True
    return tok, special, np.flatnonzero(~special)


def test_mlm_selection_statistics(masking):
    tok, special, random_ids = masking
    rng = np.random.default_rng(0)
    n_draws, L = 400, 130
    counts = {"selected": 0, "eligible": 0, "mask": 0, "other": 0, "same": 0}
    for _ in range(n_draws):
        ids = rng.choice(random_ids, size=L)
        ids[rng.choice(L, 10, replace=False)] = tok.eos_id  # specials sprinkled in
        ids[0], ids[-1] = tok.cls_id, tok.sep_id
        inputs, labels, sel = mlm_mask(
            ids, rng, special=special, mask_id=tok.mask_id, random_ids=random_ids
        )
        eligible = ~special[ids]
        assert not (sel & ~eligible).any()  # special tokens are never selected
        assert (labels[~sel] == IGNORE).all() and (labels[sel] == ids[sel]).all()
        assert (inputs[~sel] == ids[~sel]).all()
        # exact count per sequence: round(0.15 * n) of the n eligible positions
        assert sel.sum() == round(0.15 * eligible.sum())
        counts["selected"] += int(sel.sum())
        counts["eligible"] += int(eligible.sum())
        counts["mask"] += int((inputs[sel] == tok.mask_id).sum())
        counts["same"] += int((inputs[sel] == ids[sel]).sum())
        counts["other"] += int(((inputs[sel] != ids[sel]) & (inputs[sel] != tok.mask_id)).sum())
    n = counts["selected"]
    # per sequence the count is round(0.15 n), off by at most 0.5 token: |frac - 0.15| <= 0.5 / n_min
    assert abs(counts["selected"] / counts["eligible"] - 0.15) <= 0.5 / (L - 12)
    # 80/10/10: each selected token is an independent categorical draw, so each share is a binomial
    # proportion with standard deviation sqrt(p (1 - p) / n); allow 5 of them (false alarm < 1e-6).
    # A random replacement equals the original with probability 1/256, counted as "same".
    p_same = 0.1 + 0.1 / len(random_ids)
    for key, p in (("mask", 0.8), ("other", 0.1 - 0.1 / len(random_ids)), ("same", p_same)):
        assert abs(counts[key] / n - p) <= 5 * math.sqrt(p * (1 - p) / n), key


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
    rng = np.random.default_rng(1)
    ids = np.array([tok.cls_id, *tok.encode(make_text(200, 5)), tok.sep_id])
    starts = word_starts(ids, table, special)
    word = np.cumsum(starts)
    assert len(np.unique(word)) < len(ids)  # some words span several tokens
    for _ in range(50):
        _, _, sel = mlm_mask(
            ids,
            rng,
            special=special,
            mask_id=tok.mask_id,
            random_ids=np.flatnonzero(~special),
            word_start=starts,
        )
        assert sel.sum() <= round(0.15 * (~special[ids]).sum())
        for w in np.unique(word[sel]):
            assert sel[word == w].all()  # all of a selected word's tokens are selected


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
    ex = Example(0, np.asarray(store.tokens[:30], dtype=np.int64))
    inputs, labels = dm.mask_example(ex)
    assert len(inputs) == 32 and (labels != IGNORE).sum() >= 1


# -- every pair -------------------------------------------------------------------------------------
PAIRS = [(m, o) for m in MODELS for o in valid_objectives(m)]


def test_compatibility_table_covers_the_families():
    assert valid_objectives("decoder") == ["clm", "prefix_lm"]
    assert valid_objectives("encoder") == ["mlm"]
    assert set(valid_objectives("encoder_decoder")) == {
        o for o in OBJECTIVES if o in ("span", "denoise")
    }


@pytest.mark.parametrize(("model", "objective"), PAIRS)
def test_every_valid_pair_trains(tiny_cfg, model, objective):
    metrics, objects = train(
        tiny_cfg(
            f"model={model}",
            f"objective={objective}",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
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
    assert m["loss"] == pytest.approx(metrics["val/loss"], rel=1e-4)
    assert m["acc"] == pytest.approx(metrics["val/acc"], rel=1e-4)
    prompt = {
        "clm": "The king",
        "prefix_lm": "The king",
        "mlm": "The <|mask|> king",
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
        assert text.splitlines()[0].startswith("The") and "<|mask|>" not in text.splitlines()[0]
        assert "mask at token 2: " in text and "'<|" not in text  # "The", " ", mask; no specials
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
