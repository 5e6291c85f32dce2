"""Tables (CSV / TSV files -> documents "name <sep> values <sep> ... <eos>") and masked column
prediction (objective=mcp): what is read, stored, masked and scored, and the checks."""

from __future__ import annotations

import csv
import logging
from dataclasses import replace

import numpy as np
import pytest

from lmlab.data.base import RandomWindowSampler
from lmlab.data.collate import IGNORE
from lmlab.data.columns import MaskedColumnDataModule, column_groups, column_spans
from lmlab.data.corpus import TableChunk, make_corpus, plain_texts, read_table
from lmlab.data.mlm import MaskedLMDataModule
from lmlab.data.sentences import SentenceOrderDataModule
from lmlab.data.store import TABLE_PARTS, build_store
from lmlab.data.tokenizers import byte_tokenizer
from lmlab.errors import ConfigError
from lmlab.train import check_settings, train

from . import conftest


@pytest.fixture
def tok():
    return byte_tokenizer(2)


def files_cfg(train, **kw):
    return conftest.files_cfg(train, **{"val_fraction": 0.25, "table_rows": 2, **kw})


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


# -- reading tables -------------------------------------------------------------------------------
def test_a_csv_file_is_a_header_and_rows(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        '\ufeffcity,note,\n\nParis,"big, old",\r\n"New\nYork",x,\nLima\n,,\n', encoding="utf-8"
    )
    table = read_table(str(path), "csv")
    assert table.header == ("city", "note", "")
    # quoted commas and line breaks kept; a short row padded; blank rows (",,") skipped
    assert table.rows == [("Paris", "big, old", ""), ("New\nYork", "x", ""), ("Lima", "", "")]
    tsv = write_csv(tmp_path / "t.tsv", [["a", "b"], ["1,2", "3"]], delimiter="\t")
    assert read_table(str(tsv), "tsv").rows == [("1,2", "3")]
    # TSV cells quoted as R, pandas and csv.writer quote them
    (tmp_path / "q.tsv").write_text('"title"\t"year"\n"Small\t24\nRadio"\t7\n"a ""b"""\t8\n')
    table = read_table(str(tmp_path / "q.tsv"), "tsv")
    assert table.header == ("title", "year")
    assert table.rows == [("Small\t24\nRadio", "7"), ('a "b"', "8")]
    # a one-column file whose name holds the other delimiter is a one-column table
    (tmp_path / "one.tsv").write_text("City, State\nLima\n")
    assert read_table(str(tmp_path / "one.tsv"), "tsv").rows == [("Lima",)]
    # a trailing delimiter (empty extra cells) is no extra column
    (tmp_path / "trail.csv").write_text("a,b\n1,2,\n")
    assert read_table(str(tmp_path / "trail.csv"), "csv").rows == [("1", "2")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b\n1,2,3\n", r"row 2 has 3 cells, the header 2 column names; fix the row"),
        ("a,b\n1,2\n3,4,5\t6\n", r"row 3 has 3 cells.*is it a TSV file\? set data\.format=tsv"),
        ("a,b\n", "holds only a header row: a table needs its column names in the first row"),
        (",,\n", "holds no rows"),
        ('a,b\n1,2\n"3,4\n', r"bad\.csv:3 is not a readable CSV table .* must end with one"),
        ('a,b\n"Big" TV,1\n', r"bad\.csv:2 is not a readable CSV table"),
        (
            "a\tb\tc\n1\t2\t3\n",
            r"the first row is one column name holding tabs .* set data\.format=tsv",
        ),
    ],
)
def test_bad_tables_are_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        read_table(str(path), "csv")
    assert "bad.csv" in str(e.value)


