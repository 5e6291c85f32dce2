"""Translation language modelling (XLM: Lample & Conneau, 2019, "Cross-lingual Language Model
Pretraining", sec. 3.3) for encoders: ``masked`` batches.

TLM is masked LM over parallel text: a sentence and its translation side by side, tokens masked in
both, so that a word masked in one language can be recovered from the other. It trains on parallel
data (``data=files`` with JSONL rows and ``data.text_field=[<source field>, <target field>]``;
each row is a document ``source <sep> target <eos>`` in the token store).

Examples are not windows of the token stream: the pairs of a split are packed, in their order, into
groups of as many consecutive whole pairs as fit in ``seq_len - 2`` tokens (a pair longer than that
is a group of its own, cut to fit, each side keeping its beginning: XLM leaves such pairs out), and
the samplers draw groups (every group once per epoch in a random order, but fewer than one
optimizer step's worth, a different few each epoch, as windows are trimmed to whole steps; every
group at validation). So every pair is trained on about once per epoch, whole wherever it fits,
with its translation beside it. Each pair is in its own order or swapped (half each, drawn per
pair from (seed, epoch, group), with ``both_orders``: XLM trains both directions, en-fr and
fr-en); the pairs go between cls and sep, padded (on the rest of each row: ~18% padding at
seq_len=256 for pairs of 80 tokens, ~9% at 512), and are masked as objective=mlm masks (its
settings; sep and eos are never selected).

Differences from XLM: no language embeddings (lmlab's encoder has none; XLM-R dropped them too, and
the order of the sides is random), and positions are not reset at the target (RoPE takes one
position per token of the input; the pairs of an example share it, as packed MLM windows do).
XLM puts one sentence pair in each sequence; here a group fills one, as mlm packs documents.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from torch.utils.data import Dataset

from lmlab.data.base import Example, example_rng
from lmlab.data.mlm import MaskedLMDataModule
from lmlab.data.pairs import document_groups, fit_pair, split_pair
from lmlab.data.store import TokenStore
from lmlab.errors import ConfigError


def pack_pairs(offsets: np.ndarray, room: int) -> np.ndarray:
    """The document index each group starts at, then the document count: consecutive documents
    (``offsets``: a store's) packed greedily, as many as fit in ``room`` tokens; a document longer
    than that alone."""
    n = len(offsets) - 1
    starts, d = [0], 0
    while d < n:
        fits = int(np.searchsorted(offsets, offsets[d] + room, side="right")) - 1
        d = min(max(fits, d + 1), n)
        starts.append(d)
    return np.asarray(starts, dtype=np.int64)


class TranslationLMDataModule(MaskedLMDataModule):
    objective = "tlm"
    # pairs of texts: lmlab.train refuses a data config of one text per row before any work
    pair_fields = ("en", "fr")

    def __init__(
        self,
        tokenizer,
        train,
        val,
        *,
        seq_len: int,
        both_orders: bool = True,
        **kwargs,  # mask_prob, p_mask, p_random, whole_word: see MaskedLMDataModule
    ) -> None:
        self.check_orders(both_orders)
        self.both_orders = both_orders
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)

    @classmethod
    def check_settings(cls, *, seq_len: int, both_orders: bool = True, **rest) -> None:
        cls.check_orders(both_orders)
        if seq_len < 6:
            raise ConfigError(
                f"objective=tlm needs seq_len >= 6 (cls, a token of one side, sep, a token of "
                f"the other, eos, sep), got {seq_len}; raise seq_len"
            )
        super().check_settings(seq_len=seq_len, **rest)

    @staticmethod
    def check_orders(both_orders) -> None:
        if not isinstance(both_orders, bool):
            raise ConfigError(f"objective.both_orders={both_orders!r} must be true or false")

    # -- examples: groups of whole pairs ----------------------------------------------------------
    def groups(self, store: TokenStore) -> np.ndarray:
        return self.store_index(store, lambda s: pack_pairs(s.offsets, self.window_len))

    def index_space(self, store: TokenStore) -> tuple[int, int, int]:
        return len(self.groups(store)) - 1, 1, 1

    def dataset(self, store: TokenStore) -> Dataset:
        return document_groups(store, self.groups(store))

    @property
    def examples_what(self) -> str:
        return f"groups of whole pairs (up to {self.window_len} tokens)"

    def arrange(self, ex: Example) -> Example:
        """The group's pairs, each ``source sep target eos`` or, drawn per pair from (seed, epoch,
        start), ``target sep source eos``; a pair longer than :attr:`window_len` keeps both sides'
        beginnings. Text after the last eos (an example cut short for samples) stays as it is."""
        sep, eos = self.tokenizer.sep_id, self.tokenizer.eos_id
        pieces = np.split(ex.tokens, np.flatnonzero(ex.tokens == eos) + 1)
        flips = example_rng(self.seed, ex).random(len(pieces)) < 0.5
        out = []
        for piece, flip in zip(pieces, flips.tolist(), strict=True):
            if not len(piece) or piece[-1] != eos or (piece == sep).sum() != 1:
                out.append(piece)
                continue
            # a pair longer than the room is alone in its group: both sides' beginnings
            source, target = fit_pair(*split_pair(piece, sep), self.window_len - 2)
            if flip and self.both_orders:
                source, target = target, source
            out += [source, [sep], target, [eos]]
        return replace(ex, tokens=np.concatenate(out).astype(np.int64))
