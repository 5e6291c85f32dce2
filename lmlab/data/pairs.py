"""Pairs of texts (parallel text: ``data.text_field=[a, b]``), stored as documents
``a <sep> b <eos>`` (:class:`lmlab.data.store.TokenStore` with ``parts == 2``): helpers of the
objectives that train on them (objective=tlm, objective=ir_relevance)."""

from __future__ import annotations

import numpy as np

from lmlab.data.base import TokenSpans
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


def document_groups(store: TokenStore, groups: np.ndarray) -> TokenSpans:
    """The examples of groups of consecutive documents (``groups``: the document each starts at,
    then the document count; one document each for ``np.arange(n_docs + 1)``)."""
    starts = store.offsets[groups]
    return TokenSpans(store, np.stack([starts[:-1], starts[1:]], axis=1))
