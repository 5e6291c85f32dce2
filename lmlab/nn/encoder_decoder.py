"""Encoder-decoder Transformer (T5 / BART family).

A bidirectional encoder over the (corrupted) input and a causal decoder with cross-attention that
writes the target, as in T5 (Raffel et al., 2020): one embedding shared by encoder, decoder and (when
tied) the output head. Positions are rotary in both stacks (T5 uses a learned relative bias; RoPE
also encodes relative positions and keeps the blocks shared with the other families). Decoding
caches the decoder's self-attention keys/values and computes the encoder's cross-attention keys/values
once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmlab.nn.blocks import (
    Backbone,
    Block,
    CrossBlock,
    KVCache,
    RMSNorm,
    Rotary,
    key_padding_mask,
)
from lmlab.nn.decoder import DecoderConfig
from lmlab.nn.matmul import Linear
from lmlab.nn.sampling import decode_loop


@dataclass
class EncoderDecoderConfig(DecoderConfig):
    # n_layers counts encoder layers; the decoder has its own depth
    n_decoder_layers: int = 4
    max_target_len: int = 512  # longest decoder sequence the rotary table must cover

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_decoder_layers < 1:
            raise ValueError(f"model.n_decoder_layers must be >= 1, got {self.n_decoder_layers}")
        if self.max_target_len < 1:
            raise ValueError(f"model.max_target_len must be >= 1, got {self.max_target_len}")


class EncoderDecoder(Backbone):
    block_class = (Block, CrossBlock)
    fsdp_methods = ("generate",)

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.padded_vocab_size, c.d_model)
        self.rotary = Rotary(c.head_dim, max(c.max_seq_len, c.max_target_len), c.rope_theta)
        self.enc_blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.n_kv_heads, c.mlp_hidden, c.norm_eps)
            for _ in range(c.n_layers)
        )
        self.enc_norm = RMSNorm(c.d_model, c.norm_eps)
        self.dec_blocks = nn.ModuleList(
            CrossBlock(c.d_model, c.n_heads, c.n_kv_heads, c.mlp_hidden, c.norm_eps)
            for _ in range(c.n_decoder_layers)
        )
        self.dec_norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = Linear(c.d_model, c.padded_vocab_size, bias=False)
        self.init_and_tie()

    @property
    def depth(self) -> int:
        return self.config.n_layers + self.config.n_decoder_layers

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.embed(input_ids)  # (B, S, C)
        rope, mask = self.rotary(0, input_ids.shape[1]), key_padding_mask(attention_mask)
        for block in self.enc_blocks:
            x = block(x, rope, is_causal=False, attn_mask=mask)
        return self.enc_norm(x)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """The decoder's final normalised hidden states (B, T, C), attending to the encoder output
        ``memory`` (B, S, C) whose padding ``attention_mask`` marks."""
        T = decoder_input_ids.shape[1]
        start = caches[0].length if caches else 0
        rope, mask = self.rotary(start, T), key_padding_mask(attention_mask)
        x = self.embed(decoder_input_ids)  # (B, T, C)
        for i, block in enumerate(self.dec_blocks):
            x = block(x, rope, memory, mask, cache=caches[i] if caches else None)
        return self.dec_norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        head: bool = True,
    ) -> torch.Tensor:
        """Logits (B, T, V) of the target positions, or with ``head=False`` the decoder's final
        hidden states (B, T, C)."""
        memory = self.encode(input_ids, attention_mask)
        x = self.decode(decoder_input_ids, memory, attention_mask)
        return self.lm_head(x) if head else x

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        start_id: int,
        attention_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode up to ``max_new_tokens`` after ``start_id``; returns (B, n) without the start,
        n <= ``config.max_target_len`` (the longest target the decoder is trained on; the shared
        rotary table may be longer, for the encoder)."""
        B = input_ids.shape[0]
        c, p = self.config, self.embed.weight
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if max_new_tokens == 0:  # no decoder step at all (a cache of 0 positions would refuse one)
            return torch.empty(B, 0, dtype=torch.long, device=input_ids.device)
        steps = min(max_new_tokens, c.max_target_len)
        memory = self.encode(input_ids, attention_mask)
        caches = [
            KVCache(B, c.n_kv_heads, steps, c.head_dim, device=p.device, dtype=p.dtype)
            for _ in range(c.n_decoder_layers)
        ]
        start = torch.full((B, 1), start_id, dtype=torch.long, device=input_ids.device)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            hidden = self.decode(tokens, memory, attention_mask, caches)
            return self.lm_head(hidden[:, -1])[:, : c.vocab_size]

        return decode_loop(
            step(start),
            step,
            steps,
            eos_id,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )
