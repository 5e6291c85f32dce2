"""Masked column prediction (TaBERT: Yin et al., 2020, "TaBERT: Pretraining for Joint Understanding
of Textual and Tabular Data", sec. 3.2) for encoders: ``masked`` batches.

Tables come from CSV / TSV files (``data=files data.train='tables/*.csv'``, the first row the
column names; :mod:`lmlab.data.corpus`): each document of the token store is ``data.table_rows``
consecutive rows of one table, linearised column by column as TaBERT does, ``name <sep> values <sep>
name <sep> values ... <eos>``, a column's values being its cells in those rows joined by " ; ".

An example is a run of a document's consecutive whole columns, as many as fit in ``seq_len - 2``
tokens (a longer column alone, cut), between cls and sep, padded: each document's columns are packed
in their order, so every column of every document is in one example, and the samplers draw every
example once per epoch (but for fewer than one optimizer step's worth, as windows). Of its columns
with a name, each is chosen with probability ``column_prob`` (35%, TaBERT's share), at least one,
and with it every column of the example of the same name (a duplicate would give it away); every
token of a chosen column's name becomes the mask token and is the target, so the model names the
column from its values and the other columns. Nothing else is masked or scored: the loss,
perplexity, bits per byte and accuracy are those of the column names alone.

Differences from TaBERT: it masks exactly 35% of a table's columns (here each one by chance), also
the column's type (CSV cells state none), with BERT's 80/10/10 replacement (here the mask token
always), and trains MLM on the text its tables come with (tables alone have none; objective=mlm
on the same files trains MLM on the tables' text). It takes one snapshot of K rows per table per
example; here every chunk of ``data.table_rows`` rows is a document, so a table weighs in training
as its row count (a table of 10,000 rows as much as 1,000 tables of 10). As in TaBERT, the number
of mask tokens is the name's token count.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import Dataset

from lmlab.data.base import Example, TokenSpans, WindowDataModule, example_rng
from lmlab.data.collate import IGNORE
from lmlab.data.mlm import cls_sep_rows
from lmlab.data.store import TokenStore
from lmlab.errors import ConfigError


def column_spans(tokens: np.ndarray, sep: int) -> list[tuple[int, int, int, int]]:
    """(name start, name end, values start, values end) of each column of a linearised table
    (``name sep values sep name sep values``, without its eos), as positions in ``tokens``; a
    last column cut before its values has an empty values span at the end."""
    cuts = np.flatnonzero(tokens == sep).tolist()
    bounds = list(zip([-1, *cuts], [*cuts, len(tokens)], strict=True))
    spans = []
    for i in range(0, len(bounds), 2):
        a, b = bounds[i]
        c, d = bounds[i + 1] if i + 1 < len(bounds) else (len(tokens) - 1, len(tokens))
        spans.append((a + 1, b, c + 1, d))
    return spans


def column_groups(store: TokenStore, sep: int, room: int, chunk: int = 1 << 24) -> np.ndarray:
    """(G, 2) int64 token spans ``[start, end)`` of the store's examples: each document's columns
    (its eos left out) packed greedily, in their order, into runs of whole columns of at most
    ``room`` tokens; a longer column alone (cut when arranged). Every column is in one span."""
    tokens = store.tokens
    seps = np.concatenate(
        [np.flatnonzero(tokens[i : i + chunk] == sep) + i for i in range(0, len(tokens), chunk)]
        or [np.zeros(0, dtype=np.int64)]
    )
    spans = []
    for d in range(store.n_docs):
        a, b = int(store.offsets[d]), int(store.offsets[d + 1]) - 1  # b: the document's eos
        inner = seps[np.searchsorted(seps, a) : np.searchsorted(seps, b)]
        # a document of n columns has 2n - 1 seps; every second one ends a column's values
        starts = np.append(a, inner[1::2] + 1).tolist()
        ends = np.append(inner[1::2], b).tolist()
        s = 0
        while s < len(starts):
            e = s
            while e + 1 < len(starts) and ends[e + 1] - starts[s] <= room:
                e += 1
            spans.append((starts[s], ends[e]))
            s = e + 1
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


class MaskedColumnDataModule(WindowDataModule):
    objective, batch_kind = "mcp", "masked"
    tables = True  # lmlab.train refuses text data before any work

    def __init__(
        self, tokenizer, train, val, *, seq_len: int, column_prob: float = 0.35, **kwargs
    ) -> None:
        self.check_settings(seq_len=seq_len, column_prob=column_prob)
        self.column_prob = column_prob
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)

    @classmethod
    def check_settings(cls, *, seq_len: int, column_prob: float = 0.35, **rest) -> None:
        if seq_len < 4:
            raise ConfigError(
                f"objective=mcp needs seq_len >= 4 (cls, a column name, sep, sep), got {seq_len}; "
                "raise seq_len"
            )
        if isinstance(column_prob, bool) or not (
            isinstance(column_prob, int | float) and 0 < column_prob <= 1
        ):
            raise ConfigError(
                f"objective.column_prob={column_prob!r} must be in (0, 1] (the chance that a "
                "named column's name is masked; at least one per example is)"
            )
        super().check_settings(**rest)

    @property
    def window_len(self) -> int:
        return self.seq_len - 2

    # -- examples: runs of whole columns of a document ------------------------------------------
    def groups(self, store: TokenStore) -> np.ndarray:
        return self.store_index(
            store, lambda s: column_groups(s, self.tokenizer.sep_id, self.window_len)
        )

    def index_space(self, store: TokenStore) -> tuple[int, int, int]:
        return len(self.groups(store)), 1, 1

    def dataset(self, store: TokenStore) -> Dataset:
        return TokenSpans(store, self.groups(store))

    @property
    def examples_what(self) -> str:
        return f"runs of whole table columns (up to {self.window_len} tokens)"

    def arrange(self, ex: Example) -> Example:
        """The run of columns, a column longer than :attr:`window_len` alone cut to it."""
        return replace(ex, tokens=ex.tokens[: self.window_len])

    def masked_columns(self, ex: Example, spans: list[tuple[int, int, int, int]]) -> list[int]:
        """Which columns' names are masked: each named one with probability ``column_prob``, at
        least one, drawn from (seed, epoch, start); and every other column of a chosen name."""
        named = [i for i, (a, b, _, _) in enumerate(spans) if b > a]
        if not named:
            return []
        rng = example_rng(self.seed, ex)
        chosen = [
            i for i, u in zip(named, rng.random(len(named)), strict=True) if u < self.column_prob
        ]
        chosen = chosen or [named[int(rng.integers(len(named)))]]
        # a chosen name is masked wherever it heads a column of the example
        names = {ex.tokens[spans[i][0] : spans[i][1]].tobytes() for i in chosen}
        return [i for i in named if ex.tokens[spans[i][0] : spans[i][1]].tobytes() in names]

    def mask_example(self, ex: Example) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, labels) of one example: exactly its row of any batch :meth:`make_batch` puts it
        in, without the padding."""
        ex = self.arrange(ex)
        inputs, labels = self._mask(ex, cls_sep_rows([ex], self.tokenizer)[0])
        return inputs, labels

    def make_batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        examples = [self.arrange(ex) for ex in examples]
        ids = cls_sep_rows(examples, self.tokenizer, self.seq_len)
        inputs, labels = ids.copy(), np.full_like(ids, IGNORE)
        for b, ex in enumerate(examples):
            inputs[b], labels[b] = self._mask(ex, ids[b])
        lengths = np.array([len(ex.tokens) + 2 for ex in examples])
        return {
            "input_ids": torch.from_numpy(inputs),
            "attention_mask": torch.from_numpy(np.arange(self.seq_len) < lengths[:, None]),
            "labels": torch.from_numpy(labels),
        }

    def _mask(self, ex: Example, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``row`` (cls, the arranged example, sep, padding) with the chosen names masked, and
        the labels: the names' tokens there, IGNORE elsewhere."""
        inputs, labels = row.copy(), np.full_like(row, IGNORE)
        spans = column_spans(ex.tokens, self.tokenizer.sep_id)
        for i in self.masked_columns(ex, spans):
            a, b = spans[i][0] + 1, spans[i][1] + 1  # past cls
            labels[a:b] = row[a:b]
            inputs[a:b] = self.tokenizer.mask_id
        return inputs, labels
