from __future__ import annotations

import json
import logging
import os
import threading
import time
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lmlab.data import store as store_mod
from lmlab.data.base import RandomWindowSampler, eval_starts
from lmlab.data.clm import CausalLMDataModule
from lmlab.data.collate import IGNORE, causal_batch
from lmlab.data.corpus import BUNDLED, Corpus, Doc, _bundled_members, make_corpus, split_documents
from lmlab.data.mlm import MaskedLMDataModule
from lmlab.data.store import TokenStore, build_store, store_key
from lmlab.data.tokenizers import TextTokenizer, byte_tokenizer
from lmlab.errors import ConfigError
from lmlab.paths import CONF_DIR

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
    # named by the archive, not by where lmlab is installed: the same split on every machine
    assert all(d.key == f"shakespeare.tar.xz:{d.member}" for d in a.train + a.val)
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


def test_the_held_out_documents_are_fixed_values():
    """Which documents are validation is part of every comparison between runs and of what a
    checkpoint records: a changed hash or rounding would move documents between the splits (and
    make earlier runs incomparable). Reference values: 20 named documents at 0.25, and the
    bundled corpus's five held-out works (README: "5 works held out")."""
    docs = [Doc(f"f{i}") for i in range(20)]
    assert [d.path for d in split_documents(docs, 0.25)[1]] == ["f5", "f14", "f15", "f16", "f18"]
    bundled = make_corpus(OmegaConf.load(CONF_DIR / "data" / "shakespeare.yaml"))
    assert [d.member for d in bundled.val] == [
        "as_you_like_it_gut.txt",
        "henry_iv_part_1_gut.txt",
        "henry_v_gut.txt",
        "lovers_complaint_gut.txt",
        "loves_labours_lost_gut.txt",
    ]


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
    cfg = files_cfg(train=kw.get("train", str(p)))
    with pytest.raises(ConfigError, match=message):
        c = make_corpus(cfg)
        list(c.texts(c.train))


def test_encoding_errors_replace(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(b"caf\xe9 au lait")
    c = make_corpus(files_cfg(val=str(p), encoding_errors="replace"), need_train=False)
    assert next(c.texts(c.val)) == "caf\ufffd au lait"


@pytest.mark.parametrize(
    ("line", "message"),
    [('{"text": "ok"', r"d.jsonl:2 is not valid JSON"), ('{"body": "x"}', r"d.jsonl:2 has no")],
)
def test_bad_jsonl_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n' + line + "\n")
    c = make_corpus(files_cfg(val=str(p)), need_train=False)
    with pytest.raises(ConfigError, match=message):
        list(c.texts(c.val))


def test_a_lone_surrogate_in_jsonl_is_an_error_or_replaced_as_data_encoding_errors_says(tmp_path):
    """Valid JSON ("\\ud800" escapes a lone UTF-16 surrogate, seen in scraped data), not text: UTF-8
    cannot encode it (tokenizing crashed with a traceback). Refused naming the line, or replaced /
    dropped as undecodable bytes of a text file are."""
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "broken \\ud800 here"}\n')
    c = make_corpus(files_cfg(val=str(p)), need_train=False)
    with pytest.raises(ConfigError, match=r"d.jsonl:2 holds a lone UTF-16 surrogate .* data.enc"):
        list(c.texts(c.val))
    for errors, want in (("replace", "broken \ufffd here"), ("ignore", "broken  here")):
        c = make_corpus(files_cfg(val=str(p), encoding_errors=errors), need_train=False)
        assert list(c.texts(c.val)) == ["fine", want]


