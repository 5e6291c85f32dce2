"""data=hf: documents from Hugging Face datasets (lmlab/data/hf.py), on local files only (no Hub)."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lmlab.data.corpus import make_corpus
from lmlab.data.hf import held_out
from lmlab.errors import ConfigError
from lmlab.paths import CONF_DIR
from tests.conftest import TINY, command_cfg, make_text

datasets = pytest.importorskip("datasets")


def write_jsonl(path: Path, texts: list, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


def hf_cfg(tmp_path: Path, **values):
    cfg = OmegaConf.load(CONF_DIR / "data" / "hf.yaml")
    cfg.cache_dir = str(tmp_path / "hf_cache")
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


TEXTS = [f"Row {i}: " + make_text(16 + i % 7, i) for i in range(200)]


def side(texts: list[str], fraction: float, val: bool = True) -> list[str]:
    """The rows of ``texts`` that the hash hold-out puts in validation (or, val=False, training)."""
    held = held_out(np.arange(len(texts)), fraction)
    return [t for t, h in zip(texts, held, strict=True) if h == val]


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "rows.jsonl", TEXTS)


def test_held_out_rows_are_a_fixed_independent_draw_per_row():
    rows = np.arange(200_000)
    held = held_out(rows, 0.01)
    # Binomial(200000, 0.01): mean 2000, sd 44.5
    assert abs(int(held.sum()) - 2000) < 4 * 44.5
    # a threshold on one hash per row: nested in the fraction, the same whatever rows are asked
    assert not (held & ~held_out(rows, 0.02)).any()
    assert (held_out(rows[::7], 0.01) == held[::7]).all()
    # no pattern in the index: every residue class mod 10 gets its share
    per_class = [int(held[rows % 10 == r].sum()) for r in range(10)]
    assert max(per_class) - min(per_class) < 8 * math.sqrt(200)


def test_rows_split_into_disjoint_train_and_validation_in_row_order(tmp_path, jsonl):
    corpus = make_corpus(hf_cfg(tmp_path, path="json", data_files=str(jsonl), val_fraction=0.1))
    train, val = list(corpus.texts(corpus.train)), list(corpus.texts(corpus.val))
    assert val == side(TEXTS, 0.1)
    assert train == side(TEXTS, 0.1, val=False)
    assert 5 <= len(val) <= 40
    assert corpus.total_bytes(corpus.train) > corpus.total_bytes(corpus.val) > 0


def test_streaming_and_a_save_to_disk_folder_give_the_same_documents(tmp_path, jsonl):
    base = dict(path="json", data_files=str(jsonl), val_fraction=0.1)
    loaded = make_corpus(hf_cfg(tmp_path, **base))
    streamed = make_corpus(hf_cfg(tmp_path, **base, streaming=True))
    folder = tmp_path / "saved"
    datasets.load_dataset("json", data_files=str(jsonl), split="train").save_to_disk(str(folder))
    saved = make_corpus(hf_cfg(tmp_path, path=str(folder), val_fraction=0.1))
    for part in ("train", "val"):
        want = list(loaded.texts(getattr(loaded, part)))
        assert list(streamed.texts(getattr(streamed, part))) == want
        assert list(saved.texts(getattr(saved, part))) == want
    assert streamed.total_bytes(streamed.train) is None  # unknown: the progress bar counts up
    # the same rows: checkpoints recording the held-out rows accept any of the three
    assert loaded.identity(loaded.val) == streamed.identity(streamed.val)
    assert loaded.identity(loaded.val) != loaded.identity(loaded.train)


def test_a_stream_is_read_once_for_both_sides_of_the_hold_out(tmp_path, jsonl, monkeypatch):
    from lmlab.data.hf import HFCorpus

    reads = []
    real_read = HFCorpus._read
    monkeypatch.setattr(
        HFCorpus, "_read", lambda self, rows: reads.append(rows) or real_read(self, rows)
    )
    cfg = dict(path="json", data_files=str(jsonl), val_fraction=0.1, max_documents=150)
    streamed = make_corpus(hf_cfg(tmp_path, **cfg, streaming=True))
    partial = streamed.texts(streamed.train)
    next(partial)
    partial.close()  # an abandoned pass keeps nothing
    assert streamed._spill is None
    train = list(streamed.texts(streamed.train))
    val = list(streamed.texts(streamed.val))  # from the training pass's spill
    assert len(reads) == 2 and all(r.side == "train" for r in reads)
    assert (train, val) == (side(TEXTS[:150], 0.1, val=False), side(TEXTS[:150], 0.1))
    assert list(streamed.texts(streamed.val)) == val  # and again


def test_max_documents_reads_the_first_rows_of_the_training_split(tmp_path, jsonl):
    cfg = dict(path="json", data_files=str(jsonl), val_fraction=0.2, max_documents=50)
    for streaming in (False, True):
        corpus = make_corpus(hf_cfg(tmp_path, **cfg, streaming=streaming))
        train, val = list(corpus.texts(corpus.train)), list(corpus.texts(corpus.val))
        assert sorted(train + val) == sorted(TEXTS[:50])
        assert val == side(TEXTS[:50], 0.2)


def test_a_validation_split_is_read_whole_and_blank_rows_are_skipped(tmp_path):
    folder = tmp_path / "dict"
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"body": TEXTS[:30]}),
        validation=datasets.Dataset.from_dict({"body": ["  ", *TEXTS[30:40], ""]}),
    ).save_to_disk(str(folder))
    corpus = make_corpus(
        hf_cfg(
            tmp_path, path=str(folder), val_split="validation", text_field="body", max_documents=5
        )
    )
    assert list(corpus.texts(corpus.train)) == TEXTS[:5]  # max_documents: the training split's
    assert list(corpus.texts(corpus.val)) == TEXTS[30:40]


def test_fingerprint_follows_the_data_and_the_settings(tmp_path, jsonl):
    cfg = dict(path="json", data_files=str(jsonl), val_fraction=0.1)
    corpus = make_corpus(hf_cfg(tmp_path, **cfg))
    before = corpus.fingerprint(corpus.train)
    assert make_corpus(hf_cfg(tmp_path, **cfg)).fingerprint(corpus.train) == before
    assert corpus.fingerprint(corpus.val) != before
    other = make_corpus(hf_cfg(tmp_path, **{**cfg, "val_fraction": 0.2}))
    assert other.fingerprint(other.train) != before
    write_jsonl(jsonl, [*TEXTS[:-1], "changed"])
    os.utime(jsonl, ns=(1, 1))  # a new time even on coarse file-system clocks
    changed = make_corpus(hf_cfg(tmp_path, **cfg))
    assert changed.fingerprint(changed.train) != before


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"path": None}, "data=hf needs data.path"),
        ({"val_fraction": 0}, "data.val_fraction must be in (0, 1)"),
        ({"val_fraction": 1.5}, "data.val_fraction must be in (0, 1)"),
        ({"val_split": "train"}, "reads the training split 'train' too"),
        ({"val_split": "train[:10%]"}, "reads the training split 'train' too"),
        # "+" joins splits: the validation rows were all trained on
        (
            {"split": "train+validation", "val_split": "validation"},
            "split 'train+validation' too (validation in both)",
        ),
        (
            {"split": "train", "val_split": "validation+train"},
            "split 'train' too (train in both)",
        ),
        ({"val_fraction": "abc"}, "data.val_fraction must be in (0, 1), got 'abc'"),
        ({"data_files": 5}, "data.data_files=5 is not a path or glob"),
        ({"max_documents": 0}, "data.max_documents=0 must be a whole number"),
        ({"max_documents": "ten"}, "data.max_documents='ten' must be a whole number"),
        ({"text_field": "body"}, "no column data.text_field='body'; its columns are text, n"),
        ({"split": "nope"}, "could not load data.path='json', split 'nope' (ValueError: Unknown"),
        ({"data_files": "/no/such/*.jsonl"}, "data.data_files='/no/such/*.jsonl' matched no files"),
        ({"path": "someone/dataset", "data_files": None}, "Couldn't reach 'someone/dataset'"),
        ({"val_fraction": 0.001, "max_documents": 20}, "holds out 0 of the 20 rows"),
        ({"subset": "en"}, "data.subset='en' names a configuration of a Hub dataset, and the json"),
    ],
)
def test_bad_settings_are_refused_before_any_tokenizing(tmp_path, jsonl, values, message):
    cfg = hf_cfg(tmp_path, **{"path": "json", "data_files": str(jsonl), **values})
    with pytest.raises(ConfigError) as e:
        make_corpus(cfg)
    assert message in str(e.value)


def test_unknown_split_of_a_saved_folder_lists_its_splits(tmp_path):
    folder = tmp_path / "dict"
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": TEXTS[:10]})).save_to_disk(
        str(folder)
    )
    with pytest.raises(ConfigError, match="has no split 'validation'; its splits are train"):
        make_corpus(hf_cfg(tmp_path, path=str(folder), val_split="validation"))


def test_rows_without_text_are_skipped_and_a_column_of_other_values_refused(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [*TEXTS[:7], None, *TEXTS[7:10]]
    path.write_text("".join(json.dumps({"text": t, "tags": [1, 2]}) + "\n" for t in rows))
    for streaming in (False, True):
        cfg = hf_cfg(
            tmp_path, path="json", data_files=str(path), val_fraction=0.3, streaming=streaming
        )
        corpus = make_corpus(cfg)
        got = list(corpus.texts(corpus.train)) + list(corpus.texts(corpus.val))
        assert sorted(got) == sorted(TEXTS[:10])
    with pytest.raises(ConfigError, match=r"column data.text_field='tags' .* holds List"):
        make_corpus(hf_cfg(tmp_path, path="json", data_files=str(path), text_field="tags"))


def test_bad_files_are_refused_when_opened(tmp_path):
    empty, broken = tmp_path / "empty.jsonl", tmp_path / "broken.jsonl"
    empty.write_text("")
    broken.write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(
        ConfigError, match=r"could not load data.path='json', split 'train' .*no rows"
    ):
        make_corpus(hf_cfg(tmp_path, path="json", data_files=str(empty)))
    for streaming in (False, True):
        cfg = hf_cfg(tmp_path, path="json", data_files=str(broken), streaming=streaming)
        with pytest.raises(ConfigError, match=r"could not load data\.path='json'"):
            make_corpus(cfg)


def test_data_files_are_found_where_datasets_looks_for_them(tmp_path, jsonl, monkeypatch):
    """Relative to the working directory for a builder, to the folder for a local folder, and
    not checked for a Hub dataset (they name files of its repository)."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "jsondir"
    folder.mkdir()
    write_jsonl(folder / "part.jsonl", TEXTS)
    corpus = make_corpus(hf_cfg(tmp_path, path=str(folder), data_files="part.jsonl"))
    assert len(list(corpus.texts(corpus.train))) + len(list(corpus.texts(corpus.val))) == 200
    before = corpus.fingerprint(corpus.val), corpus.identity(corpus.val)
    (folder / "notes.txt").write_text("not read")  # other files of the folder change nothing
    again = make_corpus(hf_cfg(tmp_path, path=str(folder), data_files="part.jsonl"))
    assert (again.fingerprint(again.val), again.identity(again.val)) == before
    make_corpus(hf_cfg(tmp_path, path="json", data_files="rows.jsonl"))  # from the cwd
    with pytest.raises(ConfigError, match="Couldn't reach 'allenai/c4'"):  # asked of the Hub
        make_corpus(hf_cfg(tmp_path, path="allenai/c4", data_files="en/c4-train.00000.json.gz"))
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(saved))
    with pytest.raises(ConfigError, match=r"read whole: leave data\.data_files unset"):
        make_corpus(hf_cfg(tmp_path, path=str(saved), data_files="x.jsonl"))


