"""Shared pieces of the benchmarks: random batches, lmlab models and Trainer, timing, tables.

Not a benchmark itself. The scripts next to it import it as ``common`` (Python puts the script's own
folder first on ``sys.path``), so each stays runnable as ``python benchmarks/<name>.py``.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lmlab.data.collate import IGNORE, document_ids
from lmlab.models.base import param_groups
from lmlab.optim import MasterWeightAdamW

SPECIAL_IDS = {"pad": 0, "bos": 1, "eos": 2, "mask": 3, "cls": 4, "sep": 5}  # token ids 0..5
OPTIM = {  # lmlab's AdamW settings (conf/optim/adamw.yaml), the warmup shortened for short runs
    "lr": 6e-4,
    "weight_decay": 0.1,
    "betas": [0.9, 0.95],
    "eps": 1e-8,
    "warmup_steps": 2,
    "min_lr_ratio": 0.1,
}


def quiet() -> None:
    """Keep Lightning's start-up chatter and known warnings out of the tables."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (
        ".*does not have many workers.*",
        ".*GPU available but not used.*",
        ".*exists and is not empty.*",
        ".*LeafSpec.*",
        ".*TensorFloat32.*",
        ".*predict_dataloader.*",
        ".*val_dataloader.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


# -- data --------------------------------------------------------------------------------------


