"""Model FLOPs utilisation (MFU): achieved training FLOP/s over the device's peak.

Training FLOPs per token follow PaLM (Chowdhery et al., 2022, appendix B): ``6 N + 12 L H Q T`` with
N the weights of the matrix products a token goes through (the output head once, tied to the
embedding or not; embedding lookups and norm gains do no matrix work), L layers, H heads of size Q
(H Q = d_model) and T the sequence length; the second term is attention's score and value matmuls
(forward and backward, every query-key pair, causal or not). Each family's module applies it to
the tokens each part really sees (``LMModule.step_flops``): an MLM head only on the selected
positions, an encoder-decoder's decoder on the target length with cross-attention to the input.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity).
PEAK_BF16 = {
    "H200 NVL": 835e12,  # before "H200": the NVL part is slower
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # other H100 names (e.g. "H100 80GB HBM3" is the SXM part)
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,  # before "L4", which "NVIDIA L40" also contains
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> int:
    """PaLM's count for one token of a sequence of ``seq_len`` through ``n_layers`` layers."""
    return 6 * n_params + 12 * n_layers * d_model * seq_len


def matmul_weights(*modules: nn.Module) -> int:
    """Weights of the matrix products (``nn.Linear`` layers) in ``modules``: PaLM's N for them.
    Under FSDP a sharded weight counts whole (a DTensor's ``numel`` is its global size)."""
    return sum(
        m.weight.numel() for module in modules for m in module.modules() if isinstance(m, nn.Linear)
    )


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a CUDA device from :data:`PEAK_BF16` (first name contained in the
    device's name); None for CPUs and unknown devices (set ``callbacks.throughput.peak_flops``)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def mfu(tokens_per_sec: float, flops_per_token: int, peak: float, world_size: int = 1) -> float:
    """Fraction of the devices' peak that training achieves (tokens_per_sec counts all devices)."""
    return tokens_per_sec * flops_per_token / (peak * world_size)
