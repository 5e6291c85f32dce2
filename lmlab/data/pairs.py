"""Pairs of texts (parallel text: ``data.text_field=[a, b]``), stored as documents
``a <sep> b <eos>`` (:class:`lmlab.data.store.TokenStore` with ``parts == 2``): helpers of the
objectives that train on them (objective=tlm, objective=ir_relevance)."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from lmlab.data.base import Example
from lmlab.data.store import TokenStore


def split_pair(pair: np.ndarray, sep: int) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) text of a stored pair ``first <sep> second <eos>``."""
    cuts = np.flatnonzero(pair == sep)
    if len(cuts) != 1:
        raise ValueError(
            f"a stored pair holds one sep, this document {len(cuts)}: the token store is not "
            "of pairs of texts (TokenStore.parts == 2)"
        )
    return pair[: cuts[0]], pair[cuts[0] + 1 : -1]


def fit_pair(first: np.ndarray, second: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Both texts cut to at most ``budget`` tokens together, each keeping its beginning: the
    longer gives up tokens first, neither below half the budget unless the other is shorter."""
    if len(first) + len(second) <= budget:
        return first, second
    keep = min(len(first), max(budget // 2, budget - len(second)))
    return first[:keep], second[: budget - keep]


class DocumentGroups(Dataset):
    """Index = (group, epoch); item = the :class:`Example` of a group of consecutive documents
    (``groups``: the document each starts at, then the document count; one document each for
    ``np.arange(n_docs + 1)``). Its start is the group's token offset, unique in the store, as
    the examples' random draws need."""

    def __init__(self, store: TokenStore, groups: np.ndarray) -> None:
        self.store, self.groups = store, groups

    def __len__(self) -> int:
        return len(self.groups) - 1

    def __getitem__(self, index: tuple[int, int] | int) -> Example:
        """``group``, ``(group, epoch)``, or ``(group, epoch, scored)``."""
        group, epoch, *scored = index if isinstance(index, tuple) else (index, 0)
        a, b = (int(self.store.offsets[d]) for d in self.groups[group : group + 2])
        tokens = np.asarray(self.store.tokens[a:b], dtype=np.int64)
        return Example(a, tokens, epoch, *scored, store=self.store)
