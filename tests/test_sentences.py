"""Sentence-level objectives (sop, nsp, sentence_distance, deshuffle): the segments each label stands
for, the batch layout, and the sentence head's loss and metrics."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.data.base import Example, Windows, scored_only
from lmlab.data.collate import IGNORE
from lmlab.data.sentences import (
    DeshuffleDataModule,
    NextSentenceDataModule,
    SentenceDistanceDataModule,
    SentenceOrderDataModule,
    longest_run,
)
from lmlab.data.store import build_store
from lmlab.data.tokenizers import byte_tokenizer
from lmlab.errors import ConfigError
from lmlab.models.encoder import EncoderLM
from lmlab.train import train

from .conftest import tiny_encoder

ALPHABETS = ["abcd", "efgh", "ijkl", "mnop"]  # one per document: a token tells its document


def sentences(letters: str, n: int, seed: int) -> str:
    """``n`` sentences of words spelt with ``letters`` only, each ending with ". "."""
    rng = random.Random(seed)
    words = lambda k: " ".join(
        "".join(rng.choice(letters) for _ in range(rng.randint(2, 5))) for _ in range(k)
    )
    return " ".join(words(rng.randint(2, 6)).capitalize() + "." for _ in range(n)) + " "


@pytest.fixture
def tok():
    return byte_tokenizer(2)


@pytest.fixture
def store(tok, tmp_path):
    """Four documents, each spelt with its own letters (spaces, capitals and "." are shared)."""
    docs = [sentences(a, 40, i) for i, a in enumerate(ALPHABETS)]
    return build_store(iter(docs), tok, tmp_path, "pairs")


def doc_of(token: int) -> int | None:
    char = chr(token).lower()
    return next((i for i, a in enumerate(ALPHABETS) if char in a), None)


def examples(store, window_len: int, epochs: int = 3) -> list[Example]:
    ds = Windows(store, window_len)
    return [ds[(s, e)] for e in range(epochs) for s in range(0, len(store) - window_len, 11)]


def text_of(ex: Example, eos: int) -> np.ndarray:
    start, end = longest_run(ex.tokens, eos)
    return ex.tokens[start:end] if end - start >= 2 else ex.tokens


def pair(dm, ex: Example) -> tuple[np.ndarray, np.ndarray, int]:
    """(A, B, label) of a two-segment objective's example (B empty for an unscored one)."""
    segments, label = dm.segments(ex)
    return (*segments, label) if len(segments) == 2 else (segments[0], segments[0][:0], label)


def test_longest_run():
    t = np.array([5, 6, 0, 7, 8, 9, 0, 1, 2, 3])
    assert longest_run(t, 0) == (3, 6)  # the first of two runs of three
    assert longest_run(np.array([0, 0]), 0) == (0, 0)
    assert longest_run(np.array([4, 4, 4]), 0) == (0, 3)


def ids(text: str, tok) -> list[int]:
    """Byte ids, with "|" standing for a document end (eos)."""
    return [tok.eos_id if c == "|" else ord(c) for c in text]


@pytest.mark.parametrize(
    ("window", "pairs"),
    [
        # partial sentences at both edges are left out: two whole sentences, one cut
        (" is. Ab cd. Ef gh. Ij k", {(" Ab cd.", " Ef gh.")}),
        # three: either end inside
        (" is. Ab. Cd ef. Gh! Ij", {(" Ab.", " Cd ef. Gh!"), (" Ab. Cd ef.", " Gh!")}),
        # a document's first and last sentences count as partial: no segment starts without the
        # whitespace other sentence starts have, or ends without a full stop
        ("xy.|Ab cd. Ef gh. Ij kl. Mn", {(" Ef gh.", " Ij kl.")}),
        ("x. Ab cd. Ef gh. Ij|z", {(" Ab cd.", " Ef gh.")}),
        ("x. Ab cd. Ef gh.  |z", {(" Ab cd.", " Ef gh.")}),
    ],
)
def test_pairs_are_whole_sentences_of_the_window(tok, store, window, pairs):
    """A and B in the text's order, over many draws: exactly the expected cuts, each label."""
    dm = SentenceOrderDataModule(tok, store, store, seq_len=40, batch_size=4)
    seen, labels = set(), set()
    for epoch in range(300):
        a, b, y = pair(dm, Example(7, np.array(ids(window, tok)), epoch))
        first, second = (a, b) if y == 0 else (b, a)
        seen.add((bytes(first.tolist()).decode(), bytes(second.tolist()).decode()))
        labels.add(y)
    assert seen == pairs and labels == {0, 1}


