"""IR relevance (ERNIE 2.0: Sun et al., 2020, sec. 4.2.3, "IR Relevance Task") with masked LM, for
encoders: ``masked`` batches with ``sentence_labels``.

ERNIE 2.0 reads a search query and a result's title, ``cls query sep title sep``, and classifies
their relevance from Baidu's search logs: strongly relevant (the user clicked the title), weakly
relevant (shown, not clicked), irrelevant (a random title). Its data is pairs of texts, so this
objective reads them as parallel text (``data=files`` with JSONL rows and
``data.text_field=[<query field>, <title field>]``; each row a document ``query <sep> title
<eos>``), one pair per example: half the time with its own title (label 0, "relevant"), half the
time with the title of another row of the split (label 1, "irrelevant"), drawn per example from
(seed, epoch, row) uniformly among the rows whose title has as many tokens as the row's own (the
nearest count where no other row's has). Drawn from all rows, a title's length against its query's
told the label: a table of the two token counts scored 0.69 at seq_len 64 and 0.92 at 256 on a
stand-in corpus, and runs learnt it (0.66 in a 300-step run at seq_len 64, 0.557 in the default
500-step run, docs/results.md); length-matched, such tables score 0.49-0.51. A drawn title whose
text is the row's own is labelled relevant. The weakly relevant class needs click logs, which a
JSONL of pairs does not hold: the two classes here are ERNIE's first and third. A pair longer than
``seq_len - 3`` tokens is cut to fit, each text keeping its beginning
(:func:`lmlab.data.tlm.fit_pair`), after the title is chosen. The input is masked as objective=mlm
masks (its settings), and the classifier at cls adds ``sentence_weight`` x its cross-entropy to the
training loss (``val/ir_relevance_loss``, ``val/ir_relevance_acc``: chance 0.5); the masked LM's
metrics are
objective=mlm's. Every epoch draws every row (but fewer than one optimizer step's worth, a
different few each epoch, as windows are trimmed to whole steps); rows shorter than the room are
padded (query-title pairs are short).
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from lmlab.data.base import Example, example_rng
from lmlab.data.pairs import document_groups, fit_pair, split_pair
from lmlab.data.sentences import SegmentTaskDataModule
from lmlab.data.store import TokenStore
from lmlab.errors import ConfigError


class TitleLengths:
    """The rows of a store of pairs ordered by their second text's (the title's) token count, to
    draw another row whose title is as long as a given row's."""

    def __init__(self, store: TokenStore, sep: int, chunk: int = 1 << 24) -> None:
        seps = []
        for i in range(0, len(store.tokens), chunk):  # one sep per row; no copy of the store
            seps.append(np.flatnonzero(store.tokens[i : i + chunk] == sep) + i)
        lengths = store.offsets[1:] - 1 - (np.concatenate(seps) + 1)
        self.order = np.argsort(lengths, kind="stable")
        self.sorted = lengths[self.order]
        self.place = np.empty_like(self.order)
        self.place[self.order] = np.arange(len(self.order))

    def draw_like(self, row: int, rng: np.random.Generator) -> int:
        """Another row whose title has as many tokens as ``row``'s, uniformly; where none has,
        one of the rows of the nearest count (the shorter and the longer count half each where
        both are as near)."""
        length = self.sorted[self.place[row]]
        lo, hi = np.searchsorted(self.sorted, [length, length + 1])
        if hi - lo >= 2:
            k = lo + int(rng.integers(hi - lo - 1))
            return int(self.order[k + (k >= self.place[row])])
        below = self.sorted[lo - 1] if lo > 0 else None
        above = self.sorted[hi] if hi < len(self.sorted) else None
        if above is None or (
            below is not None and (length - below, rng.random()) < (above - length, 0.5)
        ):
            lo, hi = np.searchsorted(self.sorted, [below, below + 1])
        else:
            lo, hi = np.searchsorted(self.sorted, [above, above + 1])
        return int(self.order[lo + int(rng.integers(hi - lo))])


class RelevanceDataModule(SegmentTaskDataModule):
    """Masked LM plus whether the title is the query's own (0) or another row's (1)."""

    objective = "ir_relevance"
    pair_fields = ("query", "title")  # trains on pairs of texts, and refuses other data
    label_names = ("relevant", "irrelevant")
    scored_what = "a query-title pair"

    def __init__(self, tokenizer, train, val, *, seq_len: int, **kwargs) -> None:
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)

    def check(self) -> None:
        """Also refuse splits of one row (an irrelevant title is another row's); index the titles'
        lengths here, before loader workers are forked (each would index its own)."""
        self.check_parts()
        for split, store in (("training", self.train_store), ("validation", self.val_store)):
            if store is not None and store.n_docs < 2:
                raise ConfigError(
                    f"objective=ir_relevance pairs each query with another row's title half the "
                    f"time, but the {split} split has one row; add rows"
                )
            if store is not None:
                self.titles(store)
        super().check()

    # -- one row per example --------------------------------------------------------------------
    def index_space(self, store: TokenStore) -> tuple[int, int, int]:
        return store.n_docs, 1, 1

    def dataset(self, store: TokenStore) -> Dataset:
        return document_groups(store, np.arange(store.n_docs + 1))

    examples_what = "query-title rows"
    rows_grow_with_shorter_seq_len = False

    def titles(self, store: TokenStore) -> TitleLengths:
        return self.store_index(store, lambda s: TitleLengths(s, self.tokenizer.sep_id))

    def segments(self, ex: Example) -> tuple[list[np.ndarray], int]:
        sep = self.tokenizer.sep_id
        rng = example_rng(self.seed, ex)
        query, title = split_pair(ex.tokens, sep)
        label = int(rng.random() < 0.5)
        if label:
            store = self.store_of(ex)
            row = int(np.searchsorted(store.offsets, ex.start, side="right")) - 1
            other = self.titles(store).draw_like(row, rng)
            a, b = int(store.offsets[other]), int(store.offsets[other + 1])
            _, other_title = split_pair(np.asarray(store.tokens[a:b], dtype=np.int64), sep)
            if np.array_equal(other_title, title):  # the same text: relevant after all
                label = 0
            title = other_title
        return list(fit_pair(query, title, self.window_len)), label
