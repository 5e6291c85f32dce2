"""Pure batch builders: numpy token windows in, dict batches of the declared kind out (unit-tested).

Randomness comes from a counter-based generator (:func:`random_bits`): a random number is a hash of
(the example's key, a stream number, a position), so a whole batch is drawn with a few vectorized
numpy operations, and an example's draws depend only on its own key (see
:func:`lmlab.data.base.example_keys`), never on the batch, the worker or the process it lands in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE = -100  # label value that cross-entropy skips

# splitmix64 (Steele, Lea and Flood, 2014, "Fast Splittable Pseudorandom Number Generators"; the
# output function's constants are Vigna's, as in java.util.SplittableRandom and xoshiro's seeding)
GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays: a bijection whose outputs for consecutive
    inputs pass BigCrush. Wraps modulo 2**64 (numpy arrays overflow silently); ``z`` is not changed."""
    z = z ^ (z >> 30)
    z *= 0xBF58476D1CE4E5B9
    z ^= z >> 27
    z *= 0x94D049BB133111EB
    z ^= z >> 31
    return z


def random_bits(keys: np.ndarray, stream: int, index: np.ndarray) -> np.ndarray:
    """64 random bits for element ``index`` of draw ``stream`` of the examples with ``keys``.

    The value is output ``stream * 2**32 + index`` of splitmix64 seeded with the key, computed
    directly (splitmix64's state after ``i`` steps is ``key + i * GOLDEN_GAMMA``): any element of any
    draw costs the same, whatever else is drawn. ``keys`` and ``index`` (< 2**32) broadcast, e.g.
    ``keys[:, None]`` with ``np.arange(L)`` for a (B, L) draw. The elements of one draw of one key
    are distinct (distinct states, and ``mix64`` is a bijection), so sorting by them never ties.
    """
    counter = (np.uint64(stream) << np.uint64(32)) + np.asarray(index, dtype=np.uint64) + 1
    return mix64(np.asarray(keys, dtype=np.uint64) + counter * np.uint64(GOLDEN_GAMMA))


