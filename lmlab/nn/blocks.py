"""Transformer building blocks shared by every backbone family.

Pre-norm blocks in the LLaMA style (Touvron et al., 2023): RMSNorm (Zhang & Sennrich, 2019), rotary
position embeddings (Su et al., 2021, "RoFormer"), SwiGLU feed-forward (Shazeer, 2020, "GLU Variants
Improve Transformer"), optional grouped-query attention (Ainslie et al., 2023), no biases, and
``F.scaled_dot_product_attention`` so the fastest kernel available on the device is used.

The file reads in data-flow order: norm -> rotary -> attention -> MLP -> block. Nothing here imports
Lightning; parallelism, activation checkpointing and compile are applied from outside by naming
:class:`Block`. RMSNorm, RoPE and the SwiGLU gate run as small autograd functions with hand-written
gradients in eager mode (fewer passes over memory, which is what eager elementwise code costs on a
CPU) and as the plain formulas under ``torch.compile``, which fuses those itself; tests hold the two
to each other.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from lmlab.nn.matmul import Linear


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: ``x / rms(x) * weight``, computed in float32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the compiler fuses PyTorch's own into one kernel
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)
        return _RMSNorm.apply(x, self.weight, self.eps)


class _RMSNorm(torch.autograd.Function):
    """RMSNorm for eager mode with a hand-written gradient: on a CPU ``F.rms_norm`` runs as separate
    operations with autograd through each, 2.3x the time of this forward + backward (measured at
    4 x 256 x 256). Saves ``x`` and the per-row 1/rms only, as autograd would."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).mul_(weight.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        # y = xhat * w with xhat = x * rstd: dL/dw = sum(g * xhat) over rows, and
        # dL/dx = rstd * (g*w - xhat * mean(g*w * xhat)) (the projection of a unit-RMS vector).
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        g = grad.float()
        grad_w = (g * xhat).reshape(-1, x.shape[-1]).sum(0)  # any leading dims, none too
        g = g * weight.float()
        dot = (g * xhat).mean(-1, keepdim=True)
        grad_x = g.sub_(xhat.mul_(dot)).mul_(rstd)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None


class Rotary(nn.Module):
    """Precomputed RoPE tables; ``forward(positions)`` returns ``(cos, sin)`` of shape (T, head_dim/2)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10_000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = self._tables()
        # Not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim)
        )
        t = torch.arange(self.max_seq_len, device=device).float()
        freqs = torch.outer(t, inv_freq)  # (T, hd/2)
        return freqs.cos(), freqs.sin()

    def reset_parameters(self) -> None:
        """Recompute the tables (needed after meta-device initialisation)."""
        cos, sin = self._tables(self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply to the tables, dtype casts do not: ``module.to(torch.bfloat16)`` (what
        Lightning's ``bf16-true`` does) would round the angles' cos/sin to bf16 (errors up to 2e-3)
        while :func:`apply_rotary` rotates in float32. Cast tables are recomputed, not cast back."""
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            self.cos, self.sin = self._tables(self.cos.device)
        return self

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.max_seq_len:
            raise ValueError(
                f"sequence reaches position {start + length}, beyond max_seq_len={self.max_seq_len}; "
                "raise model.max_seq_len or shorten the input"
            )
        return self.cos[start : start + length], self.sin[start : start + length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of ``x`` (B, T, H, hd) by the position angles,
    in float32; returns a contiguous tensor of ``x``'s dtype.

    Applied before the heads are transposed to (B, H, T, hd) for attention: the rotated tensors stay
    in the projection's (B, T, H, hd) order, the layout flash attention kernels read natively, and
    their gradients come back in it (no transposing copies around attention)."""
    cos, sin = cos[None, :, None], sin[None, :, None]  # (1, T, 1, hd/2)
    if torch.compiler.is_compiling():  # the plain formula, which the compiler fuses into one kernel
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)
    return _Rotary.apply(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    """``x`` rotated by ``sign`` x the angles, written into one new tensor: four passes over ``x``
    instead of the seven (and three temporaries) of the formula in eager mode."""
    if x.dtype != torch.float32:
        return _rotate(x.float(), cos, sin, sign).to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)
    return out


class _Rotary(torch.autograd.Function):
    """RoPE for eager mode: a rotation, whose gradient is the inverse rotation."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1), None, None


class KVCache(nn.Module):
    """Preallocated key/value buffers for one attention layer during incremental decoding."""

    def __init__(
        self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *, device, dtype
    ) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.length = 0  # number of positions filled
        # A decoder layer of an encoder-decoder also keeps its cross-attention keys/values of the
        # encoder output here, computed at the first decoding step (CrossAttention.forward).
        self.memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        if self.length + t > self.k.shape[2]:
            raise ValueError(f"KV cache full: {self.length} + {t} > {self.k.shape[2]} positions")
        self.k[:, :, self.length : self.length + t] = k
        self.v[:, :, self.length : self.length + t] = v
        self.length += t
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


class Attention(nn.Module):
    """Multi-head self-attention with optional grouped-query heads and rotary positions."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.qkv = Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.out = Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        *,
        is_causal: bool = True,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split(
            [self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1
        )
        q = q.view(B, T, self.n_heads, hd)
        k = k.view(B, T, self.n_kv_heads, hd)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q = q.transpose(1, 2)  # (B, H, T, hd)
        k = k.transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
        if is_causal and past > 0:
            # Queries sit at positions past..past+T-1 and may see every key up to their own position;
            # SDPA's is_causal aligns to the top-left corner, so build the offset mask explicitly.
            if T == 1:
                is_causal = False
            else:
                attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
                is_causal = False
        y = sdpa(q, k, v, attn_mask, is_causal=is_causal and attn_mask is None)  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * hd))


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    repeat_kv: bool | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of queries (B, H, T, hd) over keys and values
    (B, KV, S, hd) whose KV heads are each shared by H / KV query heads.

    SDPA's ``enable_gqa`` shares them without copies, but on CUDA only the flash kernel (and the
    math one) takes it, and flash takes no mask: a masked call (prefix LM, document masks, padding)
    would fall to the math kernel, which holds every layer's float32 scores. There the key/value
    heads are repeated instead (``repeat_kv`` None: where a mask meets a CUDA tensor), so that the
    memory-efficient kernel takes the call (as Hugging Face's models do). CPUs' flash kernel takes
    both.

    A :class:`BlockMask` (``attention=flex``: :func:`flex_document_mask`) goes to
    FlexAttention instead, which skips the blocks the mask leaves empty and shares the KV heads."""
    group = q.shape[1] // k.shape[1]
    if isinstance(attn_mask, BlockMask):
        # contiguous: FlexAttention's compiled kernels have mishandled strided inputs (compiled
        # with the model, the transposed views of RoPE's outputs gave logits off by ~0.5 on a CPU,
        # torch 2.13; pytorch/pytorch#146377: wrong key gradients from sliced keys on CUDA)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        # inside a compiled model the compiler takes flex_attention itself (a compiled function
        # called there would break the graph); eager, its own compiled kernel
        flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
        return flex(q, k, v, block_mask=attn_mask, enable_gqa=group > 1)
    if repeat_kv is None:
        repeat_kv = attn_mask is not None and q.is_cuda
    if group > 1 and repeat_kv:
        k, v, group = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=group > 1
    )


