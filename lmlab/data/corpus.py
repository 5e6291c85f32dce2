"""Where text comes from: the bundled Shakespeare corpus or the user's own files (plain text, JSONL,
tables: CSV / TSV); Hugging Face datasets are in :mod:`lmlab.data.hf`.

A corpus is a list of documents, split deterministically into train and validation *by document*, so no
validation text is ever trained on: a lone document is cut into a head (train) and a tail (validation),
and files that ``data.val`` names are left out of ``data.train``'s matches. Which documents are held out
depends only on their names relative to the glob that found them, not on the working directory or on how
the path was spelled. Every problem with the input (a glob that matches nothing, an empty, binary or
wrongly encoded file, a bad JSONL line) is a :class:`ConfigError` naming the file and the fix.

A table (a .csv / .tsv file, its first row the column names) is one document of the split (whole
tables are held out, so no validation table's columns are trained on; a lone table is cut by rows)
and gives the token store one document per ``data.table_rows`` consecutive rows: a
:class:`TableChunk`, the column names and values alternating (``name <sep> values <sep> name ...
<eos>``, each column's cells in those rows joined by " ; "), for objective=mcp.
"""

from __future__ import annotations

import csv
import glob as globlib
import hashlib
import io
import json
import logging
import math
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from lmlab.errors import ConfigError, refuse_unknown_keys
from lmlab.paths import CONF_DIR

log = logging.getLogger(__name__)

# Part of every fingerprint: bump it when the text or the identity a Doc stands for changes, so caches
# built from the old meaning (token stores, trained tokenizers) are not reused. 2: JSONL lines split on
# "\n" only, the head/tail cut applied to JSONL and bundled documents, names independent of the path's
# spelling.
DOC_VERSION = 2
ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED = {"shakespeare": ASSETS / "shakespeare.tar.xz"}


@dataclass(frozen=True)
class Doc:
    """One document: a whole file, one JSONL line, a bundled member, or the head/tail of one of these."""

    path: str  # the file, as the glob found it (read from here, named in errors)
    line: int | None = None  # 1-based JSONL line
    member: str | None = None  # member of a bundled archive
    part: str | None = None  # "head" / "tail" when a lone document is split for validation
    name: str | None = None  # the file's name relative to its glob's base folder (None: ``path``)
    table: str | None = None  # "csv" / "tsv": a table (a file read as one)

    @property
    def key(self) -> str:
        """The document's identity, hashed to choose the validation documents. It uses ``name``, not
        ``path``, so the same files give the same split however the glob was spelled (relative,
        absolute, ``./``) and from any working directory."""
        ident = (self.name or self.path, self.member, self.line, self.part)
        key = ":".join(str(x) for x in ident if x)
        # a table's reading (csv / tsv) is part of what it is: a .csv file read as text before
        # tables existed is another document, and a resume or evaluation across them is noticed
        return f"{key}|{self.table}" if self.table else key

    def with_part(self, part: str) -> Doc:
        return Doc(self.path, self.line, self.member, part, self.name, self.table)


class TableChunk(tuple):
    """Some consecutive rows of a table as one document's parts: each column's name, then its cells
    in those rows joined by " ; " (the token store joins the parts with sep). Parts may be blank (a
    column without a name, cells without text): the store keeps them, as the column structure is
    read from the separators."""


@dataclass
class Table:
    """A table file's column names and rows (every row as long as the header)."""

    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    path: str = ""

    def cut(self, frac: float, part: str) -> Table:
        """The head (the first ``frac`` of the rows, at least one) or the tail (the rest, at least
        one) of a lone table split for validation."""
        n = len(self.rows)
        if n < 2:
            raise ConfigError(
                f"{self.path} is the only table and has one row: holding some out for validation "
                "needs two rows or more; add rows or tables, or name validation files with data.val"
            )
        cut = min(n - 1, max(1, round(n * frac)))
        rows = self.rows[:cut] if part == "head" else self.rows[cut:]
        return Table(self.header, rows, self.path)

    def chunks(self, rows: int) -> Iterator[TableChunk]:
        for i in range(0, len(self.rows), rows):
            block = self.rows[i : i + rows]
            yield TableChunk(
                text
                for c, name in enumerate(self.header)
                for text in (name, " ; ".join(row[c] for row in block))
            )