def test_validation_files_without_val_split_are_named_in_a_warning(tmp_path, jsonl, caplog):
    other = write_jsonl(tmp_path / "other.jsonl", TEXTS[:20])
    files = {"train": str(jsonl), "validation": str(other)}
    with caplog.at_level(logging.WARNING, logger="lmlab.data.hf"):
        make_corpus(hf_cfg(tmp_path, path="json", data_files=files))
    assert "set data.val_split=validation" in caplog.text
    corpus = make_corpus(hf_cfg(tmp_path, path="json", data_files=files, val_split="validation"))
    assert list(corpus.texts(corpus.val)) == TEXTS[:20]


def test_a_side_left_without_text_is_refused_once_and_not_cached(tmp_path):
    """A short stream (its length unknown up front) whose hold-out took no row."""
    from lmlab.data.store import build_store, store_key
    from lmlab.data.tokenizers import byte_tokenizer

    path = write_jsonl(tmp_path / "short.jsonl", TEXTS[:30])
    cfg = hf_cfg(tmp_path, path="json", data_files=str(path), val_fraction=0.01, streaming=True)
    corpus, tok = make_corpus(cfg), byte_tokenizer(2)
    assert corpus.total_bytes(corpus.val) is None and not list(corpus.texts(corpus.val))
    key, reads = store_key(corpus.fingerprint(corpus.val), tok), []

    def texts():
        reads.append(1)
        yield from corpus.texts(corpus.val)

    # Refused, and again (a waiting rank, a rerun) without another read of the data: no empty
    # store was cached, but the refusal was recorded under the key, which hashes the data.
    for _ in range(2):
        with pytest.raises(ConfigError, match="the val split has no text"):
            build_store(texts(), tok, tmp_path / "cache", key, label="val")
    assert len(reads) == 1 and not (tmp_path / "cache" / "stores" / key).exists()


