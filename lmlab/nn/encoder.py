"""Encoder-only Transformer (BERT family) with a masked-LM head.

Same pre-norm blocks as the decoder (:mod:`lmlab.nn.blocks`) with bidirectional attention and a key
padding mask, rotary or learned absolute positions, and an MLM head tied to the token embedding as in
BERT (Devlin et al., 2019). The layout follows ModernBERT (Warner et al., 2024): pre-norm, RoPE, gated
MLP, no biases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmlab.nn.blocks import Backbone, Block, RMSNorm, Rotary, key_padding_mask
from lmlab.nn.decoder import DecoderConfig
from lmlab.nn.matmul import Linear


@dataclass
class EncoderConfig(DecoderConfig):
    positions: str = "rope"  # rope | learned (absolute embeddings, as in BERT)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"model.positions must be rope or learned, got {self.positions!r}")


class Encoder(Backbone):
    """``forward(input_ids, attention_mask) -> logits`` (B, S, V) at every position."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.padded_vocab_size, c.d_model)
        self.rotary = Rotary(c.head_dim, c.max_seq_len, c.rope_theta)
        self.pos_embed = (
            nn.Embedding(c.max_seq_len, c.d_model) if c.positions == "learned" else None
        )
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.n_kv_heads, c.mlp_hidden, c.norm_eps)
            for _ in range(c.n_layers)
        )
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = Linear(c.d_model, c.padded_vocab_size, bias=False)
        self.init_and_tie()

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states (B, S, C), normalised."""
        S = input_ids.shape[1]
        x = self.embed(input_ids)  # (B, S, C)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(S, device=input_ids.device))
        else:
            rope = self.rotary(0, S)
        mask = key_padding_mask(attention_mask)
        for block in self.blocks:
            x = block(x, rope, is_causal=False, attn_mask=mask)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        head: bool = True,
    ) -> torch.Tensor:
        """Logits (B, S, V), or with ``head=False`` the final hidden states (B, S, C)."""
        x = self.encode(input_ids, attention_mask)
        return self.lm_head(x) if head else x
