"""AdamW over fp32 master copies of a model's bf16 weights (``optim.master_weights=true``).

With ``trainer.precision=bf16-true`` the weights, activations and gradients are bf16: a GPT-2 step
on an H100 is 1.105x faster than under ``bf16-mixed`` (benchmarks/README.md, the third GPU
session), since the residual stream and every elementwise kernel move half the bytes and the
weights need no cast before each product. But a bf16 weight cannot hold an update smaller than
half the spacing of bf16 numbers near it (2^-9 to 2^-8 of its size), and AdamW's updates are about
the learning rate: at the end of GPT-2's schedule (6e-5, weights ~0.02) that is ~2^-8 of a weight,
so plain bf16-true training rounds many updates away. :class:`MasterWeightAdamW` keeps the weights' fp32 copies and
AdamW's state in fp32 (as Megatron-LM and DeepSpeed do in bf16 training): each step copies the
model's gradients into fp32, steps the copies, and writes them back rounded to bf16. Memory per
weight is that of bf16-mixed (2 + 2 bytes of bf16 weight and gradient, 4 of master, 8 of AdamW's
moments, against 4 + 4 + 8 there).

Order within a Lightning step: backward (bf16 gradients on the model, all-reduced there under DDP),
``LMModule.on_before_optimizer_step`` calls :meth:`MasterWeightAdamW.pull_grads` (so clipping and
skip_nonfinite's rescaling see the fp32 gradients), clipping, :meth:`step`. The checkpoint carries
the masters (``state_dict()["master_weights"]``), so a resumed run continues exactly. Gradients
accumulated over several micro-batches add up in bf16 on the model before the pull.
"""

from __future__ import annotations

import torch


class MasterWeightAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (fused, foreach or plain, as its keywords say) stepping fp32 copies of
    ``params`` (the model's bf16 weights, in groups as AdamW takes them); after each step the model's
    weights are the copies rounded to their dtype. ``param_groups`` hold the copies: learning-rate
    schedules, clipping and gradient scaling act on them as on any AdamW's."""

    def __init__(self, params, **kwargs) -> None:
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.model_params: list[torch.Tensor] = []
        master_groups = []
        for group in groups:
            weights = list(group["params"])
            self.model_params += weights
            masters = [w.detach().to(torch.float32, copy=True) for w in weights]
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **kwargs)
        self._pulled = False

    @property
    def masters(self) -> list[torch.Tensor]:
        return [m for group in self.param_groups for m in group["params"]]

    @torch.no_grad()
    def pull_grads(self) -> None:
        """The model's gradients into the masters' (fp32) ``.grad``; None stays None (a weight the
        step did not reach, or a step whose only micro-batch skip_nonfinite skipped)."""
        to_copy, sources = [], []
        for weight, master in zip(self.model_params, self.masters, strict=True):
            if weight.grad is None:
                master.grad = None
            elif master.grad is None:
                master.grad = weight.grad.to(torch.float32)
            else:
                to_copy.append(master.grad)
                sources.append(weight.grad)
        if to_copy:
            torch._foreach_copy_(to_copy, sources)
        self._pulled = True

    @torch.no_grad()
    def push_weights(self) -> None:
        """The masters, rounded, into the model's weights."""
        torch._foreach_copy_(self.model_params, self.masters)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._pulled:  # no Lightning hook pulled them (a plain loop calling step())
            self.pull_grads()
        self._pulled = False
        super().step()
        self.push_weights()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)  # the masters'
        for weight in self.model_params:
            if weight.grad is not None:
                if set_to_none:
                    weight.grad = None
                else:
                    weight.grad.zero_()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["master_weights"] = self.masters  # references, as AdamW's own state
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """AdamW's state and, where the checkpoint has them, the masters (a checkpoint of plain
        AdamW has none: the masters stay the model's weights, as at a fresh start)."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if saved is None:
            return
        masters = self.masters
        if len(saved) != len(masters):
            raise ValueError(
                f"the checkpoint holds {len(saved)} master weights, this model {len(masters)}"
            )
        with torch.no_grad():
            for master, value in zip(masters, saved, strict=True):
                master.copy_(value)
        self.push_weights()
