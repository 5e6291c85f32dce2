"""Float32 matrix products on CPUs through oneDNN.

PyTorch sends a float32 matrix product on a CPU to its BLAS (MKL in the x86 wheels); its bf16
products already go to oneDNN, the library it ships for CPU kernels. On the 2-core AMD EPYC
(AVX-512) that lmlab's CPU benchmarks run on, oneDNN's float32 kernels are faster for two of a
linear layer's three products (measured at lmlab's shapes, 1024 tokens x 256 -> 768 / 1408 / 8192,
2026-11-27): the forward ``x @ W.T`` and the input gradient ``g @ W`` (~185 vs ~150 GFLOP/s), while
MKL stays ahead on the weight gradient ``g.T @ x``, which therefore stays with ``torch.mm``
(``benchmarks/vs_hf.py`` measures the effect on whole training steps).

A oneDNN call costs ~20-30 us more than MKL's to set up, which small products do not earn back
(a decoding step's single row: 57 vs 27 us at 256 -> 768; at d_model 64 MKL is faster up to 256 rows
and more), so only products of at least ``ONEDNN_MIN_MACS`` multiply-adds take it.

``Linear`` is ``nn.Linear`` (same parameters, same state dict) whose float32 products on a CPU take
that route when no autocast is on, nothing is being compiled (torch.compile sees the plain
``F.linear``) and PyTorch was built with oneDNN; everything else is ``F.linear``. ``mm_t`` and
``mm`` do the same for the fused output head + loss (``lmlab/nn/loss.py``).

``set_cpu_matmul("blas")`` (the ``cpu_matmul`` training setting) turns the route off, also for the
processes started after it (through ``LMLAB_CPU_MATMUL``): the results differ from BLAS's only in
the order of the float32 sums (a few ulps). Tracing for TorchScript and functorch transforms
(``vmap``, ``torch.func.grad``) take ``F.linear``; forward-mode AD is not supported on the route.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

CPU_MATMULS = ("onednn", "blas")
# set_cpu_matmul's choice, for processes started after it (ddp_spawn, DataLoader workers), which
# import this module afresh
ENV = "LMLAB_CPU_MATMUL"

# oneDNN's linear kernel as PyTorch registers it for inductor: (input, weight, bias, attr, scalars,
# algorithm) -> input @ weight.T. Absent from builds without oneDNN (MKLDNN).
_onednn_linear = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_use_onednn = _onednn_linear is not None and os.environ.get(ENV, "onednn") != "blas"
# The smallest product (rows x inner x outer multiply-adds) sent to oneDNN: on the 2-core EPYC it
# breaks even with MKL at ~64 rows x 256 -> 768 (12.6M) and wins from 128 rows (25M)
ONEDNN_MIN_MACS = 1 << 24


def check_cpu_matmul(name: object) -> None:
    """A ``ValueError`` naming the choices unless ``name`` is one of ``CPU_MATMULS``."""
    if name not in CPU_MATMULS:
        raise ValueError(
            f"cpu_matmul={name!r} is not a route for float32 matrix products on CPUs; use "
            "onednn (the default: oneDNN where PyTorch has it) or blas (PyTorch's own: MKL / "
            "OpenBLAS)"
        )


def set_cpu_matmul(name: str) -> None:
    """``onednn`` (where PyTorch has it; else the same as ``blas``) or ``blas``: the route of float32
    matrix products of lmlab's linear layers on CPUs, for this process."""
    global _use_onednn
    check_cpu_matmul(name)
    _use_onednn = name == "onednn" and _onednn_linear is not None
    os.environ[ENV] = name


def cpu_matmul() -> str:
    """The route ``set_cpu_matmul`` chose (``blas`` where PyTorch has no oneDNN)."""
    return "onednn" if _use_onednn else "blas"


def _onednn(a: torch.Tensor, b: torch.Tensor, outer: int) -> bool:
    """Whether the product of ``a`` (rows x inner) and ``b`` with ``outer`` output columns takes
    oneDNN's float32 route."""
    return (
        _use_onednn
        and not torch.compiler.is_compiling()  # first: no guards on the sizes below
        and a.numel() * outer >= max(ONEDNN_MIN_MACS, 1)
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        and type(a) in (torch.Tensor, nn.Parameter)  # not DTensors or other subclasses
        and type(b) in (torch.Tensor, nn.Parameter)
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()  # the op has no TorchScript form
        and torch._C._functorch.maybe_current_level() is None  # no vmap / grad transforms
    )


def mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for 2-D ``a`` (N, K) and ``b`` (M, K), without autograd."""
    if _onednn(a, b, b.shape[0]):
        return _onednn_linear(a, b, None, "none", [], "")
    return torch.mm(a, b.t())


# oneDNN reads ``b`` of ``mm`` transposed; over a long inner dimension that layout makes it slower
# than BLAS (the output head's input gradient at GPT-2's 50304 tokens: 269-303 vs 224-228 ms at
# 512 x 50304 x 768; still ahead at 32768)
ONEDNN_MAX_INNER_T = 1 << 15


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` (N, K) and ``b`` (K, M), without autograd."""
    if b.shape[0] <= ONEDNN_MAX_INNER_T and _onednn(a, b, b.shape[1]):
        return _onednn_linear(a, b.t(), None, "none", [], "")
    return torch.mm(a, b)


class _Linear(torch.autograd.Function):
    """``x @ weight.T`` with its gradients: ``g @ weight`` and ``g.T @ x`` (the latter by BLAS).
    ``x`` is kept only for the weight's gradient (a frozen weight keeps none, as ``F.linear``); a
    backward that builds a graph (double backward) uses PyTorch's differentiable products."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.x_shape = x.shape
        x2 = x.reshape(-1, x.shape[-1])
        return mm_t(x2, weight).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        differentiable = torch.is_grad_enabled()
        if ctx.needs_input_grad[0]:
            grad_x = (torch.mm(g, weight) if differentiable else mm(g, weight)).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(g.t(), x.reshape(-1, x.shape[-1]))
        return grad_x, grad_w


class Linear(nn.Linear):
    """``nn.Linear`` whose float32 products on a CPU go through oneDNN (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and _onednn(x, self.weight, self.out_features):
            return _Linear.apply(x, self.weight)
        return F.linear(x, self.weight, self.bias)
