"""Documents from a Hugging Face dataset (``data=hf``): a Hub dataset, streamed or downloaded, a folder
written by ``save_to_disk``, or local files read by one of ``datasets``' builders (json, csv, parquet,
text). Each row is one document; its text is the ``data.text_field`` column (rows without text, null
or blank, are skipped).

The validation documents are a split of their own (``data.val_split``) or rows of the training split
held out by a hash of their index (``data.val_fraction``), so the choice needs no pass over the data,
is the same in every process and every run, and works while streaming. ``data.max_documents`` reads
the first rows of the training split only (a streamed corpus is tokenized as it arrives, and can be
far larger than a run needs).

:class:`HFCorpus` answers what ``lmlab.train.prepare_data`` asks of a corpus (texts, fingerprint,
identity and size of each split), like :class:`lmlab.data.corpus.Corpus` for files. ``datasets`` is an
optional dependency (``pip install -e ".[hf]"``), imported only here.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from lmlab.data.collate import mix64
from lmlab.data.corpus import DOC_VERSION, text_fields
from lmlab.errors import ConfigError

log = logging.getLogger(__name__)

# Mixed into every row index before hashing: the held-out rows are not a function of the index alone
# that other tools might share (and so correlate with, e.g. "every 100th row").
HOLD_OUT_SALT = 0x6C6D6C6162  # "lmlab"
READ_BATCH = 1024  # rows read per batch from the dataset
COUNT_CHUNK = 1 << 22  # row indices hashed at once when counting the held-out rows
BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders for local files


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


def count_held_out(n: int, fraction: float) -> int:
    """How many of the rows 0..n-1 are held out (in chunks: no n-sized arrays)."""
    return sum(
        int(held_out(np.arange(i, min(i + COUNT_CHUNK, n)), fraction).sum())
        for i in range(0, n, COUNT_CHUNK)
    )


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


def _base_splits(split: str) -> set[str]:
    """The splits a split expression reads from: ``{train}`` for ``train[:10%]``,
    ``{train, validation}`` for ``train+validation``."""
    return {part.split("[", 1)[0].strip() for part in split.split("+")}


def _data_files(files) -> Any:
    """``data.data_files`` as plain Python (a path or glob, a list of them, or {split: those}),
    refused in any other shape."""
    files = OmegaConf.to_container(files) if OmegaConf.is_config(files) else files
    is_list = lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v)
    ok = files is None or isinstance(files, str) or is_list(files)
    if isinstance(files, dict):
        ok = all(isinstance(v, str) or is_list(v) for v in files.values())
    if not ok:
        raise ConfigError(
            f"data.data_files={files!r} is not a path or glob, a list of them, or a mapping of "
            "split names to those (data.data_files='{train: a/*.jsonl, validation: b.jsonl}')"
        )
    return files


class HFCorpus:
    """The corpus described by a ``data=hf`` config: checked and opened at construction (the
    datasets are loaded, so a wrong path, split or column stops the run before any tokenizing)."""

    def __init__(self, cfg, need_train: bool = True) -> None:
        self.name = cfg.name
        if not cfg.get("path"):
            raise ConfigError(
                "data=hf needs data.path: a Hub dataset id (data.path=HuggingFaceFW/fineweb-edu), a "
                "folder written by save_to_disk, or a builder with files (data.path=json "
                "data.data_files='corpus/*.jsonl')"
            )
        self.path = str(cfg.path)
        self.subset, self.revision = cfg.get("subset"), cfg.get("revision")
        self.data_files = _data_files(cfg.get("data_files"))
        self.field = text_fields(cfg.get("text_field", "text"))
        if isinstance(self.field, tuple):
            raise ConfigError(
                f"data=hf reads one text column; parallel text (data.text_field="
                f"{list(self.field)!r}) is read from JSONL files: export the dataset with "
                "Dataset.to_json('pairs.jsonl') and use data=files data.train=pairs.jsonl"
            )
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
        self.fraction = 0.0 if val_split else self._fraction(cfg.get("val_fraction"))
        shared = val_split and _base_splits(str(val_split)) & _base_splits(split)
        if shared:  # conservative: train[:90%] and train[90%:] do not overlap, but are refused too
            raise ConfigError(
                f"data.val_split={val_split!r} reads the training split {split!r} too "
                f"({', '.join(sorted(shared))} in both), so its rows could be trained on; name "
                "another split, or leave data.val_split unset to hold out data.val_fraction of "
                "the training split's rows"
            )
        local = Path(self.path).expanduser()
        if self.subset and (self.path in BUILDERS or _is_saved_folder(local)):
            # datasets would take the name and ignore it: the run would read what it was not told
            what = (
                "a folder written by save_to_disk"
                if self.path not in BUILDERS
                else f"the {self.path} builder (local files)"
            )
            raise ConfigError(
                f"data.subset={self.subset!r} names a configuration of a Hub dataset, and {what} "
                "has none: leave data.subset unset (choose files with data.data_files)"
            )
        if _is_saved_folder(local) and self.data_files is not None:
            raise ConfigError(
                f"{self.path} is a folder written by save_to_disk, which is read whole: leave "
                "data.data_files unset"
            )
        self._check_files_exist(local)
        self._opened: dict[str, Any] = {}
        self._spill = None  # a stream's held-out texts, kept by a whole pass over its other side
        if val_split:
            self.train, self.val = Rows(split), Rows(str(val_split))
        else:
            self.train, self.val = Rows(split, "train"), Rows(split, "val")
            self._warn_unused_split_files(split)
        for rows in (self.train, self.val) if need_train else (self.val,):
            self._open(rows.split)
        if not val_split:
            self._check_hold_out(need_train)

    # -- what prepare_data asks ------------------------------------------------------------------
    def texts(self, rows: Rows) -> Iterator[str]:
        """The texts of ``rows``, in row order; rows without text (null or blank) are skipped.

        The rows are read in order, whichever side of the hold-out is asked for (reading through
        an index of the chosen rows is ~20x slower), and each batch is masked. A stream is read
        once for both sides: a whole pass over the training side keeps the held-out texts in a
        temporary file, from which the validation side is then read."""
        if rows.side == "val" and self._spill is not None:
            yield from self._spilled()
            return
        spill = None
        if rows.side == "train" and not isinstance(self._open(rows.split), self._datasets.Dataset):
            spill = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 (outlives this)
        start = 0
        for batch in self._read(rows).select_columns([self.field]).iter(batch_size=READ_BATCH):
            texts = batch[self.field]
            held = np.zeros(len(texts), dtype=bool)
            if rows.side != "all":
                held = held_out(np.arange(start, start + len(texts)), self.fraction)
            for j, text in enumerate(texts):
                if not self._has_text(text, start + j, rows.split):
                    continue
                if held[j] == (rows.side == "val"):
                    yield text
                elif spill is not None:
                    spill.write(json.dumps(text) + "\n")  # escaped: one line per text
            start += len(texts)
        if spill is not None:
            self._spill = spill

    def _has_text(self, text, row: int, split: str) -> bool:
        """Whether a row's text is a document: a string with more than white space (null and
        blank rows are skipped); any other value is refused."""
        if text is None:
            return False
        if not isinstance(text, str):
            raise ConfigError(
                f"row {row} of split {split!r} of {self.path} has {type(text).__name__} in "
                f"data.text_field={self.field!r}, not text; choose the column that holds the text"
            )
        return bool(text.strip())

    def _spilled(self) -> Iterator[str]:
        self._spill.seek(0)
        for line in self._spill:
            yield json.loads(line)

    def fingerprint(self, rows: Rows) -> str:
        """Changes with the dataset's settings, the rows chosen, and the data: the Arrow cache's own
        fingerprint for downloaded / saved datasets, size and time of every local file. A streamed
        Hub dataset has neither: pin ``data.revision`` to a commit, so that an update on the Hub is
        not tokenized under the old key."""
        ds, local = self._open(rows.split), Path(self.path).expanduser()
        where = local.resolve() if local.exists() else self.path  # however the folder is spelled
        h = hashlib.sha256(
            f"v{DOC_VERSION}|hf|{where}|{self.data_files!r}|{self._choice(rows)}".encode()
        )
        h.update(f"|{getattr(ds, '_fingerprint', None)}".encode())
        for f in self._local_files():
            st = f.stat()
            h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def identity(self, rows: Rows) -> str:
        """Which rows ``rows`` are, by names and the settings that choose them (not the files'
        places or times): saved in checkpoints as the validation documents."""
        local = Path(self.path).expanduser()
        name = local.resolve().name if local.exists() else self.path
        files = sorted({f.name for f in self._local_files()}) or self.data_files
        ident = f"v{DOC_VERSION}|hf|{name}|{files!r}|{self._choice(rows)}"
        return hashlib.sha256(ident.encode()).hexdigest()[:16]

    def total_bytes(self, rows: Rows) -> int | None:
        """About how many bytes the texts of ``rows`` are (for the progress bar), or None when
        unknown (a streamed dataset)."""
        whole = self._open(rows.split)
        if not isinstance(whole, self._datasets.Dataset):
            return None
        n, limit = len(whole), self._limit(rows)
        read = n if limit is None else min(limit, n)
        share = {"all": 1.0, "val": self.fraction, "train": 1 - self.fraction}[rows.side]
        return int(whole.data.nbytes * share * read / max(n, 1))

    # -- internals -------------------------------------------------------------------------------
    @property
    def _datasets(self):
        return _datasets()

    @staticmethod
    def _fraction(value) -> float:
        try:
            fraction = float(value)
        except (TypeError, ValueError):
            fraction = float("nan")
        if not 0 < fraction < 1:
            raise ConfigError(
                f"data.val_fraction must be in (0, 1), got {value!r} (or name a validation split: "
                "data.val_split=validation)"
            )
        return fraction

    def _limit(self, rows: Rows) -> int | None:
        """``data.max_documents`` applies to the training split only (both sides of a hold-out)."""
        return self.limit if rows.split == self.train.split else None

    def _choice(self, rows: Rows) -> str:
        """What chooses the rows of ``rows``, besides the dataset."""
        rule = f"{rows.side}:{self.fraction!r}" if rows.side != "all" else "all"
        return f"{self.subset}|{self.revision}|{self.field}|{rows.split}|{rule}|{self._limit(rows)}"

    def _warn_unused_split_files(self, split: str) -> None:
        """``data_files`` for other splits than the training one, while rows are held out of it."""
        if not isinstance(self.data_files, dict):
            return
        other = sorted(k for k in self.data_files if k != split)
        if other:
            log.warning(
                "data.data_files names split(s) %s but data.val_split is not set: validation rows "
                "are held out of %r by data.val_fraction instead; set data.val_split=%s to "
                "validate on those files",
                ", ".join(other),
                split,
                other[0],
            )

    def _check_files_exist(self, local: Path) -> None:
        """``data_files`` of a builder (json, parquet, ...) name local files, relative to the
        working directory, and must match some; for a folder they are relative to it, and for a
        Hub dataset they name files in the repository (checked by datasets)."""
        if self.path in BUILDERS:
            base = Path.cwd()
        elif local.is_dir():
            base = local
        else:
            return
        for spec in self._file_specs():
            pattern = Path(spec).expanduser()
            if "://" not in spec and not glob.glob(str(base / pattern), recursive=True):
                raise ConfigError(
                    f"data.data_files={spec!r} matched no files (relative paths start from "
                    f"{base}); check the path or glob"
                )

    def _local_files(self) -> list[Path]:
        """The local files the dataset is read from: a builder's ``data_files``, those of a folder
        (relative to it), or all of a folder's files."""
        path = Path(self.path).expanduser()
        if path.is_dir() and not self._file_specs():
            return sorted(p.resolve() for p in path.rglob("*") if p.is_file())
        if not path.is_dir() and self.path not in BUILDERS:
            return []  # a Hub dataset
        base = path if path.is_dir() else Path.cwd()
        found = {
            Path(f).resolve()
            for spec in self._file_specs()
            for f in glob.glob(str(base / Path(spec).expanduser()), recursive=True)
        }
        return sorted(p for p in found if p.is_file())

    def _file_specs(self) -> list[str]:
        """``data.data_files`` as a flat list of paths / globs."""
        specs = self.data_files
        if specs is None:
            return []
        if isinstance(specs, dict):
            return [s for v in specs.values() for s in ([v] if isinstance(v, str) else v)]
        return [specs] if isinstance(specs, str) else list(specs)

    def _open(self, split: str):
        """The dataset split ``split`` (loaded once), its text column checked."""
        if split in self._opened:
            return self._opened[split]
        datasets = self._datasets
        local = Path(self.path).expanduser()
        try:
            if _is_saved_folder(local):
                ds = self._load_saved(local, split)
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
            columns = ds.column_names
            if columns is None:  # a streamed dataset may only know its columns from a row
                columns = list(next(iter(ds), {}))
        except ConfigError:
            raise
        except Exception as e:  # datasets raises many kinds; all mean the settings are wrong here
            subset = f", subset {self.subset!r}" if self.subset else ""
            why = "no rows" if isinstance(e, StopIteration) else str(e).rstrip(".")
            raise ConfigError(
                f"could not load data.path={self.path!r}{subset}, split {split!r} "
                f"({type(e).__name__}: {why}); data.path takes a Hub dataset id (the Hub needs a "
                "network; offline, a copy in the datasets cache), a folder written by "
                "save_to_disk, or a builder such as json / parquet / text with data.data_files"
            ) from None
        if self.field not in columns:
            raise ConfigError(
                f"split {split!r} of {self.path} has no column data.text_field={self.field!r}; its "
                f"columns are {', '.join(columns) or '(none)'}"
            )
        feature = (ds.features or {}).get(self.field)
        dtype = getattr(feature, "dtype", None)
        if feature is not None and dtype not in ("string", "large_string"):
            raise ConfigError(
                f"column data.text_field={self.field!r} of split {split!r} of {self.path} holds "
                f"{feature}, not text; choose the column that holds the text"
            )
        self._opened[split] = ds
        return ds

    def _load_saved(self, local: Path, split: str):
        ds = self._datasets.load_from_disk(str(local))
        if isinstance(ds, self._datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(
                    f"{self.path} has no split {split!r}; its splits are {', '.join(ds)} (set "
                    "data.split / data.val_split; a saved folder takes whole split names)"
                )
            return ds[split]
        if split != "train":
            raise ConfigError(
                f"{self.path} holds one dataset, not splits: leave data.split at train and "
                "data.val_split unset (rows are held out by data.val_fraction)"
            )
        return ds

    def _read(self, rows: Rows):
        """The dataset of ``rows``' split, cut to the rows read (``data.max_documents``)."""
        ds, limit = self._open(rows.split), self._limit(rows)
        if not isinstance(ds, self._datasets.Dataset):  # streamed
            return ds.take(limit) if limit else ds
        return ds.select(range(limit)) if limit is not None and limit < len(ds) else ds

    def _check_hold_out(self, need_train: bool) -> None:
        """Both sides of the hash hold-out get rows, where the row count is known before reading
        (a split whose documents all turn out blank is refused when its store is built)."""
        ds = self._open(self.train.split)
        if isinstance(ds, self._datasets.Dataset):
            n = len(ds) if self.limit is None else min(self.limit, len(ds))
        elif self.limit is not None:
            n = self.limit  # at most: a shorter stream is noticed when its store is built
        else:
            return
        n_val = count_held_out(n, self.fraction)
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
