"""Parallel text (JSONL pairs -> documents "source <sep> target <eos>") and translation language
modelling (objective=tlm): which pairs an example holds, their order, the checks."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
from omegaconf import OmegaConf

from lmlab.data.base import RandomWindowSampler, eval_starts
from lmlab.data.collate import IGNORE
from lmlab.data.corpus import make_corpus, plain_texts, text_fields
from lmlab.data.mlm import MaskedLMDataModule
from lmlab.data.pairs import split_pair
from lmlab.data.sentences import SentenceOrderDataModule
from lmlab.data.store import build_store
from lmlab.data.tlm import TranslationLMDataModule
from lmlab.data.tokenizers import byte_tokenizer
from lmlab.errors import ConfigError
from lmlab.train import train

from .conftest import cipher, files_cfg


@pytest.fixture
def tok():
    return byte_tokenizer(2)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- reading pairs ------------------------------------------------------------------------------
def test_jsonl_rows_of_two_fields_are_pairs(tmp_path):
    rows = [{"en": f"line {i}", "fr": f"ligne {i}", "id": i} for i in range(10)]
    nested = [{"translation": {"en": r["en"], "fr": r["fr"]}} for r in rows]
    for name, data, field in (
        ("flat", rows, ["en", "fr"]),
        ("nested", nested, ["translation.en", "translation.fr"]),
    ):
        path = write_jsonl(tmp_path / f"{name}.jsonl", data)
        corpus = make_corpus(files_cfg(path, text_field=field))
        texts = list(corpus.texts(corpus.train)) + list(corpus.texts(corpus.val))
        assert sorted(texts) == sorted((r["en"], r["fr"]) for r in rows)
        assert sorted(plain_texts(texts)) == sorted(
            [r["en"] for r in rows] + [r["fr"] for r in rows]
        )
    # one field, nested; a key with a dot in it is read as it is first (a review: it was not)
    path = write_jsonl(tmp_path / "one.jsonl", nested)
    corpus = make_corpus(files_cfg(path, text_field="translation.fr"))
    assert sorted(corpus.texts(corpus.train + corpus.val)) == sorted(r["fr"] for r in rows)
    path = write_jsonl(tmp_path / "dot.jsonl", [{"meta.text": r["en"]} for r in rows])
    corpus = make_corpus(files_cfg(path, text_field="meta.text"))
    assert sorted(corpus.texts(corpus.train + corpus.val)) == sorted(r["en"] for r in rows)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (["en"], "must be a field name, or a list of two"),
        (["en", "fr", "de"], "must be a field name, or a list of two"),
        (["en", "en"], "names one field twice"),
        (["en", ""], "must be a field name"),
        (3, "must be a field name"),
    ],
)
def test_bad_text_fields_are_refused(field, message):
    with pytest.raises(ConfigError, match=message):
        text_fields(field)


def test_parallel_text_needs_jsonl_rows_with_both_fields(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("plain text\n")
    with pytest.raises(ConfigError, match=r"only JSONL rows have, but .*a\.txt is read as plain"):
        make_corpus(files_cfg(text, text_field=["en", "fr"]))
    one = write_jsonl(tmp_path / "one.jsonl", [{"en": "a", "fr": "b"}])
    with pytest.raises(ConfigError, match="needs two rows or more"):
        make_corpus(files_cfg(one, text_field=["en", "fr"]))
    rows = [{"en": "a", "fr": "b"}, {"en": "c", "de": "d"}] * 3
    corpus = make_corpus(
        files_cfg(write_jsonl(tmp_path / "m.jsonl", rows), text_field=["en", "fr"])
    )
    with pytest.raises(ConfigError, match=r"m\.jsonl:\d+ has no string field 'fr'"):
        list(corpus.texts(corpus.train + corpus.val))
    rows = [{"en": "a", "fr": 5}] * 3
    corpus = make_corpus(
        files_cfg(write_jsonl(tmp_path / "n.jsonl", rows), text_field=["en", "fr"])
    )
    with pytest.raises(ConfigError, match=r"n\.jsonl:\d+: field 'fr' is 5 \(int\), not text"):
        list(corpus.texts(corpus.train + corpus.val))


def test_data_hf_refuses_two_fields(tmp_path):
    pytest.importorskip("datasets")
    cfg = OmegaConf.create(
        {"name": "hf", "source": "hf", "path": "json", "text_field": ["en", "fr"]}
    )
    with pytest.raises(ConfigError, match=r"Dataset.to_json"):
        make_corpus(cfg)


def test_a_pair_is_stored_as_source_sep_target_eos(tok, tmp_path, caplog):
    pairs = [("ab c", "xy"), ("d", "éz"), ("  ", "lonely"), ("", " ")]
    caplog.set_level(logging.WARNING, logger="lmlab")
    store = build_store(iter(pairs), tok, tmp_path, "p")
    want = [*b"ab c", tok.sep_id, *b"xy", tok.eos_id, *b"d", tok.sep_id, *"éz".encode(), tok.eos_id]
    assert store.tokens.tolist() == want and store.offsets.tolist() == [0, 8, 14]
    assert store.parts == 2 and store.n_bytes == 4 + 2 + 1 + 3  # both sides' bytes
    assert "1 parallel row with a blank side was skipped" in caplog.text
    plain = build_store(iter(["ab c"]), tok, tmp_path, "q")
    assert plain.parts == 1


# -- examples -----------------------------------------------------------------------------------
def pair_store(tok, tmp_path, lengths, name="s"):
    """Pairs whose sides are runs of one letter per pair: pair i is chr(97 + i % 26) * n, its
    target the same letter upper case * (n // 2 + 1)."""
    pairs = [(chr(97 + i % 26) * n, chr(65 + i % 26) * (n // 2 + 1)) for i, n in enumerate(lengths)]
    return build_store(iter(pairs), tok, tmp_path, name), pairs


def split_pairs(tok, tokens) -> list[tuple[str, str]]:
    out = []
    for pair in np.split(tokens, np.flatnonzero(tokens == tok.eos_id)[:-1] + 1):
        assert pair[-1] == tok.eos_id and (pair == tok.sep_id).sum() == 1
        cut = int(np.flatnonzero(pair == tok.sep_id)[0])
        out.append(
            (bytes(pair[:cut].tolist()).decode(), bytes(pair[cut + 1 : -1].tolist()).decode())
        )
    return out


def test_examples_are_groups_of_whole_pairs_each_pair_once(tok, tmp_path):
    """The split's pairs in order, packed greedily into groups of at most seq_len - 2 tokens: the
    samplers draw every group once per epoch, so every pair is trained on once, whole, half the
    time target first."""
    rng = np.random.default_rng(0)
    store, pairs = pair_store(tok, tmp_path, rng.integers(1, 12, size=400).tolist())
    dm = TranslationLMDataModule(tok, store, store, seq_len=40, batch_size=2)
    room = dm.window_len
    groups = dm.groups(store)
    sizes = np.diff(store.offsets[groups])
    assert (sizes <= room).all() and groups[0] == 0 and groups[-1] == store.n_docs
    # greedy: the next pair would not have fitted
    assert (sizes[:-1] + np.diff(store.offsets)[groups[1:-1]] > room).all()
    for epoch in (0, 1):
        sampler = RandomWindowSampler(*dm.index_space(store), seed=3)
        sampler.set_epoch(epoch)
        order = [k for k, _ in sampler]
        assert sorted(order) == list(range(len(groups) - 1))  # every group once
        seen, flipped = [], 0
        for k in order:
            ex = dm.arrange(dm.dataset(store)[(k, epoch)])
            got = split_pairs(tok, ex.tokens)
            want = pairs[groups[k] : groups[k + 1]]
            assert len(got) == len(want)
            for (a, b), w in zip(got, want, strict=True):
                assert (a, b) in (w, w[::-1])
                flipped += (a, b) != w
            seen += list(range(groups[k], groups[k + 1]))
        assert sorted(seen) == list(range(len(pairs)))
        assert 0.4 < flipped / len(pairs) < 0.6
    # validation: every group once, in order
    starts = eval_starts(*dm.index_space(store))
    assert starts == list(range(len(groups) - 1))
    # both_orders=false: every pair source first
    dm = TranslationLMDataModule(tok, store, store, seq_len=40, batch_size=2, both_orders=False)
    for k in range(50):
        for a, b in split_pairs(tok, dm.arrange(dm.dataset(store)[k]).tokens):
            assert a.islower() and b.isupper()


def test_long_pairs_are_cut_to_fit_and_samples_cut_short(tok, tmp_path):
    store, _ = pair_store(tok, tmp_path, [3, 60, 4, 5])  # pair 1: 60 + 1 + 31 + 1 tokens
    dm = TranslationLMDataModule(tok, store, store, seq_len=42, batch_size=2, both_orders=False)
    assert dm.groups(store).tolist() == [0, 1, 2, 4]  # the long pair alone
    ex = dm.arrange(dm.dataset(store)[1])
    assert split_pairs(tok, ex.tokens) == [("b" * 19, "B" * 19)] and len(ex.tokens) == 40
    # a short second side gives its room to the first
    short = build_store(iter([("q" * 80, "Q"), ("r", "R")]), tok, tmp_path, "u")
    ex = dm.arrange(dm.dataset(short)[0])
    assert split_pairs(tok, ex.tokens) == [("q" * 37, "Q")]
    # an example cut short (samples' max_new_tokens): the text after the last eos as it is
    ex = dm.dataset(store)[2]
    cut = dm.arrange(replace(ex, tokens=ex.tokens[:10]))
    assert split_pairs(tok, cut.tokens[:9]) == [("cccc", "CCC")]
    assert cut.tokens[9:].tolist() == [ord("d")]
    with pytest.raises(ConfigError, match="objective=tlm needs seq_len >= 6"):
        TranslationLMDataModule(tok, store, store, seq_len=5, batch_size=2)


def test_a_tokenizer_with_one_token_for_sep_and_eos_is_refused(tok, tmp_path):
    """A BERT-style file's "[SEP]" is both: a pair would read as two documents."""
    from .test_tokenizers import wordpiece

    _, bert = wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"])
    assert bert.sep_id == bert.eos_id
    with pytest.raises(ConfigError, match="sep and eos tokens differ"):
        build_store(iter([("a", "b")]), bert, tmp_path, "bert")


def test_batches_are_cls_pairs_sep_and_never_mask_sep_or_eos(tok, tmp_path):
    store, _ = pair_store(tok, tmp_path, list(range(2, 30)) * 5)
    dm = TranslationLMDataModule(tok, store, store, seq_len=64, batch_size=2, mask_prob=0.5)
    windows = [dm.dataset(store)[k] for k in range(8)]
    batch = dm.make_batch(windows)
    for i, ex in enumerate(windows):
        arranged = dm.arrange(ex).tokens
        n = len(arranged) + 2
        want = np.array([tok.cls_id, *arranged, tok.sep_id])
        assert batch["attention_mask"][i].sum() == n
        inputs, labels = batch["input_ids"][i, :n].numpy(), batch["labels"][i, :n].numpy()
        chosen = labels != IGNORE
        assert np.array_equal(inputs[~chosen], want[~chosen])
        assert np.array_equal(labels[chosen], want[chosen])
        assert not np.isin(want[chosen], [tok.sep_id, tok.eos_id, tok.cls_id]).any()
        # mask_example gives the same row
        row_inputs, row_labels = dm.mask_example(ex)
        assert np.array_equal(row_inputs, inputs) and np.array_equal(row_labels, labels)


def test_document_masks_keep_each_pair_to_itself(tok, tmp_path):
    """objective.document_mask: a row's pairs are its documents, each with its eos (cls with the
    first pair; sep, after the last eos, alone)."""
    store, _ = pair_store(tok, tmp_path, list(range(2, 12)) * 3)
    dm = TranslationLMDataModule(tok, store, store, seq_len=64, batch_size=2, document_mask=True)
    windows = [dm.dataset(store)[k] for k in range(4)]
    batch = dm.make_batch(windows)
    for i, ex in enumerate(windows):
        arranged = dm.arrange(ex).tokens
        n_pairs = int((arranged == tok.eos_id).sum())
        assert n_pairs >= 2
        want = [0]  # cls
        for p in range(n_pairs):
            want += [p] * (np.flatnonzero(arranged == tok.eos_id)[p] + 1 - (len(want) - 1))
        want += [n_pairs]  # sep; then padding continues it
        n = len(want)
        assert batch["doc_ids"][i, :n].tolist() == want
        assert (batch["doc_ids"][i, n:] == n_pairs).all()


def test_plain_text_is_refused(tok, tmp_path, compose_cfg):
    plain = build_store(iter(["some text. " * 50]), tok, tmp_path, "plain")
    pairs, _ = pair_store(tok, tmp_path, [5] * 50)
    with pytest.raises(ConfigError, match="the validation split holds 1 text"):
        TranslationLMDataModule(tok, pairs, plain, seq_len=40, batch_size=2)
    with pytest.raises(ConfigError, match=r"objective\.both_orders='yes' must be true or false"):
        TranslationLMDataModule(tok, pairs, pairs, seq_len=40, batch_size=2, both_orders="yes")
    # a run on plain text stops before any data work
    from lmlab.train import check_settings

    cfg = compose_cfg("model=encoder", "objective=tlm")
    with pytest.raises(
        ConfigError, match=r"objective=tlm trains on pairs of texts .* data=shakespeare"
    ):
        check_settings(cfg)
    # mlm reads pairs as any text; the sentence-level objectives, whose segments a pair's sep
    # would cut, refuse them (a review), here and before any data work
    MaskedLMDataModule(tok, pairs, pairs, seq_len=40, batch_size=2)
    with pytest.raises(ConfigError, match="objective=sop cuts text into segments, but the"):
        SentenceOrderDataModule(tok, pairs, pairs, seq_len=40, batch_size=2)
    cfg = compose_cfg(
        "model=encoder",
        "objective=nsp",
        "data=files",
        "data.train=x.jsonl",
        "data.text_field=[en,fr]",
    )
    with pytest.raises(ConfigError, match="objective=nsp cuts text into segments"):
        check_settings(cfg)
    with pytest.raises(ValueError, match="a stored pair holds one sep, this document 0"):
        split_pair(np.array([1, 2, tok.eos_id]), tok.sep_id)


def test_a_tlm_run_trains_on_pairs(tiny_cfg, parallel_file):
    metrics, objects = train(
        tiny_cfg(
            "model=encoder",
            "objective=tlm",
            f"data.train={parallel_file}",
            "data.text_field=[en,xx]",
            "seq_len=64",
            "sample.max_new_tokens=64",
        )
    )
    assert metrics["val/acc"] >= 0 and metrics["train/loss"] > 0
    dm = objects["datamodule"]
    assert dm.train_store.parts == 2 and dm.val_store.parts == 2
    samples = (objects["output_dir"] / "samples.txt").read_text()
    original = next(x for x in samples.splitlines() if x.startswith("original:"))
    first = original.removeprefix("original:  ").split("<|eos|>")[0]
    a, b = first.split(" | ")
    assert b == cipher(a) or a == cipher(b)  # a pair, either way round
