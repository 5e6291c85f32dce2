from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

from lmlab.paths import CONF_DIR

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# data=hf tests read local files only: the Hub is never asked (no network needed, none used)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _no_wandb_service_in_env():
    """An in-process W&B run leaves ``WANDB_SERVICE`` (its service's address) in ``os.environ``:
    later tests' subprocesses would attach to this process's service instead of starting their
    own, so a test's outcome would hang on which tests ran before it."""
    yield
    os.environ.pop("WANDB_SERVICE", None)


WORDS = [
    "the",
    "king",
    "queen",
    "love",
    "night",
    "day",
    "sword",
    "crown",
    "blood",
    "heart",
    "lord",
    "lady",
    "speak",
    "come",
    "go",
    "now",
    "thou",
    "art",
    "my",
    "good",
    "sweet",
    "fair",
    "death",
    "life",
    "hath",
    "doth",
    "shall",
]


def make_text(n_words: int, seed: int) -> str:
    """Deterministic pseudo-English: lines of words, so tokenizers have something to merge."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 8):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture
def text_files(tmp_path: Path) -> list[Path]:
    """Six small plain-text documents."""
    d = tmp_path / "corpus"
    d.mkdir()
    paths = []
    for i in range(6):
        p = d / f"doc{i}.txt"
        p.write_text(make_text(800, i))
        paths.append(p)
    return paths


def cipher(text: str) -> str:
    """A stand-in translation: each word's letters shifted by 13 (rot13), the words reversed."""
    import codecs

    return " ".join(codecs.encode(w, "rot13") for w in reversed(text.split()))


@pytest.fixture
def parallel_file(tmp_path: Path) -> Path:
    """A JSONL file of 300 translation pairs {"en": ..., "xx": cipher(en)}."""
    import json

    lines = [line for i in range(3) for line in make_text(800, i).splitlines()]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"en": t, "xx": cipher(t)}) + "\n" for t in lines))
    return path


@pytest.fixture
def table_files(tmp_path: Path) -> Path:
    """A folder of 10 CSV tables (countries: country, capital, year, population in some order)."""
    import csv

    places = [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Kenya", "Nairobi")]
    places += [("Canada", "Ottawa"), ("Norway", "Oslo"), ("Chile", "Santiago"), ("Egypt", "Cairo")]
    rng = random.Random(0)
    folder = tmp_path / "tables"
    folder.mkdir()
    for t in range(10):
        cols = rng.sample(["country", "capital", "year", "population"], rng.randint(2, 4))
        rows = []
        for _ in range(12):
            country, capital = rng.choice(places)
            cell = dict(country=country, capital=capital, year=str(rng.randint(1950, 2020)))
            cell["population"] = f"{rng.randint(1, 900) * 100_000}"
            rows.append([cell[c] for c in cols])
        with open(folder / f"t{t}.csv", "w", newline="") as f:
            csv.writer(f).writerows([cols, *rows])
    return folder


def files_cfg(train, **kw):
    """A data=files config group (conf/data/files.yaml's keys) for make_corpus, on ``train``."""
    settings = dict(val=None, val_fraction=0.2, format="auto", text_field="text")
    return OmegaConf.create(
        {"name": "files", "source": "files", "train": str(train), **settings, **kw}
    )


TINY = [
    "seq_len=32",
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=2",
    "data.batch_size=4",
    "++tokenizer.vocab_size=400",
    "++tokenizer.num_sentinels=4",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "trainer.accelerator=cpu",
    "optim.warmup_steps=2",
    "sample.max_new_tokens=8",
]


@pytest.fixture
def compose_cfg(tmp_path: Path):
    """compose_cfg(*overrides) -> a resolved-able training config writing into tmp_path."""

    def _compose(*overrides: str, output_dir: Path | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=list(overrides))
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir or tmp_path / "run")
            cfg.paths.cache_dir = str(tmp_path / "cache")
        GlobalHydra.instance().clear()
        return cfg

    return _compose


@pytest.fixture
def tiny_cfg(compose_cfg, text_files):
    """A seconds-long training config on the six-document corpus."""

    def _tiny(*overrides: str, **kw):
        files = ",".join(str(p) for p in text_files)
        return compose_cfg("data=files", f"data.train=[{files}]", *TINY, *overrides, **kw)

    return _tiny


def command_cfg(name: str, **values):
    """The shipped ``conf/<name>.yaml`` (generate or evaluate) composed as its command would, with
    ``values`` set on top: tests run the commands with their real defaults."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(name, overrides=[f"ckpt_path={values.pop('ckpt_path')}"])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def tiny_encoder(tok, **settings):
    """A 2 x 32 ``EncoderLM`` over ``tok``'s vocabulary, plain head + loss; ``settings``: an
    objective's ``model_settings()`` (its auxiliary head) or other model fields."""
    from lmlab.models.encoder import EncoderLM

    dims = dict(n_layers=2, d_model=32, n_heads=4, max_seq_len=64, loss_chunk_size=0)
    return EncoderLM(
        vocab_size=tok.vocab_size, special_ids=tok.special, optim={}, **dims | settings
    )
