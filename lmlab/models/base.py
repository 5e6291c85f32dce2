"""What every lmlab LightningModule shares: loss, metrics, optimizer groups, learning-rate schedule.

A subclass builds its backbone, declares the batch kinds it ``accepts`` and implements
``hidden_states(batch) -> (hidden, labels)``: the backbone's final hidden states at the positions
that ``labels`` scores. Auxiliary heads (classifiers at <cls> or at every position,
:class:`lmlab.models.encoder.EncoderLM`) are named in ``aux_weights`` and their sums follow the
language model's in :meth:`LMModule.nll`; they add their weighted mean cross-entropy over the step's
labels to the training loss and report ``val/<name>_loss`` and ``val/<name>_acc``. Everything else
(the output head and cross-entropy with ``ignore_index=-100``, fused chunk by chunk, perplexity,
bits per byte, AdamW with decay / no-decay groups, warmup + cosine per step, compile) is here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from contextlib import contextmanager

import lightning as L
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from lmlab import flops
from lmlab.data.collate import IGNORE
from lmlab.errors import ConfigError, NonFiniteLoss
from lmlab.loggers import ResumableCSVLogger
from lmlab.metrics import BitsPerByte, Perplexity, TargetMean
from lmlab.nn.loss import linear_cross_entropy
from lmlab.optim import MastersOffDevice, MasterWeightAdamW, fp32_all_reduce_hook
from lmlab.parallel import FSDP, check_compile_scope, compile_mode, eager, parallelize

log = logging.getLogger(__name__)
# the sampling settings of `python -m lmlab.generate` (conf/generate.yaml)
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "num_samples")
# LMModule.on_before_batch_transfer is meant to run with any DataModule (Lightning warns that the
# module's hook takes precedence over the DataModule's, which lmlab's DataModules do not define).
warnings.filterwarnings(
    "ignore", message=r".*overridden `on_before_batch_transfer` in `LightningModule`"
)
# Lightning 2.6 builds torch's LeafSpec, which torch 2.13 deprecates (a FutureWarning at every
# fit, about Lightning's code, nothing a user can change)
warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
)
# torch 2.13 deprecates DDP's broadcast_buffers for forward_sync_buffers (which torch before 2.13
# lacks, and which syncs buffers once at the start): the ddp presets keep broadcast_buffers=false
# (lmlab supports torch >= 2.5). Only where Lightning's DDPStrategy builds the DDP module.
warnings.filterwarnings(
    "ignore",
    message=r"`broadcast_buffers` is deprecated",
    category=FutureWarning,
    module=r"lightning\.pytorch\.strategies\.ddp",
)


class _NoTips(logging.Filter):
    """Lightning 2.6 logs a tip to install litlogger (its cloud service) at every Trainer it builds:
    an advertisement between the lines about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())


# Tokens per chunk of the fused head + loss that loss_chunk_size=None means on a CPU, where chunks
# whose logits stay in cache made a whole training step of vs_hf.py's decoder (vocabulary 8192) 13%
# faster than the plain head (512 and 1024 within noise of each other, 256 slower). Off on GPUs:
# there it saves memory, not time (GPT-2 124M, 16 x 1024, CUDA graphs, an H200: one chunk of 16384
# within 1% of the plain head; experiment=gpt2_124m_1gpu takes it); a few thousand tokens per chunk
# saves most of the logits' memory.
CPU_LOSS_CHUNK = 512


def check_loss_chunk_size(value: int | None) -> None:
    """Refuse a negative ``loss_chunk_size`` (the module at construction, ``train`` before any work)."""
    if value is not None and value < 0:
        raise ValueError(
            f"loss_chunk_size must be >= 0 (tokens per chunk of the fused head + loss; 0 = plain "
            f"head + cross-entropy; null = by device), got {value}"
        )


# optim.* settings a config may leave out (conf/optim/adamw.yaml lists them all), and their values
OPTIM_DEFAULTS = {
    "weight_decay": 0.0,
    "betas": (0.9, 0.95),
    "eps": 1e-8,
    "warmup_steps": 0,
    "min_lr_ratio": 0.1,
    "master_weights": False,
    "compile_master_step": True,
}


