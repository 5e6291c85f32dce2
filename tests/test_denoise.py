from __future__ import annotations

import math
from collections import Counter
from itertools import pairwise

import numpy as np
import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf

from lmlab.data.base import Example
from lmlab.data.collate import IGNORE
from lmlab.data.denoise import (
    DenoisingDataModule,
    infilling_spans,
    permute_sentences,
    sentence_end_table,
    text_infilling,
)
from lmlab.data.store import build_store
from lmlab.data.tokenizers import byte_tokenizer, train_bpe
from lmlab.errors import ConfigError
from lmlab.paths import CONF_DIR

from .conftest import make_text


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer(2)


@pytest.fixture(scope="module")
def stores(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("denoise")
    train = build_store(iter([make_text(400, 0), "Why? Because! " * 20]), tok, d, "train")
    val = build_store(iter([make_text(100, 1), "A short one."]), tok, d, "val")
    return train, val


def make_dm(tok, stores, **kw):
    train, val = stores
    args = {"seq_len": 64, "batch_size": 4, "seed": 7} | kw
    return DenoisingDataModule(tok, train, val, **args)


def windows(store, n: int, length: int) -> list[Example]:
    """``n`` full windows of ``length`` tokens spread over the store, in epoch 0."""
    starts = np.linspace(0, len(store) - length, n).astype(int)
    return [Example(int(s), np.asarray(store.tokens[s : s + length], np.int64)) for s in starts]


def split_sentences(tokens: list[int], ends: set[int]) -> list[tuple[int, ...]]:
    out, cur = [], []
    for t in tokens:
        cur.append(t)
        if t in ends:
            out.append(tuple(cur))
            cur = []
    return [*out, tuple(cur)] if cur else out


def is_sentence_permutation(seq: list[int], sentences: list[tuple[int, ...]]) -> bool:
    """Whether ``seq`` is the concatenation of ``sentences`` in some order (depth-first search)."""
    if not sentences:
        return not seq
    for i, s in enumerate(sentences):
        if tuple(seq[: len(s)]) == s and is_sentence_permutation(
            seq[len(s) :], sentences[:i] + sentences[i + 1 :]
        ):
            return True
    return False


# -- sentences ------------------------------------------------------------------------------------
def test_sentence_end_table(tok):
    table = sentence_end_table(tok)
    assert table.shape == (tok.vocab_size,)
    assert set(np.flatnonzero(table).tolist()) == {ord("."), ord("!"), ord("?"), tok.eos_id}
    # A trained BPE: a sentence ends after a token whose text ends with . ! or ? (trailing spaces
    # aside), wherever the merges put the punctuation.
    bpe = train_bpe([make_text(800, 3) + "Who goes there? Stand! Stand.\n" * 5], 400, 2)
    ids = bpe.encode("Good night. Who goes there? Stand and unfold! The end")
    is_end = sentence_end_table(bpe)
    sentences = split_sentences(ids, set(np.flatnonzero(is_end).tolist()))
    assert [bpe.decode(s) for s in sentences] == [
        "Good night.",
        " Who goes there?",
        " Stand and unfold!",
        " The end",
    ]


def test_permute_sentences_moves_whole_sentences(tok):
    is_end = sentence_end_table(tok)
    ends = set(np.flatnonzero(is_end).tolist())
    text = [*b"One. Two! Three? Four.", tok.eos_id, *b"Five, unfinished"]
    sentences = split_sentences(text, ends)
    assert len(sentences) == 6
    rng = np.random.default_rng(0)
    orders = set()
    for _ in range(50):
        out = permute_sentences(np.array(text), is_end, rng).tolist()
        assert is_sentence_permutation(out, sentences)
        orders.add(tuple(out))
    assert len(orders) > 10  # 720 orders: 50 draws see many of them


# -- text infilling -------------------------------------------------------------------------------
def test_infilling_spans_budget_and_layout():
    rng = np.random.default_rng(1)
    for length in [1, 2, 3, *rng.integers(4, 500, size=300).tolist()]:
        spans = infilling_spans(length, 0.3, 3.0, rng)
        starts, lens = spans[:, 0], spans[:, 1]
        num_mask = round(length * 0.3)
        # The budget is met exactly, so the masked fraction is mask_ratio up to rounding, 0.5 / n.
        assert int(lens.sum()) == num_mask
        assert abs(num_mask / length - 0.3) <= 0.5 / length + 1e-12
        assert len(spans) <= num_mask  # never more masks than masked tokens: input <= original
        assert (lens >= 0).all() and (starts >= 0).all() and (starts + lens <= length).all()
        # sorted, and at least one kept token between two spans, so their masks never touch
        assert (starts[1:] >= starts[:-1] + lens[:-1] + 1).all()


def test_infilling_spans_take_uniformly_random_places():
    """The k spans of a window take k of its gaps (before, between and after the kept tokens:
    length - masked + 1 of them), every k-subset alike: each gap holds a span with probability
    k / gaps. Counted over 4000 windows of 20 tokens (3 masked, 18 gaps, k of 1 to 3 spans plus
    insertions), each gap's count is a sum of Bernoulli draws: allowed 5 sd from its mean."""
    length, ratio, lam, draws = 20, 0.15, 3.0, 4000
    gaps = length - round(length * ratio) + 1
    rng = np.random.default_rng(3)
    held, expected, var = np.zeros(gaps), np.zeros(gaps), np.zeros(gaps)
    for _ in range(draws):
        spans = infilling_spans(length, ratio, lam, rng)
        before = np.concatenate([[0], np.cumsum(spans[:, 1])[:-1]])  # masked tokens before each
        held[spans[:, 0] - before] += 1  # the gap of each span: its start less those
        p = len(spans) / gaps
        expected += p
        var += p * (1 - p)
    assert (np.abs(held - expected) <= 5 * np.sqrt(var)).all(), (held, expected)


def test_infilling_span_lengths_follow_poisson():
    # Non-empty spans are Poisson(lam) given > 0: mean mu = lam / (1 - e^-lam) = 3.157 for lam = 3
    # (the plain Poisson mean, 3, counts the empty spans too), variance (lam + lam^2) / (1 - e^-lam)
    # - mu^2, so sigma = 1.63. With n = 1000 and mask_ratio 0.3 each window masks m = 300 tokens in
    # about k = m / mu = 95 spans; W = 200 windows give N = W * k = 19000 spans, standard error
    # sigma / sqrt(N) = 0.012. The last span of a window is cut to meet the budget, which can only
    # lower the mean, by at most (size-biased span mean (1 + lam) = 4) / k = 0.042. Allowed:
    # [mu - 0.042 - 5 se, mu + 5 se], which excludes 3.
    lam, n, m, W = 3.0, 1000, 300, 200
    mu = lam / (1 - math.exp(-lam))
    sigma = math.sqrt((lam + lam**2) / (1 - math.exp(-lam)) - mu**2)
    k = m / mu
    se = sigma / math.sqrt(W * k)
    rng = np.random.default_rng(2)
    lens = np.concatenate([infilling_spans(n, 0.3, lam, rng)[:, 1] for _ in range(W)])
    assert lens.sum() == W * m
    nonempty = lens[lens > 0]
    assert mu - (1 + lam) / k - 5 * se <= nonempty.mean() <= mu + 5 * se
    assert not mu - (1 + lam) / k - 5 * se <= lam
    # Empty spans (inserted masks) are kept at the Poisson rate e^-lam = 0.0498: a binomial
    # proportion over ~N spans, sd sqrt(p (1 - p) / N) = 0.0016, allowed 5 sd.
    p0 = math.exp(-lam)
    assert abs((lens == 0).mean() - p0) <= 5 * math.sqrt(p0 * (1 - p0) / len(lens))


def test_text_infilling_replaces_each_span_by_one_mask():
    tokens = np.arange(10, 20)
    spans = np.array([[0, 2], [4, 0], [6, 3]])
    assert text_infilling(tokens, spans, 99).tolist() == [99, 12, 13, 99, 14, 15, 99, 19]
    assert text_infilling(tokens, np.zeros((0, 2), np.int64), 99).tolist() == tokens.tolist()


# -- DataModule -----------------------------------------------------------------------------------
def check_batch(b, examples, tok, seq_len):
    """Shapes, target = original + eos, -100 exactly on padding, decoder inputs shifted right."""
    B = len(examples)
    assert b["input_ids"].shape == b["attention_mask"].shape == (B, seq_len)
    assert b["labels"].shape == b["decoder_input_ids"].shape == (B, seq_len)
    assert b["input_ids"].dtype == b["labels"].dtype == torch.long
    assert b["attention_mask"].dtype == torch.bool
    for row, ex in enumerate(examples):
        n = len(ex.tokens) + 1
        labels = b["labels"][row]
        assert labels[:n].tolist() == [*ex.tokens.tolist(), tok.eos_id]
        assert (labels[n:] == IGNORE).all()
        assert b["decoder_input_ids"][row, :n].tolist() == [tok.bos_id, *labels[: n - 1].tolist()]
        assert (b["decoder_input_ids"][row, n:] == tok.pad_id).all()
        real = int(b["attention_mask"][row].sum())
        assert b["attention_mask"][row].tolist() == [True] * real + [False] * (seq_len - real)
        assert (b["input_ids"][row, real:] == tok.pad_id).all()
        assert b["input_ids"][row, real - 1] == tok.eos_id


def test_denoising_batches(tok, stores):
    dm = make_dm(tok, stores)
    assert dm.batch_kind == "seq2seq" and (dm.window_len, dm.target_len) == (63, 64)
    exs = windows(stores[0], 40, dm.window_len)
    b = dm.make_batch(exs)
    check_batch(b, exs, tok, 64)
    n_masked = 0
    for row, ex in enumerate(exs):
        inp = b["input_ids"][row][b["attention_mask"][row]].tolist()[:-1]
        masks = [i for i, t in enumerate(inp) if t == tok.mask_id]
        kept = [t for t in inp if t != tok.mask_id]
        assert masks and all(j - i > 1 for i, j in pairwise(masks))
        assert not Counter(kept) - Counter(ex.tokens.tolist())  # a sub-multiset of the window
        # round(63 * 0.3) = 19 tokens are masked in every full window
        assert len(ex.tokens) - len(kept) == 19
        n_masked += len(ex.tokens) - len(kept)
    assert n_masked / (40 * 63) == pytest.approx(0.3, abs=0.5 / 63)


def test_no_noise_gives_the_original(tok, stores):
    dm = make_dm(tok, stores, mask_ratio=0.0, permute_sentences=False)
    exs = windows(stores[0], 8, dm.window_len)
    b = dm.make_batch(exs)
    assert torch.equal(b["input_ids"], b["labels"]) and b["attention_mask"].all()


def test_permutation_only_shuffles_whole_sentences(tok, stores):
    dm = make_dm(tok, stores, mask_ratio=0.0)
    ends = set(np.flatnonzero(sentence_end_table(tok)).tolist())
    exs = windows(stores[0], 20, dm.window_len)
    b = dm.make_batch(exs)
    check_batch(b, exs, tok, 64)
    assert b["attention_mask"].all()
    moved = 0
    for row, ex in enumerate(exs):
        inp = b["input_ids"][row, :-1].tolist()
        assert is_sentence_permutation(inp, split_sentences(ex.tokens.tolist(), ends))
        moved += inp != ex.tokens.tolist()
    assert moved >= 10  # ~8 words per sentence: a 63-byte window has 2+ sentences to shuffle


def test_short_examples_and_reproducibility(tok, stores):
    dm = make_dm(tok, stores)
    exs = [
        Example(1, np.array([65])),
        Example(2, np.array([65, 46])),
        Example(3, np.arange(65, 90)),
    ]
    b = dm.make_batch(exs)
    check_batch(b, exs, tok, 64)
    assert b["input_ids"][0, :2].tolist() == [65, tok.eos_id]  # round(0.3) = 0: nothing masked
    again = make_dm(tok, stores).make_batch([Example(e.start, e.tokens.copy()) for e in exs])
    assert all(torch.equal(b[k], again[k]) for k in b)
    ex = windows(stores[0], 1, dm.window_len)[0]
    first = dm.make_batch([ex])["input_ids"]
    for other in (Example(ex.start, ex.tokens, 1), Example(ex.start + 1, ex.tokens, 0)):
        assert not torch.equal(dm.make_batch([other])["input_ids"], first)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"mask_ratio": -0.1}, "mask_ratio"),
        ({"mask_ratio": 1.5}, "mask_ratio"),
        ({"poisson_lambda": 0.0}, "poisson_lambda"),
        # inf and NaN failed only at the first batch, in numpy ("lam value too large")
        ({"poisson_lambda": math.inf}, "poisson_lambda=inf must be > 0 and at most seq_len=64"),
        ({"poisson_lambda": math.nan}, "poisson_lambda=nan must be > 0"),
        ({"poisson_lambda": 65.0}, "at most seq_len=64"),
        ({"seq_len": 1}, "seq_len >= 2"),
    ],
)
def test_bad_settings_are_config_errors(tok, stores, kw, message):
    with pytest.raises(ConfigError, match=message):
        make_dm(tok, stores, **kw)


