"""Encoder-only Transformer (BERT family) with a masked-LM head.

Same pre-norm blocks as the decoder (:mod:`lmlab.nn.blocks`) with bidirectional attention and a key
padding mask, rotary or learned absolute positions, and an MLM head tied to the token embedding as in
BERT (Devlin et al., 2019). The layout follows ModernBERT (Warner et al., 2024): pre-norm, RoPE, gated
MLP, no biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.nn.blocks import Backbone, Block, RMSNorm, Rotary, flex_document_mask, key_padding_mask
from lmlab.nn.decoder import DecoderConfig
from lmlab.nn.matmul import Linear


@dataclass
class EncoderConfig(DecoderConfig):
    positions: str = "rope"  # rope | learned (absolute embeddings, as in BERT)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"model.positions must be rope or learned, got {self.positions!r}")


class SentenceHead(nn.Module):
    """BERT's pooler and classifier over one position's hidden state (the cls token's):
    ``logits = W2 tanh(W1 h + b1) + b2`` (Devlin et al., 2019; ALBERT keeps it for sentence order).

    Its own parameters rather than ``nn.Linear`` children: :meth:`reset_parameters` zeroes the
    biases (BERT's init) and a meta-device model materialised by :mod:`lmlab.parallel` resets each
    submodule, where child ``nn.Linear`` would draw the biases again; the weights get the
    backbone's normal init with the rest."""

    def __init__(self, d_model: int, classes: int) -> None:
        super().__init__()
        self.pool_weight = nn.Parameter(torch.empty(d_model, d_model))
        self.pool_bias = nn.Parameter(torch.empty(d_model))
        self.weight = nn.Parameter(torch.empty(classes, d_model))
        self.bias = nn.Parameter(torch.empty(classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.pool_weight, self.weight):
            nn.init.normal_(w, std=1 / math.sqrt(w.shape[1]))  # the backbone's init follows
        nn.init.zeros_(self.pool_bias)
        nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., classes) logits."""
        pooled = torch.tanh(F.linear(hidden, self.pool_weight, self.pool_bias))
        return F.linear(pooled, self.weight, self.bias)


class TokenHead(nn.Module):
    """A linear classifier of each position's hidden state (BERT's token classification head):
    ``logits = W h + b``; biases zeroed, as :class:`SentenceHead`'s."""

    def __init__(self, d_model: int, classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, d_model))
        self.bias = nn.Parameter(torch.empty(classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1 / math.sqrt(self.weight.shape[1]))
        nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)


class Encoder(Backbone):
    """``forward(input_ids, attention_mask) -> logits`` (B, S, V) at every position. With
    ``sentence_classes`` > 0 it also has a :class:`SentenceHead` (``sentence_head``) that the
    sentence-level objectives (nsp, sop, ...) apply to the cls position's hidden state, and with
    ``token_classes`` > 0 a :class:`TokenHead` (``token_head``) for every position's
    (capital_word)."""

    flex_masks = False  # document masks as FlexAttention block masks (attention=flex, on CUDA)

    def __init__(
        self, config: EncoderConfig, sentence_classes: int = 0, token_classes: int = 0
    ) -> None:
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
        self.sentence_head = SentenceHead(c.d_model, sentence_classes) if sentence_classes else None
        self.token_head = TokenHead(c.d_model, token_classes) if token_classes else None
        self.init_and_tie()

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, S, C), normalised. ``doc_ids`` (B, S), the document of each
        position of packed windows: attention stays inside each document. With rotary positions a
        document's outputs are then those of the document alone (scores depend on distances
        only); learned positions still tell where in the window it sits."""
        S = input_ids.shape[1]
        x = self.embed(input_ids)  # (B, S, C)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(S, device=input_ids.device))
        else:
            rope = self.rotary(0, S)
        if doc_ids is not None and self.flex_masks:
            mask = flex_document_mask(doc_ids, causal=False, keys=attention_mask)
        else:
            mask = key_padding_mask(attention_mask)
            if doc_ids is not None:
                same = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]  # (B, 1, S, S)
                mask = same if mask is None else same & mask
        for block in self.blocks:
            x = block(x, rope, is_causal=False, attn_mask=mask)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Logits (B, S, V), or with ``head=False`` the final hidden states (B, S, C)."""
        x = self.encode(input_ids, attention_mask, doc_ids)
        return self.lm_head(x) if head else x