def test_a_lone_document_of_any_kind_is_cut_between_the_splits(tmp_path):
    # JSONL lines and bundled members get the head/tail cut too, never their whole text in both
    # splits; text without a line start near the end is cut at a word, so validation is not empty.
    lines = "".join(f"line {i} of the only document\n" for i in range(40))
    one_line = "word " * 1000
    for name, content, text in [
        ("one.jsonl", json.dumps({"text": lines}) + "\n", lines),
        ("para.jsonl", json.dumps({"text": one_line}) + "\n", one_line),
        ("one_line.txt", one_line, one_line),
    ]:
        (tmp_path / name).write_text(content)
        c = make_corpus(files_cfg(train=str(tmp_path / name), val_fraction=0.1))
        head, tail = next(c.texts(c.train)), next(c.texts(c.val))
        assert head + tail == text, name
        assert 0.9 * len(text) <= len(head) < 0.9 * len(text) + 30, name
        assert tail.startswith(("line ", "word ")), name
    path = str(BUNDLED["shakespeare"])
    member, whole = next(iter(_bundled_members(path).items()))
    train, val = split_documents([Doc(path, member=member, name="shakespeare.tar.xz")], 0.1)
    c = Corpus("shakespeare", train, val, val_fraction=0.1)
    head, tail = next(c.texts(train)), next(c.texts(val))
    assert head + tail == whole and 0 < len(tail) < 0.11 * len(whole)


def test_a_byte_order_mark_starts_no_document(tmp_path):
    """Windows editors start UTF-8 files with a BOM: JSONL was refused ("Unexpected UTF-8 BOM")
    and plain text began with an invisible U+FEFF."""
    rows = [{"text": f"document {i}"} for i in range(3)]
    jsonl, text = tmp_path / "bom.jsonl", tmp_path / "bom.txt"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode())
    text.write_bytes(b"\xef\xbb\xbfTo be, or not to be.")
    c = make_corpus(files_cfg(val=[str(jsonl), str(text)]), need_train=False)
    assert list(c.texts(c.val)) == [r["text"] for r in rows] + ["To be, or not to be."]


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    # json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085 raw inside strings, where
    # str.splitlines would break the line; "\r\n" line ends are fine.
    rows = ["para one\u2028para two", "a\u2029b", "nel\u0085here", "last"]
    p = tmp_path / "web.jsonl"
    lines = [json.dumps({"text": r}, ensure_ascii=False) for r in rows] + ['{"body": 1}']
    p.write_bytes("\r\n".join(lines).encode() + b"\n")
    c = make_corpus(files_cfg(val=str(p)), need_train=False)
    assert [d.line for d in c.val] == [1, 2, 3, 4, 5]
    got = []
    with pytest.raises(ConfigError, match=r"web.jsonl:5 has no string field 'text'"):
        got.extend(c.texts(c.val))
    assert got == rows


def test_validation_files_are_left_out_of_training(text_files, monkeypatch, caplog):
    d = text_files[0].parent
    monkeypatch.chdir(d.parent)
    with caplog.at_level(logging.WARNING, logger="lmlab.data.corpus"):
        c = make_corpus(files_cfg(train=str(d / "*.txt"), val="corpus/doc3.txt"))  # other spelling
    assert [os.path.basename(x.path) for x in c.train] == [f"doc{i}.txt" for i in (0, 1, 2, 4, 5)]
    assert [x.path for x in c.val] == ["corpus/doc3.txt"]
    assert "are data.val files and are left out of training: " in caplog.text
    # nothing left to train on
    with pytest.raises(
        ConfigError, match=r"every file that data\.train matches is also a data\.val"
    ):
        make_corpus(files_cfg(train="corpus/doc[34].txt", val=str(d / "*.txt")))
    # one file named twice, spelled two ways, is one document
    c = make_corpus(files_cfg(train=[str(d / "doc0.txt"), "corpus/doc0.txt", "corpus/doc1.txt"]))
    assert len(c.train) + len(c.val) == 2


def test_held_out_documents_do_not_depend_on_how_the_path_is_spelled(text_files, monkeypatch):
    d = text_files[0].parent  # <tmp>/corpus
    (d / "sub").mkdir()
    (d / "sub" / "doc9.txt").write_text(make_text(100, 9))
    splits = []
    for cwd, pattern in [
        (d.parent, "corpus/**/*.txt"),
        (d.parent, "./corpus/**/*.txt"),
        (d, "**/*.txt"),
        (d / "sub", "../**/*.txt"),
        (d / "sub", str(d / "**" / "*.txt")),
    ]:
        monkeypatch.chdir(cwd)
        c = make_corpus(files_cfg(train=pattern))
        splits.append(([x.key for x in c.train], [x.key for x in c.val], c.fingerprint(c.val)))
    assert all(split == splits[0] for split in splits)
    train, val, _ = splits[0]
    assert sorted(train + val) == [f"doc{i}.txt" for i in range(6)] + ["sub/doc9.txt"]


