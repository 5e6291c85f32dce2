"""AdamW over fp32 master copies of a model's bf16 weights (``optim.master_weights=true``).

With ``trainer.precision=bf16-true`` the weights, activations and gradients are bf16: a GPT-2 step
on an H100 is 1.09-1.1x faster than under ``bf16-mixed`` (1.04x with master weights;
benchmarks/README.md, the third and fourth GPU sessions), since the residual stream and every
elementwise kernel move half the bytes and the weights need no cast before each product. But a bf16 weight cannot hold an update smaller than
half the spacing of bf16 numbers near it (2^-9 to 2^-8 of its size), and AdamW's updates are about
the learning rate: at the end of GPT-2's schedule (6e-5, weights ~0.02) that is ~2^-8 of a weight,
so plain bf16-true training rounds many updates away. :class:`MasterWeightAdamW` keeps fp32 copies
of the weights and AdamW's state in fp32: each step copies the model's gradients into fp32, steps
the copies, and writes them back rounded to bf16. Memory per weight: 16 bytes through the forward
and backward passes (2 + 2 of bf16 weight and gradient, 4 of master, 8 of AdamW's moments), as
under bf16-mixed (4 + 4 + 8), and 20 during the optimizer step, while the masters' fp32 gradients
exist; with gradient accumulation those live from the first micro-batch's backward on (20), and
under DDP its buckets add 2 (the model's gradients live in them: ``gradient_as_bucket_view``), with
one bucket's fp32 sum beside them while its all-reduce runs.

Gradients add up in fp32, as Megatron-LM adds and all-reduces them: gradient accumulation adds
each micro-batch's gradient into the masters' fp32 gradients right after its backward
(``LMModule.on_after_backward`` calls :meth:`accumulate_grads`; a sum of 8 micro-batches'
gradients in bf16 was off by ~4e-3 of its size), and under DDP :func:`fp32_all_reduce_hook`, DDP's
communication hook (``LMModule.on_fit_start`` registers it), all-reduces in fp32 what each of the
model's gradient buckets holds at the step's last backward plus what the earlier micro-batches
left in the masters' gradients, into the masters' gradients: bucket by bucket while the backward
goes on, as DDP's own bf16 all-reduce would (twice its bytes).

Order within a Lightning step: backward (bf16 gradients on the model; under DDP the fp32
all-reduce into the masters' gradients at the last micro-batch), the callbacks'
``on_before_optimizer_step`` (they see the model's gradients in one process without accumulation;
otherwise the model's are gone by then, and a callback's ``on_after_backward`` sees each
micro-batch's), ``LMModule.on_before_optimizer_step``, which calls
:meth:`MasterWeightAdamW.pull_grads` (so skip_nonfinite's rescaling and clipping act on the fp32
gradients), clipping, :meth:`step`. The checkpoint carries the masters
(``state_dict()["master_weights"]``), so a resumed run continues exactly;
``LMModule.on_load_checkpoint`` carries them across a resume that switches the setting.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _adamw_step():
    """torch's AdamW step without the profiling / hook wrapper that torch puts on every optimizer
    class's ``step`` (calling the wrapped one from :meth:`MasterWeightAdamW.step` ran the step
    hooks twice, the first time before the weights were written back)."""
    step = torch.optim.AdamW.step
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class MasterWeightAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (fused, foreach or plain, as its keywords say) stepping fp32 copies of
    ``params`` (the model's bf16 weights, in groups as AdamW takes them); after each step the model's
    weights are the copies rounded to their dtype. ``param_groups`` hold the copies: learning-rate
    schedules, clipping and gradient scaling act on them as on any AdamW's."""

    def __init__(self, params, **kwargs) -> None:
        if isinstance(params, torch.Tensor):
            raise TypeError(
                "params must be an iterable of tensors or of parameter groups (dicts), not a "
                f"{torch.typename(params)}"
            )
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.model_params: list[torch.Tensor] = []
        master_groups = []
        for group in groups:
            weights = group["params"]
            weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
            self.model_params += weights
            masters = [w.detach().to(torch.float32, copy=True) for w in weights]
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **kwargs)
        self._pulled = False
        self._accumulated = False  # the masters' gradients hold this step's micro-batches so far
        self.reduced = False  # ... all of them, all-reduced over the processes (DDP's hook)
        self._index = {id(w): i for i, w in enumerate(self.model_params)}

    @property
    def masters(self) -> list[torch.Tensor]:
        return [m for group in self.param_groups for m in group["params"]]

    @torch.no_grad()
    def pull_grads(self) -> None:
        """The model's gradients into the masters' ``.grad``, in fp32; None stays None (a weight
        the step did not reach, or a step whose only micro-batch skip_nonfinite skipped). After
        :meth:`accumulate_grads` the masters hold the sum, and what the model holds is added."""
        if self.reduced:  # fp32_all_reduce_hook gave the masters the step's whole gradient
            pass
        elif self._accumulated:
            self.accumulate_grads()
        else:
            for weight, master in zip(self.model_params, self.masters, strict=True):
                master.grad = None if weight.grad is None else weight.grad.to(torch.float32)
        self._pulled = True

    @torch.no_grad()
    def accumulate_grads(self, keep: bool = False) -> None:
        """Add the model's gradients (a micro-batch's) into the masters' fp32 ones and clear them
        (``keep``: zero them instead, for DDP, whose reducer expects a weight that had a gradient
        to keep one, and whose buckets hold them anyway): gradient accumulation in fp32."""
        for weight, master in zip(self.model_params, self.masters, strict=True):
            if weight.grad is None:
                continue
            if master.grad is None:
                master.grad = weight.grad.to(torch.float32)
            else:
                master.grad.add_(weight.grad)
            if keep:
                weight.grad.zero_()
            else:
                weight.grad = None
        self._accumulated = True

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
        self._pulled = self._accumulated = self.reduced = False
        _adamw_step()(self)
        for master in self.masters:  # read by nothing after the step: 4 bytes a weight freed
            master.grad = None
        self.push_weights()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)  # the masters'
        self._accumulated = self.reduced = False
        for weight in self.model_params:
            if weight.grad is not None:
                if set_to_none:
                    weight.grad = None
                else:
                    weight.grad.zero_()

    @torch.no_grad()
    def to(self, device: torch.device | str) -> None:
        """Move the masters (AdamW's state is moved by Lightning with the model): after fit, so
        the masters do not hold 4 bytes a weight of GPU memory for as long as the Trainer lives."""
        for master in self.masters:
            master.data = master.data.to(device)
            master.grad = None

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["master_weights"] = self.masters  # references, as AdamW's own state
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """AdamW's state and, where the checkpoint has them, the masters (a checkpoint of plain
        AdamW has none: the masters stay the model's weights, as at a fresh start, unless
        ``LMModule.on_load_checkpoint`` put the checkpoint's fp32 weights there)."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if saved is None:
            return
        masters = self.masters
        shapes = [tuple(m.shape) for m in masters]
        if [tuple(v.shape) for v in saved] != shapes:
            raise ValueError(
                f"the checkpoint's {len(saved)} master weights do not match this model's "
                f"{len(masters)} weights (shapes differ)"
            )
        with torch.no_grad():
            for master, value in zip(masters, saved, strict=True):
                master.copy_(value)
        self.push_weights()


def fp32_all_reduce_hook(state: tuple[MasterWeightAdamW, dist.ProcessGroup | None], bucket):
    """DDP communication hook (``ddp_model.register_comm_hook((optimizer, ddp_model.process_group),
    fp32_all_reduce_hook)``) for master weights: the bucket's bf16 gradients (this process's last micro-batch of the step)
    plus the fp32 sum of its earlier micro-batches (:meth:`MasterWeightAdamW.accumulate_grads`) in
    fp32, averaged over the processes with one all-reduce, become the masters' gradients; the
    bucket goes back to DDP as it came (the model's gradients are dropped after the backward,
    ``LMModule.on_after_backward``). DDP runs it on every bucket as soon as its gradients are
    ready, so the all-reduces overlap the rest of the backward. (``bucket`` and the result, a
    future of a tensor, have no annotations: DDP checks them against its types, and this module's
    ``from __future__ import annotations`` would make them strings.)"""
    optimizer, group = state
    masters = optimizer.masters
    picked = [masters[optimizer._index[id(p)]] for p in bucket.parameters()]
    buffer = bucket.buffer()
    total = buffer.to(torch.float32, copy=True)
    spans, offset = [], 0
    for master in picked:  # the bucket holds its parameters' gradients flat, in this order
        spans.append((master, offset))
        if master.grad is not None:
            total[offset : offset + master.numel()].add_(master.grad.flatten())
        offset += master.numel()
    if offset != total.numel():
        raise RuntimeError(
            f"a DDP gradient bucket of {total.numel()} values holds parameters of {offset}"
        )
    total.div_(dist.get_world_size(group))
    future = dist.all_reduce(total, group=group, async_op=True).get_future()

    def to_masters(done: torch.futures.Future) -> torch.Tensor:
        reduced = done.value()[0]
        for master, start in spans:
            master.grad = reduced[start : start + master.numel()].view_as(master)
        optimizer.reduced = True
        return buffer

    return future.then(to_masters)