def test_whole_tables_are_held_out_and_stored_as_chunks_of_rows(tmp_path):
    """Each file is one document of the split (its rows never on both sides); its text is chunks
    of table_rows rows, column by column, cells joined by " ; "."""
    for t in range(8):
        write_csv(
            tmp_path / f"t{t}.csv", [["id", "name"], *[[f"{t}.{r}", f"n{r}"] for r in range(5)]]
        )
    corpus = make_corpus(files_cfg(tmp_path / "*.csv"))
    assert len(corpus.train) == 6 and len(corpus.val) == 2  # files: 25% held out
    assert all(d.table == "csv" for d in corpus.train + corpus.val)
    val = list(corpus.texts(corpus.val))
    assert all(isinstance(c, TableChunk) for c in val) and len(val) == 2 * 3  # 5 rows: 2 + 2 + 1
    t = corpus.val[0].name.removesuffix(".csv").removeprefix("t")
    assert val[:3] == [
        ("id", f"{t}.0 ; {t}.1", "name", "n0 ; n1"),
        ("id", f"{t}.2 ; {t}.3", "name", "n2 ; n3"),
        ("id", f"{t}.4", "name", "n4"),
    ]
    train_ids = {v for c in corpus.texts(corpus.train) for v in c[1].split(" ; ")}
    assert not {v for c in val for v in c[1].split(" ; ")} & train_ids
    assert set(plain_texts(val[:1])) == {"id", f"{t}.0 ; {t}.1", "name", "n0 ; n1"}
    # the store's key follows table_rows and the table's reading (csv / tsv / text), for tables only
    tsv = make_corpus(files_cfg(tmp_path / "*.csv", format="tsv"))
    assert tsv.fingerprint(tsv.val) != corpus.fingerprint(corpus.val)
    as_text = make_corpus(files_cfg(tmp_path / "*.csv", format="text"))
    assert as_text.identity(as_text.train) != corpus.identity(corpus.train)
    other = make_corpus(files_cfg(tmp_path / "*.csv", table_rows=3))
    assert other.fingerprint(other.val) != corpus.fingerprint(corpus.val)
    (tmp_path / "a.txt").write_text("text")
    plain = make_corpus(files_cfg(tmp_path / "a.txt"))
    plain3 = make_corpus(files_cfg(tmp_path / "a.txt", table_rows=3))
    assert plain.fingerprint(plain.train) == plain3.fingerprint(plain3.train)
    # format=text reads a CSV file as text
    as_text = make_corpus(files_cfg(tmp_path / "t0.csv", format="text"))
    assert next(iter(as_text.texts(as_text.train))).startswith("id,name\r\n0.0,n0\r\n")


def test_mcp_on_a_lone_table_is_refused_before_any_data_work(tiny_cfg, tmp_path):
    """Its held-out rows would have the training rows' column names: val/acc would score memory
    (a review: 0.55 in 10 s on one statsmodels table)."""
    write_csv(tmp_path / "one.csv", [["a", "b"], *[[str(r), "x"] for r in range(30)]])
    cfg = tiny_cfg("model=encoder", "objective=mcp", f"data.train={tmp_path}/one.csv")
    with pytest.raises(ConfigError, match="objective=mcp on one table: its held-out rows"):
        train(cfg)
    assert not (tmp_path / "cache").exists()  # no tokenizer trained, no store built


def test_a_lone_table_is_cut_by_rows(tmp_path):
    write_csv(tmp_path / "one.csv", [["a"], *[[str(r)] for r in range(8)]])
    corpus = make_corpus(files_cfg(tmp_path / "one.csv"))
    rows = [v for c in corpus.texts(corpus.train) for v in c[1].split(" ; ")]
    held = [v for c in corpus.texts(corpus.val) for v in c[1].split(" ; ")]
    assert rows == [str(r) for r in range(6)] and held == ["6", "7"]
    write_csv(tmp_path / "single.csv", [["a"], ["1"]])
    corpus = make_corpus(files_cfg(tmp_path / "single.csv"))
    with pytest.raises(ConfigError, match=r"single\.csv is the only table and has one row"):
        list(corpus.texts(corpus.train))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(table_rows=0), r"data\.table_rows=0 must be a whole number >= 1"),
        (
            dict(text_field=["a", "b"]),
            r"names two fields \(parallel text\), but .* read as a table",
        ),
        (dict(format="xls"), r"unknown data\.format='xls'; choose auto, text, jsonl, csv or tsv"),
    ],
)
def test_bad_table_settings_are_refused(tmp_path, kw, message):
    write_csv(tmp_path / "t.csv", [["a"], ["1"], ["2"]])
    with pytest.raises(ConfigError, match=message):
        make_corpus(files_cfg(tmp_path / "t.csv", **kw))