@pytest.mark.parametrize("cls", [SentenceOrderDataModule, DeshuffleDataModule])
def test_windows_under_two_whole_sentences_are_not_scored(tok, store, cls):
    """Cut at random positions instead, a word running on across the junction told that two
    segments were in order (a review's bigram rule: 0.87 on such sop windows)."""
    dm = cls(tok, store, store, seq_len=40, batch_size=4)
    for window in ("ab cd. ef gh", "xy.|Ab cd. Ef gh. Ij", "abcd", "a|b|c|d", "|", "a"):
        example = Example(7, np.array(ids(window, tok)))
        assert dm.stretch(example) is None
        segments, label = dm.segments(example)
        assert label == IGNORE and len(segments) == 1 and segments[0] is example.tokens


def test_sop_pairs_are_the_document_text_in_or_out_of_order(tok, store):
    dm = SentenceOrderDataModule(tok, store, store, seq_len=80, batch_size=4)
    labels, unscored = [], 0
    for ex in examples(store, dm.window_len):
        a, b, y = pair(dm, ex)
        if y == IGNORE:
            unscored += 1
            continue
        text = text_of(ex, tok.eos_id)
        assert len(a) and len(b) and y in (0, 1)
        first, second = (a, b) if y == 0 else (b, a)
        joined = np.concatenate([first, second])
        view = np.lib.stride_tricks.sliding_window_view(text, len(joined))
        assert (view == joined).all(axis=1).any()  # consecutive text of the stretch
        assert len({doc_of(t) for t in joined} - {None}) == 1  # one document's
        assert dm.is_end[first[-1]] and dm.is_end[second[-1]]  # whole sentences
        labels.append(y)
        assert pair(dm, ex)[2] == y and dm.sentence_label(ex) == y  # reproducible
    assert unscored < 0.1 * len(labels)  # windows of ~4 sentences: nearly all scored
    # half swapped: 4.5 standard deviations
    n = len(labels)
    assert abs(np.mean(labels) - 0.5) < 4.5 * 0.5 / math.sqrt(n), (np.mean(labels), n)


def test_nsp_not_next_segments_are_whole_sentences_of_other_documents(tok, store):
    dm = NextSentenceDataModule(tok, store, store, seq_len=80, batch_size=4)
    text = np.asarray(store.tokens, dtype=np.int64)
    starts = set(np.flatnonzero(dm.is_end[text[:-1]]) + 1) | set(store.offsets[:-1].tolist())
    labels, other_docs, lengths = [], set(), {0: [], 1: []}
    for ex in examples(store, dm.window_len):
        a, b, y = pair(dm, ex)
        if y == IGNORE:
            continue
        whole = text_of(ex, tok.eos_id)
        own = {doc_of(t) for t in whole} - {None}
        assert len(own) == 1
        lengths[y].append(len(b))
        if y == 0:
            joined = np.concatenate([a, b])
            view = np.lib.stride_tricks.sliding_window_view(whole, len(joined))
            assert (view == joined).all(axis=1).any()
        else:
            assert len(b) <= len(whole) - len(a)
            docs = {doc_of(t) for t in b} - {None}
            assert len(docs) == 1 and not docs & own and tok.eos_id not in b
            other_docs |= docs
            # a piece of the store: whole sentences from a sentence start
            view = np.lib.stride_tricks.sliding_window_view(text, len(b))
            where = set(np.flatnonzero((view == b).all(axis=1)).tolist())
            assert where & starts and dm.is_end[b[-1]]
        labels.append(y)
    assert other_docs == {0, 1, 2, 3}  # every document serves as another's NotNext text
    n = len(labels)
    assert abs(np.mean(labels) - 0.5) < 4.5 * 0.5 / math.sqrt(n)
    # both labels' B are as long on average (within 10%): the length tells nothing
    assert np.mean(lengths[1]) == pytest.approx(np.mean(lengths[0]), rel=0.1)


