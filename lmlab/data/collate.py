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