def test_tables_and_text_files_are_not_mixed(tmp_path):
    write_csv(tmp_path / "t.csv", [["a"], ["1"], ["2"]])
    (tmp_path / "v.txt").write_text("text")
    with pytest.raises(
        ConfigError, match=r"mix tables \(\.csv / \.tsv: 1 file\) with text \(1 file\)"
    ):
        make_corpus(files_cfg(tmp_path / "t.csv", val=str(tmp_path / "v.txt")))


# -- the store -------------------------------------------------------------------------------------
def test_a_chunk_is_stored_as_names_and_values_between_seps_blank_parts_kept(tok, tmp_path):
    chunks = [
        TableChunk(("ab", "1 ; 2", "", "x")),
        TableChunk(("c", " ", "d", "")),
        TableChunk(("", " ")),
    ]
    store = build_store(iter(chunks), tok, tmp_path, "t")
    sep, eos = tok.sep_id, tok.eos_id
    want = [*b"ab", sep, *b"1 ; 2", sep, sep, *b"x", eos, *b"c", sep, sep, *b"d", sep, eos]
    assert store.tokens.tolist() == want  # the all-blank chunk skipped
    assert store.parts == TABLE_PARTS and store.n_docs == 2
    assert store.n_bytes == 2 + 5 + 1 + 1 + 1  # the blank parts' bytes are not counted


