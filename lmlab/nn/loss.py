"""The output head and the cross-entropy in one pass over chunks of tokens.

``linear_cross_entropy(hidden, weight, labels)`` is ``F.cross_entropy(hidden @ weight.T, labels,
reduction="sum")`` without ever holding the (tokens x vocab) logits whole: each chunk of tokens gets its
logits, its loss and, when gradients are wanted, its gradients with respect to ``hidden`` and ``weight``,
before the next chunk starts. The backward pass then only scales the stored gradients. This is the
"fused linear cross-entropy" of Liger-Kernel (Hsu et al., 2024) and of Wijmans et al. (2024, "Cut Your
Losses in Large-Vocabulary Language Models"), written here in plain PyTorch so it runs, and compiles,
on every device.

What it saves: the logits and their gradient are the largest activations of a small model with a
large vocabulary (16 x 1024 tokens x 50K vocabulary in fp32 is 3.3 GB, twice); a chunk's stay in
cache, so the softmax and its gradient cost little next to the three matrix products, which are
unchanged (``benchmarks/vs_hf.py`` measures the effect on a whole training step). Eagerly a chunk's
softmax gradient is written in place of its float32 logits (fewest passes for eager code); under
``torch.compile`` it is the pure formula, which inductor turns into one kernel that reads the logits
in the matrix product's dtype and writes the gradient over them (the in-place code made it keep a
float32 copy and scatter into it eagerly).

Numerics: logits, the log-sum-exp and the softmax gradient are float32, as ``F.cross_entropy`` on
upcast logits; the matrix products run in the autocast dtype when autocast is on (bf16-mixed), else
in the weight's dtype.
"""

from __future__ import annotations

import torch

from lmlab.data.collate import IGNORE
from lmlab.nn.matmul import mm, mm_t


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The matrix products' dtype: autocast's when it is on for the weight's device."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _softmax_grad(z, top, nll, target, valid, dtype):
    """A chunk's ``softmax(z) - onehot(y)`` in ``dtype`` (rows of ignored tokens zero) and its
    summed loss, as the pure formulas that ``torch.compile`` fuses: one reduction over the chunk's
    logits and one pass writing the gradient. The eager code's in-place updates and
    ``scatter_add_`` would make inductor keep a float32 copy of the logits (twice their bf16 size),
    scatter into it eagerly and read it again to round it."""
    shifted = z - top  # relative to the row's largest logit: exact, and lse stays small
    lse = shifted.exp().sum(1, keepdim=True).log()
    onehot = torch.arange(z.shape[1], device=z.device) == target
    g = torch.where(valid, (shifted - lse).exp() - onehot.float(), 0).to(dtype)
    return g, torch.where(valid, nll + lse, 0).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """(summed NLL, correct argmax count); with ``grads``, the gradients are computed in ``forward``
    and scaled in ``backward``."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, count_correct: bool, grads: bool):
        dtype = _compute_dtype(weight)
        with torch.autocast(weight.device.type, enabled=False):
            w = weight.to(dtype)
            grad_h, grad_w = [], None
            # The totals are summed out of place: under torch.compile, torch 2.11 sends the gradient
            # of an output that forward changed in place to the wrong output, and the inputs got
            # zero gradients (pytorch/pytorch#180642; seen on an H100 and a CPU, 2026-11-27).
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            correct = torch.zeros((), dtype=torch.long, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)
                y = labels[start : start + chunk_size]
                target = y.clamp(min=0)[:, None]  # any class for ignored rows; masked below
                valid = (y != IGNORE)[:, None]
                if grads:
                    # An ignored row must add exactly nothing, as in F.cross_entropy, even where its
                    # hidden state is not finite (NaN * 0 is NaN): zeroed (N x C, not N x V), its
                    # logits are finite, the masks below zero its loss and softmax gradient, and it
                    # adds 0 * 0 to the weight's gradient, not 0 * NaN.
                    h = torch.where(valid, h, 0)
                z = mm_t(h, w).float()  # this chunk's logits
                if count_correct:
                    correct = correct + ((z.argmax(1, keepdim=True) == target) & valid).sum()
                top = z.amax(1, keepdim=True)
                nll = top - z.gather(1, target)
                if not grads:  # no gradients: dropping the ignored rows' (N, 1) losses is enough
                    lse = (z - top).exp().sum(1, keepdim=True).log()
                    total = total + torch.where(valid, nll + lse, 0).sum()
                    continue
                if torch.compiler.is_compiling():
                    g, chunk_total = _softmax_grad(z, top, nll, target, valid, dtype)
                    total = total + chunk_total
                else:  # softmax(z) - onehot(y) in place of z; rows of ignored tokens are zero
                    z.sub_(top).exp_()
                    norm = z.sum(1, keepdim=True)
                    total = total + ((nll + norm.log()) * valid).sum()
                    z.mul_(valid / norm)
                    z.scatter_add_(1, target, -valid.float())
                    g = z.to(dtype)
                grad_h.append(mm(g, w).to(hidden.dtype))
                if grad_w is None:
                    grad_w = torch.mm(g.t(), h).float()
                elif dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)
                else:  # accumulate the chunks' bf16 products in float32
                    grad_w += torch.mm(g.t(), h)
        if grads:
            if grad_w is None:  # no tokens at all
                grad_h, grad_w = [torch.zeros_like(hidden)], torch.zeros_like(weight)
            ctx.save_for_backward(torch.cat(grad_h), grad_w.to(weight.dtype))
            ctx.used = False
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_output, _):
        if ctx.used:
            raise RuntimeError(
                "linear_cross_entropy supports one backward pass per forward: its gradients are "
                "computed in the forward pass and scaled in place"
            )
        ctx.used = True
        grad_h, grad_w = ctx.saved_tensors
        # In place: a (vocab x C) product of fresh memory costs more than the multiply on a CPU.
        grad_h.mul_(grad_output.to(grad_h.dtype))
        grad_w.mul_(grad_output.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 1024,
    count_correct: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels``, chunk by chunk.

    hidden (N, C), weight (V, C), labels (N,) with -100 for positions that are not targets. Returns
    (summed NLL in nats as a float32 scalar, number of targets whose argmax logit is right, or
    ``None`` unless ``count_correct``). With gradients enabled, the gradients with respect to
    ``hidden`` and ``weight`` are computed here, chunk by chunk, so nothing of size N x V outlives
    a chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    nll, correct = _LinearCrossEntropy.apply(
        hidden, weight, labels, chunk_size, count_correct, grads
    )
    return nll, correct if count_correct else None