def test_identity_names_the_rows_not_where_they_are(tmp_path, jsonl, monkeypatch):
    """Checkpoints record it: other files, another column or other rows are other documents (a
    resume is refused); a setting that does not choose the validation rows is not."""
    base = dict(path="json", data_files=str(jsonl), val_fraction=0.1)
    ident = lambda **kw: (c := make_corpus(hf_cfg(tmp_path, **{**base, **kw}))).identity(c.val)
    small = write_jsonl(tmp_path / "small.jsonl", TEXTS[:50])
    assert ident() != ident(data_files=str(small))
    titled = tmp_path / "titled.jsonl"
    titled.write_text("".join(json.dumps({"text": t, "title": t[:12]}) + "\n" for t in TEXTS))
    assert ident(data_files=str(titled)) != ident(data_files=str(titled), text_field="title")
    assert ident() != ident(revision="abc123") and ident() != ident(max_documents=100)
    # the same file under another folder and spelling: the same documents
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "rows.jsonl").write_text(jsonl.read_text())
    monkeypatch.chdir(moved)
    assert ident(data_files="rows.jsonl") == ident()
    # with a validation split, max_documents (of the training split) leaves it alone
    folder = tmp_path / "dict"
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": TEXTS[:100]}),
        validation=datasets.Dataset.from_dict({"text": TEXTS[100:150]}),
    ).save_to_disk(str(folder))
    monkeypatch.chdir(folder)
    split = dict(path=str(folder), data_files=None, val_split="validation")
    assert ident(**split) == ident(**split, max_documents=10) == ident(**{**split, "path": "."})
    # and the cache key does not depend on how the folder is spelled either
    fp = lambda **kw: (c := make_corpus(hf_cfg(tmp_path, **kw))).fingerprint(c.val)
    assert fp(**split) == fp(**{**split, "path": "."})


