"""Token store: a corpus split tokenized once into a flat memmap of token ids plus document offsets.

Layout of one store (a folder named by the cache key):
  tokens.bin   uint16 (vocab <= 65536) or uint32 token ids, every document followed by eos
  offsets.npy  int64 (n_docs + 1,): document d spans tokens[offsets[d]:offsets[d+1]] (its eos included)
  meta.json    dtype, counts, UTF-8 byte count of the text, parts per document (2: parallel text,
               each document "src <sep> tgt <eos>"; 0: tables, each document some rows of one,
               "name <sep> values <sep> name <sep> values ... <eos>", lmlab.data.corpus.TableChunk),
               the key's ingredients

The key hashes (documents' identities, sizes and mtimes; the tokenizer; the settings), so a changed file or
tokenizer builds a new store and an unchanged one is reused. A store is written into a temporary folder
and renamed into place, so a crashed build never leaves a half-written store that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lmlab.data.corpus import TableChunk
from lmlab.data.tokenizers import TextTokenizer
from lmlab.errors import ConfigError
from lmlab.paths import file_lock

log = logging.getLogger(__name__)

# 2: long documents are cut into pieces only for tokenizers that encode them exactly so (1 cut them
# for every tokenizer, which put a "▁" at every piece's start with SentencePiece-style ones);
# 3: not after a blank line, "\r\n" or " \n" (a merge such as GPT-2's "ĊĊ" gave other ids there);
# 4: whitespace-only documents skipped (data=files kept a JSONL row {"text": ""} as an eos-only
# document, and a split of such rows scored bits per byte over 0 bytes); also rebuilds the stores
# read before a leading byte-order mark was dropped
STORE_VERSION = 4
CHUNK_CHARS = 1 << 20  # long documents are encoded in ~1 MB pieces so every core gets work
BATCH_CHARS = 8 << 20  # texts handed to the tokenizer's parallel batch encoder at once
TABLE_PARTS = 0  # TokenStore.parts of a store of tables (documents of as many parts as columns x 2)


@dataclass
class TokenStore:
    path: Path
    tokens: np.ndarray  # memmap, (n_tokens,)
    offsets: np.ndarray  # (n_docs + 1,)
    n_bytes: int  # UTF-8 bytes of the text (eos excluded)
    docs_id: str | None = None  # which documents it holds (Corpus.identity), set by prepare_data
    parts: int = 1  # texts per document, joined by sep: 2 for parallel text (translation pairs),
    # TABLE_PARTS (0) for tables (a column's name, then its values, for each column)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def byte_scale(self, token_bytes: np.ndarray, chunk: int = 1 << 24) -> float:
        """The text's UTF-8 bytes over the bytes its tokens count (``token_bytes``, per id): 1.0
        when the pieces spell the text exactly (byte-level BPE, the byte tokenizer); above 1 when
        they drop bytes (WordPiece pieces hold no spaces; normalizers strip accents). Bits per byte
        divide by the counted bytes times this, so over a whole split they divide by the text's
        bytes whatever the tokenizer. Counted in chunks (a histogram of ids): no copy of the
        store in memory."""
        counts = np.zeros(len(token_bytes), dtype=np.int64)
        for i in range(0, len(self.tokens), chunk):
            counts += np.bincount(self.tokens[i : i + chunk], minlength=len(token_bytes))
        counted = int(counts @ token_bytes.astype(np.int64))
        return self.n_bytes / counted if counted else 1.0

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenStore:
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        tokens = np.memmap(path / "tokens.bin", dtype=meta["dtype"], mode="r")
        offsets = np.load(path / "offsets.npy")
        return cls(path, tokens, offsets, meta["n_bytes"], parts=meta.get("parts", 1))


def store_key(doc_fingerprint: str, tokenizer: TextTokenizer) -> str:
    return hashlib.sha256(
        f"v{STORE_VERSION}|{doc_fingerprint}|{tokenizer.fingerprint}|eos".encode()
    ).hexdigest()[:20]


def _pieces(text: str) -> list[str]:
    """Cut a long text after line ends between two non-space characters ("x\ny" -> "x\n", "y").

    With the GPT-2 pre-tokenizer regex a pre-token never spans such a boundary, so encoding the pieces
    separately gives exactly the ids of encoding the whole text. (Not after "\n\n", "\r\n" or
    " \n": at the end of a piece those are one pre-token, in the whole text two, and a vocabulary
    with a merge for them, as GPT-2's "ĊĊ", would give other ids.) Only for tokenizers where that
    holds (:attr:`TextTokenizer.encodes_lines_apart`); :func:`_encode_stream` encodes others whole.
    """
    if len(text) <= CHUNK_CHARS:
        return [text]
    out, start = [], 0
    while len(text) - start > CHUNK_CHARS:
        cut = start + CHUNK_CHARS
        while cut < len(text) and not (
            text[cut - 1] == "\n" and not text[cut - 2].isspace() and not text[cut].isspace()
        ):
            cut += 1
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return [p for p in out if p]


def _encode_stream(
    texts: Iterable[str | tuple[str, ...]], tokenizer: TextTokenizer, total_bytes: int | None
) -> Iterator[tuple[np.ndarray, int, int]]:
    """Yield (ids of one document with eos appended, UTF-8 bytes of that document, its parts: 1,
    2 for a translation pair, TABLE_PARTS for some rows of a table); documents of
    whitespace only are skipped (as data=hf skips blank rows): they hold nothing to learn or score.
    A document of several parts (a tuple: parallel text, a :class:`TableChunk`) is its parts' ids
    joined by sep; a pair with a blank part is skipped (half a pair is no translation), with a
    warning; a table chunk keeps its blank parts (a column without a name or without values: the
    separators say which part is which), unless every part is blank.

    Parallel text and tables need a tokenizer whose sep and eos differ (a pretrained BERT-style file
    has one "[SEP]" for both): a pair's halves (a table's columns) would read as separate documents;
    refused.

    Text never yields a special id: the added-token matcher is off for corpora, but a model may hold
    a special token as one of its own pieces (a SentencePiece Unigram file's "</s>", "<pad>") and
    pick it for text that spells it, a document end or pad inside a document. Such ids are stored
    as the model's unknown token (dropped where it has none), with a warning."""
    sep, eos = np.array([tokenizer.sep_id]), np.array([tokenizer.eos_id])
    unk = tokenizer.unk_id
    special = np.zeros(tokenizer.vocab_size, dtype=bool)
    special[tokenizer.special_ids] = True
    if unk is not None:
        special[unk] = False  # the model's own answer for unknown text
    forged: Counter[int] = Counter()
    # Cutting is only for speed (the batch encoder spreads pieces over the cores): never at the
    # price of different ids.
    cut = _pieces if tokenizer.encodes_lines_apart else lambda text: [text]
    # (bytes, each part's pieces, whether a table chunk) per document
    batch: list[tuple[int, list[list[str]], bool]] = []
    size = 0
    bar = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        disable=total_bytes is not None and total_bytes < 32 << 20,  # None: unknown, maybe large
    )

    def part_ids(chunks: list[list[int]]) -> np.ndarray:
        ids = np.asarray([t for chunk in chunks for t in chunk], dtype=np.int64)
        hit = special[ids]
        if hit.any():
            forged.update(ids[hit].tolist())
            ids = ids[~hit] if unk is None else np.where(hit, unk, ids)
        return ids

    def flush():
        flat = [p for _, parts, _ in batch for ps in parts for p in ps]
        ids = tokenizer.encode_batch(flat)
        i = 0
        for nbytes, parts, table in batch:
            doc = []
            for ps in parts:
                doc += [part_ids(ids[i : i + len(ps)]), sep]
                i += len(ps)
            doc[-1] = eos  # the last part's sep
            bar.update(nbytes)
            yield np.concatenate(doc), nbytes, TABLE_PARTS if table else len(parts)

    half_blank = 0
    for text in texts:
        parts = text if isinstance(text, tuple) else (text,)
        table = isinstance(text, TableChunk)
        if (len(parts) > 1 or table) and tokenizer.sep_id == tokenizer.eos_id:
            what = "tables" if table else "parallel text"
            raise ConfigError(
                f"{what} needs a tokenizer whose sep and eos tokens differ, but this one "
                f"has {tokenizer.tk.id_to_token(tokenizer.eos_id)!r} for both ("
                f"{'columns' if table else 'pairs'} would read as separate documents); use "
                "tokenizer=bpe or tokenizer=byte, or a tokenizer.json with its own separator token"
            )
        blank = [not p.strip() for p in parts]
        # (a table's blank parts are stored as no tokens: their bytes are not counted either)
        nbytes = sum(len(p.encode("utf-8")) for p, b in zip(parts, blank, strict=True) if not b)
        if all(blank) or (any(blank) and not table):
            half_blank += not all(blank)
            bar.update(nbytes)
            continue
        # a blank part of a table is encoded as no tokens (a lone space would give one)
        batch.append((nbytes, [cut(p) if p.strip() else [] for p in parts], table))
        size += sum(map(len, parts))
        if size >= BATCH_CHARS:
            yield from flush()
            batch, size = [], 0
    if batch:
        yield from flush()
    bar.close()
    if half_blank:
        one = half_blank == 1
        log.warning(
            "%d parallel %s with a blank side %s skipped",
            half_blank,
            "row" if one else "rows",
            "was" if one else "were",
        )
    if forged:
        log.warning(
            "the text spells special tokens that the tokenizer's model encodes as themselves (%s); "
            "stored as %s, so the text cannot forge document ends, pads or masks",
            ", ".join(f"{tokenizer.tk.id_to_token(i)!r} x{n}" for i, n in forged.most_common(5)),
            "its unknown token" if unk is not None else "nothing (the model has no unknown token)",
        )


