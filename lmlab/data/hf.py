"""Documents from a Hugging Face dataset (``data=hf``): a Hub dataset, streamed or downloaded, a folder
written by ``save_to_disk``, or local files read by one of ``datasets``' builders (json, csv, parquet,
text). Each row is one document; its text is the ``data.text_field`` column.

The validation documents are a split of their own (``data.val_split``) or rows of the training split
held out by a hash of their index (``data.val_fraction``), so the choice needs no pass over the data,
is the same in every process and every run, and works while streaming. ``data.max_documents`` reads
the first rows only (a streamed corpus is tokenized as it arrives, and can be far larger than a run
needs).

:class:`HFCorpus` answers what ``lmlab.train.prepare_data`` asks of a corpus (texts, fingerprint,
identity and size of each split), like :class:`lmlab.data.corpus.Corpus` for files. ``datasets`` is an
optional dependency (``pip install -e ".[hf]"``), imported only here.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from lmlab.data.collate import mix64
from lmlab.data.corpus import DOC_VERSION
from lmlab.errors import ConfigError

log = logging.getLogger(__name__)

# Mixed into every row index before hashing: the held-out rows are not a function of the index alone
# that other tools might share (and so correlate with, e.g. "every 100th row").
HOLD_OUT_SALT = 0x6C6D6C6162  # "lmlab"
READ_BATCH = 1024  # rows read per batch from the dataset


@dataclass(frozen=True)
class Rows:
    """One side of the corpus: rows of the dataset split ``split``; ``side`` is "all", or "train" /
    "val" for the two sides of the hash hold-out."""

    split: str
    side: str = "all"


def held_out(index: np.ndarray, fraction: float) -> np.ndarray:
    """True for the row indices held out for validation: those whose salted splitmix64 hash falls in
    the lowest ``fraction`` of its range (a fixed, independent draw per row)."""
    bits = mix64(np.asarray(index, dtype=np.uint64) ^ np.uint64(HOLD_OUT_SALT))
    return bits < np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "data=hf needs Hugging Face datasets: pip install datasets (in a checkout of lmlab: "
            'pip install -e ".[hf]")'
        ) from None
    return datasets


def _is_saved_folder(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


class HFCorpus:
    """The corpus described by a ``data=hf`` config: checked and opened at construction (the
    datasets are loaded, so a wrong path, split or column stops the run before any tokenizing)."""

    def __init__(self, cfg, need_train: bool = True) -> None:
        self.name = cfg.name
        self.path = cfg.get("path")
        if not self.path:
            raise ConfigError(
                "data=hf needs data.path: a Hub dataset id (data.path=HuggingFaceFW/fineweb-edu), a "
                "folder written by save_to_disk, or a builder with files (data.path=json "
                "data.data_files='corpus/*.jsonl')"
            )
        self.path = str(self.path)
        self.subset, self.revision = cfg.get("subset"), cfg.get("revision")
        files = cfg.get("data_files")
        self.data_files = OmegaConf.to_container(files) if OmegaConf.is_config(files) else files
        self.field = cfg.get("text_field", "text")
        self.streaming = bool(cfg.get("streaming", False))
        self.cache_dir = cfg.get("cache_dir")
        self.limit = cfg.get("max_documents")
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise ConfigError(
                f"data.max_documents={self.limit!r} must be a whole number >= 1 (or null: every row)"
            )
        split, val_split = str(cfg.get("split") or "train"), cfg.get("val_split")
        self.fraction = float(cfg.get("val_fraction", 0.0)) if not val_split else 0.0
        if not val_split and not 0 < self.fraction < 1:
            raise ConfigError(
                f"data.val_fraction must be in (0, 1), got {cfg.get('val_fraction')!r} (or name a "
                "validation split: data.val_split=validation)"
            )
        if val_split and str(val_split) == split:
            raise ConfigError(
                f"data.val_split={val_split!r} is the training split too: name another split, or "
                "leave data.val_split unset to hold out data.val_fraction of its rows"
            )
        self._opened: dict[str, Any] = {}
        if val_split:
            self.train, self.val = Rows(split), Rows(str(val_split))
        else:
            self.train, self.val = Rows(split, "train"), Rows(split, "val")
        for spec in self._file_specs():
            if "://" not in spec and not glob.glob(str(Path(spec).expanduser()), recursive=True):
                raise ConfigError(
                    f"data.data_files={spec!r} matched no files (relative paths start from "
                    f"{Path.cwd()}); check the path or glob"
                )
        for rows in (self.train, self.val) if need_train else (self.val,):
            self._open(rows.split)
        if not val_split:
            self._check_hold_out(need_train)

    # -- what prepare_data asks ------------------------------------------------------------------
    def texts(self, rows: Rows) -> Iterator[str]:
        """The texts of ``rows``, in row order; rows whose text is blank are skipped."""
        ds, indices = self._rows(rows)
        ds = ds.select_columns([self.field])
        start = 0
        for batch in ds.iter(batch_size=READ_BATCH):
            texts = batch[self.field]
            keep = None
            if indices is None and rows.side != "all":  # streaming: decide row by row
                held = held_out(np.arange(start, start + len(texts)), self.fraction)
                keep = held if rows.side == "val" else ~held
            for j, text in enumerate(texts):
                if keep is not None and not keep[j]:
                    continue
                if not isinstance(text, str):
                    row = start + j if indices is None else int(indices[start + j])
                    raise ConfigError(
                        f"row {row} of split {rows.split!r} of {self.path} has "
                        f"{type(text).__name__} in data.text_field={self.field!r}, not text; "
                        "choose the column that holds the text"
                    )
                if text.strip():
                    yield text
            start += len(texts)

    def fingerprint(self, rows: Rows) -> str:
        """Changes with the dataset's settings, the rows chosen, and the data: the Arrow cache's own
        fingerprint for downloaded / saved datasets, size and time of every local file. A streamed
        Hub dataset has neither: pin ``data.revision`` so that an update on the Hub is not
        tokenized under the old key."""
        ds = self._open(rows.split)
        h = hashlib.sha256(self._settings(rows).encode())
        h.update(f"|{getattr(ds, '_fingerprint', None)}".encode())
        for f in self._local_files():
            st = f.stat()
            h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def identity(self, rows: Rows) -> str:
        """Which rows ``rows`` are, by the dataset's name and the settings that choose them (not its
        files' places or times): saved in checkpoints as the validation documents."""
        name = Path(self.path).name if Path(self.path).expanduser().exists() else self.path
        ident = f"v{DOC_VERSION}|hf|{name}|{self._choice(rows)}"
        return hashlib.sha256(ident.encode()).hexdigest()[:16]

    def total_bytes(self, rows: Rows) -> int | None:
        """About how many bytes the texts of ``rows`` are (for the progress bar), or None when
        unknown (a streamed dataset)."""
        ds, _ = self._rows(rows)
        if not isinstance(ds, self._datasets.Dataset):
            return None
        size = self._open(rows.split).data.nbytes  # the Arrow table, every column
        whole = len(self._open(rows.split))
        return int(size * len(ds) / max(whole, 1))

    # -- internals -------------------------------------------------------------------------------
    @property
    def _datasets(self):
        return _datasets()

    def _choice(self, rows: Rows) -> str:
        rule = f"{rows.side}:{self.fraction!r}" if rows.side != "all" else "all"
        return f"{self.subset}|{rows.split}|{rule}|{self.limit}"

    def _settings(self, rows: Rows) -> str:
        return (
            f"v{DOC_VERSION}|hf|{self.path}|{self.data_files!r}|{self.revision}|{self.field}|"
            f"{self._choice(rows)}"
        )

    def _local_files(self) -> list[Path]:
        """The local files the dataset is read from: a saved folder's, or ``data_files``'."""
        path = Path(self.path).expanduser()
        if path.is_dir():
            return sorted(p.resolve() for p in path.rglob("*") if p.is_file())
        found = {
            Path(f).resolve()
            for spec in self._file_specs()
            for f in glob.glob(str(Path(spec).expanduser()), recursive=True)
        }
        return sorted(p for p in found if p.is_file())

    def _file_specs(self) -> list[str]:
        """``data.data_files`` as a flat list of paths / globs."""
        specs = self.data_files
        if specs is None:
            return []
        if isinstance(specs, dict):
            return [str(s) for v in specs.values() for s in ([v] if isinstance(v, str) else v)]
        return [specs] if isinstance(specs, str) else [str(s) for s in specs]

    def _open(self, split: str):
        """The dataset split ``split`` (loaded once), its text column checked."""
        if split in self._opened:
            return self._opened[split]
        datasets = self._datasets
        local = Path(self.path).expanduser()
        try:
            if _is_saved_folder(local):
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise ConfigError(
                            f"{self.path} has no split {split!r}; its splits are "
                            f"{', '.join(ds)} (set data.split / data.val_split)"
                        )
                    ds = ds[split]
                elif split != "train":
                    raise ConfigError(
                        f"{self.path} holds one dataset, not splits: leave data.split at train and "
                        "data.val_split unset (rows are held out by data.val_fraction)"
                    )
            else:
                ds = datasets.load_dataset(
                    self.path,
                    self.subset,
                    split=split,
                    data_files=self.data_files,
                    revision=self.revision,
                    streaming=self.streaming,
                    cache_dir=self.cache_dir,
                )
        except ConfigError:
            raise
        except Exception as e:  # datasets raises many kinds; all mean the settings are wrong here
            subset = f", subset {self.subset!r}" if self.subset else ""
            raise ConfigError(
                f"could not load data.path={self.path!r}{subset}, split {split!r} "
                f"({type(e).__name__}: {str(e).rstrip('.')}); data.path takes a Hub dataset id "
                "(the Hub needs a network; offline, a copy in the datasets cache), a folder written "
                "by save_to_disk, or a builder such as json / parquet / text with data.data_files"
            ) from None
        columns = ds.column_names
        if columns is None:  # a streamed dataset may only know its columns from a row
            columns = list(next(iter(ds), {}))
        if self.field not in columns:
            raise ConfigError(
                f"split {split!r} of {self.path} has no column data.text_field={self.field!r}; its "
                f"columns are {', '.join(columns) or '(none)'}"
            )
        self._opened[split] = ds
        return ds

    def _rows(self, rows: Rows):
        """(dataset limited to the rows read, the row indices of ``rows`` in it or None when they
        are decided while reading: a streamed hold-out)."""
        ds = self._open(rows.split)
        limit = self.limit if rows.split == self.train.split else None  # not a val_split's
        if not isinstance(ds, self._datasets.Dataset):  # streamed
            return (ds.take(limit) if limit else ds), None
        n = len(ds) if limit is None else min(limit, len(ds))
        if rows.side == "all":
            return (ds.select(range(n)) if n < len(ds) else ds), None
        held = held_out(np.arange(n), self.fraction)
        indices = np.flatnonzero(held if rows.side == "val" else ~held)
        return ds.select(indices), indices

    def _check_hold_out(self, need_train: bool) -> None:
        """Both sides of the hash hold-out get rows, where the row count is known before reading."""
        ds = self._open(self.train.split)
        if isinstance(ds, self._datasets.Dataset):
            n = len(ds) if self.limit is None else min(self.limit, len(ds))
        elif self.limit is not None:
            n = self.limit  # at most: a shorter stream is noticed when its store is empty
        else:
            return
        n_val = int(held_out(np.arange(n), self.fraction).sum())
        if n_val == 0 or (need_train and n_val == n):
            raise ConfigError(
                f"data.val_fraction={self.fraction} holds out {n_val} of the {n} rows read from "
                f"split {self.train.split!r}: "
                + (
                    "raise data.val_fraction (or data.max_documents), or name a validation split "
                    "with data.val_split"
                    if n_val == 0
                    else "lower data.val_fraction"
                )
            )