def test_text_from_elsewhere_takes_every_whole_sentence_that_fits(tok, store):
    """From its drawn start, the text runs on while the next whole sentence fits the room: it was
    cut where the stretch of the document it was drawn in ended (on documents shorter than
    REGION_TOKENS, a random prefix or suffix of the document), and ran shorter than B."""
    dm = NextSentenceDataModule(tok, store, store, seq_len=80, batch_size=4)
    text = np.asarray(store.tokens, dtype=np.int64)
    ex = examples(store, dm.window_len)[0]
    rng, room, cut, drawn = np.random.default_rng(0), 60, 0, 0
    for doc in range(store.n_docs):
        lo, hi = int(store.offsets[doc]), int(store.offsets[doc + 1]) - 1
        for _ in range(50):
            b = dm.text_from(ex, (lo, hi), room, rng)
            if b is None:  # a stretch without a whole sentence that fits: drawn again by nsp
                continue
            view = np.lib.stride_tricks.sliding_window_view(text[lo:hi], len(b))
            (where,) = np.flatnonzero((view == b).all(axis=1))
            end = lo + int(where) + len(b)
            after = np.flatnonzero(dm.is_end[text[end:hi]])
            assert len(b) <= room and dm.is_end[b[-1]]
            # the next sentence does not fit, or the document has no whole sentence left
            cut += not (len(after) == 0 or len(b) + int(after[0]) + 1 > room)
            drawn += 1
    assert cut == 0 and drawn > 150


def test_nsp_in_a_one_document_split_takes_text_away_from_the_window(tok, tmp_path):
    one = build_store(iter([sentences("abcd", 300, 0)]), tok, tmp_path, "one")
    dm = NextSentenceDataModule(tok, one, one, seq_len=80, batch_size=2)
    text = np.asarray(one.tokens, dtype=np.int64)
    seen = 0
    for ex in examples(one, dm.window_len, epochs=2):
        _, b, y = pair(dm, ex)
        if y == 1:
            view = np.lib.stride_tricks.sliding_window_view(text, len(b))
            where = np.flatnonzero((view == b).all(axis=1))
            wl = dm.window_len
            assert any(w + len(b) <= ex.start - wl or w >= ex.start + wl for w in where)
            seen += 1
    assert seen > 50
    doc = sentences("abcd", 3, 0)
    short = build_store(iter([doc]), tok, tmp_path, "short")  # under 3 windows of 77
    with pytest.raises(ConfigError, match=f"one document of {len(doc)} tokens, under 3 windows"):
        NextSentenceDataModule(tok, one, short, seq_len=80, batch_size=2)


ALL = [
    SentenceOrderDataModule,
    NextSentenceDataModule,
    SentenceDistanceDataModule,
    DeshuffleDataModule,
]


@pytest.mark.parametrize("cls", ALL)
def test_batches_are_cls_then_each_segment_and_sep_masked_as_mlm(tok, store, cls):
    dm = cls(tok, store, store, seq_len=60, batch_size=4)
    exs = examples(store, dm.window_len)[:6]
    batch = dm.make_batch(exs)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (6, 60)
    original = torch.where(labels != IGNORE, labels, ids)
    for row, ex in enumerate(exs):
        segments, y = dm.segments(ex)
        want, seps = [tok.cls_id], [0]
        for seg in segments:
            want += [*seg, tok.sep_id]
            seps.append(len(want) - 1)
        n = len(want)
        assert n <= 60 and original[row, :n].tolist() == want
        assert (ids[row, n:] == tok.pad_id).all()
        assert mask[row].tolist() == [True] * n + [False] * (60 - n)
        selected = labels[row] != IGNORE
        text = sum(len(seg) for seg in segments)
        assert selected.sum() == max(1, round(0.15 * text))  # mlm's budget
        assert not selected[seps].any()  # cls and seps never masked
        assert batch["sentence_labels"][row] == y
        assert y == IGNORE or 0 <= y < len(dm.label_names)
        # the same example masks the same in any batch, and as mask_example shows it
        alone = dm.make_batch([ex])
        assert torch.equal(alone["input_ids"][0], ids[row])
        inputs, example_labels = dm.mask_example(ex)
        assert inputs.tolist() == ids[row, :n].tolist()
        assert example_labels.tolist() == labels[row, :n].tolist()
        assert dm.segments(ex)[1] == y == dm.sentence_label(ex)  # reproducible
    # a validation rank's padding window: its label is not scored either
    padded = scored_only(
        dm.make_batch, [exs[0], Example(exs[1].start, exs[1].tokens, 0, False, store)]
    )
    assert padded["sentence_labels"].tolist() == [dm.sentence_label(exs[0]), IGNORE]
    assert (padded["labels"][1] == IGNORE).all()
    # a one-token window (a split's last): nothing to classify, its label ignored
    tail = Example(len(store) - 1, np.asarray(store.tokens[-1:], dtype=np.int64), store=store)
    assert dm.segments(tail)[1] == IGNORE


