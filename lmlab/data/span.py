"""T5 span corruption (Raffel et al., 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", §3.1.4 and §3.3): ``seq2seq`` batches.

A window of raw tokens is split into alternating non-noise and noise spans (T5's
``random_spans_noise_mask``: ``noise_density`` of the tokens are noise, in spans of mean length
``mean_span_length``). The encoder input keeps the non-noise tokens and replaces each noise span by one
sentinel ``<extra_id_i>``; the decoder target lists each sentinel followed by the tokens it replaced:

    window  The quick brown fox jumps over the lazy dog
    input   The quick <X0> jumps over the <X1> <eos>
    target  <X0> brown fox <X1> lazy dog <eos>

As in T5, the spans alternate starting with a non-noise one and ending with a noise one: a window's
first token is always kept and its last always replaced.

The span counts are fixed by the window length, so T5's ``compute_input_and_target_lengths`` arithmetic
picks the window length whose corrupted input is exactly ``seq_len`` tokens: training batches carry no
padding, and every target has at most ``target_len`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lmlab.data.base import Example, Seq2SeqDataModule, example_keys
from lmlab.data.collate import random_bits, seq2seq_batch, smallest
from lmlab.data.store import TokenStore
from lmlab.data.tokenizers import TextTokenizer
from lmlab.errors import ConfigError


# -- arithmetic -----------------------------------------------------------------------------------
def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a window of ``length`` raw tokens, with T5's arithmetic.

    ``num_noise = round(length * noise_density)`` and ``num_spans = max(1, round(num_noise /
    mean_span_length))`` (Python's ``round`` rounds half to even, like T5's ``tf.round``). As in T5
    at least one token is noise and one is not; a 1-token window gets no noise (T5 pads it to two and
    truncates, which leaves its only token unmasked).
    """
    if length < 2:
        return 0, 0
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    # Every noise span and every non-noise span needs a token; binds only for tiny or very noisy windows.
    num_spans = min(num_spans, num_noise, length - num_noise)
    return num_noise, num_spans


def corrupted_lengths(
    length: int, noise_density: float, mean_span_length: float
) -> tuple[int, int]:
    """(input tokens, target tokens), both with their eos, of a corrupted ``length``-token window."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def compute_lengths(seq_len: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(window_len, target_len): the most raw tokens whose corrupted input fits ``seq_len``.

    T5's ``compute_input_and_target_lengths`` (e.g. 512 -> 568 raw tokens, 114 target tokens at the
    defaults). One more raw token adds either a kept token (+1 input) or a noise token (+0, or +1 when
    it makes one more span and so one more sentinel), so the input length never decreases and steps by
    one: the largest fitting window corrupts to exactly ``seq_len`` tokens. (Only when a window is so
    noisy that its non-noise tokens limit the span count can it step by two and leave one pad.) T5's
    extra "noise_density == 0.5" tweak (one raw token fewer so that targets are no longer than inputs)
    is not applied: the target length is simply reported.
    """
    if seq_len < 2:
        raise ConfigError(f"span corruption needs seq_len >= 2 (one token and eos), got {seq_len}")
    # Input length is at most length + 1 (each sentinel replaces at least one token), so seq_len - 1
    # raw tokens always fit: scan up from there.
    n = seq_len - 1
    while corrupted_lengths(n + 1, noise_density, mean_span_length)[0] <= seq_len:
        n += 1
    return n, corrupted_lengths(n, noise_density, mean_span_length)[1]


# -- corruption -----------------------------------------------------------------------------------
# random streams of a window's noise mask: one independent draw each
NOISE_RUNS, KEEP_RUNS = 0, 1


def _random_composition(total: int, parts: int, keys: np.ndarray, stream: int) -> np.ndarray:
    """(B, parts) int64: per key, ``parts`` positive integers summing to ``total``, uniform over all
    such compositions.

    Same distribution as T5's ``_random_segmentation``: ``parts - 1`` distinct cut points among the
    ``total - 1`` places between items, a uniformly random subset (the places with the smallest
    :func:`random_bits`).
    """
    B = len(keys)
    if parts == 1:
        return np.full((B, 1), total, dtype=np.int64)
    # (B, total - 1): a random value per place, place i being the cut before item i + 1
    order = random_bits(np.asarray(keys)[:, None], stream, np.arange(total - 1))
    cut = smallest(order, np.full(B, parts - 1))
    # row-major, so each row's places in order
    cuts = np.flatnonzero(cut).reshape(B, parts - 1) % (total - 1) + 1
    edges = np.concatenate([np.zeros((B, 1), np.int64), cuts, np.full((B, 1), total)], axis=1)
    return np.diff(edges, axis=1)


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, keys: np.ndarray
) -> np.ndarray:
    """Boolean (B, length) masks, one per key of the counter-based generator
    (:func:`lmlab.data.base.example_keys`), True on noise: ``num_spans`` non-noise runs alternating
    with ``num_spans`` noise runs (counts from :func:`span_counts`), each of length >= 1, non-noise
    first.

    Starting with non-noise, as T5 does, means the first token is always kept and the last is always
    noise; the run lengths of each kind are an independent uniformly random composition. Row ``b``
    depends only on ``keys[b]``.
    """
    B = len(keys)
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    if num_spans == 0:
        return np.zeros((B, length), dtype=bool)
    noise = _random_composition(num_noise, num_spans, keys, NOISE_RUNS)
    keep = _random_composition(length - num_noise, num_spans, keys, KEEP_RUNS)
    runs = np.stack([keep, noise], axis=2).reshape(-1)  # per row: keep, noise, keep, noise, ...
    return np.repeat(np.tile([False, True], B * num_spans), runs).reshape(B, length)