def test_tables_need_a_tokenizer_with_its_own_sep(tok, tmp_path):
    """A BERT-style file's "[SEP]" is both: a table's columns would read as documents."""
    from .test_tokenizers import wordpiece

    _, bert = wordpiece(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"])
    with pytest.raises(ConfigError, match="tables needs a tokenizer whose sep and eos tokens"):
        build_store(iter([TableChunk(("a", "b"))]), bert, tmp_path, "bert")


# -- masked column prediction ----------------------------------------------------------------------
def table_store(tok, tmp_path, chunks, name="s"):
    return build_store(iter(TableChunk(c) for c in chunks), tok, tmp_path, name)


def columns_of(tok, tokens) -> list[tuple[str, str]]:
    spans = column_spans(np.asarray(tokens), tok.sep_id)

    def text(a, b):
        return bytes(tokens[a:b].tolist()).decode()

    return [(text(a, b), text(c, d)) for a, b, c, d in spans]


def test_column_spans_and_examples_of_whole_columns(tok, tmp_path):
    """A document's columns are packed, in order, into examples of whole columns up to
    seq_len - 2 tokens; a longer column is an example alone, cut; every column in one example."""
    doc = ("name", "aa ; bb", "", "7", "year", "1999 ; 2000")  # columns of 12, 2 and 16 tokens
    store = table_store(tok, tmp_path, [doc, ("x", "1")])

    def examples(seq_len):
        dm = MaskedColumnDataModule(tok, store, store, seq_len=seq_len, batch_size=1)
        n, _, _ = dm.index_space(store)
        return [columns_of(tok, dm.arrange(dm.dataset(store)[i]).tokens) for i in range(n)]

    everything = [("name", "aa ; bb"), ("", "7"), ("year", "1999 ; 2000")]
    assert examples(60) == [everything, [("x", "1")]]
    # room 15: the first two (12 + sep + 2) together, the third (16) alone and cut
    assert examples(17) == [everything[:2], [("year", "1999 ; 200")], [("x", "1")]]
    assert examples(16) == [everything[:1], everything[1:2], [("year", "1999 ; 20")], [("x", "1")]]
    # an example cut short (samples' max_new_tokens): its first tokens
    dm = MaskedColumnDataModule(tok, store, store, seq_len=60, batch_size=1)
    cut = dm.arrange(replace(dm.dataset(store)[0], tokens=store.tokens[:3].astype(np.int64)))
    assert columns_of(tok, cut.tokens) == [("nam", "")]


def test_whole_names_of_chosen_columns_are_masked_and_are_the_only_targets(tok, tmp_path):
    rng = np.random.default_rng(0)
    chunks = [
        tuple(
            x
            for c in range(int(rng.integers(1, 7)))
            for x in (("" if rng.random() < 0.2 else f"col{c}x" * int(rng.integers(1, 3))), f"v{c}")
        )
        for _ in range(300)
    ]
    store = table_store(tok, tmp_path, chunks)
    dm = MaskedColumnDataModule(tok, store, store, seq_len=120, batch_size=4, seed=1)
    chosen = total = 0
    for k in range(0, 300, 4):
        examples = [dm.dataset(store)[(i, 2)] for i in range(k, k + 4)]
        batch = dm.make_batch(examples)
        inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
        for b, ex in enumerate(examples):
            tokens = dm.arrange(ex).tokens
            row = np.concatenate([[tok.cls_id], tokens, [tok.sep_id]])
            n = len(row)
            assert batch["attention_mask"][b].tolist() == [True] * n + [False] * (120 - n)
            assert (inputs[b, n:] == tok.pad_id).all() and (labels[b, n:] == IGNORE).all()
            masked = np.zeros(n, dtype=bool)
            named = 0
            for a, e, _, _ in column_spans(tokens, tok.sep_id):
                on = labels[b, a + 1 : e + 1] != IGNORE
                assert on.all() or not on.any()  # whole names
                named += e > a
                if on.any():
                    masked[a + 1 : e + 1] = True
                    chosen += 1
            total += named
            assert masked.any() == (named > 0)  # at least one, where a column has a name
            assert (labels[b, :n][masked] == row[masked]).all()
            assert (labels[b, :n][~masked] == IGNORE).all()
            assert (inputs[b, :n][masked] == tok.mask_id).all()
            assert (inputs[b, :n][~masked] == row[~masked]).all()
            # the same row alone, in any batch
            alone_inputs, alone_labels = dm.mask_example(ex)
            assert (alone_inputs == inputs[b, :n]).all() and (alone_labels == labels[b, :n]).all()
    # 35% of the named columns, a little more for the at-least-one rule
    assert 0.35 < chosen / total < 0.5
    # another epoch, other columns
    labels = [[dm.mask_example(dm.dataset(store)[(i, e)])[1] for e in (2, 3)] for i in range(20)]
    assert any((a != b).any() for a, b in labels)


def test_the_fallback_column_is_any_named_one_and_a_chosen_name_is_masked_everywhere(tok, tmp_path):
    store = table_store(tok, tmp_path, [("a", "1", "", "2", "b", "3", "c", "4")] * 200)
    dm = MaskedColumnDataModule(tok, store, store, seq_len=40, batch_size=1, column_prob=1e-9)
    picked = set()
    for i in range(200):
        ex = dm.arrange(dm.dataset(store)[i])
        (k,) = dm.masked_columns(ex, column_spans(ex.tokens, tok.sep_id))
        picked.add(k)
    assert picked == {0, 2, 3}  # the named ones, each some time; never the nameless one
    dup = table_store(tok, tmp_path, [("x", "1", "y", "2", "x", "3")] * 50, name="dup")
    dm = MaskedColumnDataModule(tok, dup, dup, seq_len=40, batch_size=1, column_prob=1e-9)
    for i in range(50):
        ex = dm.arrange(dm.dataset(dup)[i])
        chosen = dm.masked_columns(ex, column_spans(ex.tokens, tok.sep_id))
        assert chosen in ([0, 2], [1])  # "x" in both places, or "y"


def test_validation_padding_rows_score_nothing(tok, tmp_path):
    from lmlab.data.base import scored_only

    store = table_store(tok, tmp_path, [("a", "1", "b", "2")] * 4)
    dm = MaskedColumnDataModule(tok, store, store, seq_len=20, batch_size=2)
    examples = [dm.dataset(store)[(0, 0, True)], dm.dataset(store)[(1, 0, False)]]
    assert [ex.scored for ex in examples] == [True, False]
    labels = scored_only(dm.make_batch, examples)["labels"]
    assert (labels[0] != IGNORE).any() and (labels[1] == IGNORE).all()


def test_every_example_is_drawn_once_per_epoch(tok, tmp_path):
    store = table_store(tok, tmp_path, [("n", str(i), "m", "x" * (i % 7)) for i in range(37)])
    dm = MaskedColumnDataModule(tok, store, store, seq_len=8, batch_size=4)
    n, length, stride = dm.index_space(store)
    assert (length, stride) == (1, 1) and n > 37  # some documents need two examples
    covered = [columns_of(tok, dm.dataset(store)[i].tokens) for i in range(n)]
    # the store scanned for separators in small chunks gives the same examples
    assert (column_groups(store, tok.sep_id, dm.window_len, chunk=7) == dm.groups(store)).all()
    assert [c for cols in covered for c in cols] == [
        c for i in range(37) for c in (("n", str(i)), ("m", "x" * (i % 7)))
    ]
    sampler = RandomWindowSampler(n, 1, 1, seed=3)
    sampler.set_epoch(1)
    order = [k for k, _ in sampler]
    assert len(set(order)) == len(order) and len(order) >= n - 4  # trimmed to whole steps


def test_objective_and_data_kinds_must_match(tok, tmp_path, compose_cfg):
    tables = table_store(tok, tmp_path, [("a", "1")] * 40)
    plain = build_store(iter(["some text. " * 50]), tok, tmp_path, "plain")
    with pytest.raises(ConfigError, match="objective=mcp trains on tables, but the validation"):
        MaskedColumnDataModule(tok, tables, plain, seq_len=20, batch_size=2)
    MaskedLMDataModule(tok, tables, tables, seq_len=20, batch_size=2)  # tables read as text
    with pytest.raises(
        ConfigError,
        match="objective=sop cuts text into segments, but the training split holds tables",
    ):
        SentenceOrderDataModule(tok, tables, tables, seq_len=20, batch_size=2)
    with pytest.raises(ConfigError, match=r"objective\.column_prob=0 must be in \(0, 1\]"):
        MaskedColumnDataModule(tok, tables, tables, seq_len=20, batch_size=2, column_prob=0)
    # before any data work
    with pytest.raises(
        ConfigError, match="objective=mcp trains on tables, but data=shakespeare reads text"
    ):
        check_settings(compose_cfg("model=encoder", "objective=mcp"))
    for objective, message in (("nsp", "reads sentences"), ("tlm", "reads pairs of texts")):
        cfg = compose_cfg(
            "model=encoder", f"objective={objective}", "data=files", "data.train=t/*.csv"
        )
        with pytest.raises(
            ConfigError, match=f"objective={objective} {message}, but the data files are tables"
        ):
            check_settings(cfg)
    check_settings(
        compose_cfg("model=encoder", "objective=mcp", "data=files", "data.train=t/*.tsv")
    )
    check_settings(
        compose_cfg(
            "model=encoder", "objective=mcp", "data=files", "data.train=t/x", "data.format=csv"
        )
    )


def test_an_mcp_run_predicts_column_names(tiny_cfg, table_files, caplog):
    caplog.set_level(logging.INFO)
    metrics, objects = train(
        tiny_cfg(
            "model=encoder",
            "objective=mcp",
            f"data.train={table_files}/*.csv",
            "seq_len=96",
            "sample.max_new_tokens=96",
        )
    )
    assert 0 <= metrics["val/acc"] <= 1 and metrics["train/loss"] > 0
    dm = objects["datamodule"]
    assert dm.train_store.parts == TABLE_PARTS == dm.val_store.parts
    samples = (objects["output_dir"] / "samples.txt").read_text()
    original = next(x for x in samples.splitlines() if x.startswith("original:"))
    masked = next(x for x in samples.splitlines() if x.startswith("masked:"))
    names = original.removeprefix("original:  ").split(" | ")[::2]
    assert set(names) <= {"country", "capital", "year", "population"}
    parts = masked.removeprefix("masked:    ").split(" | ")
    assert any("<|mask|>" in n for n in parts[::2]) and not any(
        "<|mask|>" in v for v in parts[1::2]
    )