def flex_document_mask(
    doc_ids: torch.Tensor,
    *,
    causal: bool = True,
    prefix_len: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
) -> BlockMask:
    """Packed documents' attention as FlexAttention's block mask (``attention=flex``): query q
    sees key k when both are in the same document (``doc_ids`` (B, T)) and, ``causal``, k <= q or
    k is inside the row's ``prefix_len``; ``keys`` (B, T) bool, the real tokens (an encoder's
    padding). The same pairs as the dense masks (:func:`lmlab.nn.decoder.document_mask`, the
    encoder's), stored by which 128 x 128 blocks of the score matrix hold any, so that the kernel
    skips the blocks across documents (documents of ~T/n tokens keep ~1/n of the blocks)."""
    B, T = doc_ids.shape

    def visible(b, h, q, k):
        seen = doc_ids[b, q] == doc_ids[b, k]
        if causal:
            seen = seen & ((k <= q) if prefix_len is None else (k <= q) | (k < prefix_len[b]))
        return seen if keys is None else seen & keys[b, k]

    return create_block_mask(visible, B, None, T, T, device=doc_ids.device)


@functools.cache
def compiled_flex_attention():
    """``flex_attention`` compiled once per process, for eager models (uncompiled, it is a
    reference implementation that holds the whole score matrix)."""
    return torch.compile(flex_attention, dynamic=False)


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention: queries from the decoder, keys and values from the encoder.

    No rotary positions here: relative positions between two different sequences mean nothing, and the
    encoder output already carries its positions. The keys/values of the encoder output are computed
    inside ``forward`` (so that a sharded layer has its weights gathered) and, during incremental
    decoding, once: the layer's cache keeps them for the later steps.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q = Linear(d_model, n_heads * self.head_dim, bias=False)
        self.kv = Linear(d_model, 2 * n_kv_heads * self.head_dim, bias=False)
        self.out = Linear(n_heads * self.head_dim, d_model, bias=False)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = memory.shape
        k, v = self.kv(memory).view(B, S, 2, self.n_kv_heads, self.head_dim).unbind(2)
        return k.transpose(1, 2), v.transpose(1, 2)  # (B, KV, S, hd) each

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        if cache is None:
            k, v = self.memory_kv(memory)
        else:
            if cache.memory_kv is None:
                cache.memory_kv = self.memory_kv(memory)
            k, v = cache.memory_kv
        y = sdpa(q, k, v, memory_mask)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    """Gated feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = Linear(d_model, 2 * hidden, bias=False)
        self.down = Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        if torch.compiler.is_compiling():  # the plain formula, which the compiler fuses
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(_SwiGLU.apply(gate_up))


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` of the fused projection's output ``[gate | up]`` for eager mode: the
    gradients are written straight into the two halves of one ``[dgate | dup]`` tensor (autograd
    would compute them separately and then concatenate them, a further pass over the largest
    activation) and only the input is saved, not ``silu(gate)`` as well (it is recomputed). Fwd + bwd
    at 4 x 256 x 2 x 704 on the 2-core CPU: 1.4 ms instead of 2.5 ms. Results equal the formula's
    bit for bit in float32 and bfloat16 (tests)."""

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_in = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_in.chunk(2, dim=-1)
        act = F.silu(gate)
        torch.mul(grad, act, out=grad_up)
        torch.mul(grad, up, out=act)  # dL/dsilu(gate), in the buffer silu(gate) no longer needs
        torch.ops.aten.silu_backward.grad_input(act, gate, grad_input=grad_gate)
        return grad_in


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, mlp_hidden: int, norm_eps: float
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = Attention(d_model, n_heads, n_kv_heads)
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        self.mlp = SwiGLU(d_model, mlp_hidden)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        *,
        is_causal: bool = True,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(
            self.attn_norm(x), rope, is_causal=is_causal, attn_mask=attn_mask, cache=cache
        )
        return x + self.mlp(self.mlp_norm(x))


