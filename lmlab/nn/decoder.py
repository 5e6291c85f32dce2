"""Decoder-only Transformer (GPT family) in the LLaMA layout.

Token embedding -> L pre-norm blocks (causal self-attention with RoPE, SwiGLU MLP) -> RMSNorm -> LM
head, optionally tied to the embedding (Press & Wolf, 2017). The structure follows nanoGPT
(karpathy/nanoGPT) with the LLaMA component choices; generation uses a key/value cache so each new
token costs one position of compute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lmlab.nn.blocks import (
    Backbone,
    Block,
    KVCache,
    RMSNorm,
    Rotary,
    flex_document_mask,
    multiple_of,
)
from lmlab.nn.matmul import Linear
from lmlab.nn.sampling import decode_loop


@dataclass
class DecoderConfig:
    # vocabulary
    vocab_size: int = (
        50304  # tokenizer size; the embedding is padded to a multiple of `pad_vocab_to`
    )
    pad_vocab_to: int = 64  # padded rows are never targets; padding keeps matmuls aligned
    # size
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention when < n_heads; None = n_heads (MHA)
    mlp_hidden: int | None = None  # None = 8/3 * d_model rounded up to a multiple of 64 (LLaMA)
    max_seq_len: int = 1024  # longest sequence the rotary table covers
    # details
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    padded_vocab_size: int = field(init=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden is None:
            self.mlp_hidden = multiple_of(int(8 * self.d_model / 3), 64)
        positive = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "max_seq_len")
        for name in (*positive, "mlp_hidden", "pad_vocab_to"):  # pad_vocab_to=1: no padding
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"head size d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE"
            )
        for name in ("rope_theta", "init_std"):  # written so that NaN fails too
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(
                    f"model.{name} must be a finite number > 0, got {getattr(self, name)}"
                )
        if not 0 <= self.norm_eps < math.inf:
            raise ValueError(f"model.norm_eps must be a finite number >= 0, got {self.norm_eps}")
        self.padded_vocab_size = multiple_of(self.vocab_size, self.pad_vocab_to)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("padded_vocab_size")
        return d


def prefix_lm_mask(prefix_len: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, T) bool: query q sees key k when k <= q or k is inside the row's prefix."""
    pos = torch.arange(T, device=prefix_len.device)
    causal = pos[None, :] <= pos[:, None]  # (T, T)
    in_prefix = pos[None, None, :] < prefix_len[:, None, None]  # (B, 1, T)
    return (causal[None] | in_prefix)[:, None]


def document_mask(doc_ids: torch.Tensor, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, T, T) bool: query q sees key k when both are in the same document and k <= q (or,
    with ``prefix_len``, k is inside the row's prefix)."""
    T = doc_ids.shape[1]
    if prefix_len is None:
        pos = torch.arange(T, device=doc_ids.device)
        allowed = (pos[None, :] <= pos[:, None])[None, None]  # (1, 1, T, T)
    else:
        allowed = prefix_lm_mask(prefix_len, T)
    return allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])


class Decoder(Backbone):
    """Causal language model: ``forward(input_ids) -> logits`` of shape (B, T, padded_vocab)."""

    fsdp_methods = ("generate",)
    flex_masks = False  # document masks as FlexAttention block masks (attention=flex, on CUDA)

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.padded_vocab_size, c.d_model)
        self.rotary = Rotary(c.head_dim, c.max_seq_len, c.rope_theta)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.n_kv_heads, c.mlp_hidden, c.norm_eps)
            for _ in range(c.n_layers)
        )
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = Linear(c.d_model, c.padded_vocab_size, bias=False)
        self.init_and_tie()

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        prefix_len: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Logits (B, T, V), or with ``head=False`` the final normalised hidden states (B, T, C)
        (the training loss applies the head itself, :mod:`lmlab.nn.loss`). ``prefix_len`` (B,):
        prefix-LM attention, bidirectional over each row's first ``prefix_len`` positions and causal
        after them (Raffel et al., 2020, sec. 3.2). ``doc_ids`` (B, T), the document of each
        position of packed windows: attention stays inside each document (the prefix's too).

        Rotary positions need no restart at each document: RoPE's attention scores depend on the
        distance between query and key only, so a document's outputs are the same wherever it
        starts in the window (to float rounding; tests/test_families.py)."""
        T = input_ids.shape[1]
        start = caches[0].length if caches else 0
        if caches and doc_ids is not None:
            raise ValueError("doc_ids are for packed training windows, not for cached decoding")
        rope = self.rotary(start, T)
        if doc_ids is not None and self.flex_masks:
            mask = flex_document_mask(doc_ids, prefix_len=prefix_len)
        elif doc_ids is not None:
            mask = document_mask(doc_ids, prefix_len)
        else:
            mask = None if prefix_len is None else prefix_lm_mask(prefix_len, T)
        x = self.embed(input_ids)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches else None
            x = block(x, rope, is_causal=mask is None, attn_mask=mask, cache=cache)
        x = self.norm(x)
        return self.lm_head(x) if head else x  # (B, T, V) or (B, T, C)

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        c, p = self.config, self.embed.weight
        return [
            KVCache(batch, c.n_kv_heads, max_len, c.head_dim, device=p.device, dtype=p.dtype)
            for _ in range(c.n_layers)
        ]

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        suppress: Sequence[int] = (),
        prefix: bool = False,
    ) -> torch.Tensor:
        """Continue ``input_ids`` (B, T0) by up to ``max_new_tokens``; returns (B, T0 + n).

        The prompt is processed once (prefill), then one position per step through the KV cache.
        Rows that emitted ``eos_id`` keep emitting it; generation stops early when all rows have.
        The vocabulary padding rows and the ids in ``suppress`` are never sampled. ``prefix``: the
        prompt is a prefix LM's prefix, its positions attending to each other both ways (as
        ``prefix_len=T0`` in training); the new tokens attend causally, to it and to each other.
        """
        B, T0 = input_ids.shape
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if max_new_tokens == 0:
            return input_ids
        total = min(T0 + max_new_tokens, self.config.max_seq_len)
        if total <= T0:
            raise ValueError(
                f"prompt of {T0} tokens leaves no room to generate within max_seq_len="
                f"{self.config.max_seq_len}"
            )
        caches = self.new_caches(B, total)
        banned = torch.tensor(list(suppress), dtype=torch.long, device=input_ids.device)

        def logits(tokens: torch.Tensor, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
            out = self.next_logits(tokens, caches, prefix_len)
            return out.index_fill_(-1, banned, float("-inf"))

        whole = torch.full((B,), T0, device=input_ids.device) if prefix else None
        new = decode_loop(
            logits(input_ids, whole),
            logits,
            total - T0,
            eos_id,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )
        return torch.cat([input_ids, new], dim=1)

    def next_logits(
        self,
        input_ids: torch.Tensor,
        caches: list[KVCache],
        prefix_len: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, vocab_size) after the last position of ``input_ids``, through the caches; the
        head runs on that position only. (`self.forward`, not `self(...)`: after `module.compile()`
        the call path is compiled for training shapes; decoding with a growing cache would
        recompile at every length.)"""
        if prefix_len is not None and caches[0].length:
            raise ValueError(
                "a prefix is the first part of the input: prefill it into empty caches"
            )
        hidden = self.forward(input_ids, prefix_len=prefix_len, caches=caches, head=False)[:, -1]
        return self.lm_head(hidden)[:, : self.config.vocab_size]
