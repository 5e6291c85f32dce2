"""AdamW over fp32 master copies of a model's bf16 weights (``optim.master_weights=true``).

With ``trainer.precision=bf16-true`` the weights, activations and gradients are bf16: a GPT-2 step
on an H100 is 1.09-1.1x faster than under ``bf16-mixed`` (1.04x with master weights' eager step;
benchmarks/README.md, the third and fourth GPU sessions), since the residual stream and every
elementwise kernel move half the bytes and the weights need no cast before each product. But a
bf16 weight cannot hold an update smaller than half the spacing of bf16 numbers near it (2^-9 to
2^-8 of its size), and AdamW's updates are about the learning rate: at the end of GPT-2's
schedule (6e-5, weights ~0.02) that is ~2^-8 of a weight, so plain bf16-true training rounds many
updates away. :class:`MasterWeightAdamW` keeps fp32 copies
of the weights and AdamW's state in fp32: each step copies the model's gradients into fp32, steps
the copies, and writes them back rounded to bf16. Memory per weight: 16 bytes through the forward
and backward passes (2 + 2 of bf16 weight and gradient, 4 of master, 8 of AdamW's moments), as
under bf16-mixed (4 + 4 + 8), and 20 during the eager optimizer step, while the masters' fp32
gradients exist (the compiled step, below, makes none in one process without accumulation: 16);
with gradient accumulation those live from the first micro-batch's backward on (20), and
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
:meth:`MasterWeightAdamW.pull_grads` (so skip_nonfinite's rescaling and clipping see the step's
whole gradient), clipping, :meth:`step`. Scaling and clipping are recorded as a factor (and a bound)
that the step applies as it reads each gradient (:meth:`scale_grads`, :meth:`clip_grad_norm_`,
:meth:`clip_grad_value_`), not as passes of their own over the gradients. The checkpoint carries
the masters (``state_dict()["master_weights"]``), so a resumed run continues exactly;
``LMModule.on_load_checkpoint`` carries them across a resume that switches the setting.

With ``compiled=True`` (``compile=true`` in lmlab's config) the step is one ``torch.compile``d
function (:func:`master_adamw`): in one process without accumulation it reads the model's bf16
gradients where they are (no fp32 copy), applies the factor, steps the masters and AdamW's moments
and writes the rounded weights, in one kernel per parameter group with one pass over each tensor
(inductor's C++ code on a CPU, ``TORCH_LOGS=output_code``; its Triton code on a GPU not yet seen):
per weight it reads 14 bytes (gradient, master, two moments) and writes 14 (master, moments,
weight), where the eager step (copy into fp32, scale, torch's fused AdamW, copy back) moves 48.
The gradient norm for clipping reads the bf16 gradients (2 bytes a weight, not 4).
(benchmarks/optimizer.py measures both side by side.) The first step compiles it (~30 s on a
2-core CPU for GPT-2's 148 tensors); ``optim.compile_master_step=false`` keeps the eager step.
"""

from __future__ import annotations

import types
import warnings