@dataclass
class Corpus:
    name: str
    train: list[Doc]
    val: list[Doc]
    text_field: str | tuple[str, ...] = "text"  # two fields: parallel text (pairs)
    encoding_errors: str = "strict"
    val_fraction: float = 0.0  # used to cut a lone document into head (train) and tail (val)
    table_rows: int = 3  # rows of a table per store document (TableChunk)

    def identity(self, docs: Sequence[Doc]) -> str:
        """Which documents ``docs`` are, by name only (not file times or places): saved in
        checkpoints as the validation documents, so a resume or an evaluation on other ones (other
        data settings, or lmlab's older choice of held-out documents) is noticed."""
        keys = "\n".join(sorted(d.key for d in docs))
        return hashlib.sha256(f"v{DOC_VERSION}\n{keys}".encode()).hexdigest()[:16]

    def fingerprint(self, docs: Sequence[Doc]) -> str:
        """Changes when any document's identity, file, size or modification time changes.

        The file enters as its resolved path: ``key`` alone is the same for equally named files in
        two folders, whose caches must not be shared."""
        h = hashlib.sha256(
            f"v{DOC_VERSION}|{self.text_field}|{self.encoding_errors}|{self.val_fraction}".encode()
        )
        if any(d.table for d in docs):  # (only then: other corpora keep their caches)
            h.update(f"|table_rows={self.table_rows}".encode())
        files: dict[str, str] = {}  # path -> "resolved|size|mtime", one stat per file
        for d in docs:
            if d.path not in files:
                p = Path(d.path)
                st = p.stat()
                files[d.path] = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
            h.update(f"{d.key}|{files[d.path]}\n".encode())  # (a table's key holds its kind)
        return h.hexdigest()[:16]

    def total_bytes(self, docs: Sequence[Doc]) -> int:
        """The size of the files ``docs`` are read from (for the progress bar)."""
        return sum(Path(p).stat().st_size for p in {d.path for d in docs})

    def texts(self, docs: Sequence[Doc]) -> Iterator[str | tuple[str, ...]]:
        """Yield each document's text (a pair's two, as a tuple; a table's chunks of
        ``table_rows`` rows, each a :class:`TableChunk`), reading every file once."""
        i = 0
        while i < len(docs):
            j = i
            while j < len(docs) and docs[j].path == docs[i].path:
                j += 1
            for text in self._file_texts(docs[i:j]):
                if isinstance(text, Table):
                    yield from text.chunks(self.table_rows)
                else:
                    yield text
            i = j

    def _file_texts(self, docs: Sequence[Doc]) -> Iterator[str | tuple[str, ...]]:
        """The texts of ``docs`` (all of one file), each cut to its head or tail where it has one,
        whatever kind of document it is: a lone document never gives its whole text to both splits."""
        for d, text in zip(docs, self._whole_texts(docs), strict=True):
            if d.part is not None and isinstance(text, Table):
                text = text.cut(1 - self.val_fraction, d.part)
            elif d.part is not None:
                cut = _cut_point(text, 1 - self.val_fraction)
                text = text[:cut] if d.part == "head" else text[cut:]
            yield text

    def _whole_texts(self, docs: Sequence[Doc]) -> Iterator[str | tuple[str, ...]]:
        path = docs[0].path
        if docs[0].table is not None:
            yield read_table(path, docs[0].table, self.encoding_errors)
        elif docs[0].member is not None:
            members = _bundled_members(path)
            yield from (members[d.member] for d in docs)
        elif docs[0].line is not None:
            lines = _jsonl_lines(_read_text(path, self.encoding_errors))
            for d in docs:
                yield _jsonl_text(
                    lines[d.line - 1], path, d.line, self.text_field, self.encoding_errors
                )
        else:
            for _ in docs:
                yield _read_text(path, self.encoding_errors)


_SPACE = re.compile(r"\s")


def _cut_point(text: str, frac: float) -> int:
    """Where a lone document is cut, at or after ``frac`` of the text: the first line start there,
    or, in text without one (a one-line file, a JSONL paragraph), the first word start, or else
    exactly there, so the tail is never left empty for want of a newline."""
    at = int(len(text) * frac)
    end = len(text.rstrip())  # a line break at the very end (one-line files have one) cuts nothing
    nl = text.find("\n", at, end)
    if nl >= 0:
        return nl + 1
    space = _SPACE.search(text, at, end)
    return space.end() if space else min(at, end)


