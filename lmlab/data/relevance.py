"""IR relevance (ERNIE 2.0: Sun et al., 2020, sec. 4.2.3, "IR Relevance Task") with masked LM, for
encoders: ``masked`` batches with ``sentence_labels``.

ERNIE 2.0 reads a search query and a result's title, ``cls query sep title sep``, and classifies
their relevance from Baidu's search logs: strongly relevant (the user clicked the title), weakly
relevant (shown, not clicked), irrelevant (a random title). Its data is pairs of texts, so this
objective reads them as parallel text (``data=files`` with JSONL rows and
``data.text_field=[<query field>, <title field>]``; each row a document ``query <sep> title
<eos>``), one pair per example: half the time with its own title (label 0, "relevant"), half the
time with the title of another row of the split drawn uniformly (label 1, "irrelevant"), drawn per
example from (seed, epoch, row). The weakly relevant class needs click logs, which a JSONL of pairs
does not hold: the two classes here are ERNIE's first and third. A pair longer than ``seq_len - 3``
tokens is cut to fit, each text keeping its beginning (:func:`lmlab.data.tlm.fit_pair`), after
the title is chosen. The input is masked as objective=mlm masks (its settings), and the
classifier at cls adds ``sentence_weight`` x its cross-entropy to the training loss
(``val/ir_relevance_loss``, ``val/ir_relevance_acc``: chance 0.5); the masked LM's metrics are
objective=mlm's. Every row is an example once per epoch (rows shorter than the room are padded:
query-title pairs are short). A random title is as long as titles are, but not as long as a title
of *this* query would be: the model may use how the two lengths go together, as it may in ERNIE's
data.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from lmlab.data.base import Example, example_rng
from lmlab.data.sentences import SentenceTaskDataModule
from lmlab.data.store import TokenStore
from lmlab.data.tlm import PairGroups, check_parallel, fit_pair, split_pair
from lmlab.errors import ConfigError


class RelevanceDataModule(SentenceTaskDataModule):
    """Masked LM plus whether the title is the query's own (0) or another row's (1)."""

    objective = "ir_relevance"
    parallel = True  # lmlab.train refuses a data config that is not pairs, before any work
    label_names = ("relevant", "irrelevant")
    scored_what = "a query-title pair"

    def check(self) -> None:
        """Refuse plain text, and splits of one row (an irrelevant title is another row's)."""
        check_parallel(self)
        for split, store in (("training", self.train_store), ("validation", self.val_store)):
            if store is not None and store.n_docs < 2:
                raise ConfigError(
                    f"objective=ir_relevance pairs each query with another row's title half the "
                    f"time, but the {split} split has one row; add rows"
                )
        super().check()

    def scored(self, ex: Example) -> bool:
        return True

    # -- one row per example --------------------------------------------------------------------
    def index_space(self, store: TokenStore) -> tuple[int, int, int]:
        return store.n_docs, 1, 1

    def dataset(self, store: TokenStore) -> Dataset:
        return PairGroups(store, np.arange(store.n_docs + 1))

    examples_what = "query-title rows"

    def segments(self, ex: Example) -> tuple[list[np.ndarray], int]:
        sep = self.tokenizer.sep_id
        rng = example_rng(self.seed, ex)
        query, title = split_pair(ex.tokens, sep)
        label = int(rng.random() < 0.5)
        if label:
            store = self.store_of(ex)
            row = int(np.searchsorted(store.offsets, ex.start, side="right")) - 1
            other = int(rng.integers(store.n_docs - 1))
            other += other >= row
            a, b = int(store.offsets[other]), int(store.offsets[other + 1])
            _, title = split_pair(np.asarray(store.tokens[a:b], dtype=np.int64), sep)
        return list(fit_pair(query, title, self.window_len)), label