def random_uniform(keys: np.ndarray, stream: int, index: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1): the top 53 bits of :func:`random_bits` (every float64 multiple of
    2**-53, each equally likely)."""
    return (random_bits(keys, stream, index) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def smallest(bits: np.ndarray, k: np.ndarray, eligible: np.ndarray | None = None) -> np.ndarray:
    """Boolean (B, L): True on the positions of the ``k[b]`` smallest ``bits`` among the eligible
    positions of row ``b`` (all without ``eligible``), a uniformly random ``k``-subset when ``bits``
    is one draw of :func:`random_bits` (distinct within a row: exactly ``k`` are True, for ``k`` at
    most the row's eligible count).

    Partitioning whole rows costs several microseconds a row, so each row is first cut to its
    candidates: the positions below the quantile where ``k + 5 sqrt(k) + 5`` of its ``n`` eligible
    ones are expected (fewer than ``k`` candidates is a > 5 sigma event; then all ``n`` are). One sort of the
    candidates, packed into a (B, max count) matrix, gives each row's ``k``-th smallest value. The
    selection is the same whichever way it is found: only the time depends on the draw.
    """
    B = len(bits)
    k = np.asarray(k, dtype=np.int64)
    if k.max(initial=0) == 0:
        return np.zeros(bits.shape, dtype=bool)
    n = bits.shape[1] if eligible is None else eligible.sum(axis=1)
    quantile = np.minimum((k + 5 * np.sqrt(k) + 5) / np.maximum(n, 1), 1.0)
    # compared on the top 53 bits, so that the quantile 1 (every position) is 2**53, no overflow
    candidate = (bits >> np.uint64(11)) < (quantile * 2.0**53).astype(np.uint64)[:, None]
    if eligible is not None:
        candidate &= eligible
    count = candidate.sum(axis=1)
    if (count < k).any():
        candidate = np.ones(bits.shape, dtype=bool) if eligible is None else eligible
        count = candidate.sum(axis=1)
    width = int(count.max())
    packed = np.full((B, width), 2**64 - 1, dtype=np.uint64)  # sorts after every candidate
    # candidate i (row-major) of row b, the j-th of its row, goes to flat index b * width + j
    shift = np.repeat(np.arange(B) * width - (np.cumsum(count) - count), count)
    packed.reshape(-1)[np.arange(len(shift)) + shift] = bits[candidate]
    packed.sort(axis=1)
    threshold = packed[np.arange(B), np.maximum(k, 1) - 1]
    selected = (bits <= threshold[:, None]) & (k > 0)[:, None]
    return selected if eligible is None else selected & eligible


def causal_batch(
    windows: Sequence[np.ndarray], seq_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """``causal`` batch from windows of up to ``seq_len + 1`` tokens.

    ``input_ids[t] = w[t]`` and ``labels[t] = w[t + 1]`` (labels are already shifted); a short window
    is right-padded with ``pad_id`` inputs and ``-100`` labels.
    """
    B = len(windows)
    input_ids = np.full((B, seq_len), pad_id, dtype=np.int64)
    labels = np.full((B, seq_len), IGNORE, dtype=np.int64)
    for b, w in enumerate(windows):
        n = len(w) - 1
        if not 0 < n <= seq_len:
            raise ValueError(f"window of {len(w)} tokens does not fit seq_len={seq_len} (+1)")
        input_ids[b, :n] = w[:-1]
        labels[b, :n] = w[1:]
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


def document_ids(input_ids: np.ndarray, eos_id: int, *, eos_opens: bool = True) -> np.ndarray:
    """(B, T) int64: the document each position of windows cut from a packed stream belongs to
    within its row (0, 1, ...; ``eos_id`` separates the stream's documents). A row's first
    document starts at the row's start (mid-document, as without a mask).

    ``eos_opens`` (causal models): an eos belongs to the document after it, so a document's first
    token is predicted from the eos before it alone, as generation from an empty prompt (``[eos]``)
    starts a document; the last token of a document still predicts the eos that ends it. Else
    (bidirectional models) it belongs to the document it ends, as in the store ("text eos") and in
    TLM's pairs ("source sep target eos")."""
    ends = input_ids == eos_id
    ids = np.cumsum(ends, axis=1)
    return ids if eos_opens else ids - ends


# random streams of mlm_mask: one independent draw each
MLM_SELECT, MLM_ACTION, MLM_REPLACE = 0, 1, 2


def mlm_mask(
    ids: np.ndarray,
    keys: np.ndarray,
    *,
    special: np.ndarray,
    mask_id: int,
    random_ids: np.ndarray,
    mask_prob: float = 0.15,
    p_mask: float = 0.8,
    p_random: float = 0.1,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT masking (Devlin et al., 2019, sec. 3.1) of a batch of sequences ``ids`` (B, L).

    Selects ``round(mask_prob * n)`` of the ``n`` non-special positions of each row (at least one;
    none when ``n = 0``), a uniformly random subset, as BERT's ``create_pretraining_data`` does. With
    ``word_start`` (B, L) it selects whole words instead, adding words in random order while they
    fit the budget (whole-word masking; a Python loop per row, as the fill is sequential). Each
    selected token becomes the mask token with probability ``p_mask``, a uniformly random token from
    ``random_ids`` with ``p_random``, and stays unchanged otherwise.

    Row ``b`` depends only on ``ids[b]`` (and ``word_start[b]``) and its key ``keys[b]``: padding
    (a special id, so never selected) and the other rows change nothing, which keeps every example's
    masking the same in any batch. Returns (inputs, labels with -100 off the selection, selected).
    """
    B, L = ids.shape
    keys = np.asarray(keys, dtype=np.uint64)
    eligible = ~special[ids]
    n = eligible.sum(axis=1)
    budget = np.where(n > 0, np.maximum(1, np.round(n * mask_prob)), 0).astype(np.int64)
    order = random_bits(keys[:, None], MLM_SELECT, np.arange(L))
    if word_start is None:
        selected = smallest(order, budget, eligible)
    else:
        selected = np.zeros((B, L), dtype=bool)
        for b in range(B):
            selected[b] = _whole_words(order[b], eligible[b], word_start[b], int(budget[b]))
    rows, cols = np.divmod(np.flatnonzero(selected), L)  # (2D nonzero is several times slower)
    u = random_uniform(keys[rows], MLM_ACTION, cols)
    inputs = ids.copy()
    inputs[rows[u < p_mask], cols[u < p_mask]] = mask_id
    replace = (u >= p_mask) & (u < p_mask + p_random)
    rows, cols = rows[replace], cols[replace]
    # modulo bias: at most len(random_ids) / 2**64
    pick = random_bits(keys[rows], MLM_REPLACE, cols) % np.uint64(len(random_ids))
    inputs[rows, cols] = random_ids[pick]
    labels = np.where(selected, ids, IGNORE)
    return inputs, labels, selected


def _whole_words(
    order: np.ndarray, eligible: np.ndarray, word_start: np.ndarray, budget: int
) -> np.ndarray:
    """One row's whole-word selection: words (a ``word_start`` position and the ones up to the next)
    in the order of their first eligible token's key, each taken while it still fits the budget."""
    selected = np.zeros(len(order), dtype=bool)
    if budget == 0:
        return selected
    pos = np.flatnonzero(eligible)
    word = np.cumsum(word_start)[pos]  # word number of each eligible position
    first = np.flatnonzero(np.diff(word, prepend=-1))  # where each word begins, as indices of pos
    sizes = np.diff(first, append=len(pos))
    size = sizes.tolist()
    take = np.zeros(len(first), dtype=bool)
    taken = 0
    for w in np.argsort(order[pos[first]]).tolist():
        if taken + size[w] <= budget:
            take[w] = True
            taken += size[w]
            if taken == budget:
                break
    selected[pos] = np.repeat(take, sizes)
    return selected


def seq2seq_batch(
    inputs: Sequence[np.ndarray] | np.ndarray,
    targets: Sequence[np.ndarray] | np.ndarray,
    seq_len: int,
    target_len: int,
    pad_id: int,
    bos_id: int,
) -> dict[str, torch.Tensor]:
    """``seq2seq`` batch of fixed shape from encoder inputs and decoder targets (each with its eos).

    ``input_ids`` (B, seq_len) right-padded with ``pad_id``, ``attention_mask`` True on real tokens;
    ``labels`` (B, target_len) = target, -100 on padding; ``decoder_input_ids`` = labels shifted right
    with ``bos_id`` as the decoder start token (teacher forcing), ``pad_id`` on padding. Inputs (and
    targets) may come as one (B, n) array when all have n tokens, which saves copying row by row.
    """
    in_len, tgt_len = _lengths(inputs), _lengths(targets)
    if len(in_len) != len(tgt_len):
        raise ValueError(f"{len(in_len)} inputs but {len(tgt_len)} targets")
    bad = (in_len < 1) | (in_len > seq_len) | (tgt_len < 1) | (tgt_len > target_len)
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(
            f"input of {in_len[b]} / target of {tgt_len[b]} tokens does not fit "
            f"seq_len={seq_len} / target_len={target_len}"
        )
    input_ids = _pad_rows(inputs, seq_len, pad_id)
    labels = _pad_rows(targets, target_len, IGNORE)
    attention_mask = np.arange(seq_len) < in_len[:, None]
    decoder_input_ids = np.full(labels.shape, pad_id, dtype=np.int64)
    decoder_input_ids[:, 0] = bos_id
    # position t reads target t - 1 wherever target t is real
    real = np.arange(1, target_len) < tgt_len[:, None]
    decoder_input_ids[:, 1:] = np.where(real, labels[:, :-1], pad_id)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "decoder_input_ids": torch.from_numpy(decoder_input_ids),
        "labels": torch.from_numpy(labels),
    }


def _lengths(rows: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(B,) int64 token counts of the rows."""
    if isinstance(rows, np.ndarray):
        return np.full(len(rows), rows.shape[1], dtype=np.int64)
    return np.array([len(row) for row in rows], dtype=np.int64)


def _pad_rows(rows: Sequence[np.ndarray] | np.ndarray, width: int, fill: int) -> np.ndarray:
    """(B, width) int64: row ``b`` is ``rows[b]`` then ``fill``."""
    out = np.full((len(rows), width), fill, dtype=np.int64)
    if isinstance(rows, np.ndarray):
        out[:, : rows.shape[1]] = rows
    else:
        for b, row in enumerate(rows):
            out[b, : len(row)] = row
    return out