@lru_cache(maxsize=2)
def _bundled_members(path: str) -> dict[str, str]:
    with tarfile.open(path, "r:xz") as tar:
        return {
            m.name: tar.extractfile(m).read().decode("utf-8")
            for m in sorted(tar.getmembers(), key=lambda m: m.name)
            if m.isfile()
        }


def _read_text(path: str, errors: str) -> str:
    raw = Path(path).read_bytes()
    if not raw.strip():
        raise ConfigError(f"{path} is empty: remove it from the data file list or add text to it")
    if b"\x00" in raw[:8192]:
        raise ConfigError(
            f"{path} looks binary (it contains NUL bytes): give UTF-8 text, JSONL, CSV or TSV "
            "files (a UTF-16 export, as Excel writes, must be saved as UTF-8)"
        )
    try:  # a leading byte-order mark (Windows editors write one) is not text
        return raw.decode("utf-8-sig", errors=errors)
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r}); convert it, "
            "or set data.encoding_errors=replace to replace the bad bytes"
        ) from None


def read_table(path: str, kind: str, errors: str = "strict") -> Table:
    """A CSV (``kind`` "csv") or TSV file: the first non-blank row names the columns, every other
    non-blank row is a row of cells (quoted cells may hold the delimiter, line breaks and quotes).
    A row shorter than the header is padded with empty cells (as pandas reads it); a longer one is
    refused unless its extra cells are empty (a trailing delimiter). A file whose header and first
    row are one cell each, split alike by the other delimiter, is refused as read with the wrong
    one."""
    text = _read_text(path, errors)
    # Quoted cells in TSV too, as pandas reads them and R, pandas, Excel and Python's csv write
    # them (a cell holding a tab, a line break or a quote); strict: a stray quote is an error, not
    # a cell that swallows the rows after it.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=",\t"[kind == "tsv"], strict=True)
    try:
        rows = [(n, row) for n, row in enumerate(reader, 1) if any(c.strip() for c in row)]
    except csv.Error as e:
        raise ConfigError(
            f"{path}:{reader.line_num} is not a readable {kind.upper()} table ({e}): a cell that "
            'starts with a quote must end with one (write a quote inside it as ""); fix the file'
        ) from None
    if len(rows) < 2:
        raise ConfigError(
            f"{path} holds {'only a header row' if rows else 'no rows'}: a table needs its column "
            "names in the first row and at least one row of cells; remove the file or add rows"
        )
    (_, header), *body = rows
    other = "\t" if kind == "csv" else ","
    first = body[0][1] if body else []
    cells = header[0].count(other) + 1 if len(header) == 1 else 1
    if cells > 1 and len(first) == 1 and first[0].count(other) + 1 == cells:
        raise ConfigError(
            f"{path}: the first row is one column name holding "
            f"{'tabs' if other == chr(9) else 'commas'} ({header[0][:40]!r}): is it a "
            f"{'TSV' if kind == 'csv' else 'CSV'} file? set data.format="
            f"{'tsv' if kind == 'csv' else 'csv'} (or name it .{'tsv' if kind == 'csv' else 'csv'})"
        )
    width = len(header)
    out = []
    for n, row in body:
        if len(row) > width and any(cell.strip() for cell in row[width:]):
            raise ConfigError(
                f"{path}: row {n} has {len(row)} cells, the header {width} column names; fix the "
                f"row or name every column in the first row"
                + (
                    " (is it a TSV file? set data.format=tsv)"
                    if kind == "csv" and "\t" in text
                    else ""
                )
            )
        out.append(tuple(row[:width]) + ("",) * (width - len(row)))
    return Table(tuple(header), out, path)


