"""BART denoising (Lewis et al., 2020, "BART: Denoising Sequence-to-Sequence Pre-training for Natural
Language Generation, Translation, and Comprehension", §2.2 and §5.1): ``seq2seq`` batches.

The encoder reads a corrupted window; the decoder reconstructs the original. BART's best combination,
in fairseq's ``DenoisingDataset`` order:

1. Sentence permutation: the window is cut after every sentence-ending token and the sentences are
   shuffled (all of them, as BART-large does).
2. Text infilling: about ``mask_ratio`` of the tokens, in spans whose lengths are drawn from
   Poisson(``poisson_lambda``), are each replaced by ONE mask token; a zero-length span inserts a mask,
   so the model also learns how many tokens are missing.

The target is the original, unpermuted window followed by eos. Unlike fairseq, spans are placed so
that masks never touch (each gap between kept tokens holds at most one span, so one mask token always
stands for one span), and tokens rather than whole words are masked.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np

from lmlab.data.base import Example, Seq2SeqDataModule, example_rng
from lmlab.data.store import TokenStore
from lmlab.data.tokenizers import TextTokenizer
from lmlab.errors import ConfigError

SENTENCE_END = (".", "!", "?")


def token_texts(tokenizer: TextTokenizer) -> list[str]:
    """The decoded text of every token id (special tokens' names included)."""
    return tokenizer.tk.decode_batch(
        [[i] for i in range(tokenizer.vocab_size)], skip_special_tokens=False
    )


def sentence_end_table(tokenizer: TextTokenizer) -> np.ndarray:
    """Boolean (vocab_size,) table: True for eos and for tokens whose text ends a sentence.

    A token ends a sentence when its decoded text, stripped of trailing whitespace, ends with ".",
    "!" or "?" (BART splits at full stops; whitespace after the stop then opens the next sentence).
    """
    texts = token_texts(tokenizer)
    table = np.array([t.rstrip().endswith(SENTENCE_END) for t in texts], dtype=bool)
    table[tokenizer.special_ids] = False  # "<|mask|>" and friends are never text
    table[tokenizer.eos_id] = True  # a document boundary ends a sentence too
    return table


def permute_sentences(
    tokens: np.ndarray, is_end: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The window's sentences in a random order; a sentence ends after a token with ``is_end``.

    The last sentence may be cut by the window edge (it has no end token); it is shuffled like the
    others, as whole sentences are the unit BART permutes.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) == 0:
        return tokens.copy()
    cuts = np.flatnonzero(is_end[tokens]) + 1
    bounds = np.concatenate([[0], cuts[cuts < len(tokens)], [len(tokens)]])
    sentences = [tokens[a:b] for a, b in pairwise(bounds)]
    return np.concatenate([sentences[i] for i in rng.permutation(len(sentences))])


def infilling_spans(
    length: int, mask_ratio: float, poisson_lambda: float, rng: np.random.Generator
) -> np.ndarray:
    """(k, 2) int64 array of (start, span length) for text infilling of ``length`` tokens.

    Exactly ``round(length * mask_ratio)`` tokens are masked. As in BART's ``add_whole_word_mask``,
    Poisson lengths are drawn until they cover that budget and the last one is cut to meet it
    exactly; zero-length spans are kept as insertions. Spans are sorted by start, and between two
    spans there is always at least one kept token, so each becomes its own mask token. Two limits,
    needed only at extreme settings: insertions are capped so that the corrupted input is never longer
    than the original (at most one mask per masked token), and when the kept tokens leave too few gaps
    for the spans, the last spans are merged. The tokens at either end of the window are masked
    less often than the rest (fewer placements of a span cover them): at 127 tokens, mask_ratio 0.3
    and Poisson(3), the first and last in 13% of windows, the second and last but one in 23%, the
    middle ones in 30%.
    """
    num_mask = round(length * mask_ratio)
    if num_mask == 0:
        return np.zeros((0, 2), dtype=np.int64)
    lengths = np.zeros(0, dtype=np.int64)
    # Draws expected to cover the budget in about one round (num_mask of them from a mean of 1 on)
    draws = max(num_mask, math.ceil(num_mask / poisson_lambda))
    while lengths.sum() < num_mask:
        lengths = np.concatenate([lengths, rng.poisson(poisson_lambda, size=draws)])
    cum = np.cumsum(lengths)
    last = int(np.searchsorted(cum, num_mask))  # first span that reaches the budget
    lengths = lengths[: last + 1].copy()
    lengths[last] = num_mask - (cum[last - 1] if last else 0)  # >= 1: cum[last - 1] < num_mask
    spans = lengths[lengths > 0]
    gaps = length - num_mask + 1  # places between (and around) the kept tokens
    while len(spans) > gaps:
        spans = np.concatenate([spans[:-2], [spans[-2] + spans[-1]]])
    n_inserts = min(int((lengths == 0).sum()), num_mask - len(spans), gaps - len(spans))
    spans = rng.permutation(np.concatenate([spans, np.zeros(n_inserts, dtype=np.int64)]))
    # One distinct gap per span; a span's start is its gap plus the tokens masked before it.
    where = np.sort(rng.choice(gaps, size=len(spans), replace=False))
    starts = where + np.concatenate([[0], np.cumsum(spans)[:-1]])
    return np.stack([starts, spans], axis=1).astype(np.int64)


def text_infilling(tokens: np.ndarray, spans: np.ndarray, mask_id: int) -> np.ndarray:
    """``tokens`` with each (start, length) span of ``spans`` replaced by one ``mask_id``."""
    pieces, pos = [], 0
    for start, n in spans:
        pieces += [tokens[pos:start], [mask_id]]
        pos = start + n
    pieces.append(tokens[pos:])
    return np.concatenate(pieces).astype(np.int64)


class DenoisingDataModule(Seq2SeqDataModule):
    """BART denoising over non-overlapping windows of ``seq_len - 1`` tokens (eos makes ``seq_len``)."""

    objective = "denoise"

    def __init__(
        self,
        tokenizer: TextTokenizer,
        train: TokenStore | None,
        val: TokenStore,
        *,
        seq_len: int,
        mask_ratio: float = 0.3,
        poisson_lambda: float = 3.0,
        permute_sentences: bool = True,
        **kwargs,  # batch_size, eval_batch_size, num_workers, seed, name: see WindowDataModule
    ) -> None:
        self.check_settings(seq_len=seq_len, mask_ratio=mask_ratio, poisson_lambda=poisson_lambda)
        self.mask_ratio, self.poisson_lambda = float(mask_ratio), float(poisson_lambda)
        self.permute_sentences = bool(permute_sentences)
        # Decoding every token once costs a fraction of a second, not once per batch.
        self.is_sentence_end = sentence_end_table(tokenizer) if self.permute_sentences else None
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)

    @classmethod
    def check_settings(
        cls, *, seq_len: int, mask_ratio: float, poisson_lambda: float, **rest
    ) -> None:
        if seq_len < 2:
            raise ConfigError(f"denoising needs seq_len >= 2 (one token and eos), got {seq_len}")
        if not 0.0 <= mask_ratio <= 1.0:
            raise ConfigError(f"objective.mask_ratio={mask_ratio} must be in [0, 1] (BART: 0.3)")
        if not 0.0 < poisson_lambda <= seq_len:
            # lambda = 0 would draw only empty spans and never reach the masking budget; a mean
            # span longer than the window means nothing (and inf, NaN fail here, not in numpy)
            raise ConfigError(
                f"objective.poisson_lambda={poisson_lambda} must be > 0 and at most "
                f"seq_len={seq_len} (BART uses 3)"
            )
        super().check_settings(**rest)

    @property
    def window_len(self) -> int:
        return self.seq_len - 1  # the target is the window plus eos

    @property
    def target_len(self) -> int:
        return self.seq_len

    @classmethod
    def target_length(cls, *, seq_len: int, **_) -> int:
        return seq_len

    def corrupt(self, ex: Example) -> tuple[np.ndarray, np.ndarray]:
        """(input, target) of one example, reproducible from (seed, epoch, start)."""
        rng = example_rng(self.seed, ex)
        x = ex.tokens
        if self.is_sentence_end is not None:
            x = permute_sentences(x, self.is_sentence_end, rng)
        spans = infilling_spans(len(x), self.mask_ratio, self.poisson_lambda, rng)
        x = text_infilling(x, spans, self.tokenizer.mask_id)
        eos = self.tokenizer.eos_id
        return np.append(x, eos), np.append(ex.tokens, eos)