def lr_lambda(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (dim >= 2) only; never on norms' gains or biases."""
    params = [p for p, _ in trained_params(module)]
    return [
        {"params": params[: sum(p.dim() >= 2 for p in params)], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def trained_params(module: torch.nn.Module) -> list[tuple[torch.nn.Parameter, list[str]]]:
    """Each trained parameter once (a tied one has several names) with its names, in the order of
    :func:`param_groups`: the matrices and embeddings (dim >= 2), then the rest."""
    names: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            names.setdefault(id(p), []).append(name)
            params[id(p)] = p
    order = [i for i in params if params[i].dim() >= 2] + [i for i in params if params[i].dim() < 2]
    return [(params[i], names[i]) for i in order]


class FiniteFlag:
    """Whether a loss is finite, read later without draining the device's queue.

    On a GPU the flag is copied to pinned host memory right after the loss is computed, behind an
    event: reading it waits for that point of the stream only, not for the backward and optimizer
    kernels queued since (``bool(torch.isfinite(loss))`` a step later would wait for all of them).
    """

    def __init__(self, loss: torch.Tensor, step: int) -> None:
        # A copy for the message: under compile="reduce-overhead" the loss lives in a CUDA graph's
        # output buffer, which the next step's replay overwrites.
        self.loss, self.step = loss.detach().clone(), step
        finite = torch.isfinite(self.loss)
        self.event = None
        if finite.is_cuda:
            self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.host.copy_(finite, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = finite

    def value(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host)


class LMModule(L.LightningModule):
    """Subclasses set ``accepts``, ``config_class`` and ``backbone_class`` and implement
    ``hidden_states``.

    ``loss_chunk_size`` > 0 computes the output head and the cross-entropy together over chunks of
    that many tokens (:func:`lmlab.nn.loss.linear_cross_entropy`), so the (tokens x vocab) logits
    never exist whole; 0 runs the head on all positions, then ``F.cross_entropy``. Same loss and
    gradients either way. ``None`` picks by device: :data:`CPU_LOSS_CHUNK` on a CPU, 0 elsewhere.

    ``compile``: false, true or a ``torch.compile`` mode name (:data:`lmlab.parallel.COMPILE_MODES`;
    true is ``"default"``); ``compile_scope`` says what is compiled in that mode: ``"model"``, the
    whole loss computation (:meth:`nll`) as one graph; ``"blocks"``, each Transformer block on its
    own (every block of a kind reuses one graph: the first step's compile time stays that of one
    block however deep the model) and the output head + loss (:meth:`head_loss`) as another. Under
    FSDP it is ``"blocks"`` whatever the setting (FSDP's hooks stay outside the graphs).

    Keyword arguments other than the ones below are fields of ``config_class`` (the backbone's
    config dataclass, which validates them); everything is saved as hyperparameters, so a checkpoint
    rebuilds its module with ``cls(**checkpoint["hyper_parameters"])``.
    """

    accepts: tuple[str, ...] = ()  # batch kinds this architecture can train on
    # the settings of `python -m lmlab.generate` that its `generate_text` reads (GENERATION_KEYS)
    generation_settings: tuple[str, ...] = GENERATION_KEYS
    config_class: type = object
    backbone_class: type = object

    def __init__(
        self,
        *,
        vocab_size: int,
        special_ids: dict[str, int],
        optim: dict,
        compile: bool | str = False,
        compile_scope: str = "model",
        activation_checkpointing: bool = False,
        loss_chunk_size: int | None = None,
        name: str = "",
        init_device: str | None = None,
        **backbone,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["init_device"])
        self.vocab_size, self.special_ids = vocab_size, dict(special_ids)
        self.optim_cfg = {**OPTIM_DEFAULTS, **optim}
        self.compile_mode = compile_mode(compile)
        self.compile_scope = check_compile_scope(compile_scope)
        self.activation_checkpointing = activation_checkpointing
        check_loss_chunk_size(loss_chunk_size)
        self.loss_chunk_size = loss_chunk_size
        self.config = self.config_class(vocab_size=vocab_size, **backbone)
        # init_device="meta": no memory until `configure_model` shards and materialises it (FSDP)
        with torch.device(init_device) if init_device else contextlib.nullcontext():
            self.backbone = self.build_backbone()
        self.val_loss, self.val_ppl, self.val_bpb = TargetMean(), Perplexity(), BitsPerByte()
        self.val_acc = TargetMean()
        # auxiliary heads: name -> weight of its mean cross-entropy in the training loss, in the
        # order of their sums in `nll` (a subclass declares them with `add_aux_task`)
        self.aux_weights: dict[str, float] = {}
        self.aux_keys: dict[str, str] = {}  # name -> its batch key of labels
        self.val_aux = torch.nn.ModuleDict()
        # UTF-8 bytes of each token id (0 for specials); set from the tokenizer by `set_token_bytes`.
        self.register_buffer(
            "token_bytes", torch.zeros(vocab_size, dtype=torch.long), persistent=False
        )
        self.extra_checkpoint: dict = {}  # saved under checkpoint["lmlab"]: version, tokenizer, config
        self.byte_scale = 1.0  # text bytes per counted token byte (set_token_bytes)
        self.skip_nonfinite = False  # set from trainer.skip_nonfinite by train()
        self.skipped_nonfinite = 0
        self.last_val_step = -1  # global step of the latest validation
        # the last training loss, checked a step late
        self._unchecked_loss: FiniteFlag | None = None
        self._epoch_targets: torch.Tensor | None = None  # target tokens of the epoch so far
        self._skipped_targets: torch.Tensor | None = None  # the step's skip_nonfinite skipped
        self._grad_rescale: float | None = None  # the step's gradient, to its trained targets' mean
        self._epoch_targets_shared = False  # ... of all processes (else this process's)
        self._resumed_epoch_targets: tuple[int, int] | None = None  # (epoch, count) of a checkpoint
        # (NLL, targets, bytes) of the optimizer step in progress and of the last complete one
        self._step_sums: torch.Tensor | None = None
        self._last_train: torch.Tensor | None = None
        self.final_train_metrics: dict[str, torch.Tensor] = {}  # set at the end of training

    # -- set-up ----------------------------------------------------------------------------------
    def build_backbone(self) -> torch.nn.Module:
        return self.backbone_class(self.config)

    def add_aux_task(self, name: str, weight: float, key: str) -> None:
        """Declare an auxiliary head whose (NLL sum, count, correct) :meth:`nll` returns after the
        language model's four values (in the order of declaration), over the batch's ``key``
        labels."""
        self.aux_weights[name] = float(weight)
        self.aux_keys[name] = key
        self.val_aux[name] = torch.nn.ModuleDict({"loss": TargetMean(), "acc": TargetMean()})

    def aux_sums(self, sums: tuple[torch.Tensor, ...]) -> list[tuple]:
        """(name, NLL sum, count, correct) of each auxiliary head from :meth:`nll`'s values."""
        return [(name, *sums[4 + 3 * i : 7 + 3 * i]) for i, name in enumerate(self.aux_weights)]

    def set_token_bytes(self, token_bytes, scale: float = 1.0) -> None:
        """UTF-8 bytes per token id, for bits per byte, and ``scale``: the text's bytes per counted
        byte (:meth:`lmlab.data.store.TokenStore.byte_scale` of the validation split; 1.0 for
        tokenizers whose pieces spell the text exactly)."""
        tb = torch.as_tensor(token_bytes, dtype=torch.long)
        if tb.shape != (self.vocab_size,):
            raise ValueError(
                f"token_bytes has shape {tuple(tb.shape)}, expected ({self.vocab_size},)"
            )
        self.token_bytes = tb.to(self.token_bytes.device)
        self.byte_scale = float(scale)

    def configure_model(self) -> None:
        """Activation checkpointing, compile and FSDP sharding (:func:`lmlab.parallel.parallelize`),
        once, when the trainer sets up (Lightning calls this hook under every strategy)."""
        if getattr(self, "_configured", False):
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        fsdp = strategy if isinstance(strategy, FSDP) else None
        per_block = fsdp is not None or self.compile_scope == "blocks"
        parallelize(
            self.backbone,
            activation_checkpointing=self.activation_checkpointing,
            compile_blocks=self.compile_mode if per_block else None,  # outside FSDP's hooks
            fsdp=fsdp,
            device=strategy.root_device if strategy is not None else None,
        )
        # The head and the loss are compiled in either scope: the fp32 upcast and the cross-entropy
        # fuse with the head's output, and the head, which runs outside the backbone's forward, is
        # covered (compiling only the backbone's forward missed the encoder's: 335K -> 449K
        # tokens/s on an H100 with the other changes of that commit). Generation stays eager
        # (`evaluating`): its shapes change at every token.
        if self.compile_mode and per_block:
            self.head_loss = torch.compile(self.head_loss, mode=self.compile_mode)
        elif self.compile_mode:  # the forward and the loss in one graph
            self.nll = torch.compile(self.nll, mode=self.compile_mode)
        self._configured = True

    def num_params(self, non_embedding: bool = True) -> int:
        return self.backbone.num_params(non_embedding)

    def step_flops(self, batch: dict) -> int:
        """Training FLOPs (forward and backward) of one micro-batch, by PaLM's count
        (:mod:`lmlab.flops`): here every token through every block and the output head, with
        attention over the whole window; families whose parts see other token counts override it."""
        B, T = batch["input_ids"].shape
        b = self.backbone
        n = flops.matmul_weights(b.blocks) + b.lm_head.weight.numel()
        return B * T * flops.flops_per_token(n, self.config.n_layers, self.config.d_model, T)

    def flops_per_token(self, batch: dict) -> float:
        """Training FLOPs per input token of ``batch`` (what ``train/tokens_per_sec`` counts), for
        ``train/mfu``."""
        return self.step_flops(batch) / batch["input_ids"].numel()

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # A padding mask without padding (full pre-training windows) is dropped while the batch is
        # still on the host: the attention then takes its fused path without the device sync that
        # asking the mask on the GPU would cost (lmlab.nn.blocks.key_padding_mask).
        mask = batch.get("attention_mask")
        if mask is not None and mask.device.type == "cpu" and bool(mask.all()):
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        return batch

    # -- loss and metrics ------------------------------------------------------------------------
    def hidden_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (..., C), labels (...)): the backbone's final hidden states and the label each
        position is scored against (-100: not a target)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (..., V) aligned with the labels of :meth:`hidden_states`."""
        return self.backbone.lm_head(self.hidden_states(batch)[0])

    def nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Return (summed target NLL in nats, target count, UTF-8 bytes of the targets, correct
        argmax predictions (counted in eval mode only)), over the positions whose label is not -100;
        then (NLL sum, count, correct) of each auxiliary head (:attr:`aux_weights`)."""
        hidden, labels = self.hidden_states(batch)
        return self.head_loss(hidden, labels, count_correct=not self.training)

    def head_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, count_correct: bool
    ) -> tuple[torch.Tensor, ...]:
        """:meth:`nll` from the final hidden states: the output head and the cross-entropy (fused
        over chunks or not, :attr:`loss_chunk_size`), the target count, their UTF-8 bytes and, with
        ``count_correct``, the correct argmax predictions (else zero)."""
        labels = labels.flatten()
        hidden = hidden.reshape(labels.shape[0], -1)
        mask = labels != IGNORE
        # Ignored labels are masked, not gathered: the loss has static shapes and compiles without
        # graph breaks. Accuracy is a validation metric: no argmax over (N, V) in training steps.
        chunk = self.loss_chunk_size
        if chunk is None:
            chunk = CPU_LOSS_CHUNK if hidden.device.type == "cpu" else 0
        if chunk:
            weight = self.backbone.lm_head.weight
            nll_sum, correct = linear_cross_entropy(
                hidden, weight, labels, chunk_size=chunk, count_correct=count_correct
            )
        else:
            logits = self.backbone.lm_head(hidden)
            nll_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
            correct = ((logits.argmax(-1) == labels) & mask).sum() if count_correct else None
        if correct is None:
            correct = torch.zeros((), dtype=torch.long, device=labels.device)
        n_bytes = (self.token_bytes[labels.clamp(min=0)] * mask).sum() * self.byte_scale
        return nll_sum, mask.sum(), n_bytes, correct

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step_targets, aux_targets = self.all_processes(
            batch.pop("step_targets", None), batch.pop("step_aux_targets", None)
        )
        sums = self.nll(batch)
        nll_sum, count, n_bytes = sums[:3]
        aux = self.aux_sums(sums)
        loss = nll_sum / self.loss_divisor(count, step_targets)
        for name, aux_nll, aux_count, _ in aux:
            # like the language model's: every label of the step weighs alike
            loss = loss + self.aux_weights[name] * aux_nll / self.loss_divisor(
                aux_count, self.aux_step_targets(name, aux_targets)
            )
        if self.skip_nonfinite:  # needs this step's value now: one host sync per step
            if not torch.isfinite(loss):
                self.skipped_nonfinite += 1
                self.log("train/skipped_nonfinite", float(self.skipped_nonfinite))
                self._add_to_step(None)
                self._count_epoch_targets(count, step_targets, trained=False)
                # Lightning skips this batch's backward; the step's other micro-batches still step
                # (their gradient rescaled: on_before_optimizer_step)
                return None
        else:
            # Checked one step late, so the host never waits for the device mid-step; the
            # checkpoint and validation hooks check first, so no non-finite state is saved.
            self.check_finite()
            self._unchecked_loss = FiniteFlag(loss, self.global_step)
        # Sums kept past the step, as new tensors (under compile=reduce-overhead the outputs live
        # in memory that the next replay of the CUDA graph overwrites), on the device: the
        # optimizer step's NLL, targets and bytes, and the epoch's target tokens.
        values = (
            nll_sum,
            count,
            n_bytes,
            *(t for _, a_nll, a_count, _ in aux for t in (a_nll, a_count)),
        )
        self._add_to_step(torch.stack([t.detach().float() for t in values]))
        self._count_epoch_targets(count, step_targets)
        return loss

    def on_fit_start(self) -> None:
        """Master weights under DDP: gradients all-reduced in fp32 into the masters' by DDP's
        communication hook (lmlab/optim.py), in place of DDP's own all-reduce of the model's bf16
        gradients."""
        strategy = self.trainer.strategy
        model = strategy.model
        for optimizer in self.trainer.optimizers:
            if not isinstance(optimizer, MasterWeightAdamW):
                continue
            if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                model.register_comm_hook((optimizer, model.process_group), fp32_all_reduce_hook)
            elif self.trainer.world_size > 1:
                raise ConfigError(
                    f"optim.master_weights=true with {self.trainer.world_size} processes needs "
                    f"DDP (its fp32 all-reduce of the masters' gradients); "
                    f"{type(strategy).__name__} is not: use trainer=ddp (or ddp_sim on CPUs)"
                )

    def on_after_backward(self) -> None:
        """Master weights: each micro-batch's gradient is added into the fp32 masters' after its
        backward, with gradient accumulation or under DDP (whose hook has given the masters the
        step's all-reduced gradient after the last micro-batch's: the model's are dropped then);
        in one process without accumulation :meth:`on_before_optimizer_step` copies them."""
        trainer = self._trainer
        if trainer is None:
            return
        for optimizer in trainer.optimizers:
            if not isinstance(optimizer, MasterWeightAdamW):
                continue
            if optimizer.reduced:
                for weight in optimizer.model_params:
                    weight.grad = None
            elif trainer.accumulate_grad_batches > 1 or trainer.world_size > 1:
                optimizer.accumulate_grads(keep=trainer.world_size > 1)

    def on_before_optimizer_step(self, optimizer) -> None:
        """After a step whose micro-batch ``skip_nonfinite`` skipped: the others' losses were
        divided by all the step's targets, so their gradient is scaled up to the mean over the
        targets trained on (before clipping, which Lightning does next). With master weights the
        optimizer first takes the step's gradients (copied into the masters' in fp32, or read
        where they are by the compiled step) and the rescale is a factor its step applies."""
        factor, self._grad_rescale = self._grad_rescale, None
        if isinstance(optimizer, MasterWeightAdamW):
            optimizer.pull_grads()
            if factor is not None:
                optimizer.scale_grads(factor)  # applied as its step reads them
        elif factor is not None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
            torch._foreach_mul_([g for g in grads if g is not None], factor)

    def all_processes(
        self, step_targets: torch.Tensor | None, aux_targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The loader's ``step_targets`` (this process's targets in the micro-batches of its
        optimizer step, :class:`lmlab.data.base.ResumableLoader`) and ``step_aux_targets`` (an
        auxiliary head's) summed over all processes: one all-reduce of a few numbers with several
        (the host does not wait for it)."""
        trainer = self._trainer
        if step_targets is None or trainer is None or trainer.world_size == 1:
            return step_targets, aux_targets
        # torch.distributed directly: Lightning's strategy.reduce adds a barrier, which on NCCL
        # waits for the device
        both = (
            step_targets.view(1)
            if aux_targets is None
            else torch.cat([step_targets.view(1), aux_targets])
        )
        both = both.clone()  # all_reduce works in place
        torch.distributed.all_reduce(both)
        return both[0], (both[1:] if aux_targets is not None else None)

    def aux_step_targets(self, name: str, aux_targets: torch.Tensor | None) -> torch.Tensor | None:
        """The optimizer step's label count of auxiliary head ``name`` in ``step_aux_targets``
        (ordered by label key, :func:`lmlab.data.base.aux_label_keys`)."""
        if aux_targets is None:
            return None
        return aux_targets[sorted(self.aux_keys.values()).index(self.aux_keys[name])]

    def loss_divisor(
        self, count: torch.Tensor, step_targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """What a micro-batch's summed NLL is divided by to make its loss. Lightning divides each
        micro-batch's loss by the accumulation and the strategy averages gradients over processes,
        so dividing by the micro-batch's own target count would weigh its targets more when it has
        fewer. With ``step_targets`` (the optimizer step's targets over all processes,
        :meth:`all_processes`) the divisor is that per micro-batch: every target of the step
        weighs alike, and the gradient is the large batch's. Where every micro-batch has as many
        targets (causal LM), the divisor is exactly ``count``."""
        trainer = self._trainer
        if step_targets is None or trainer is None:
            return count.clamp(min=1)
        return step_targets.clamp(min=1) / (trainer.accumulate_grad_batches * trainer.world_size)

    def _count_epoch_targets(
        self, count: torch.Tensor, step_targets: torch.Tensor | None, trained: bool = True
    ) -> None:
        """Add to the epoch's target tokens (``train/tokens``: those trained on). With the step's
        targets over all processes (:meth:`all_processes`), those once per optimizer step, at its
        last micro-batch, less those of its micro-batches that ``skip_nonfinite`` skipped (one
        process): the same count in every process, so a checkpoint keeps it for a resumed epoch.
        Without them, this process's own, summed across processes at the epoch's end."""
        if step_targets is None:
            if not trained:
                return
            add, self._epoch_targets_shared = count, False
        else:
            if not trained:
                skipped = self._skipped_targets
                self._skipped_targets = count if skipped is None else skipped + count
            if self._trainer is not None and self.trainer.fit_loop.epoch_loop._should_accumulate():
                return
            add, self._epoch_targets_shared = step_targets, True
            if self._skipped_targets is not None:
                add, self._skipped_targets = add - self._skipped_targets, None
                if add > 0:  # the other micro-batches were divided by all the step's targets
                    # (an auxiliary head's loss is rescaled by the same factor: exact where its
                    # labels are skipped in the same share, approximate otherwise)
                    self._grad_rescale = float(step_targets / add)
        self._epoch_targets = (
            add.clone() if self._epoch_targets is None else self._epoch_targets + add
        )

    def _add_to_step(self, sums: torch.Tensor | None) -> None:
        """Add a micro-batch's (NLL, targets, bytes) (None: a batch skip_nonfinite skipped) to the
        optimizer step's; at the step's last micro-batch the step's become `latest_train_metrics`."""
        if self._step_sums is not None:
            sums = self._step_sums if sums is None else self._step_sums + sums
        if self._trainer is not None and self.trainer.fit_loop.epoch_loop._should_accumulate():
            self._step_sums = sums  # more micro-batches to come in this optimizer step
        else:
            self._step_sums = None
            if sums is not None:
                self._last_train = sums

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # The step's metrics go through Lightning's `log` only on the steps whose metrics it
        # writes (trainer.log_every_n_steps), once per optimizer step, as lmlab.callbacks.
        # Throughput logs: each `log` costs ~0.25 ms of host time (Lightning moves its record of
        # the metric to the value's device at every call), 1.2 of a tiny model's 3.4 ms step on a
        # CPU. Here, after every callback's hook, a stop a callback has just asked for (which
        # makes this step one Lightning writes) is seen. A batch that skip_nonfinite skipped
        # logs the last good step's values. The values cover every process's targets (one
        # all-reduce per logging step); the progress bar reads this process's own.
        trainer = self.trainer
        if trainer._logger_connector.should_update_logs and not (
            trainer.fit_loop.epoch_loop._should_accumulate()
        ):
            for name, value in self.latest_train_metrics(all_processes=True).items():
                self.log(name, value)

    def latest_train_metrics(self, all_processes: bool = False) -> dict[str, torch.Tensor]:
        """The last optimizer step's loss, perplexity and bits per byte over all its targets (its
        micro-batches' too, weighted by their targets), as device tensors (reading one waits for
        that step on a GPU); empty before the first step. This process's targets, or with
        ``all_processes`` every process's (a collective: every process must call it; a process
        without a step yet adds nothing)."""
        sums = self._last_train
        trainer = self._trainer
        if all_processes and trainer is not None and trainer.world_size > 1:
            if sums is None:
                sums = torch.zeros(3 + 2 * len(self.aux_weights), device=self.device)
            sums = trainer.strategy.reduce(sums.clone(), reduce_op="sum")
        if sums is None:
            return {}
        nll_sum, count, n_bytes, *aux = sums.unbind()
        loss = nll_sum / count.clamp(min=1)
        metrics = {
            "train/loss": loss,
            "train/ppl": loss.exp(),
            "train/bpb": nll_sum / (math.log(2) * n_bytes.clamp(min=1)),
        }
        for i, name in enumerate(self.aux_weights):
            metrics[f"train/{name}_loss"] = aux[2 * i] / aux[2 * i + 1].clamp(min=1)
        return metrics

    def on_train_epoch_end(self) -> None:
        # the epoch's target tokens, all processes (summed across them once where each counted
        # its own)
        if self._epoch_targets is not None:
            targets, self._epoch_targets = self._epoch_targets, None
            sync = not self._epoch_targets_shared
            self.log(
                "train/tokens", targets.double(), reduce_fx="sum", on_epoch=True, sync_dist=sync
            )

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLoss` if the last unchecked training loss was NaN or infinite."""
        pending, self._unchecked_loss = self._unchecked_loss, None
        if pending is None or pending.value():
            return
        raise NonFiniteLoss(
            f"training loss is {pending.loss.item()} at step {pending.step}: stopping. The run folder's "
            "checkpoints/last.ckpt holds the last good state. Lower optim.lr, raise "
            "optim.warmup_steps or use trainer.precision=32-true; or skip such batches with "
            "trainer.skip_nonfinite=true"
        )

    def on_train_start(self) -> None:
        self._epoch_targets = self._step_sums = self._last_train = None  # none from an earlier fit
        self._skipped_targets = self._grad_rescale = None
        resumed, self._resumed_epoch_targets = self._resumed_epoch_targets, None
        if resumed is not None and resumed[0] == self.current_epoch:
            # The checkpoint's epoch goes on (one written at an epoch's last batch resumes at the
            # next epoch, which starts from none)
            self._epoch_targets = torch.tensor(resumed[1], device=self.device)
            self._epoch_targets_shared = True
        # A run resumed after a crash: its metrics.csv holds the rows the crashed run logged after
        # the checkpoint, which this run logs again; they go (lmlab.loggers). A fresh start (in a
        # folder without a checkpoint: lmlab.train.check_fresh_start) drops an earlier attempt's.
        if self.trainer.ckpt_path:
            self.apply_optim_settings()
        for logger in self.trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.drop_rows_from(self.trainer.global_step)

    def apply_optim_settings(self) -> None:
        """This run's ``optim`` settings on the optimizer and the schedule. A resumed run's
        optimizer and scheduler state come from its checkpoint, loaded over what
        :meth:`configure_optimizers` built from the config: without this a changed learning rate,
        weight decay, betas or eps (the way out of a non-finite loss) was ignored, and a changed
        warmup or length took effect one step late. The schedule's position (its step) and the
        moments of AdamW stay the checkpoint's."""
        o = self.optim_cfg
        optimizer = self.trainer.optimizers[0]
        schedule = self.trainer.lr_scheduler_configs[0].scheduler
        decays = [g["weight_decay"] for g in param_groups(self, o["weight_decay"])]
        schedule.base_lrs = [o["lr"]] * len(optimizer.param_groups)
        for group, weight_decay, factor in zip(
            optimizer.param_groups, decays, schedule.lr_lambdas, strict=True
        ):
            group.update(
                weight_decay=weight_decay,
                betas=tuple(o["betas"]),
                eps=o["eps"],
                initial_lr=o["lr"],
                lr=o["lr"] * factor(schedule.last_epoch),
            )
        schedule._last_lr = [group["lr"] for group in optimizer.param_groups]

    def on_validation_start(self) -> None:
        self.check_finite()

    def on_train_end(self) -> None:
        self.check_finite()
        # the run's last step, over every process, for its summary: reduced here, inside fit,
        # where every process still runs the strategy (not after it)
        self.final_train_metrics = self.latest_train_metrics(all_processes=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        sums = self.nll(batch)
        nll_sum, count, n_bytes, correct = sums[:4]
        self.val_loss.update(nll_sum, count)
        self.val_ppl.update(nll_sum, count)
        self.val_bpb.update(nll_sum, n_bytes)
        self.val_acc.update(correct, count)
        for name, aux_nll, aux_count, aux_correct in self.aux_sums(sums):
            self.val_aux[name]["loss"].update(aux_nll, aux_count)
            self.val_aux[name]["acc"].update(aux_correct, aux_count)

    def on_validation_epoch_end(self) -> None:
        # Logged once per validation, not at every batch: each Lightning `log` call costs ~0.25 ms
        # of host time, and four per batch were more than a small model's forward on a CPU.
        # Lightning computes each metric (across processes), resets them, and shows loss and bpb
        # on the bar.
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/ppl", self.val_ppl)
        self.log("val/bpb", self.val_bpb, prog_bar=True)
        self.log("val/acc", self.val_acc)
        for name, metrics in self.val_aux.items():
            self.log(f"val/{name}_loss", metrics["loss"])
            self.log(f"val/{name}_acc", metrics["acc"])
        self.last_val_step = self.trainer.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # never save weights a non-finite loss has updated
        checkpoint["lmlab"] = self.extra_checkpoint
        counters = {"skipped_nonfinite": self.skipped_nonfinite}
        if self._epoch_targets is not None and self._epoch_targets_shared:
            # every process's count of the epoch so far (the same in each): a resumed epoch goes on
            counters["epoch_targets"] = (self.current_epoch, int(self._epoch_targets))
        checkpoint["lmlab_counters"] = counters

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A resumed run keeps what train() recorded for it (this version, config and held-out
        # documents; the tokenizer was checked to be the checkpoint's); a bare module takes the
        # checkpoint's.
        self.extra_checkpoint = self.extra_checkpoint or checkpoint.get("lmlab", {})
        # the run's count goes on (skip_nonfinite runs in one process: one count)
        counters = checkpoint.get("lmlab_counters", {})
        self.skipped_nonfinite = int(counters.get("skipped_nonfinite", 0))
        self._resumed_epoch_targets = counters.get("epoch_targets")
        self.carry_master_weights(checkpoint)

    def carry_master_weights(self, checkpoint: dict) -> None:
        """Across a resume that switches ``optim.master_weights`` (called before Lightning loads
        the weights and the optimizer; under trainer=fsdp Lightning loads the weights first and
        nothing is carried, as master weights do not combine with it): a checkpoint with fp32
        masters resumed without them gives the model the masters (its bf16 weights are them
        rounded: a bf16-mixed or 32-true resume would lose their low bits); one of fp32 weights
        without masters resumed with them starts the masters from those weights, not from this
        run's bf16 copy of them."""
        weights, optimizers = checkpoint.get("state_dict"), checkpoint.get("optimizer_states")
        if not weights or not optimizers or len(optimizers) != 1:
            return
        params = trained_params(self)
        saved = optimizers[0].get("master_weights")
        if saved is not None and not self.optim_cfg["master_weights"]:
            if [tuple(v.shape) for v in saved] == [tuple(p.shape) for p, _ in params]:
                for (_, names), value in zip(params, saved, strict=True):
                    weights.update({n: value for n in names if n in weights})
        elif saved is None and self.optim_cfg["master_weights"]:
            first = [names[0] for _, names in params]
            if all(n in weights and weights[n].dtype == torch.float32 for n in first):
                optimizers[0]["master_weights"] = [weights[n] for n in first]

    def configure_callbacks(self) -> list[L.Callback]:
        # master weights off the GPU after fit, also when it raises (a callback's exception hook)
        return [MastersOffDevice()] if self.optim_cfg["master_weights"] else []

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim_cfg
        p = next(self.parameters())
        # The fused (single-kernel) AdamW except for sharded (DTensor) weights, and fp16 mixed
        # precision, whose gradient scaler Lightning will not combine with clipping a fused optimizer.
        fused = (
            p.device.type in ("cuda", "cpu")
            and not isinstance(p, DTensor)
            and str(self.trainer.precision) != "16-mixed"
        )
        settings = dict(lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], fused=fused)
        if o["master_weights"]:  # fp32 copies of bf16-true weights, stepped and rounded back
            # (lmlab/optim.py); under compile its step is compiled too: one fused pass
            compiled = bool(self.compile_mode) and fused and o["compile_master_step"]
            optimizer = MasterWeightAdamW(
                param_groups(self, o["weight_decay"]), compiled=compiled, **settings
            )
        else:
            optimizer = torch.optim.AdamW(param_groups(self, o["weight_decay"]), **settings)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        total = total or int(self.trainer.estimated_stepping_batches)
        warmup = o["warmup_steps"]
        if warmup >= total:
            raise ValueError(
                f"optim.warmup_steps={warmup} must be below the number of steps ({total})"
            )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: lr_lambda(s, warmup, total, o["min_lr_ratio"]),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        # bf16 autocast has no gradient scaler, so clipping is the plain clip; doing it here lets it
        # run with the fused AdamW (Lightning's mixed-precision plugin refuses any fused optimizer,
        # for fp16's sake). Values <= 0 clip nothing, as in Lightning (a negative max_norm would
        # flip the gradients' sign; lmlab.train refuses one before any work). Master weights clip
        # as a factor their step applies (lmlab/optim.py).
        masters = isinstance(optimizer, MasterWeightAdamW)
        if masters or str(self.trainer.precision) == "bf16-mixed":
            if not gradient_clip_val or gradient_clip_val <= 0:
                return
            by_norm = gradient_clip_algorithm in (None, "norm")  # else "value"
            if masters:
                clip = optimizer.clip_grad_norm_ if by_norm else optimizer.clip_grad_value_
                clip(gradient_clip_val)
            else:
                params = [p for g in optimizer.param_groups for p in g["params"]]
                clip = (
                    torch.nn.utils.clip_grad_norm_ if by_norm else torch.nn.utils.clip_grad_value_
                )
                clip(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- what to show at each validation ---------------------------------------------------------
    def samples(self, tokenizer, datamodule, **settings) -> list[str]:
        """Human-readable outputs (generations, reconstructions) for ``samples.txt``."""
        raise NotImplementedError

    def check_prompt_length(self, n_tokens: int) -> None:
        """A prompt the model reads whole (an encoder's input) must fit its positions."""
        limit = self.config.max_seq_len
        if n_tokens > limit:
            raise ConfigError(
                f"the prompt is {n_tokens} tokens (with the special tokens the model adds), beyond "
                f"the model's max_seq_len={limit}; shorten the prompt"
            )

    @contextmanager
    def evaluating(self):
        """Eval mode, no gradients and no compiled code (:func:`lmlab.parallel.eager`) for a block
        (generation, predictions), restoring the previous mode after it."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), eager():
                yield
        finally:
            self.train(was_training)