def test_loaders_from_config_and_validation_covers_every_token_once(tok, stores):
    train, val = stores
    cfg = OmegaConf.load(CONF_DIR / "objective" / "denoise.yaml").objective  # a _global_ package
    assert cfg.name == "denoise" and cfg.mask_ratio == 0.3 and cfg.permute_sentences is True
    # as the trainer builds it: the YAML keys plus the runtime objects, passed as they are
    kwargs = OmegaConf.to_container(cfg)
    dm = get_class(kwargs.pop("_target_"))(
        **kwargs, tokenizer=tok, train=train, val=val, seq_len=48, batch_size=4, seed=0
    )
    assert isinstance(dm, DenoisingDataModule) and dm.stride == dm.window_len == 47
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape == b["labels"].shape == (4, 48)
    assert (b["labels"] != IGNORE).all()  # training windows are always full
    assert len(val) % dm.window_len != 0  # the last validation window is short
    passes = [list(dm.val_dataloader()) for _ in range(2)]
    rebuilt = []
    for vb in passes[0]:
        for labels in vb["labels"]:
            assert labels[labels != IGNORE][-1] == tok.eos_id
            rebuilt += labels[labels != IGNORE][:-1].tolist()
    assert rebuilt == val.tokens.tolist()
    for a, b2 in zip(*passes, strict=True):
        assert all(torch.equal(a[k], b2[k]) for k in a)
