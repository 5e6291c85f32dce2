from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lmlab.data import store as store_mod
from lmlab.data.base import RandomWindowSampler, eval_starts
from lmlab.data.clm import CausalLMDataModule
from lmlab.data.collate import IGNORE, causal_batch
from lmlab.data.corpus import Doc, make_corpus, split_documents
from lmlab.data.store import TokenStore, build_store, store_key
from lmlab.data.tokenizers import byte_tokenizer
from lmlab.errors import ConfigError

from .conftest import make_text


def files_cfg(**kw):
    base = {"name": "files", "source": "files", "train": None, "val": None, "val_fraction": 0.25}
    return OmegaConf.create(base | kw)


# -- corpus ---------------------------------------------------------------------------------------
def test_bundled_split_is_deterministic_and_disjoint():
    cfg = OmegaConf.create({"name": "shakespeare", "source": "bundled", "val_fraction": 0.1})
    a, b = make_corpus(cfg), make_corpus(cfg)
    assert [d.key for d in a.val] == [d.key for d in b.val]
    assert len(a.train) + len(a.val) == 42 and len(a.val) == 5  # ceil(4.2)
    assert not {d.key for d in a.train} & {d.key for d in a.val}
    text = next(a.texts([a.val[0]]))
    assert len(text) > 10_000


def test_split_fraction_and_lone_document(tmp_path):
    docs = [Doc(f"f{i}") for i in range(20)]
    train, val = split_documents(docs, 0.25)
    assert len(val) == 5 and set(train) | set(val) == set(docs)
    p = tmp_path / "one.txt"
    p.write_text("".join(f"line {i}\n" for i in range(100)))
    c = make_corpus(files_cfg(train=str(p), val_fraction=0.1))
    head, tail = next(c.texts(c.train)), next(c.texts(c.val))
    text = p.read_text()
    assert head + tail == text and head.endswith("\n") and tail.startswith("line ")
    assert 0.9 * len(text) <= len(head) < 0.9 * len(text) + len("line 90\n")


def test_files_glob_list_and_explicit_val(text_files):
    d = text_files[0].parent
    c = make_corpus(files_cfg(train=str(d / "doc[0-3].txt"), val=[str(d / "doc5.txt")]))
    assert [os.path.basename(x.path) for x in c.train] == [f"doc{i}.txt" for i in range(4)]
    assert [os.path.basename(x.path) for x in c.val] == ["doc5.txt"]


def test_jsonl_documents(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"content": f"document number {i}"} for i in range(8)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    c = make_corpus(files_cfg(train=str(p), text_field="content"))
    got = sorted(c.texts(c.train)) + sorted(c.texts(c.val))
    assert sorted(got) == sorted(r["content"] for r in rows) and len(c.val) == 2


@pytest.mark.parametrize(
    ("content", "kw", "message"),
    [
        (None, {"train": "nowhere/*.txt"}, "matched no files"),
        (b"", {}, "is empty"),
        (b"\x00\x01\x02binary", {}, "looks binary"),
        (b"caf\xe9 au lait", {}, "is not valid UTF-8 .* data.encoding_errors=replace"),
    ],
)
def test_bad_text_files_are_clear_errors(tmp_path, content, kw, message):
    p = tmp_path / "bad.txt"
    if content is not None:
        p.write_bytes(content)
    cfg = files_cfg(train=kw.get("train", str(p)), val=str(p))
    with pytest.raises(ConfigError, match=message):
        c = make_corpus(cfg)
        list(c.texts(c.train))