def test_sentence_distance_labels_say_where_b_comes_from(tok, store, tmp_path):
    dm = SentenceDistanceDataModule(tok, store, store, seq_len=80, batch_size=4)
    text = np.asarray(store.tokens, dtype=np.int64)
    starts = set(np.flatnonzero(dm.is_end[text[:-1]]) + 1) | set(store.offsets[:-1].tolist())
    counts = np.zeros(3, dtype=int)
    for ex in examples(store, dm.window_len):
        segments, y = dm.segments(ex)
        if y == IGNORE:
            continue
        a, b = segments
        whole = text_of(ex, tok.eos_id)
        (own,) = {doc_of(t) for t in whole} - {None}
        counts[y] += 1
        if y == 0:  # the text that follows
            joined = np.concatenate([a, b])
            view = np.lib.stride_tricks.sliding_window_view(whole, len(joined))
            assert (view == joined).all(axis=1).any()
            continue
        assert ({doc_of(t) for t in b} - {None} == {own}) == (y == 1)
        view = np.lib.stride_tricks.sliding_window_view(text, len(b))
        where = set(np.flatnonzero((view == b).all(axis=1)).tolist())
        assert where & starts and dm.is_end[b[-1]]  # whole sentences
        if y == 1:  # same document, a window away from A's window or after it: never next to A
            wl = dm.window_len
            assert any(w + len(b) <= ex.start - wl or w >= ex.start + wl for w in where)
    assert (abs(counts / counts.sum() - 1 / 3) < 0.06).all(), counts
    # one document shorter than a window: only "adjacent" is possible
    short = build_store(iter([sentences("abcd", 3, 0)]), tok, tmp_path, "short")
    dm = SentenceDistanceDataModule(tok, store, short, seq_len=80, batch_size=1)
    (ex,) = dm.val_examples(5)
    draws = [Example(0, ex.tokens, epoch, store=short) for epoch in range(30)]
    assert {dm.segments(ex)[1] for ex in draws} == {0}


@pytest.mark.parametrize(
    ("window", "pieces"),
    [
        # three whole sentences (the edges' partial ones left out): cut into 1 to 3 segments
        (" is. Ab. Cd ef. Gh! Ij", [" Ab.", " Cd ef.", " Gh!"]),
        # two: into 1 or 2 segments
        (" is. Ab. Cd ef. Gh", [" Ab.", " Cd ef."]),
    ],
)
def test_deshuffle_labels_name_the_order_of_the_segments(tok, store, window, pieces):
    dm = DeshuffleDataModule(tok, store, store, seq_len=40, batch_size=4, max_segments=3)
    assert dm.label_names == (
        "1",
        "1 2",
        "2 1",
        "1 2 3",
        "1 3 2",
        "2 1 3",
        "2 3 1",
        "3 1 2",
        "3 2 1",
    )
    seen = np.zeros(len(dm.label_names), dtype=int)
    for epoch in range(900):
        segments, y = dm.segments(Example(7, np.array(ids(window, tok)), epoch))
        texts = [bytes(seg.tolist()).decode() for seg in segments]
        order = [int(i) - 1 for i in dm.label_names[y].split()]
        # the label's order puts the segments back; every segment is whole sentences
        restored = [None] * len(order)
        for text, i in zip(texts, order, strict=True):
            restored[i] = text
        assert "".join(restored) == "".join(pieces)
        assert all(t.endswith((".", "!")) for t in texts)
        seen[y] += 1
    possible = 1 + sum(math.factorial(n) for n in range(2, len(pieces) + 1))
    assert (seen[:possible] > 0).all() and not seen[possible:].any()
    # n uniform over 1..len(pieces): the one-segment class takes 1/len(pieces) of the draws
    assert seen[0] / 900 == pytest.approx(1 / len(pieces), abs=0.06)