class CrossBlock(nn.Module):
    """Encoder-decoder decoder block: causal self-attention, cross-attention, MLP, each pre-norm."""

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, mlp_hidden: int, norm_eps: float
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = Attention(d_model, n_heads, n_kv_heads)
        self.cross_norm = RMSNorm(d_model, norm_eps)
        self.cross = CrossAttention(d_model, n_heads, n_kv_heads)
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        self.mlp = SwiGLU(d_model, mlp_hidden)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``memory``: the encoder output (B, S, C); ``cache``: this layer's decoding cache."""
        x = x + self.attn(self.attn_norm(x), rope, is_causal=True, cache=cache)
        x = x + self.cross(self.cross_norm(x), memory, memory_mask, cache)
        return x + self.mlp(self.mlp_norm(x))


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) bool, True = real token -> (B, 1, 1, S) mask that SDPA broadcasts over heads/queries.

    A batch without padding gets ``None``: with an explicit mask SDPA falls back from the fused
    (flash) kernels to the slower math path, and full windows are the common case in pre-training.
    That is checked only where it is free, on a host tensor outside compilation: on a GPU, reading
    the answer would wait for every queued kernel (``LMModule.on_before_batch_transfer`` drops such
    masks while batches are still on the host), and under compile it would break the graph.
    """
    if attention_mask is None:
        return None
    on_host = attention_mask.device.type == "cpu" and not torch.compiler.is_compiling()
    if on_host and bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


def init_weights(module: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 style init: N(0, std) everywhere, residual output projections scaled by 1/sqrt(2L).

    Scaling the projections that write into the residual stream keeps its variance independent of
    depth (Radford et al., 2019, section 2.3).
    """
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue  # norm gains stay at one
        residual_out = ("attn.out.weight", "cross.out.weight", "mlp.down.weight")
        scale = 1 / math.sqrt(2 * n_layers) if name.endswith(residual_out) else 1
        nn.init.normal_(p, mean=0.0, std=std * scale)


class Backbone(nn.Module):
    """What the three backbones share: a token embedding ``embed`` and an output head ``lm_head``
    (tied to it when ``config.tie_embeddings``), GPT-2 initialisation over ``depth`` residual blocks,
    and the names strategies use: ``block_class`` (the repeated blocks that activation checkpointing,
    compile and FSDP wrap) and ``fsdp_methods`` (entry points besides ``forward`` that FSDP must
    gather the root weights for)."""

    block_class: type | tuple[type, ...] = Block
    fsdp_methods: tuple[str, ...] = ()

    @property
    def depth(self) -> int:
        """Residual blocks the init scales the output projections by."""
        return self.config.n_layers

    def init_and_tie(self) -> None:
        """The end of every backbone's ``__init__``: initialise, then share embedding and head."""
        self.reset_parameters()
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        init_weights(self, self.depth, self.config.init_std)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the token embedding (and tied head) and a learned
        position embedding (the encoder's ``pos_embed``), as Kaplan et al. (2020) count N."""
        n = sum(p.numel() for p in self.parameters())
        if not non_embedding:
            return n
        pos_embed = getattr(self, "pos_embed", None)
        n -= self.embed.weight.numel()
        return n - pos_embed.weight.numel() if pos_embed is not None else n


def multiple_of(n: int, k: int) -> int:
    """Round ``n`` up to a multiple of ``k``."""
    return -(-n // k) * k