def _jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL file: split on "\\n" only (a "\\r" before it dropped), as JSON Lines
    defines them. ``str.splitlines`` would also split on U+2028, U+2029 and U+0085, which
    ``json.dumps(ensure_ascii=False)`` leaves unescaped inside strings, and refuse valid files."""
    return [line.removesuffix("\r") for line in text.split("\n")]


_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may escape them; UTF-8 cannot hold them


def text_fields(field) -> str | tuple[str, str]:
    """``data.text_field``: one field name, or a list of two (parallel text: each row a pair of
    translations, a document of two parts); a dotted name reaches into nested objects
    ("translation.en")."""
    field = _plain(field)
    if isinstance(field, str) and field:
        return field
    if (
        isinstance(field, list | tuple)
        and len(field) == 2
        and all(isinstance(f, str) and f for f in field)
    ):
        if field[0] == field[1]:
            raise ConfigError(f"data.text_field={list(field)!r} names one field twice")
        return tuple(field)
    raise ConfigError(
        f"data.text_field={field!r} must be a field name, or a list of two for parallel text "
        "(e.g. data.text_field=[en,fr], or [translation.en,translation.fr] for nested rows)"
    )


def plain_texts(texts: Iterable[str | tuple[str, ...]]) -> Iterator[str]:
    """Every text of ``texts``, a parallel document's (or a table chunk's) parts one by one (to
    train a tokenizer)."""
    for text in texts:
        yield from (p for p in text if p) if isinstance(text, tuple) else (text,)


def _jsonl_text(
    line: str, path: str, n: int, field: str | tuple[str, ...], errors: str = "strict"
) -> str | tuple[str, ...]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}:{n} is not valid JSON ({e.msg}); fix or remove the line"
        ) from None
    if isinstance(field, tuple):
        return tuple(_field_text(obj, f, path, n, errors) for f in field)
    return _field_text(obj, field, path, n, errors)


def _field_text(obj, field: str, path: str, n: int, errors: str) -> str:
    """The string at ``field`` of one JSONL row: the key itself, else a dotted path through nested
    objects."""
    text = obj.get(field) if isinstance(obj, dict) else None
    if text is None:
        text = obj
        for key in field.split("."):
            text = text.get(key) if isinstance(text, dict) else None
    if text is not None and not isinstance(text, str):
        raise ConfigError(
            f"{path}:{n}: field {field!r} is {text!r:.40} ({type(text).__name__}), not text; set "
            "data.text_field to the field that holds the text"
        )
    if text is None:
        raise ConfigError(
            f"{path}:{n} has no string field {field!r}; set data.text_field to the field that "
            "holds the text"
        )
    bad = _SURROGATE.search(text)
    if bad and errors == "strict":
        raise ConfigError(
            f"{path}:{n} holds a lone UTF-16 surrogate ({bad.group()!a} "
            f"at character {bad.start()} of {field!r}), which is not text; fix the line, or set "
            "data.encoding_errors=replace (or ignore) to replace (or drop) such characters"
        )
    return _SURROGATE.sub("\ufffd" if errors == "replace" else "", text) if bad else text


Files = dict[Path, tuple[str, str]]  # resolved file -> (path as the glob found it, name)
_MAGIC = re.compile(r"[*?[]")  # the characters that make a path component a glob (as in glob)


def _glob_base(pattern: str) -> Path:
    """The folder a glob's matches are named from: its components before the first wildcard, or a
    plain path's folder."""
    parts = Path(pattern).parts
    k = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), None)
    return Path(*parts[:k]) if k is not None else Path(pattern).parent


def _expand(spec, what: str) -> Files:
    """Resolve a glob or a list of globs/paths into {resolved file: (path as found, name)}, sorted
    per pattern, each file once however often or however spelled it is matched.

    ``name`` is the file's path relative to its pattern's base folder (:func:`_glob_base`), so it is
    the same for ``data/*.txt``, ``./data/*.txt`` and ``/abs/data/*.txt`` (see :attr:`Doc.key`).
    """
    if spec is None:
        return {}
    patterns = [spec] if isinstance(spec, str) else list(spec)
    files: Files = {}
    for pat in patterns:
        pat = str(Path(pat).expanduser())
        hits = sorted(p for p in globlib.glob(pat, recursive=True) if Path(p).is_file())
        if not hits and Path(pat).is_dir():
            raise ConfigError(
                f"{what}={pat!r} is a folder: name its files, e.g. {what}='{pat.rstrip('/')}/*.txt' "
                f"(or '{pat.rstrip('/')}/**/*.jsonl' for subfolders too)"
            )
        if not hits:
            raise ConfigError(
                f"{what}={pat!r} matched no files (relative paths start from {Path.cwd()}); "
                "check the path or glob"
            )
        base = _glob_base(pat)
        for hit in hits:
            files.setdefault(Path(hit).resolve(), (hit, Path(hit).relative_to(base).as_posix()))
    return files