def test_settings_are_checked(tok, store):
    for bad in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ConfigError, match=r"sentence_weight=.* must be a finite number >= 0"):
            SentenceOrderDataModule(
                tok, store, store, seq_len=40, batch_size=4, sentence_weight=bad
            )
    with pytest.raises(ConfigError, match="objective=nsp needs seq_len >= 5"):
        NextSentenceDataModule(tok, store, store, seq_len=4, batch_size=4)
    with pytest.raises(ConfigError, match="objective=deshuffle needs seq_len >= 9"):
        DeshuffleDataModule(tok, store, store, seq_len=8, batch_size=4, max_segments=4)
    # two segments fit seq_len=5 (the data check that follows finds no two whole sentences)
    with pytest.raises(ConfigError, match="holds two whole sentences"):
        DeshuffleDataModule(tok, store, store, seq_len=5, batch_size=4, max_segments=2)
    for bad, message in (
        (1, "must be 2 to 5"),
        (6, "must be 2 to 5"),
        ("3", "not a whole"),
        (True, "not a whole"),
    ):
        with pytest.raises(ConfigError, match=f"objective.max_segments=.* {message}"):
            DeshuffleDataModule(tok, store, store, seq_len=40, batch_size=4, max_segments=bad)
    assert (
        DeshuffleDataModule(tok, store, store, seq_len=40, batch_size=4).model_settings()[
            "sentence_classes"
        ]
        == 9
    )
    dm = SentenceOrderDataModule(tok, store, store, seq_len=40, batch_size=4, sentence_weight=0.5)
    assert dm.model_settings() == {
        "sentence_task": "sop",
        "sentence_classes": 2,
        "sentence_weight": 0.5,
    }


def test_sentence_head_loss_is_the_cross_entropy_at_cls_added_to_the_mlm_loss(tok, store):
    dm = NextSentenceDataModule(tok, store, store, seq_len=64, batch_size=4)
    torch.manual_seed(0)
    m = tiny_encoder(tok, **dm.model_settings())
    short = Example(5, np.asarray(store.tokens[5:12], np.int64), store=store)  # not scored
    batch = dm.make_batch([*examples(store, dm.window_len)[:9], short])
    y = batch["sentence_labels"]
    scored = y != IGNORE
    n = int(scored.sum())
    assert {0, 1, IGNORE} <= set(y.tolist())  # both labels, and an unscored example
    m.eval()
    nll, count, _, _, s_nll, s_count, s_correct = m.nll(batch)
    hidden = m.backbone(batch["input_ids"], batch["attention_mask"], head=False)
    logits = m.backbone.sentence_head(hidden[:, 0])
    torch.testing.assert_close(s_nll, F.cross_entropy(logits[scored], y[scored], reduction="sum"))
    assert s_count == n and s_correct == int((logits.argmax(-1) == y)[scored].sum())
    # the MLM values are the plain encoder's over the same selected positions
    mlm = m.head_loss(*m.hidden_states(batch), count_correct=True)
    torch.testing.assert_close(nll, mlm[0])
    # training: MLM mean + weight x pair mean; weight 0 leaves the MLM loss alone
    m.train()
    loss = m.training_step(dict(batch), 0)
    torch.testing.assert_close(loss, nll / count + s_nll / n)
    m.aux_weights["nsp"] = 0.0
    torch.testing.assert_close(m.training_step(dict(batch), 0), nll / count)
    m.aux_weights["nsp"] = 1.0
    m.training_step(dict(batch), 0).backward()
    assert m.backbone.sentence_head.weight.grad.abs().sum() > 0
    assert m.latest_train_metrics()["train/nsp_loss"] == pytest.approx(
        float(s_nll.detach()) / n, rel=1e-5
    )
    # the head's work in the FLOP count: 6 x its matmul weights per sequence
    plain = tiny_encoder(tok)
    assert m.step_flops(batch) - plain.step_flops(batch) == 6 * (32 * 32 + 2 * 32) * 10
    # rebuilt from its hyperparameters (as a checkpoint is), it has the head
    again = EncoderLM(**m.hparams)
    assert again.backbone.sentence_head is not None and again.aux_weights == {"nsp": 1.0}
    with pytest.raises(ValueError, match="must be given together"):
        EncoderLM(**{**m.hparams, "sentence_classes": 0})