import lightning as L
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
    ``params`` (the model's bf16 weights, in groups as AdamW takes them); after each step the
    model's weights are the copies rounded to their dtype. ``param_groups`` hold the copies:
    learning-rate schedules, clipping and gradient scaling act on them as on any AdamW's."""

    def __init__(self, params, compiled: bool = False, **kwargs) -> None:
        if compiled and any(kwargs.get(k) for k in ("amsgrad", "maximize", "differentiable")):
            raise ValueError(
                "MasterWeightAdamW(compiled=True) steps plain AdamW: amsgrad, maximize and "
                "differentiable need compiled=False"
            )
        if compiled and not (kwargs.get("fused") or kwargs.get("capturable")):
            raise ValueError(
                "MasterWeightAdamW(compiled=True) keeps AdamW's step counts on the weights' "
                "device, as torch's fused AdamW: pass fused=True (or capturable=True)"
            )
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
        self.compiled = compiled
        self._factor: torch.Tensor | float | None = None  # the step's gradient is times this
        self._bound: float | None = None  # ... then clamped to +-this
        self._step_fn = None  # the compiled step, made at the first step
        self._index = {id(w): i for i, w in enumerate(self.model_params)}

    @property
    def masters(self) -> list[torch.Tensor]:
        return [m for group in self.param_groups for m in group["params"]]

    @torch.no_grad()
    def pull_grads(self) -> None:
        """The model's gradients into the masters' ``.grad``, in fp32; None stays None (a weight
        the step did not reach, or a step whose only micro-batch skip_nonfinite skipped). After
        :meth:`accumulate_grads` the masters hold the sum, and what the model holds is added. The
        compiled step reads a single micro-batch's bf16 gradients where they are: no copy."""
        if self.reduced:  # fp32_all_reduce_hook gave the masters the step's whole gradient
            pass
        elif self._accumulated:
            self.accumulate_grads()
        elif not self.compiled:
            for weight, master in zip(self.model_params, self.masters, strict=True):
                master.grad = None if weight.grad is None else weight.grad.to(torch.float32)
        self._pulled = True

    def step_grads(self) -> list[torch.Tensor | None]:
        """The gradients the step reads, one per master (after :meth:`pull_grads`): the masters'
        fp32 ones, or, compiled in one process without accumulation, the model's bf16 ones. The
        pending factor and bound (:meth:`scale_grads`, clipping) are not applied to them yet."""
        if self.compiled and not (self.reduced or self._accumulated):
            return [w.grad for w in self.model_params]
        return [m.grad for m in self.masters]

    def scale_grads(self, factor: torch.Tensor | float) -> None:
        """Multiply the step's gradient by ``factor`` (applied by the step as it reads them)."""
        self._factor = factor if self._factor is None else self._factor * factor

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` of the step's gradients (scaled as they will be):
        their total 2-norm, computed in fp32 on the device (no host sync), and a factor
        ``min(1, max_norm / (norm + 1e-6))`` for the step. Returns the norm before clipping. (A
        pending :meth:`clip_grad_value_` bound is not in the norm: Lightning never does both.)"""
        if not self._pulled:  # a plain loop: backward, clip, step
            self.pull_grads()
        grads = [g for g in self.step_grads() if g is not None]
        if not grads:
            return torch.zeros(())
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        total = torch.linalg.vector_norm(torch.stack(norms))
        if self._factor is not None:
            total = total * self._factor
        self.scale_grads((max_norm / (total + 1e-6)).clamp(max=1.0))
        return total

    def clip_grad_value_(self, bound: float) -> None:
        """``torch.nn.utils.clip_grad_value_``: the step clamps its (scaled) gradients to
        ``[-bound, bound]``."""
        if not self._pulled:
            self.pull_grads()
        self._bound = bound if self._bound is None else min(self._bound, bound)

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
        grads, factor, bound = self.step_grads(), self._factor, self._bound
        self._pulled = self._accumulated = self.reduced = False
        self._factor = self._bound = None
        if self.compiled:
            self._compiled_step(grads, factor, bound)
        else:
            live = [g for g in grads if g is not None]
            if live and factor is not None:
                torch._foreach_mul_(live, factor)
            if live and bound is not None:
                torch._foreach_clamp_min_(live, -bound)
                torch._foreach_clamp_max_(live, bound)
            _adamw_step()(self)
            self.push_weights()
        for master in self.masters:  # read by nothing after the step: 4 bytes a weight freed
            master.grad = None
        return loss

    @torch.no_grad()
    def _compiled_step(
        self, grads: list[torch.Tensor | None], factor: torch.Tensor | float | None, bound
    ) -> None:
        """:func:`master_adamw` on each parameter group's weights that have a gradient (torch's
        AdamW skips the others too), with AdamW's state as torch's fused AdamW keeps it (a
        checkpoint resumes in either mode). The learning rate and the factor go in as tensors:
        a schedule changing the rate compiles nothing new."""
        index = 0
        for group in self.param_groups:
            live = []
            for master in group["params"]:
                grad, weight = grads[index], self.model_params[index]
                index += 1
                if grad is not None:
                    live.append((master, grad, weight))
            if not live:
                continue
            device = live[0][0].device
            for master, _, _ in live:
                state = self.state[master]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                    state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        master, memory_format=torch.preserve_format
                    )
            states = [self.state[m] for m, _, _ in live]
            beta1, beta2 = group["betas"]
            lr = _scalar(group["lr"], device)
            scale = _scalar(1.0 if factor is None else factor, device)
            if self._step_fn is None:
                self._step_fn = _compiled_master_adamw()
            self._step_fn(
                [m for m, _, _ in live],
                [g for _, g, _ in live],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states],
                [w for _, _, w in live],
                lr,
                scale,
                bound,
                float(beta1),
                float(beta2),
                float(group["eps"]),
                float(group["weight_decay"]),
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)  # the masters'
        self._accumulated = self.reduced = False
        self._factor = self._bound = None
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


class MastersOffDevice(L.Callback):
    """Moves a fit's master weights to the CPU when it ends, or raises (``LMModule`` adds it with
    master weights; a LightningModule has no exception hook). Lightning moves the model and AdamW's
    state off the GPU at teardown, not the masters, which would otherwise hold 4 bytes a weight of
    GPU memory for as long as the Trainer lives (in a notebook, the traceback of the error keeps
    it)."""

    def on_fit_end(self, trainer, pl_module) -> None:
        self._move(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        try:  # after a device error the move may fail too: Lightning's own clean-up comes next
            self._move(trainer)
        except Exception as e:
            warnings.warn(f"master weights not moved off the device: {e}", stacklevel=1)

    @staticmethod
    def _move(trainer) -> None:
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, MasterWeightAdamW):
                optimizer.to("cpu")


def master_adamw(
    masters: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    weights: list[torch.Tensor],
    lr: torch.Tensor,
    factor: torch.Tensor,
    bound: float | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step of fp32 ``masters`` (in place, with their moments and step counts) on
    ``grads`` (bf16 or fp32) times ``factor``, clamped to ``[-bound, bound]`` unless ``bound`` is
    None; then ``weights`` (bf16) = the masters rounded. Torch's AdamW arithmetic (its capturable
    multi-tensor form: the bias corrections from the step tensors, on the device). In ``_foreach``
    ops, which ``torch.compile`` fuses into a few kernels reading each tensor once."""
    grads = torch._foreach_mul([g.to(torch.float32) for g in grads], factor)
    if bound is not None:
        grads = torch._foreach_clamp_max(torch._foreach_clamp_min(grads, -bound), bound)
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if weight_decay:
        torch._foreach_mul_(masters, 1 - lr * weight_decay)
    step_size = torch._foreach_pow(beta1, steps)
    torch._foreach_sub_(step_size, 1)
    torch._foreach_div_(step_size, lr)
    torch._foreach_reciprocal_(step_size)  # -lr / (1 - beta1^t)
    correction2 = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(correction2)
    torch._foreach_add_(correction2, 1)
    torch._foreach_sqrt_(correction2)  # sqrt(1 - beta2^t)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, correction2)
    torch._foreach_add_(denom, eps)
    torch._foreach_div_(denom, step_size)
    torch._foreach_addcdiv_(masters, exp_avgs, denom)
    torch._foreach_copy_(weights, masters)


def _scalar(value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """``value`` as a 0-d fp32 tensor on ``device``: a number is filled in there (copying one from
    the host's pageable memory would wait for the device's queue)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32)
    return torch.full((), value, dtype=torch.float32, device=device)


def _compiled_master_adamw():
    """:func:`master_adamw` compiled, for one optimizer: each group's shapes (and gradient dtype,
    bound, weights with a gradient) compile a graph of their own, never a dynamic-shape one.
    Dynamo keeps a function's graphs with its code object, at most ``recompile_limit`` (8) of
    them, and with ``fullgraph`` a ninth fails: each optimizer compiles a copy of the code, so
    optimizers built one after another in one process (a notebook, a benchmark's runs) do not add
    up; one that still needs a ninth graph steps eagerly from then on (same arithmetic, unfused)."""
    fresh = types.FunctionType(
        master_adamw.__code__.replace(), master_adamw.__globals__, master_adamw.__name__
    )
    compiled = torch.compile(fresh, fullgraph=True, dynamic=False)
    eager = False

    def step(*args) -> None:
        nonlocal eager
        if not eager:
            try:
                return compiled(*args)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                eager = True
                warnings.warn(
                    "the compiled master-weight step needs more graphs than torch._dynamo's "
                    "recompile_limit allows (a new group shape, gradient dtype or set of weights "
                    "with a gradient each compile one): it steps eagerly from here on",
                    stacklevel=2,
                )
        return master_adamw(*args)

    return step


def fp32_all_reduce_hook(state: tuple[MasterWeightAdamW, dist.ProcessGroup | None], bucket):
    """DDP communication hook (``ddp_model.register_comm_hook((optimizer, ddp_model.process_group),
    fp32_all_reduce_hook)``) for master weights: the bucket's bf16 gradients (this process's last
    micro-batch of the step) plus the fp32 sum of its earlier micro-batches
    (:meth:`MasterWeightAdamW.accumulate_grads`) in fp32, averaged over the processes with one
    all-reduce, become the masters' gradients; the bucket goes back to DDP as it came (the model's
    gradients are dropped after the backward, ``LMModule.on_after_backward``). DDP runs it on
    every bucket as soon as its gradients are ready, so the all-reduces overlap the rest of the
    backward. (``bucket`` and the result, a future of a tensor, have no annotations: DDP checks
    them against its types, and this module's ``from __future__ import annotations`` would make
    them strings.)"""
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