def corrupt_spans(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: Sequence[int], eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of T5 span corruption of one sequence, both ending with ``eos_id``.

    Input: the non-noise tokens with each noise span replaced by the next sentinel. Target: each
    span's sentinel followed by the span's tokens. (The definition; batches go through
    :func:`corrupt_spans_batch`, which gives the same rows.)
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    noise_mask = np.asarray(noise_mask, dtype=bool)
    starts = noise_mask & ~np.concatenate([[False], noise_mask[:-1]])
    n_spans = int(starts.sum())
    if n_spans > len(sentinel_ids):
        raise ValueError(f"{n_spans} noise spans but only {len(sentinel_ids)} sentinel ids")
    sentinels = np.asarray(sentinel_ids[:n_spans], dtype=np.int64)
    with_sentinels = tokens.copy()
    with_sentinels[starts] = sentinels
    inputs = with_sentinels[~noise_mask | starts]  # a span's first position now holds its sentinel
    # np.insert puts each sentinel before the first noise token of its span
    targets = np.insert(tokens[noise_mask], np.flatnonzero(starts[noise_mask]), sentinels)
    return np.append(inputs, eos_id), np.append(targets, eos_id)


def corrupt_spans_batch(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: Sequence[int], eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`corrupt_spans` of every row of ``tokens`` (B, L) at once: (inputs, targets), (B, ·).

    Every row of ``noise_mask`` must hold the same number of noise tokens and of spans (as
    :func:`random_spans_noise_mask` makes them for one window length), so that all inputs and all
    targets have one length and the rows are gathered by boolean masks and reshaped, without a
    Python loop.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    noise_mask = np.asarray(noise_mask, dtype=bool)
    B, L = tokens.shape
    inner = np.zeros_like(noise_mask)  # noise that continues a span: dropped from the input
    inner[:, 1:] = noise_mask[:, 1:] & noise_mask[:, :-1]
    starts = noise_mask ^ inner  # the first token of each span
    num_noise, num_spans = noise_mask.sum(axis=1), starts.sum(axis=1)
    if B == 0 or (num_noise != num_noise[0]).any() or (num_spans != num_spans[0]).any():
        raise ValueError(
            "corrupt_spans_batch needs the same noise and span counts in every row, got "
            f"{num_noise.tolist()} noise tokens in {num_spans.tolist()} spans"
        )
    N, S = int(num_noise[0]), int(num_spans[0])
    if len(sentinel_ids) < S:
        raise ValueError(f"{S} noise spans but only {len(sentinel_ids)} sentinel ids")
    sentinels = np.asarray(sentinel_ids[:S], dtype=np.int64)
    with_sentinels = tokens.copy()
    with_sentinels[starts] = np.tile(sentinels, B)  # row-major: each row's spans in order
    inputs = np.empty((B, L - N + S + 1), dtype=np.int64)
    inputs[:, :-1] = with_sentinels[~inner].reshape(B, L - N + S)
    inputs[:, -1] = eos_id

    # In window order, a position contributes its span's sentinel if it starts a span, then itself if
    # it is noise: slots (B, L, 2) read row-major, as boolean indexing reads them.
    slots = np.empty((B, L, 2), dtype=np.int64)
    slots[..., 0] = with_sentinels
    slots[..., 1] = tokens
    targets = np.empty((B, N + S + 1), dtype=np.int64)
    targets[:, :-1] = slots[np.stack([starts, noise_mask], axis=2)].reshape(B, N + S)
    targets[:, -1] = eos_id
    return inputs, targets


def fill_sentinels(
    input_ids: Sequence[int],
    target_ids: Sequence[int],
    sentinel_ids: Sequence[int],
    eos_id: int | None = None,
) -> list[int]:
    """Put each sentinel's span from the target back into the input (undo :func:`corrupt_spans`).

    With ``eos_id``, one trailing eos is dropped from the input and from the target first (the ones
    corruption appends; eos tokens inside the window are kept), so ``fill_sentinels(*corrupt_spans(w,
    ...), sentinel_ids, eos_id)`` is exactly ``w``. Strip padding before calling. For model outputs:
    target tokens before the first sentinel are ignored, a repeated sentinel keeps its first span, and
    a sentinel missing from the target stays in the input, so a reconstruction shows what is missing.
    """
    inp, tgt = [int(t) for t in input_ids], [int(t) for t in target_ids]
    if eos_id is not None:
        if inp and inp[-1] == eos_id:
            inp.pop()
        if tgt and tgt[-1] == eos_id:
            tgt.pop()
    is_sentinel = set(int(s) for s in sentinel_ids)
    spans: dict[int, list[int]] = {}
    current: list[int] = []  # tokens before the first sentinel land here and are dropped
    for t in tgt:
        if t in is_sentinel:
            current = []
            spans.setdefault(t, current)  # a repeat's tokens go to a list nobody reads
        else:
            current.append(t)
    out: list[int] = []
    for t in inp:
        out.extend(spans.get(t, [t]) if t in is_sentinel else [t])
    return out


class SpanCorruptionDataModule(Seq2SeqDataModule):
    """T5 span corruption over non-overlapping windows of :func:`compute_lengths` raw tokens."""

    objective = "span"

    def __init__(
        self,
        tokenizer: TextTokenizer,
        train: TokenStore | None,
        val: TokenStore,
        *,
        seq_len: int,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        **kwargs,  # batch_size, eval_batch_size, num_workers, seed, name: see WindowDataModule
    ) -> None:
        self.check_settings(
            seq_len=seq_len,
            noise_density=noise_density,
            mean_span_length=mean_span_length,
            num_sentinels=len(tokenizer.sentinel_ids),
        )
        self.noise_density, self.mean_span_length = float(noise_density), float(mean_span_length)
        self._window_len, self._target_len = compute_lengths(
            seq_len, self.noise_density, self.mean_span_length
        )
        super().__init__(tokenizer, train, val, seq_len=seq_len, **kwargs)

    @classmethod
    def check_settings(
        cls,
        *,
        seq_len: int,
        noise_density: float,
        mean_span_length: float,
        num_sentinels: int | None = None,
        **rest,
    ) -> None:
        if not 0.0 < noise_density < 1.0:
            raise ConfigError(
                f"objective.noise_density={noise_density} must be in (0, 1) (T5 uses 0.15)"
            )
        if not mean_span_length >= 1.0:  # NaN fails too
            raise ConfigError(
                f"objective.mean_span_length={mean_span_length} must be >= 1 (a span is at least "
                "one token; T5 uses 3)"
            )
        window_len, _ = compute_lengths(seq_len, float(noise_density), float(mean_span_length))
        # Span counts never decrease with the window length, so a full window needs the most.
        _, max_spans = span_counts(window_len, float(noise_density), float(mean_span_length))
        if num_sentinels is not None and max_spans > num_sentinels:
            raise ConfigError(
                f"span corruption with seq_len={seq_len}, noise_density={noise_density} and "
                f"mean_span_length={mean_span_length} needs {max_spans} sentinel tokens per example, "
                f"but the tokenizer has {num_sentinels} (tokenizer.num_sentinels={num_sentinels}); "
                f"set tokenizer.num_sentinels>={max_spans}, or lower seq_len or noise_density, or "
                "raise mean_span_length"
            )
        super().check_settings(**rest)

    @property
    def window_len(self) -> int:
        return self._window_len

    @property
    def target_len(self) -> int:
        """Decoder length: the target of a full window (shorter windows have shorter targets)."""
        return self._target_len

    @classmethod
    def target_length(
        cls, *, seq_len: int, noise_density: float, mean_span_length: float, **_
    ) -> int:
        return compute_lengths(seq_len, float(noise_density), float(mean_span_length))[1]

    def corrupt(self, ex: Example) -> tuple[np.ndarray, np.ndarray]:
        """(input, target) of one example, reproducible from (seed, epoch, start): exactly its row
        of any batch :meth:`make_batch` puts it in, without the padding."""
        inputs, targets = self._corrupt_windows(ex.tokens[None], example_keys(self.seed, [ex]))
        return inputs[0], targets[0]

    def make_batch(self, examples: list[Example]) -> dict:
        """Windows of one length (all training windows; the last validation window of a split is
        shorter) are corrupted together."""
        keys = example_keys(self.seed, examples)
        lengths = np.array([len(ex.tokens) for ex in examples])
        groups = []  # (batch rows, their inputs, their targets) per window length
        for length in np.unique(lengths):
            rows = np.flatnonzero(lengths == length)
            windows = np.stack([examples[b].tokens for b in rows])
            groups.append((rows, *self._corrupt_windows(windows, keys[rows])))
        if len(groups) == 1:  # every training batch: (B, ·) arrays, in batch order
            _, inputs, targets = groups[0]
        else:
            by_row = sorted(
                (b, x, y) for rows, xs, ys in groups for b, x, y in zip(rows, xs, ys, strict=True)
            )
            _, inputs, targets = zip(*by_row, strict=True)
        tok = self.tokenizer
        return seq2seq_batch(inputs, targets, self.seq_len, self.target_len, tok.pad_id, tok.bos_id)

    def _corrupt_windows(self, windows: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, ...]:
        """(inputs, targets), (B, ·), of windows (B, L) of one length, row b drawn with key b."""
        mask = random_spans_noise_mask(
            windows.shape[1], self.noise_density, self.mean_span_length, keys
        )
        tok = self.tokenizer
        return corrupt_spans_batch(windows, mask, tok.sentinel_ids, tok.eos_id)