def test_the_sentence_head_trains_through_the_encoder(tok, store):
    """Training steps on one batch of pairs fit its labels (the labels reach the head, and its
    gradient the encoder): the pair loss falls from chance (log 2) to near zero."""
    dm = SentenceOrderDataModule(tok, store, store, seq_len=40, batch_size=4)
    torch.manual_seed(0)
    m = tiny_encoder(tok, loss_chunk_size=None, **dm.model_settings())
    batch = dm.make_batch(examples(store, dm.window_len)[:16])
    optimizer = torch.optim.AdamW(m.parameters(), lr=3e-3)
    start = m.backbone.blocks[0].attn.qkv.weight.detach().clone()
    losses = []
    for _ in range(100):
        m.training_step(dict(batch), 0).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(m.latest_train_metrics()["train/sop_loss"]))
    assert losses[0] == pytest.approx(math.log(2), abs=0.05) and losses[-1] < 0.05, losses
    assert not torch.equal(m.backbone.blocks[0].attn.qkv.weight, start)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective.sentence_weight=-1"], r"objective.sentence_weight=-1 must be a finite number"),
        (["objective.sentence_weight=nan"], r"objective.sentence_weight=nan must be a finite"),
        (["seq_len=4"], r"objective=sop needs seq_len >= 5"),
        (["+objective.sentence_wieght=2"], r"sentence_wieght"),
        (["model=decoder"], r"model=decoder cannot train on objective=sop"),
    ],
)
def test_bad_pair_settings_are_refused_before_any_data_work(compose_cfg, overrides, message):
    from lmlab.train import check_compatible, check_settings

    cfg = compose_cfg("model=encoder", "objective=sop", *overrides)
    with pytest.raises(ConfigError, match=message):
        check_compatible(cfg)
        check_settings(cfg)


def test_a_pair_run_reports_the_sentence_head(tiny_cfg, caplog):
    """Its metrics in the summary and the final line, its labels and predictions in the samples."""
    caplog.set_level("INFO", logger="lmlab")
    metrics, objects = train(tiny_cfg("model=encoder", "objective=nsp", "seq_len=48"))
    assert 0 <= metrics["val/nsp_acc"] <= 1 and metrics["val/nsp_loss"] > 0
    assert metrics["train/nsp_loss"] > 0 and "val/sop_acc" not in metrics
    final = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Final:"))
    assert f"val/nsp_acc {metrics['val/nsp_acc']:.4f}" in final
    samples = (objects["output_dir"] / "samples.txt").read_text()
    lines = [line for line in samples.splitlines() if line.startswith("nsp: ")]
    assert len(lines) == 4  # two samples at each of the two validations
    for line in lines:
        assert re.fullmatch(
            r"nsp: (is next|not next) \(predicted (is next|not next), p=[01]\.\d\d\)", line
        )
    assert " | " in samples  # the segments shown apart


@pytest.mark.parametrize("seq_len", [40, 80])  # windows of ~2 and ~4 sentences
@pytest.mark.parametrize("cls", ALL)
def test_segment_edges_and_lengths_do_not_tell_the_label(tok, store, cls, seq_len):
    """Per label, how often the first and the last segment start with a space and end a
    sentence, and the first segment's share of the text, are the same up to sampling noise (~600
    examples per label; 0.12 is ~4 standard errors). Cutting a window's text at a sentence end
    but keeping its edges made "the input ends with a full stop" say "swapped" 66% of the time
    against 4% for "in order"."""
    dm = cls(tok, store, store, seq_len=seq_len, batch_size=1)
    features: dict[int, list] = {}
    for ex in examples(store, dm.window_len, epochs=6 if seq_len > 40 else 16):
        segments, y = dm.segments(ex)
        if y == IGNORE or (cls is DeshuffleDataModule and len(segments) != 2):
            continue  # deshuffle: the orders of two segments, "1 2" against "2 1"
        first, last = segments[0], segments[-1]
        features.setdefault(y, []).append(
            [
                first[0] == ord(" "),
                dm.is_end[first[-1]],
                last[0] == ord(" "),
                dm.is_end[last[-1]],
                len(first) / sum(len(s) for s in segments),
            ]
        )
    assert len(features) == (3 if cls is SentenceDistanceDataModule else 2)
    assert min(len(f) for f in features.values()) > 100
    means = np.array([np.mean(f, axis=0) for f in features.values()])
    assert (means.max(axis=0) - means.min(axis=0) < 0.12).all(), means


