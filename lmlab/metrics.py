"""Language-model metrics as torchmetrics ``Metric``s, so they reduce correctly across devices.

All of them are fed the summed target negative log-likelihood (in nats) that the loss already computed,
never the logits again: a second softmax over (B*T, V) would cost as much as the loss itself.

- ``TargetMean``: a per-target mean from per-batch sums (loss = summed NLL / targets, accuracy =
  correct / targets). Used instead of torchmetrics' ``MeanMetric``, whose NaN check reads a value
  at every update (on a GPU, a wait for the device) and drops NaN batches from the mean with a
  warning: here a NaN loss makes the mean NaN, as it should. (Its ``nan_strategy="disable"``,
  which skips the check, also drops the weights in torchmetrics 1.9: Lightning-AI/torchmetrics#3434.)
- ``Perplexity``: torchmetrics' own, fed through :meth:`update` with (nll_sum, count) = exp(mean NLL).
- ``BitsPerByte``: summed NLL / (ln 2 * UTF-8 bytes of the target tokens). Unlike loss or perplexity it
  does not depend on how the text was tokenized, so it compares runs with different tokenizers.
"""

from __future__ import annotations

import math

import torch
import torchmetrics
from torchmetrics.text import Perplexity as _Perplexity


class _ExactStates:
    """Mixin for a Metric whose states keep their dtype when the module around them is cast:
    Lightning's ``bf16-true`` calls ``model.to(torch.bfloat16)``, which torchmetrics applies to
    float states (it guards only ``.half()``, ``.float()`` and the like), and a sum in bf16 keeps
    about three significant digits (1000 + 1 is 1000). Device moves still apply; ``set_dtype``
    still casts."""

    def _apply(self, fn, exclude_state=""):
        if self._dtype_convert:
            return super()._apply(fn, exclude_state)

        def move(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)  # the state is a scalar: casting it only to learn the device costs nothing
            return out if out.dtype == t.dtype else t.to(out.device)

        return super()._apply(move, exclude_state)


class TargetMean(_ExactStates, torchmetrics.Metric):
    """``sum(total) / sum(count)`` over the updates (0 while no target was seen)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, total: torch.Tensor, count: torch.Tensor) -> None:
        self.total += total.detach().to(self.total)
        self.count += count.to(self.count)

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class Perplexity(_ExactStates, _Perplexity):
    """torchmetrics ``Perplexity`` whose update takes the NLL sum and target count directly.

    Its states are float64 and int64 as in the other metrics here, not torchmetrics' float32: a
    float32 count stops counting exactly at 2^24 targets, and after ~1e8 validation tokens the
    perplexity drifted from exp(val/loss) in the 5th digit."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # Registered again (same names, reductions and reset): only the dtypes change.
        self.add_state(
            "total_log_probs", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, count: torch.Tensor) -> None:  # type: ignore[override]
        self.total_log_probs += nll_sum.detach().to(self.total_log_probs)
        self.count += count.to(self.count)

    def compute(self) -> torch.Tensor:
        return super().compute().float()


class BitsPerByte(_ExactStates, torchmetrics.Metric):
    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        # float: byte counts are scaled to the text's bytes (TokenStore.byte_scale)
        self.add_state(
            "bytes", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, nll_sum: torch.Tensor, n_bytes: torch.Tensor) -> None:
        self.nll += nll_sum.detach().to(self.nll)
        self.bytes += n_bytes.to(self.bytes)

    def compute(self) -> torch.Tensor:
        return self.nll / (math.log(2) * self.bytes.clamp(min=1))