def test_without_datasets_installed_the_error_says_how_to_install(tmp_path, jsonl, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(
        ConfigError,
        match=r"pip install datasets \(in a checkout of lmlab: pip install -e \"\.\[hf\]\"\)",
    ):
        make_corpus(hf_cfg(tmp_path, path="json", data_files=str(jsonl)))


def run_overrides(tmp_path: Path, jsonl: Path) -> list[str]:
    """A run's data=hf settings for the rows of ``jsonl`` (10% held out)."""
    return [
        "data=hf",
        "data.path=json",
        f"data.data_files={jsonl}",
        f"data.cache_dir={tmp_path / 'hf_cache'}",
        "data.val_fraction=0.1",
    ]


def test_training_on_a_dataset_end_to_end(compose_cfg, tmp_path, jsonl, caplog):
    from lmlab.evaluate import evaluate
    from lmlab.train import train

    cfg = compose_cfg(*run_overrides(tmp_path, jsonl), *TINY, "tokenizer=byte")
    metrics, objects = train(cfg)
    assert math.isfinite(metrics["val/loss"]) and metrics["trainer/global_step"] == 6
    # the validation store holds exactly the held-out rows, each followed by eos
    val = objects["datamodule"].val_store
    held = side(TEXTS, 0.1)
    assert val.n_docs == len(held)
    assert val.n_bytes == sum(len(t.encode()) for t in held)
    # evaluating the run's own data finds the same held-out rows (no warning) and scores as it did
    ecfg = command_cfg(
        "evaluate",
        ckpt_path=str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
        device="cpu",
        limit_batches=3,  # as the run's validations (TINY: trainer.limit_val_batches=3)
        **{"paths.cache_dir": cfg.paths.cache_dir},
    )
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        scores = evaluate(ecfg)
    assert "not the ones" not in caplog.text
    assert scores["loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)


def _prepare_counting_reads(cfg_yaml: str, out: str, barrier) -> None:
    """A rank of a launch preparing the data (spawned): which sides of the corpus it read."""
    import time

    import lmlab.train
    from lmlab.data.hf import HFCorpus

    reads, real_read, real_build = [], HFCorpus._read, lmlab.train.build_store

    def read(self, rows):
        reads.append(rows.side)
        return real_read(self, rows)

    def build(texts, tok, cache, key, **kw):
        store = real_build(texts, tok, cache, key, **kw)
        if kw.get("label") == "train" and reads:  # this rank read the stream for it
            time.sleep(1)  # so the other rank reaches the validation store first
        return store

    HFCorpus._read, lmlab.train.build_store = read, build
    barrier.wait()  # both ranks start preparing together
    lmlab.train.prepare_data(OmegaConf.create(cfg_yaml))
    Path(out).write_text(json.dumps(reads))


def test_ranks_preparing_together_read_a_stream_once(compose_cfg, tmp_path, jsonl):
    """Two ranks of a launch on one cache: the rank that reads the training side also builds the
    validation store from what that read held out; the other waits and opens both."""
    cfg = compose_cfg(*run_overrides(tmp_path, jsonl), "data.streaming=true", "tokenizer=byte")
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        outs = [str(tmp_path / f"reads{r}.json") for r in range(2)]
        procs = [
            ctx.Process(target=_prepare_counting_reads, args=(OmegaConf.to_yaml(cfg), o, barrier))
            for o in outs
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]
    reads = sorted(json.loads(Path(o).read_text()) for o in outs)
    assert reads == [[], ["train"]]  # one pass over the stream in all


def test_a_subset_with_local_files_or_a_saved_folder_is_refused(tmp_path):
    """datasets takes a configuration name for a builder of local files or a saved folder and
    ignores it: the run would read all the rows it was pointed at, not the subset it names."""
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": TEXTS[:10]}).save_to_disk(str(folder))
    with pytest.raises(ConfigError, match="a folder written by save_to_disk has none"):
        make_corpus(hf_cfg(tmp_path, path=str(folder), subset="en"))


def test_the_held_out_rows_are_fixed_values():
    """The rows held out are part of what a checkpoint's validation set is (HFCorpus.identity
    records the settings, not the rows): a changed hash or salt would resume old runs against
    other validation rows. The first 40 rows at 0.25, and the share over 100000 rows at 0.1."""
    rows = np.flatnonzero(held_out(np.arange(40), 0.25)).tolist()
    assert rows == [1, 6, 7, 10, 13, 14, 21, 22, 23, 26, 30, 32, 33, 34, 38]
    assert int(held_out(np.arange(100_000), 0.1).sum()) == 10_029  # ~N(10000, 95)