def test_resume_across_versions_and_objectives(tiny_cfg, tmp_path):
    """A checkpoint written before the auxiliary heads existed (its hyperparameters lack their
    arguments) resumes as the defaults say; one whose objective gave other heads is refused,
    naming the objective, before any training."""
    from lmlab.errors import ResumeRefused

    out = tmp_path / "run"
    common = ["model=encoder", "trainer.max_steps=3", "callbacks.samples=null"]
    train(tiny_cfg(*common, "objective=mlm", output_dir=out))
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    for key in ("sentence_task", "sentence_classes", "sentence_weight", "token_task"):
        ckpt["hyper_parameters"].pop(key)  # as lmlab wrote it before 8a61d7f
    torch.save(ckpt, last)
    more = [*common[:1], "trainer.max_steps=6", "callbacks.samples=null", "ckpt_path=last"]
    metrics, _ = train(tiny_cfg(*more, "objective=mlm", output_dir=out))
    assert metrics["trainer/global_step"] == 6
    with pytest.raises(
        ResumeRefused,
        match=r"does not fit this run's objective: its sentence_task is ''.*\(objective=mlm\)",
    ):
        train(tiny_cfg(*more, "trainer.max_steps=9", "objective=sop", output_dir=out))


def test_text_from_elsewhere_starts_at_a_uniformly_drawn_sentence_start(tok, store):
    """text_from a document: whole sentences from a sentence start (after a sentence end) whose
    first sentence fits the room, each such start about as likely (the stretch it is drawn in is
    placed at random, so about, not exactly: 4000 draws over the 27 starts of document 1 whose
    sentence fits 24 tokens give 115-181 each, 148 expected); never a start that does not fit or
    the document's first."""
    dm = NextSentenceDataModule(tok, store, store, seq_len=80, batch_size=1)
    ex = examples(store, dm.window_len)[0]
    lo, hi, room = int(store.offsets[1]), int(store.offsets[2]) - 1, 24
    doc = np.asarray(store.tokens[lo:hi], dtype=np.int64)
    ends = np.flatnonzero(dm.is_end[doc])
    starts, stops = ends[:-1] + 1, ends[1:] + 1
    fitting = starts[stops - starts <= room].tolist()
    assert 10 < len(fitting) < len(starts)  # some sentences do not fit
    drawn = Counter()
    for seed in range(4000):
        text = dm.text_from(ex, (lo, hi), room, np.random.default_rng(seed))
        if text is None:  # a stretch without a fitting sentence: rare here
            continue
        (at,) = [p for p in fitting if np.array_equal(doc[p : p + len(text)], text)]
        drawn[at] += 1
    expected = sum(drawn.values()) / len(fitting)
    assert set(drawn) == set(fitting)
    assert all(0.6 * expected <= n <= 1.4 * expected for n in drawn.values()), drawn


def test_text_without_a_fitting_sentence_is_never_drawn_from_elsewhere(tok, tmp_path):
    """Other documents without sentence ends (code, lists) offer no whole sentences: NotNext
    examples there go unscored, and sentence_distance does not offer "other document"; a cut
    sentence (or a document's start) would have told the label."""
    words = " ".join(["efgh ijkl mnop"] * 400)  # no ". ! ?" at all
    docs = [sentences("abcd", 120, 0), words, words, words]
    store = build_store(iter(docs), tok, tmp_path, "mixed")
    nsp = NextSentenceDataModule(tok, store, store, seq_len=80, batch_size=1)
    distance = SentenceDistanceDataModule(tok, store, store, seq_len=80, batch_size=1)
    first_doc = [ex for ex in examples(store, nsp.window_len) if ex.start < store.offsets[1] - 80]
    nsp_labels = {nsp.segments(ex)[1] for ex in first_doc}
    assert nsp_labels == {0, IGNORE}
    assert {distance.segments(ex)[1] for ex in first_doc} - {IGNORE} == {0, 1}


def test_text_without_whole_sentences_is_refused_before_training(tok, store, tmp_path, caplog):
    words = build_store(iter([" ".join(["efgh ijkl mnop"] * 400)]), tok, tmp_path, "w")
    with pytest.raises(ConfigError, match="none of the first 64 validation windows of 77 tokens"):
        SentenceOrderDataModule(tok, store, words, seq_len=80, batch_size=1)
    # windows too short for two sentences: a warning, the masked LM trains on the rest
    caplog.set_level("WARNING", logger="lmlab")
    SentenceOrderDataModule(tok, store, store, seq_len=28, batch_size=1)
    assert "only 3 of the first 64 validation windows hold two whole sentences" in caplog.text