def test_equally_named_files_in_two_folders_do_not_share_caches(tmp_path):
    corpora = []
    for folder, letter in (("a", "x"), ("b", "y")):
        f = tmp_path / folder / "doc.txt"
        f.parent.mkdir()
        f.write_text(letter * 100)
        os.utime(f, ns=(10**18, 10**18))  # same name, size and mtime; other text
        corpora.append(make_corpus(files_cfg(val=str(f)), need_train=False))
    a, b = corpora
    assert [x.key for x in a.val] == [x.key for x in b.val] == ["doc.txt"]
    assert a.fingerprint(a.val) != b.fingerprint(b.val)


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


def test_a_vocabulary_beyond_uint16_is_stored_as_uint32(tmp_path):
    """Ids above 65535 (Llama 3's 128K vocabulary) need 32 bits: a uint16 store wraps them."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from lmlab.data.tokenizers import load_pretrained

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 70_000)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<eos>")])
    tk.save(str(tmp_path / "big.json"))
    tok = load_pretrained(tmp_path / "big.json")
    s = build_store(iter(["w1 w69999 w65536", "w65535"]), tok, tmp_path, "big")
    assert s.tokens.dtype == np.uint32
    eos = tok.eos_id
    assert s.tokens.tolist() == [1, 69_999, 65_536, eos, 65_535, eos]
    assert TokenStore.open(s.path).tokens.tolist() == s.tokens.tolist()


def test_whitespace_only_documents_are_skipped_and_a_split_of_only_them_is_refused(tmp_path):
    """A JSONL row {"text": ""} or {"text": "  \\n"} holds nothing to learn: no eos-only document
    (whose split would score bits per byte over 0 bytes), as data=hf skips such rows."""
    tok = byte_tokenizer(2)
    s = build_store(iter(["hi", "", " \n\t", "yo"]), tok, tmp_path, "k")
    assert s.tokens.tolist() == [*b"hi", tok.eos_id, *b"yo", tok.eos_id]
    assert s.n_docs == 2 and s.n_bytes == 4
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text(json.dumps({"text": "some text"}) + "\n")
    val.write_text("\n".join(json.dumps({"text": t}) for t in ("", "   ", "\n")) + "\n")
    c = make_corpus(files_cfg(train=str(train), val=str(val)))
    with pytest.raises(
        store_mod.EmptySplit, match=r"the val split has no text: .* every one was blank"
    ):
        build_store(c.texts(c.val), tok, tmp_path, "v", label="val")
    assert not list((tmp_path / "stores").glob("v*"))  # nothing cached


def test_concurrent_builds_of_one_store_tokenize_once(tmp_path, caplog):
    """Two builders of one key at once (the ranks of a torchrun launch): the second waits for the
    first's lock and opens its store without reading its own texts. flock locks belong to open
    files, so two threads contend for one as two processes do."""
    tok = byte_tokenizer(2)
    first_started, release = threading.Event(), threading.Event()
    read_by_second = []

    def first_texts():
        first_started.set()
        release.wait(10)  # still tokenizing while the second asks
        yield "hello"

    def second_texts():
        read_by_second.append(1)
        yield "hello"

    stores = {}
    a = threading.Thread(
        target=lambda: stores.update(a=build_store(first_texts(), tok, tmp_path, "k"))
    )
    a.start()
    assert first_started.wait(10)
    b = threading.Thread(
        target=lambda: stores.update(b=build_store(second_texts(), tok, tmp_path, "k"))
    )
    waiting = "Waiting for another process: token store k built"
    with caplog.at_level(logging.INFO, logger="lmlab.paths"):
        b.start()
        deadline = time.monotonic() + 10  # polled: a loaded machine may stall a thread for long
        while waiting not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waiting in caplog.text
        assert b.is_alive()  # waiting for the lock (the first still holds it), and saying so
    release.set()
    a.join(10)
    b.join(10)
    assert not read_by_second
    assert stores["a"].tokens.tolist() == stores["b"].tokens.tolist() == [*b"hello", tok.eos_id]


def test_without_file_locks_stores_are_built_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    """A file system that refuses flock (some Lustre mounts): the build goes on, and says so."""
    import lmlab.paths

    def refuse(fd, op):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(lmlab.paths.fcntl, "flock", refuse)
    with caplog.at_level(logging.WARNING, logger="lmlab.paths"):
        store = build_store(iter(["hi"]), byte_tokenizer(2), tmp_path, "k", label="train")
    assert store.tokens.tolist()[:2] == [*b"hi"]
    assert "token store k (train) built without a lock" in caplog.text


def test_lock_files_are_shared_and_taken_read_only_when_not_writable(tmp_path, monkeypatch):
    """A cache shared by several users: lock files are left writable by all, and one that is
    not writable (made by another user before) is locked through a read-only descriptor."""
    import fcntl

    import lmlab.paths
    from lmlab.paths import file_lock

    lock = tmp_path / "stores" / ".k.lock"
    with file_lock(lock, "test"):
        pass
    assert lock.stat().st_mode & 0o777 == 0o666
    real_open, flags_seen = os.open, []

    def no_write(path, flags, *args):
        flags_seen.append(flags)
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(lmlab.paths.os, "open", no_write)
    with file_lock(lock, "test"):
        other = real_open(lock, os.O_RDONLY)
        with pytest.raises(BlockingIOError):  # held: another open file cannot take it
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(other)
    assert flags_seen[-1] == os.O_RDONLY


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


def test_the_reading_settings_are_part_of_the_store_key(tmp_path):
    """One JSONL file read with another val_fraction, text field or encoding_errors gives other
    documents or other texts: its stores must not be shared (a changed val_fraction reused the
    old validation store)."""
    rows = tmp_path / "rows.jsonl"
    lines = [json.dumps({"a": f"text {i}", "b": f"other {i}"}) for i in range(40)]
    rows.write_text("\n".join(lines) + "\n")

    def key(split: str, **settings) -> str:
        corpus = make_corpus(files_cfg(train=str(rows), **{"text_field": "a", **settings}))
        return corpus.fingerprint(getattr(corpus, split))

    for split in ("train", "val"):
        assert key(split) == key(split)  # nothing changed: the same key
        for changed in ({"val_fraction": 0.5}, {"text_field": "b"}, {"encoding_errors": "replace"}):
            assert key(split, **changed) != key(split), (split, changed)


def test_long_documents_split_exactly(monkeypatch):
    from lmlab.data.tokenizers import train_bpe

    tok = train_bpe([make_text(2000, 1)], 400, 2)
    text = make_text(4000, 2).replace("\n", "\n\n  ", 3)
    monkeypatch.setattr(store_mod, "CHUNK_CHARS", 500)
    pieces = store_mod._pieces(text)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [t for p in tok.encode_batch(pieces) for t in p] == tok.encode(text)
    assert tok.encodes_lines_apart
    # the byte tokenizer too, also when it comes back from a checkpoint (no regex, but no merges)
    assert TextTokenizer.from_str(byte_tokenizer(2).to_str(), "checkpoint").encodes_lines_apart


def test_long_documents_split_exactly_at_blank_lines_crlf_and_trailing_spaces(monkeypatch):
    """Web text: paragraphs between blank lines, Windows line ends, spaces before a line end. At
    the end of a piece "\n\n", "\r\n" and " \n" are one pre-token each (GPT-2's \\s+(?!\\S)),
    in the whole text two: with merges for them (as GPT-2's ĊĊ) a cut there changed the ids."""
    from lmlab.data.tokenizers import train_bpe

    def web(seed: int, n: int) -> str:
        lines = make_text(n, seed).split("\n")
        seps = ["\n\n", "\r\n", " \n", "\n", "\n\n\n", "\r\n\r\n", " \n\n"]
        return "".join(line + seps[i % len(seps)] for i, line in enumerate(lines))

    tok = train_bpe([web(1, 3000)], 400, 2)
    assert all(tok.tk.token_to_id(t) is not None for t in ("ĊĊ", "ĠĊ"))  # the merges
    text = web(2, 6000)
    monkeypatch.setattr(store_mod, "CHUNK_CHARS", 500)
    pieces = store_mod._pieces(text)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [t for p in tok.encode_batch(pieces) for t in p] == tok.encode(text)


def test_long_documents_are_encoded_whole_for_other_tokenizers(tmp_path, monkeypatch):
    # A SentencePiece-style tokenizer.json (Metaspace) puts a "▁" at the start of every piece.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "".join(f"Line number {i} says hello.\nAnd more text here\n" for i in range(200))
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    tk.train_from_iterator([text], trainer)
    tok = TextTokenizer(tk, "pretrained")
    monkeypatch.setattr(store_mod, "CHUNK_CHARS", 1000)  # stands for 1 MiB: text is 10 pieces
    assert len(store_mod._pieces(text)) == 10
    s = build_store(iter([text]), tok, tmp_path, "k")
    assert s.tokens.tolist() == [*tok.encode(text), tok.eos_id]
    assert not tok.encodes_lines_apart


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
    # a new phase each epoch: window boundaries move across the text (over 20 epochs, the phases
    # of 10 possible: a fixed phase, 0 or any other, is one value)
    phases = []
    for epoch in range(20):
        s.set_epoch(epoch)
        (phase,) = {x % 10 for x, _ in s}
        phases.append(phase)
    assert len(set(phases)) >= 6
    # non-overlapping windows (stride = window) for the other objectives
    s2 = RandomWindowSampler(n_tokens=1000, window_len=10, stride=10, seed=0)
    assert len(s2) == 99 and all(x + 10 <= 1000 for x, _ in s2)


def test_ranks_split_each_step_of_the_one_process_order():
    """Two ranks with batches of 2 see, step by step, the windows of one process with batches of
    4: rank r takes positions r, r + 2, ... of its order (the same data as one device with the
    same global batch)."""
    kw = dict(n_tokens=1000, window_len=11, stride=10, seed=3)
    one = RandomWindowSampler(**kw, batch_size=4)
    ranks = [RandomWindowSampler(**kw, rank=r, world=2, batch_size=2) for r in (0, 1)]
    for epoch in range(3):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        single = list(one)
        assert len(single) == 96 and [len(r) for r in ranks] == [48, 48]
        for r, s in enumerate(ranks):
            assert list(s) == single[r::2]
        for step in range(24):  # one optimizer step: the one process's batch, split over ranks
            both = [w for s in ranks for w in list(s)[2 * step : 2 * step + 2]]
            assert sorted(both) == sorted(single[4 * step : 4 * step + 4])


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


def test_a_validation_split_shorter_than_one_window_is_said(tmp_path, caplog):
    """Accepted (its tokens are scored), but val/* then rest on a few tokens: a warning says so
    and names the settings that give more."""
    tok = byte_tokenizer(2)
    train = build_store(iter([make_text(400, 0)]), tok, tmp_path, "t")
    short = build_store(iter(["Short."]), tok, tmp_path, "s")  # 7 tokens: "Short." + eos
    caplog.set_level(logging.WARNING, logger="lmlab")
    CausalLMDataModule(tok, train, short, seq_len=16, batch_size=4)
    said = "the validation split has 7 tokens, less than one window of 17"
    assert said in caplog.text and "data.val_fraction" in caplog.text
    caplog.clear()
    CausalLMDataModule(tok, None, short, seq_len=16, batch_size=4)  # lmlab.evaluate's
    assert "the evaluated split has 7 tokens" in caplog.text and "data.val" not in caplog.text
    caplog.clear()
    exact = build_store(iter(["a" * 16]), tok, tmp_path, "e")  # 17 tokens: one whole window
    CausalLMDataModule(tok, train, exact, seq_len=16, batch_size=4)
    assert not caplog.text


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
    with pytest.raises(
        ConfigError,
        match=r"objective=clm with seq_len=64 needs at least 128 \(windows of 65 tokens start at a random offset of up to 63\)",
    ):
        CausalLMDataModule(
            tok, build_store(iter(["tiny"]), tok, tmp_path, "x"), val, seq_len=64, batch_size=2
        )


# -- MLM --------------------------------------------------------------------------------------------
def test_mlm_too_short_seq_len_is_refused_before_any_data_work(compose_cfg, tmp_path):
    from lmlab.train import check_objective

    with pytest.raises(
        ConfigError, match=r"objective=mlm needs seq_len >= 3 .*got 2; raise seq_len"
    ):
        check_objective(compose_cfg("objective=mlm", "seq_len=2"))
    check_objective(compose_cfg("objective=mlm", "seq_len=3"))  # the shortest that works
    tok = byte_tokenizer(2)
    store = build_store(iter([make_text(100, 0)]), tok, tmp_path, "s")
    with pytest.raises(ConfigError, match=r"needs seq_len >= 3"):
        MaskedLMDataModule(tok, store, store, seq_len=2, batch_size=1)


def test_a_one_line_file_ending_in_a_newline_still_gets_a_validation_tail():
    from lmlab.data.corpus import _cut_point

    for text in ("word " * 50 + "\n", "word " * 50, "a\nb " * 3 + "c" * 40 + "\n\n"):
        cut = _cut_point(text, 0.9)
        assert 0 < cut < len(text.rstrip()), text  # both parts hold text


def test_train_epochs_are_whole_optimizer_steps_under_gradient_accumulation(tmp_path):
    """5 micro-batches' worth of windows with 3 micro-batches per step: the epoch is 3 batches
    (one step), not 5 (a second step of 2 that Lightning would take early at the epoch's end)."""
    tok = byte_tokenizer(2)
    train = build_store(iter([make_text(400, 0)]), tok, tmp_path, "t")
    val = build_store(iter([make_text(100, 1)]), tok, tmp_path, "v")
    windows = RandomWindowSampler(len(train), 16, 15, 0).n
    batch = windows // 5
    dm = CausalLMDataModule(tok, train, val, seq_len=15, batch_size=batch)
    strategy = types.SimpleNamespace(root_device=torch.device("cpu"))
    dm.trainer = types.SimpleNamespace(
        strategy=strategy, global_rank=0, world_size=1, accumulate_grad_batches=3
    )
    assert len(dm.train_dataloader()) == 3
    dm.trainer.accumulate_grad_batches = 6
    with pytest.raises(
        ConfigError, match=r"one optimizer step's batch of data.batch_size=\d+ x 6 "
    ):
        dm.train_dataloader()


def test_each_batch_carries_its_optimizer_steps_target_count_also_after_a_resume(tmp_path):
    """Prefix LM varies the targets per micro-batch; every batch of an optimizer step (3
    micro-batches here, Lightning's groups: epoch batch indices 0-2, 3-5, ...) carries the step's
    total. A pass resumed mid-step (a checkpoint written by hand between micro-batches) groups
    the rest of that step alone, then whole steps again."""
    from lmlab.data.prefix_lm import PrefixLMDataModule

    tok = byte_tokenizer(2)
    train = build_store(iter([make_text(600, 0)]), tok, tmp_path, "t")
    val = build_store(iter([make_text(100, 1)]), tok, tmp_path, "v")
    dm = PrefixLMDataModule(tok, train, val, seq_len=15, batch_size=2)
    strategy = types.SimpleNamespace(root_device=torch.device("cpu"))
    dm.trainer = types.SimpleNamespace(
        strategy=strategy, global_rank=0, world_size=1, accumulate_grad_batches=3
    )

    def passes(loader):
        batches = list(loader)
        own = [int((b["labels"] != IGNORE).sum()) for b in batches]
        return own, [int(b["step_targets"]) for b in batches]

    loader = dm.train_dataloader()
    own, carried = passes(loader)
    assert len(own) == len(loader) == 3 * (len(own) // 3) >= 6
    assert len(set(own)) > 1  # the prefixes vary the counts
    for start in range(0, len(own), 3):
        assert carried[start : start + 3] == [sum(own[start : start + 3])] * 3

    resumed = dm.train_dataloader()
    resumed.load_state_dict({**loader.state_dict(), "epoch": 0, "windows": 2 * 2})  # 2 batches
    own_r, carried_r = passes(resumed)
    assert own_r == own[2:]
    assert carried_r[0] == own[2] and carried_r[1:4] == carried[3:6]

    # trainer.limit_train_batches=4: Lightning's second step has one micro-batch, its last
    dm.trainer.num_training_batches = 4
    own_l, carried_l = passes(dm.train_dataloader())
    assert own_l == own and carried_l[:4] == [*carried[:3], own[3]]


@pytest.mark.parametrize("module", ["clm", "mlm", "span"])
def test_every_rank_runs_as_many_validation_batches_and_scores_each_window_once(tmp_path, module):
    """3 validation windows over 2 ranks at batch size 1: rank 0 had 2 batches, rank 1 one, and
    under FSDP (whose forward gathers the weights with every rank) rank 0 waited forever. Rank 1
    now gets a padding window whose labels are all ignored."""
    from lmlab.data.span import SpanCorruptionDataModule

    cls = {"clm": CausalLMDataModule, "mlm": MaskedLMDataModule}.get(module)
    tok = byte_tokenizer(8)
    train = build_store(iter([make_text(400, 0)]), tok, tmp_path, "t")
    seq_len = 32
    cls = cls or SpanCorruptionDataModule
    probe = cls(tok, train, train, seq_len=seq_len, batch_size=1)
    n_tokens = 2 * probe.stride + probe.window_len  # three windows
    val = build_store(iter([make_text(n_tokens, 1)[: n_tokens - 2]]), tok, tmp_path, "v")
    every = eval_starts(len(val), probe.window_len, probe.stride)
    assert len(every) == 3
    per_rank, targets = [], 0
    for rank in (0, 1):
        dm = cls(tok, train, val, seq_len=seq_len, batch_size=1)
        strategy = types.SimpleNamespace(root_device=torch.device("cpu"))
        dm.trainer = types.SimpleNamespace(strategy=strategy, global_rank=rank, world_size=2)
        batches = list(dm.val_dataloader())
        per_rank.append(len(batches))
        targets += sum(int((b["labels"] != IGNORE).sum()) for b in batches)
        if rank == 1:
            assert (batches[-1]["labels"] == IGNORE).all()  # the padding window
    assert per_rank == [2, 2]
    one = cls(tok, train, val, seq_len=seq_len, batch_size=1)
    assert targets == sum(int((b["labels"] != IGNORE).sum()) for b in one.val_dataloader())


def test_a_folder_a_forgotten_data_option_and_an_evaluation_without_files_are_named(tmp_path):
    """data.train=corpus (a folder) "matched no files"; +data.val=... without data=files was an
    "unknown data.source=None"; evaluate's data=files without data.val asked for data.train."""
    from lmlab.data.corpus import check_data

    (tmp_path / "corpus").mkdir()
    with pytest.raises(
        ConfigError,
        match=r"data.train='.*corpus' is a folder: name its files, e.g. data.train='.*corpus/\*.txt'",
    ):
        make_corpus(files_cfg(train=str(tmp_path / "corpus")))
    with pytest.raises(
        ConfigError,
        match=r"data settings without a data option: add one, e.g. data=files .*"
        r"\(options: files, hf, shakespeare\)",
    ):
        check_data(OmegaConf.create({"val": "held_out/*.txt"}), sizes=False)
    with pytest.raises(
        ConfigError, match=r"data=files needs data.val='<glob or list of files>' to evaluate on"
    ):
        make_corpus(files_cfg(), need_train=False)


def test_consolidating_a_missing_folder_says_it_is_missing(tmp_path):
    from lmlab.checkpoint import consolidate

    with pytest.raises(ConfigError, match=r"nope does not exist; pass a sharded checkpoint folder"):
        consolidate(tmp_path / "nope")
