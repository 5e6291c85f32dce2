"""Pure batch builders: numpy token windows in, dict batches of the declared kind out (unit-tested)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE = -100  # label value that cross-entropy skips


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


def mlm_mask(
    ids: np.ndarray,
    rng: np.random.Generator,
    *,
    special: np.ndarray,
    mask_id: int,
    random_ids: np.ndarray,
    mask_prob: float = 0.15,
    p_mask: float = 0.8,
    p_random: float = 0.1,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT masking (Devlin et al., 2019, sec. 3.1) of one sequence.

    Selects ``round(mask_prob * n)`` of the ``n`` non-special positions (at least one), as BERT's
    ``create_pretraining_data`` does; with ``word_start`` it selects whole words instead, adding words
    in random order while they fit the budget (whole-word masking). Each selected token becomes the mask
    token with probability ``p_mask``, a random token from ``random_ids`` with ``p_random``, and stays
    unchanged otherwise. Returns (inputs, labels with -100 off the selection, selected mask).
    """
    eligible = ~special[ids]
    n = int(eligible.sum())
    selected = np.zeros(len(ids), dtype=bool)
    if n:
        budget = max(1, round(n * mask_prob))
        if word_start is None:
            selected[rng.choice(np.flatnonzero(eligible), size=budget, replace=False)] = True
        else:
            word = np.cumsum(word_start) - 1  # word index of every position
            words = np.unique(word[eligible])
            taken = 0
            for w in rng.permutation(words):
                members = (word == w) & eligible
                size = int(members.sum())
                if taken + size <= budget:
                    selected |= members
                    taken += size
                if taken == budget:
                    break
    labels = np.where(selected, ids, IGNORE)
    inputs = ids.copy()
    r = rng.random(len(ids))
    to_mask = selected & (r < p_mask)
    to_random = selected & (r >= p_mask) & (r < p_mask + p_random)
    inputs[to_mask] = mask_id
    inputs[to_random] = rng.choice(random_ids, size=int(to_random.sum()))
    return inputs, labels, selected


def seq2seq_batch(
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    seq_len: int,
    target_len: int,
    pad_id: int,
    bos_id: int,
) -> dict[str, torch.Tensor]:
    """``seq2seq`` batch of fixed shape from encoder inputs and decoder targets (each with its eos).

    ``input_ids`` (B, seq_len) right-padded with ``pad_id``, ``attention_mask`` True on real tokens;
    ``labels`` (B, target_len) = target, -100 on padding; ``decoder_input_ids`` = labels shifted right
    with ``bos_id`` as the decoder start token (teacher forcing), ``pad_id`` on padding.
    """
    B = len(inputs)
    input_ids = np.full((B, seq_len), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, seq_len), dtype=bool)
    decoder_input_ids = np.full((B, target_len), pad_id, dtype=np.int64)
    labels = np.full((B, target_len), IGNORE, dtype=np.int64)
    for b, (x, y) in enumerate(zip(inputs, targets, strict=True)):
        if not 0 < len(x) <= seq_len or not 0 < len(y) <= target_len:
            raise ValueError(
                f"input of {len(x)} / target of {len(y)} tokens does not fit "
                f"seq_len={seq_len} / target_len={target_len}"
            )
        input_ids[b, : len(x)] = x
        attention_mask[b, : len(x)] = True
        labels[b, : len(y)] = y
        decoder_input_ids[b, 0] = bos_id
        decoder_input_ids[b, 1 : len(y)] = y[:-1]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "decoder_input_ids": torch.from_numpy(decoder_input_ids),
        "labels": torch.from_numpy(labels),
    }
