"""Next-token selection from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

Top-p follows Holtzman et al., 2020 ("The Curious Case of Neural Text Degeneration"): keep the smallest
set of tokens whose probability mass reaches ``top_p``; the most likely token is always kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def check_sampling(
    temperature: float, top_k: int | None, top_p: float | None, prefix: str = ""
) -> None:
    """Raise ``ValueError`` naming the first sampling setting out of range (``prefix``: the
    settings' config group, e.g. ``"sample."``)."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature < math.inf  # NaN fails too
    ):
        raise ValueError(
            f"{prefix}temperature must be a finite number >= 0 (0: greedy), got {temperature!r}"
        )
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1
    ):
        raise ValueError(f"{prefix}top_p must be in (0, 1] or null, got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{prefix}top_k must be a whole number >= 1 or null, got {top_k!r}")


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token id per row of ``logits`` (B, V). ``temperature == 0`` means greedy."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # Exactly k survive: masking by ``logits < k-th value`` would keep every token tied with
        # the k-th (all of them for equal logits, and common with bf16 logits).
        values, ids = torch.topk(logits, top_k, dim=-1)  # (B, k)
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, ids, values)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (so the first is always kept).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_tokens(
    logits: torch.Tensor,
    done: torch.Tensor,
    eos_id: int | None,
    **sampling,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step for a batch: sample (see :func:`sample_next`), keep finished rows on
    ``eos_id``; returns (tokens (B,), updated done mask (B,))."""
    nxt = sample_next(logits, **sampling)
    if eos_id is not None:
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        done = done | (nxt == eos_id)
    return nxt, done


def decode_loop(
    logits: torch.Tensor,
    step: Callable[[torch.Tensor], torch.Tensor],
    max_steps: int,
    eos_id: int | None,
    **sampling,
) -> torch.Tensor:
    """Incremental decoding shared by the generating backbones: ``logits`` (B, V) give the first
    token, ``step(tokens (B, 1)) -> logits (B, V)`` each next one (through the model's caches).
    Rows that emitted ``eos_id`` keep emitting it, and decoding stops early once all have; no step
    is taken after the last token. Returns the tokens (B, n), n <= ``max_steps``."""
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    out = []
    for i in range(max_steps):
        nxt, done = next_tokens(logits, done, eos_id, **sampling)
        out.append(nxt[:, None])
        if i == max_steps - 1 or (eos_id is not None and bool(done.all())):
            break
        logits = step(nxt[:, None])
    return torch.cat(out, dim=1)