def build_store(
    texts: Iterable[str],
    tokenizer: TextTokenizer,
    cache_dir: str | os.PathLike,
    key: str,
    *,
    total_bytes: int | None = 0,
    label: str = "",
) -> TokenStore:
    """Return the store for ``key``, tokenizing ``texts`` only when it is not cached yet.

    ``total_bytes``, the texts' approximate size, sets the progress bar: shown from 32 MB, and
    when it is None (unknown: a streamed dataset); the default 0 shows none. Processes that ask
    for the same store at once (the ranks of a ``torchrun`` / SLURM launch, each preparing the
    data) build it once: the first holds a lock while it tokenizes, the others wait and open it."""
    root = Path(cache_dir) / "stores"
    final = root / key
    if (final / "meta.json").is_file():
        log.info("Token store %s: cached %s", label, final)
        return TokenStore.open(final)
    refused = root / f".{key}.empty"  # a build that found no text, for the processes waiting
    what = f"token store {key}" + (f" ({label})" if label else "") + " built"
    with file_lock(root / f".{key}.lock", what):
        if (final / "meta.json").is_file():
            log.info("Token store %s: built by another process, %s", label, final)
            return TokenStore.open(final)
        if refused.is_file():  # the key hashes the data: another read would find none again
            raise EmptySplit(refused.read_text())
        try:
            _build(texts, tokenizer, root, key, total_bytes, label)
        except EmptySplit as e:
            tmp = refused.with_name(f"{refused.name}.{os.getpid()}.tmp")
            tmp.write_text(str(e))
            os.replace(tmp, refused)
            raise
    return TokenStore.open(final)