def random_batch(
    kind: str,
    batch: int,
    seq_len: int,
    vocab: int,
    *,
    target_len: int = 0,
    mask_prob: float = 0.15,
    document_length: int | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """A batch of the given kind (causal / masked / seq2seq) of uniformly random non-special tokens,
    shaped like lmlab's collate functions make them (``lmlab/data/collate.py``), without padding.

    ``document_length`` (causal and masked): packed documents of that mean length, as under
    ``objective.document_mask=true``: each input token is eos with probability 1 / length, and
    the batch carries their ``doc_ids``."""
    lo = len(SPECIAL_IDS)
    ids = lambda *shape: torch.randint(lo, vocab, shape, generator=generator)
    if document_length is not None and kind == "seq2seq":
        raise ValueError("document masks are for causal and masked batches")

    def packed(x: torch.Tensor, out: dict) -> dict:
        if document_length is None:
            return out
        ends = torch.rand(x.shape, generator=generator) < 1 / document_length
        out["input_ids"] = x = x.masked_fill(ends, SPECIAL_IDS["eos"])
        if kind == "masked":  # eos is special: never a masked target
            out["labels"] = out["labels"].masked_fill(ends, IGNORE)
        docs = document_ids(x.numpy(), SPECIAL_IDS["eos"], eos_opens=kind == "causal")
        return out | {"doc_ids": torch.from_numpy(docs)}

    if kind == "causal":
        x = ids(batch, seq_len)
        return packed(x, {"input_ids": x, "labels": ids(batch, seq_len)})
    if kind == "masked":
        x = ids(batch, seq_len)
        selected = torch.rand(batch, seq_len, generator=generator) < mask_prob
        labels = torch.where(selected, x, IGNORE)
        x = torch.where(selected, SPECIAL_IDS["mask"], x)
        out = {
            "input_ids": x,
            "attention_mask": torch.ones(batch, seq_len, dtype=torch.bool),
            "labels": labels,
        }
        return packed(x, out)
    if kind == "seq2seq":
        labels = ids(batch, target_len)
        decoder_input_ids = torch.cat(
            [torch.full((batch, 1), SPECIAL_IDS["bos"]), labels[:, :-1]], dim=1
        )
        return {
            "input_ids": ids(batch, seq_len),
            "attention_mask": torch.ones(batch, seq_len, dtype=torch.bool),
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
        }
    raise ValueError(f"unknown batch kind {kind!r}")


def adamw(
    model: torch.nn.Module,
    optim: dict = OPTIM,
    fused: bool = True,
    masters: bool = False,
    compiled_step: bool = False,
) -> torch.optim.AdamW:
    """lmlab's AdamW as ``LMModule.configure_optimizers`` builds it: decay / no-decay groups, the
    settings of ``optim``, fused on CPU and CUDA; over fp32 masters of bf16 weights with
    ``masters``, their step compiled with ``compiled_step`` (as under compile=true)."""
    groups = param_groups(model, optim["weight_decay"])
    settings = dict(lr=optim["lr"], betas=tuple(optim["betas"]), eps=optim["eps"], fused=fused)
    if masters:
        return MasterWeightAdamW(groups, compiled=compiled_step, **settings)
    return torch.optim.AdamW(groups, **settings)


def lmlab_loss(model, batch: dict) -> torch.Tensor:
    nll_sum, count, _, _ = model.nll(batch)  # LMModule.training_step's loss
    return nll_sum / count.clamp(min=1)


class Stepper:
    """One optimizer step of a model on a batch without a Trainer: ``loss_fn(model, batch)`` under
    bf16 autocast when ``bf16``, backward, clipping at 1.0, lmlab's fused AdamW, zero_grad.
    ``bf16_weights``: the model in bf16 instead (Lightning's bf16-true; no autocast), its AdamW
    over fp32 masters with ``masters`` (lmlab's optim.master_weights), stepped by the compiled
    step with ``compiled_step``."""

    def __init__(
        self,
        model,
        loss_fn: Callable,
        device: torch.device,
        bf16: bool,
        bf16_weights: bool = False,
        masters: bool = False,
        compiled_step: bool = False,
    ) -> None:
        model = model.to(device, torch.bfloat16 if bf16_weights else None)
        self.model, self.loss_fn, self.device = model, loss_fn, device
        self.bf16 = bf16 and not bf16_weights
        self.model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = adamw(model, masters=masters, compiled_step=compiled_step)

    def __call__(self, batch: dict) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        if isinstance(self.opt, MasterWeightAdamW):  # as LMModule's hooks: clipped by the step
            self.opt.pull_grads()
            self.opt.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class CycledBatches(Dataset):
    """``length`` items cycling over a few pre-made batches (use with ``batch_size=None``)."""

    def __init__(self, batches: Sequence[dict], length: int) -> None:
        self.batches, self.length = list(batches), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return self.batches[i % len(self.batches)]


def loader(batches: Sequence[dict], steps: int) -> DataLoader:
    """The same loader for every contender: an epoch of exactly ``steps`` ready-made batches, in
    pinned host memory where CUDA is available, as lmlab's data modules build them for a GPU
    (``lmlab.data.base``): a copy from pageable memory goes through a staging buffer, and may
    wait for the device."""
    return DataLoader(
        CycledBatches(batches, steps),
        batch_size=None,
        shuffle=False,
        pin_memory=torch.cuda.is_available(),
    )


# -- lmlab's Lightning path ----------------------------------------------------------------------


def lmlab_model(
    family: str,
    *,
    vocab_size: int,
    compile: bool | str = False,
    master_weights: bool = False,
    compile_master_step: bool = True,
    **dims,
) -> L.LightningModule:
    """The LightningModule of a family (decoder / encoder / encoder_decoder) with lmlab's optimizer
    (``master_weights``, ``compile_master_step``: lmlab's ``optim.*`` settings)."""
    from lmlab.models.decoder import DecoderLM
    from lmlab.models.encoder import EncoderLM
    from lmlab.models.encoder_decoder import EncoderDecoderLM

    cls = {"decoder": DecoderLM, "encoder": EncoderLM, "encoder_decoder": EncoderDecoderLM}[family]
    model = cls(
        vocab_size=vocab_size,
        special_ids=SPECIAL_IDS,
        optim=dict(OPTIM, master_weights=master_weights, compile_master_step=compile_master_step),
        compile=compile,
        name=family,
        **dims,
    )
    model.set_token_bytes(torch.ones(vocab_size, dtype=torch.long))  # bpb needs byte counts
    return model


# The callbacks of conf/callbacks/default.yaml that act during training steps. Left out: the two
# checkpoint callbacks (they save at validation, every 100 steps and at the end of training:
# outside the timed steps) and Samples (validation only). Validation itself is off.
SPEED_CALLBACKS = "preemption, lr_monitor, throughput, progress_bar; logger: csv"


def lmlab_trainer(
    *,
    accelerator: str,
    precision: str,
    max_steps: int,
    output_dir: Path,
    callbacks: Sequence[L.Callback] = (),
    use_hydra: bool = True,
    overrides: Sequence[str] = (),
    accumulate: int = 1,
    log_every: int = 10,
) -> tuple[L.Trainer, str]:
    """A Trainer as ``lmlab.train.build_run`` makes it: composed from ``conf/`` with Hydra's compose
    API when Hydra is installed (trainer=cpu|gpu, callbacks=default, logger=csv, then
    ``overrides``: more Hydra overrides of ``trainer.*`` / ``callbacks.*`` keys), else built by hand
    with the same settings (for machines without Hydra, which take no overrides); ``accumulate``
    micro-batches per optimizer step and metrics written and the progress bar redrawn every
    ``log_every`` steps either way. Returns (trainer, how it was built)."""
    from lmlab.checkpoint_io import AtomicCheckpointIO

    try:
        if not use_hydra:
            raise ImportError
        from hydra import compose, initialize_config_dir
        from hydra.utils import instantiate
        from omegaconf import open_dict

        from lmlab.paths import CONF_DIR
    except ImportError:
        if overrides:
            raise SystemExit(
                f"overrides {list(overrides)} need Hydra (hydra-core, omegaconf) to compose conf/"
            ) from None
        return _trainer_by_hand(
            accelerator, precision, max_steps, output_dir, callbacks, accumulate, log_every
        ), "by hand (no Hydra)"

    overrides = [
        f"trainer={'gpu' if accelerator == 'gpu' else 'cpu'}",
        f"trainer.precision={precision}",
        f"trainer.max_steps={max_steps}",
        f"trainer.accumulate_grad_batches={accumulate}",
        f"trainer.log_every_n_steps={log_every}",
        f"callbacks.progress_bar.refresh_rate={log_every}",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint=null",
        "callbacks.last_checkpoint=null",
        "callbacks.samples=null",
        "logger=csv",
        f"paths.output_dir={output_dir}",
        *overrides,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    trainer_cfg = cfg.trainer.copy()
    with open_dict(trainer_cfg):
        trainer_cfg.pop("skip_nonfinite", None)
    built = lambda group: [instantiate(c) for c in group.values() if c and "_target_" in c]
    trainer = instantiate(
        trainer_cfg,
        callbacks=[*built(cfg.callbacks), *callbacks],
        logger=built(cfg.logger),
        plugins=[AtomicCheckpointIO()],
        _convert_="all",  # plain lists, as lmlab.train.build_run passes them
    )
    return trainer, "Hydra compose of conf/ (trainer, callbacks, logger)"


def _trainer_by_hand(
    accelerator, precision, max_steps, output_dir, callbacks, accumulate=1, log_every=10
) -> L.Trainer:
    """conf/trainer/default.yaml + cpu|gpu.yaml and the speed-relevant callbacks, without Hydra."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from lmlab.callbacks import Preemption, ProgressBar, Throughput
    from lmlab.checkpoint_io import AtomicCheckpointIO
    from lmlab.loggers import ResumableCSVLogger

    return L.Trainer(
        default_root_dir=str(output_dir),
        accelerator=accelerator,
        devices=1,
        num_nodes=1,
        precision=precision,
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=250,
        check_val_every_n_epoch=None,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=log_every,
        enable_progress_bar=True,
        enable_model_summary=False,
        deterministic=False,
        use_distributed_sampler=False,
        callbacks=[
            Preemption(dirpath=str(output_dir / "checkpoints")),
            LearningRateMonitor(logging_interval="step"),
            Throughput(window=20),
            ProgressBar(refresh_rate=log_every),
            *callbacks,
        ],
        logger=[
            ResumableCSVLogger(
                save_dir=str(output_dir), name="", version="", flush_logs_every_n_steps=100
            )
        ],
        plugins=[AtomicCheckpointIO()],
    )


class StepTimer(L.Callback):
    """Per-step wall times of the steps after ``warmup``, from one step's end to the next's (data,
    forward, backward, clipping, optimizer, every callback and logging: all a step costs), in a
    window bracketed by device synchronisations: at the end of step ``warmup`` and of the
    Trainer's last step (``max_steps``; or step ``last``, when steps after the window are for
    something else), so the end of the run (epoch-end metrics, the loggers' last writes, teardown:
    once per run, not per step) stays out, as it does from the plain loop's ``timed_loop``. A run
    that stops before then is closed at the end of training."""

    def __init__(self, warmup: int, last: int | None = None) -> None:
        self.warmup, self.last = warmup, last
        self.times: list[float] = []
        self._last: float | None = None  # the end of the last timed step; None: window closed
        self._step = -1  # the optimizer step last seen (micro-batches of one step are one step)

    @property
    def total(self) -> float:
        """The synchronised window's length: the timed steps' sum."""
        return sum(self.times)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.warmup == 0:
            sync(pl_module.device)
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = trainer.global_step
        if done == self._step:  # a micro-batch that did not step the optimizer
            return
        self._step = done
        if done == self.warmup and self.warmup > 0:
            sync(pl_module.device)
            self._last = time.perf_counter()
        elif done > self.warmup and self._last is not None:
            last = trainer.max_steps if self.last is None else self.last
            if done == last:
                sync(pl_module.device)
            now = time.perf_counter()
            self.times.append(now - self._last)
            self._last = None if done == last else now

    def on_train_end(self, trainer, pl_module) -> None:
        if self._last is not None and self.times:  # stopped early: the last step ends when done
            sync(pl_module.device)
            self.times[-1] += time.perf_counter() - self._last


def timed_loop(
    step: Callable[[dict], None], batches: DataLoader, warmup: int, device: torch.device
) -> tuple[list[float], float]:
    """Run ``step`` over ``batches``; (per-step times after ``warmup``, their synchronised total)."""
    times, start, last = [], None, None
    for i, batch in enumerate(batches, start=1):
        step(batch)
        if i == warmup:
            sync(device)
            start = last = time.perf_counter()
        elif i > warmup:
            now = time.perf_counter()
            times.append(now - last)
            last = now
    sync(device)
    return times, time.perf_counter() - start


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``; other values (a count the module's host-side hook
    added) as they are, as Lightning moves a batch."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def scratch_folder(prefix: str) -> Path:
    """A temporary folder for runs' outputs (Trainer folders, metrics.csv), removed when the
    process ends."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return Path(path)


def trace_folder(path: Path | None, steps: int = 0, prefix: str = "lmlab-traces-") -> Path | None:
    """``--trace-dir``, made if missing (a path that is a file is refused before any run); with
    ``steps`` to trace and no path, a new temporary folder, kept for the traces."""
    if path is not None:
        if path.exists() and not path.is_dir():
            raise SystemExit(f"--trace-dir {path} is a file; name a folder for the traces")
        path.mkdir(parents=True, exist_ok=True)
    elif steps:
        path = Path(tempfile.mkdtemp(prefix=prefix))
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(times: Sequence[float]) -> float:
    return 1e3 * statistics.median(times)


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table (so it pastes into benchmarks/README.md as it is)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


def machine() -> str:
    """CPU model and core count (and the GPU, if any) for the tables' captions."""
    import os
    import platform

    cpu = platform.processor() or "unknown CPU"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, lightning {L.__version__}"
    if torch.cuda.is_available():
        out += f", {torch.cuda.get_device_name()}"
    return out


# Kinds by (lowercased) kernel or operator name, first match wins: attention before matrix products
# (cuDNN's attention kernels are named sm90_... too), copies before the elementwise catch-all.
KINDS = (
    # the compiler's kernels by their prefix (their names list the fused operators: `_to_copy`
    # in a fused RMSNorm does not make it a copy); templates (max-autotune) are matrix products
    ("matrix products", ("triton_tem",)),
    ("elementwise and reductions", ("triton_",)),
    # a CPU's compiled graph runs its fused C++ kernels inside this call, not as operators
    ("compiled graphs (CPU)", ("compiledfxgraph",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn", "dot_do_o", "convert_dq")),
    ("matrix products", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm")),
    ("matrix products", ("aten::bmm", "aten::matmul", "aten::linear", "sm90_", "sm80_")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "linalg_vector_norm")),
    ("copies and fills", ("memcpy", "memset", "copy_", "to_copy", "fill_", "zero_")),
    ("elementwise and reductions", ("elementwise", "reduce", "aten::", "vectorized")),
)
FRAMEWORK = "Python and autograd (CPU)"


def kind_of(name: str, device_kernel: bool) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    # On a CPU, what is not an aten operator is the framework around them (autograd nodes,
    # lmlab's autograd Functions' Python, the profiler's step markers)
    return "other" if device_kernel else FRAMEWORK