def test_encoding_errors_replace(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(b"caf\xe9 au lait")
    c = make_corpus(files_cfg(train=str(p), val=str(p), encoding_errors="replace"))
    assert next(c.texts(c.train)) == "caf\ufffd au lait"


@pytest.mark.parametrize(
    ("line", "message"),
    [('{"text": "ok"', r"d.jsonl:2 is not valid JSON"), ('{"body": "x"}', r"d.jsonl:2 has no")],
)
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n")
    c = make_corpus(files_cfg(train=str(p), val=str(p)))
    with pytest.raises(ConfigError, match=message):
        list(c.texts(c.train))


# -- token store ----------------------------------------------------------------------------------
def test_store_contents_offsets_and_bytes(tmp_path):
    tok = byte_tokenizer(2)
    texts = ["hello", "wörld!"]
    s = build_store(iter(texts), tok, tmp_path, "k1")
    eos = tok.eos_id
    assert s.tokens.dtype == np.uint16
    expected = [*b"hello", eos, *"wörld!".encode(), eos]
    assert s.tokens.tolist() == expected
    assert s.offsets.tolist() == [0, 6, 14] and s.n_bytes == 12
    reopened = TokenStore.open(s.path)
    assert reopened.tokens.tolist() == expected


def test_store_cache_hit_and_invalidation(tmp_path, text_files):
    cfg = files_cfg(train=str(text_files[0].parent / "*.txt"))
    tok = byte_tokenizer(2)
    c = make_corpus(cfg)
    key = store_key(c.fingerprint(c.train), tok)
    built = []

    def texts():
        built.append(1)
        return c.texts(c.train)

    s1 = build_store(texts(), tok, tmp_path, key)
    assert store_key(c.fingerprint(c.train), tok) == key  # nothing changed: same key
    s2 = build_store(iter(()), tok, tmp_path, key)  # cache hit: the (empty) texts are not read
    assert s2.tokens.tolist() == s1.tokens.tolist()
    # a changed file changes the key
    target = next(d for d in c.train)
    with open(target.path, "a") as f:
        f.write("more text\n")
    assert store_key(c.fingerprint(c.train), tok) != key
    # a changed tokenizer changes the key
    assert store_key(c.fingerprint(c.train), byte_tokenizer(3)) != store_key(
        c.fingerprint(c.train), tok
    )


def test_long_documents_split_exactly(monkeypatch):
    from lmlab.data.tokenizers import train_bpe

    tok = train_bpe([make_text(2000, 1)], 400, 2)
    text = make_text(4000, 2).replace("\n", "\n\n  ", 3)
    monkeypatch.setattr(store_mod, "CHUNK_CHARS", 500)
    pieces = store_mod._pieces(text)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [t for p in tok.encode_batch(pieces) for t in p] == tok.encode(text)


# -- CLM batches ----------------------------------------------------------------------------------
def test_causal_batch_labels_are_shifted_inputs():
    w = [np.arange(10, 19), np.arange(20, 25)]
    b = causal_batch(w, seq_len=8, pad_id=0)
    assert torch.equal(b["input_ids"][0], torch.arange(10, 18))
    assert torch.equal(b["labels"][0], torch.arange(11, 19))
    assert b["input_ids"][1].tolist() == [20, 21, 22, 23, 0, 0, 0, 0]
    assert b["labels"][1].tolist() == [21, 22, 23, 24] + [IGNORE] * 4


def test_eval_windows_cover_every_target_once():
    n, T = 103, 10
    targets = []
    for s in eval_starts(n, T + 1, T):
        targets += list(range(s + 1, min(s + T + 1, n)))
    assert targets == list(range(1, n))


def test_train_sampler_epoch_permutation():
    s = RandomWindowSampler(n_tokens=1000, window_len=11, stride=10, seed=3)
    e0 = list(s)
    assert len(e0) == len(s) == 99 and len(set(e0)) == 99 and {e for _, e in e0} == {0}
    phase = e0[0][0] % 10
    assert all(x % 10 == phase and x + 11 <= 1000 for x, _ in e0)
    assert list(s) == e0  # same epoch, same order
    s.set_epoch(1)
    assert list(s) != e0 and {e for _, e in s} == {1}
    # non-overlapping windows (stride = window) for the other objectives
    s2 = RandomWindowSampler(n_tokens=1000, window_len=10, stride=10, seed=0)
    assert len(s2) == 99 and all(x + 10 <= 1000 for x, _ in s2)


def test_train_epochs_are_whole_batches_with_the_left_out_windows_changing():
    s = RandomWindowSampler(n_tokens=1000, window_len=11, stride=10, seed=3, batch_size=8)
    epochs = []
    for epoch in range(3):
        s.set_epoch(epoch)
        epochs.append({x // 10 for x, _ in s})  # window index (the phase changes per epoch)
    assert len(s) == 96 == 99 // 8 * 8 and all(len(e) == 96 for e in epochs)
    assert len({frozenset(set(range(99)) - e) for e in epochs}) == 3  # other windows left out


def test_a_split_smaller_than_one_steps_batch_is_refused(tmp_path):
    tok = byte_tokenizer(2)
    train = build_store(iter([make_text(40, 0)]), tok, tmp_path, "t")
    val = build_store(iter([make_text(100, 1)]), tok, tmp_path, "v")
    windows = RandomWindowSampler(len(train), 16, 15, 0).n  # clm: seq_len + 1 tokens, stride 15
    assert 4 < windows < 40
    with pytest.raises(
        ConfigError, match=rf"makes {windows} windows of 16 tokens, fewer than one "
    ):
        CausalLMDataModule(tok, train, val, seq_len=15, batch_size=windows + 1)
    dm = CausalLMDataModule(tok, train, val, seq_len=15, batch_size=windows // 2 + 1)
    assert len(dm.train_dataloader()) == 1  # one process: one batch per epoch
    strategy = types.SimpleNamespace(root_device=torch.device("cpu"))
    dm.trainer = types.SimpleNamespace(strategy=strategy, global_rank=0, world_size=2)
    with pytest.raises(ConfigError, match=r"data.batch_size=\d+ x 2 processes; add text"):
        dm.train_dataloader()


def test_loaders_pin_host_memory_for_cuda_devices_only(tmp_path):
    tok = byte_tokenizer(2)
    train = build_store(iter([make_text(400, 0)]), tok, tmp_path, "t")
    val = build_store(iter([make_text(100, 1)]), tok, tmp_path, "v")
    dm = CausalLMDataModule(tok, train, val, seq_len=16, batch_size=4)
    assert not dm.train_dataloader().pin_memory  # outside a Trainer
    for device, pinned in (("cpu", False), ("cuda:0", True)):
        strategy = types.SimpleNamespace(root_device=torch.device(device))
        dm.trainer = types.SimpleNamespace(strategy=strategy, global_rank=0, world_size=1)
        assert dm.train_dataloader().pin_memory is pinned  # built, not iterated: no GPU here
        assert dm.val_dataloader().pin_memory is pinned
    dm.pin_memory = False  # set by hand (benchmarks/data.py: as on the GPU, without a Trainer)
    assert not dm.train_dataloader().pin_memory


def test_datamodule_batches_and_too_short_corpus(tmp_path):
    tok = byte_tokenizer(2)
    train = build_store(iter([make_text(400, 0)]), tok, tmp_path, "t")
    val = build_store(iter([make_text(100, 1)]), tok, tmp_path, "v")
    dm = CausalLMDataModule(tok, train, val, seq_len=16, batch_size=4)
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape == (4, 16)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    n_val = sum(int((vb["labels"] != IGNORE).sum()) for vb in dm.val_dataloader())
    assert n_val == len(val) - 1
    with pytest.raises(ConfigError, match="fewer than one window of 128"):
        CausalLMDataModule(
            tok, build_store(iter(["tiny"]), tok, tmp_path, "x"), val, seq_len=64, batch_size=2
        )