class EmptySplit(ConfigError):
    """A split without any text: refused, and remembered under its key, not cached as a store."""


def _build(texts, tokenizer, root: Path, key: str, total_bytes, label: str) -> None:
    """Tokenize ``texts`` into ``root/key``: written in a temporary folder, renamed into place."""
    final = root / key
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    offsets, n_tokens, n_bytes, parts = [0], 0, 0, 1
    try:
        with open(tmp / "tokens.bin", "wb") as f:
            for ids, nbytes, doc_parts in _encode_stream(texts, tokenizer, total_bytes):
                f.write(ids.astype(dtype).tobytes())
                parts = doc_parts  # the same for every document of a corpus
                n_tokens += len(ids)
                n_bytes += nbytes
                offsets.append(n_tokens)
        if n_tokens == 0:  # refused, not cached: every later run would open an empty store
            raise EmptySplit(
                f"the {label or key} split has no text: no document was selected, or every one was "
                "blank; check the data settings (with data=hf: raise data.val_fraction or "
                "data.max_documents, or name a data.val_split)"
            )
        np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
        meta = {
            "version": STORE_VERSION,
            "dtype": np.dtype(dtype).name,
            "n_tokens": n_tokens,
            "n_docs": len(offsets) - 1,
            "n_bytes": n_bytes,
            "parts": parts,
            "tokenizer": tokenizer.fingerprint,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "Token store %s: %d documents, %d tokens, %.2f bytes/token -> %s",
        label,
        len(offsets) - 1,
        n_tokens,
        n_bytes / max(n_tokens, 1),
        final,
    )