def _without_val(train: Files, val: Files) -> Files:
    """``train`` less the files that are also validation files.

    Left out with a warning rather than refused: a glob cannot say "all but one file", so
    ``data.train='data/*.jsonl' data.val=data/val.jsonl`` can only mean "train on the others", and
    refusing it would make users list every training file by hand.
    """
    both = [train[p][0] for p in train if p in val]
    if not both:
        return train
    if len(both) == len(train):
        raise ConfigError(
            "every file that data.train matches is also a data.val file, so nothing is left to "
            "train on; point data.train at the training files (or leave data.val unset to hold "
            "out data.val_fraction of the data.train documents)"
        )
    if rank_zero_only.rank == 0:
        log.warning(
            "%d file(s) matched by data.train are data.val files and are left out of training: %s",
            len(both),
            ", ".join(both[:5]) + (", ..." if len(both) > 5 else ""),
        )
    return {p: f for p, f in train.items() if p not in val}


TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv"}


def file_kind(path: str, fmt: str) -> str:
    """How ``data.format`` (auto: by the extension) reads a file: text, jsonl, csv or tsv."""
    if fmt != "auto":
        return fmt
    if path.endswith((".jsonl", ".json")):
        return "jsonl"
    return TABLE_SUFFIXES.get(Path(path).suffix.lower(), "text")


def _documents(
    files: Files, fmt: str, errors: str, field: str | tuple[str, ...] = "text"
) -> list[Doc]:
    docs: list[Doc] = []
    for f, name in files.values():
        kind = file_kind(f, fmt)
        if kind in ("csv", "tsv") and isinstance(field, tuple):
            raise ConfigError(
                f"data.text_field={list(field)!r} names two fields (parallel text), but {f} is "
                "read as a table; use JSONL files for pairs, or one text field"
            )
        if kind == "text" and isinstance(field, tuple):
            raise ConfigError(
                f"data.text_field={list(field)!r} names two fields (parallel text), which only "
                f"JSONL rows have, but {f} is read as plain text; use .jsonl files (or "
                "data.format=jsonl), or one text field"
            )
        if kind == "jsonl":
            lines = _jsonl_lines(_read_text(f, errors))
            docs.extend(Doc(f, line=n, name=name) for n, s in enumerate(lines, 1) if s.strip())
        elif kind == "text":
            docs.append(Doc(f, name=name))
        elif kind in ("csv", "tsv"):
            docs.append(Doc(f, name=name, table=kind))
        else:
            raise ConfigError(f"unknown data.format={fmt!r}; choose auto, text, jsonl, csv or tsv")
    return docs


