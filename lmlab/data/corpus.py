"""Where text comes from: the bundled Shakespeare corpus or the user's own files (plain text, JSONL).

A corpus is a list of documents, split deterministically into train and validation *by document*, so no
validation text is ever trained on. Every problem with the input (a glob that matches nothing, an empty,
binary or wrongly encoded file, a bad JSONL line) is a :class:`ConfigError` naming the file and the fix.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import math
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lmlab.errors import ConfigError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED = {"shakespeare": ASSETS / "shakespeare.tar.xz"}


@dataclass(frozen=True)
class Doc:
    """One document: a whole file, one JSONL line, a bundled member, or the head/tail of one file."""

    path: str
    line: int | None = None  # 1-based JSONL line
    member: str | None = None  # member of a bundled archive
    part: str | None = None  # "head" / "tail" when a lone document is split for validation

    @property
    def key(self) -> str:
        return ":".join(str(x) for x in (self.path, self.member, self.line, self.part) if x)


@dataclass
class Corpus:
    name: str
    train: list[Doc]
    val: list[Doc]
    text_field: str = "text"
    encoding_errors: str = "strict"
    val_fraction: float = 0.0  # used to cut a lone document into head (train) and tail (val)

    def fingerprint(self, docs: Sequence[Doc]) -> str:
        """Changes when any document's identity, size or modification time changes."""
        h = hashlib.sha256(f"{self.text_field}|{self.encoding_errors}|{self.val_fraction}".encode())
        for d in docs:
            st = Path(d.path).stat()
            h.update(f"{d.key}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def texts(self, docs: Sequence[Doc]) -> Iterator[str]:
        """Yield each document's text, reading every file once."""
        i = 0
        while i < len(docs):
            j = i
            while j < len(docs) and docs[j].path == docs[i].path:
                j += 1
            yield from self._file_texts(docs[i:j])
            i = j

    def _file_texts(self, docs: Sequence[Doc]) -> Iterator[str]:
        path = docs[0].path
        if docs[0].member is not None:
            members = _bundled_members(path)
            yield from (members[d.member] for d in docs)
        elif docs[0].line is not None:
            wanted = {d.line for d in docs}
            for n, line in enumerate(_read_text(path, self.encoding_errors).splitlines(), 1):
                if n in wanted:
                    yield _jsonl_text(line, path, n, self.text_field)
        else:
            for d in docs:
                text = _read_text(path, self.encoding_errors)
                if d.part is not None:
                    cut = _cut_point(text, 1 - self.val_fraction)
                    text = text[:cut] if d.part == "head" else text[cut:]
                yield text


def _cut_point(text: str, frac: float) -> int:
    """Index of the first line start at or after ``frac`` of the text."""
    at = int(len(text) * frac)
    nl = text.find("\n", at)
    return len(text) if nl < 0 else nl + 1


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
            f"{path} looks binary (it contains NUL bytes): give plain UTF-8 text or JSONL files"
        )
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r}); convert it, "
            "or set data.encoding_errors=replace to replace the bad bytes"
        ) from None


def _jsonl_text(line: str, path: str, n: int, field: str) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}:{n} is not valid JSON ({e.msg}); fix or remove the line"
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        raise ConfigError(
            f"{path}:{n} has no string field {field!r}; set data.text_field to the field that "
            "holds the text"
        )
    return obj[field]


def _expand(spec, what: str) -> list[str]:
    """Resolve a glob or a list of globs/paths into a sorted list of files."""
    if spec is None:
        return []
    patterns = [spec] if isinstance(spec, str) else list(spec)
    files: list[str] = []
    for pat in patterns:
        pat = str(Path(pat).expanduser())
        hits = sorted(p for p in globlib.glob(pat, recursive=True) if Path(p).is_file())
        if not hits:
            raise ConfigError(
                f"{what}={pat!r} matched no files (relative paths start from {Path.cwd()}); "
                "check the path or glob"
            )
        files.extend(hits)
    return list(dict.fromkeys(files))


def _documents(files: list[str], fmt: str, errors: str) -> list[Doc]:
    docs: list[Doc] = []
    for f in files:
        kind = fmt if fmt != "auto" else ("jsonl" if f.endswith((".jsonl", ".json")) else "text")
        if kind == "jsonl":
            lines = _read_text(f, errors).splitlines()
            docs.extend(Doc(f, line=n) for n, s in enumerate(lines, 1) if s.strip())
        elif kind == "text":
            docs.append(Doc(f))
        else:
            raise ConfigError(f"unknown data.format={fmt!r}; choose auto, text or jsonl")
    return docs


def split_documents(docs: list[Doc], val_fraction: float) -> tuple[list[Doc], list[Doc]]:
    """Deterministic split: the ``ceil``-rounded fraction of documents with the smallest key hash."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) == 1:
        (d,) = docs
        return [Doc(d.path, d.line, d.member, "head")], [Doc(d.path, d.line, d.member, "tail")]
    n_val = min(len(docs) - 1, max(1, math.ceil(round(val_fraction * len(docs), 6))))
    ranked = sorted(docs, key=lambda d: hashlib.sha1(d.key.encode()).hexdigest())
    val = set(ranked[:n_val])
    return [d for d in docs if d not in val], [d for d in docs if d in val]


def make_corpus(cfg, need_train: bool = True) -> Corpus:
    """Build the corpus described by the ``data`` config group (validated, nothing tokenized yet).

    ``need_train=False`` (evaluation) accepts ``data=files`` with only ``data.val``.
    """
    errors = cfg.get("encoding_errors", "strict")
    if errors not in ("strict", "replace", "ignore"):
        raise ConfigError(f"data.encoding_errors must be strict, replace or ignore, got {errors!r}")
    fmt, field = cfg.get("format", "auto"), cfg.get("text_field", "text")
    if cfg.source == "bundled":
        if cfg.name not in BUNDLED:
            raise ConfigError(f"no bundled corpus {cfg.name!r}; bundled: {', '.join(BUNDLED)}")
        path = str(BUNDLED[cfg.name])
        docs = [Doc(path, member=m) for m in _bundled_members(path)]
        train, val = split_documents(docs, cfg.val_fraction)
    elif cfg.source == "files" and not need_train and cfg.get("val"):
        train, val = [], _documents(_expand(cfg.val, "data.val"), fmt, errors)
    elif cfg.source == "files":
        if not cfg.get("train"):
            raise ConfigError("data=files needs data.train='<glob or list of files>'")
        train = _documents(_expand(cfg.train, "data.train"), fmt, errors)
        if cfg.get("val"):
            val = _documents(_expand(cfg.val, "data.val"), fmt, errors)
        else:
            train, val = split_documents(train, cfg.val_fraction)
    else:
        raise ConfigError(f"unknown data.source={cfg.source!r}; choose bundled or files")
    return Corpus(cfg.name, train, val, field, errors, cfg.get("val_fraction", 0.0))