def split_documents(docs: list[Doc], val_fraction: float) -> tuple[list[Doc], list[Doc]]:
    """Deterministic split: the ``ceil``-rounded fraction of documents with the smallest key hash."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) == 1:
        (d,) = docs
        return [d.with_part("head")], [d.with_part("tail")]
    n_val = min(len(docs) - 1, max(1, math.ceil(round(val_fraction * len(docs), 6))))
    ranked = sorted(docs, key=lambda d: hashlib.sha1(d.key.encode()).hexdigest())
    val = set(ranked[:n_val])
    return [d for d in docs if d not in val], [d for d in docs if d in val]


# The settings of the data group: the loader's (every source) and each source's own.
LOADER_SETTINGS = ("name", "source", "batch_size", "eval_batch_size", "num_workers")
SOURCE_SETTINGS = {
    "bundled": ("val_fraction",),
    "files": (
        "train",
        "val",
        "val_fraction",
        "format",
        "text_field",
        "encoding_errors",
        "table_rows",
    ),
    "hf": (
        "path",
        "subset",
        "data_files",
        "revision",
        "cache_dir",
        "streaming",
        "split",
        "val_split",
        "val_fraction",
        "max_documents",
        "text_field",
    ),
}


def check_data(cfg, sizes: bool = True) -> None:
    """The data group's keys and (with ``sizes``) loader sizes, before any work: a misspelt or
    made-up key (``data.eval_batchsize``) would otherwise be ignored without a word."""
    source = cfg.get("source")
    if source is None:  # keys given without a data option (+data.val=... alone)
        raise ConfigError(
            "data settings without a data option: add one, e.g. data=files data.val='held_out/*.txt'"
            f" (options: {', '.join(sorted(p.stem for p in (CONF_DIR / 'data').glob('*.yaml')))})"
        )
    if source not in SOURCE_SETTINGS:
        raise ConfigError(f"unknown data.source={source!r}; choose {', '.join(SOURCE_SETTINGS)}")
    known = LOADER_SETTINGS + SOURCE_SETTINGS[source]
    refuse_unknown_keys("data", cfg, known, of=f"data={cfg.get('name')} (source {source})")
    if not sizes:
        return
    for key, least in (("batch_size", 1), ("eval_batch_size", 1), ("num_workers", 0)):
        value = cfg.get(key)
        if key == "eval_batch_size" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"data.{key}={value!r} must be a whole number >= {least}")


def make_corpus(cfg, need_train: bool = True):
    """Build the corpus described by the ``data`` config group (validated, nothing tokenized yet):
    a :class:`Corpus` of files, or for ``data.source=hf`` an :class:`lmlab.data.hf.HFCorpus`.

    ``need_train=False`` (evaluation) accepts ``data=files`` with only ``data.val``.
    """
    if cfg.source == "hf":
        from lmlab.data.hf import HFCorpus  # imports datasets, an optional dependency

        return HFCorpus(cfg, need_train)
    errors = cfg.get("encoding_errors", "strict")
    if errors not in ("strict", "replace", "ignore"):
        raise ConfigError(f"data.encoding_errors must be strict, replace or ignore, got {errors!r}")
    fmt = cfg.get("format", "auto")
    field = text_fields(cfg.get("text_field", "text"))
    table_rows = cfg.get("table_rows", 3)
    if isinstance(table_rows, bool) or not isinstance(table_rows, int) or table_rows < 1:
        raise ConfigError(
            f"data.table_rows={table_rows!r} must be a whole number >= 1 (rows of a table per "
            "document of the token store)"
        )
    if cfg.source == "bundled":
        if cfg.name not in BUNDLED:
            raise ConfigError(f"no bundled corpus {cfg.name!r}; bundled: {', '.join(BUNDLED)}")
        path = str(BUNDLED[cfg.name])
        # named by the archive, not its path: the split is the same wherever lmlab is installed
        docs = [Doc(path, member=m, name=BUNDLED[cfg.name].name) for m in _bundled_members(path)]
        train, val = split_documents(docs, cfg.val_fraction)
    elif cfg.source == "files" and not need_train and cfg.get("val"):
        train, val = [], _documents(_expand(cfg.val, "data.val"), fmt, errors, field)
    elif cfg.source == "files":
        if not cfg.get("train"):
            raise ConfigError(
                "data=files needs data.train='<glob or list of files>'"
                if need_train
                else "data=files needs data.val='<glob or list of files>' to evaluate on"
            )
        train_files = _expand(cfg.train, "data.train")
        if cfg.get("val"):
            val_files = _expand(cfg.val, "data.val")
            train = _documents(_without_val(train_files, val_files), fmt, errors, field)
            val = _documents(val_files, fmt, errors, field)
        else:
            docs = _documents(train_files, fmt, errors, field)
            if isinstance(field, tuple) and len(docs) == 1:  # half a pair is no pair
                raise ConfigError(
                    f"parallel text (data.text_field={list(field)!r}) needs two rows or more to "
                    "hold some out for validation; the files have one: add rows, or name "
                    "validation files with data.val"
                )
            train, val = split_documents(docs, cfg.val_fraction)
    else:
        raise ConfigError(
            f"unknown data.source={cfg.source!r}; choose {', '.join(SOURCE_SETTINGS)}"
        )
    docs = train + val
    if any(d.table for d in docs) and not all(d.table for d in docs):
        tables = len({d.path for d in docs if d.table})
        texts = len({d.path for d in docs if not d.table})
        raise ConfigError(
            f"the data files mix tables (.csv / .tsv: {tables} file{'s' * (tables != 1)}) with "
            f"text ({texts} file{'s' * (texts != 1)}), which the objectives read differently; "
            "give one kind (or data.format=text to read the tables as plain text)"
        )
    return Corpus(cfg.name, train, val, field, errors, cfg.get("val_fraction", 0.0), table_rows)


def _plain(value):
    """An OmegaConf list as a Python list (other values as they are)."""
    from omegaconf import ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
