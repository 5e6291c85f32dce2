"""``train(cfg)``: one training run from a composed config, callable from the CLI, tests and notebooks.

Order of work (cheap checks first, so bad input fails before anything expensive):
  1. model/objective compatibility, settings, devices, launcher  (no data touched)
  2. callbacks, loggers, Trainer (Lightning checks its own settings here)
  3. corpus listing and validation -> tokenizer -> token stores  (cached)
  4. DataModule, LightningModule
  5. fit, a final validation if the last step was not validated, summary.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import netrc
import os
import shutil
import time
import typing
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.callbacks import ProgressBar as ProgressBarBase
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from lmlab import __version__
from lmlab.callbacks import last_saved_at_step
from lmlab.checkpoint import SHARDED_META, is_sharded, read_checkpoint
from lmlab.checkpoint_io import AtomicCheckpointIO
from lmlab.data.corpus import (
    Corpus,
    check_data,
    file_kind,
    make_corpus,
    plain_texts,
    text_fields,
)
from lmlab.data.store import build_store, store_key
from lmlab.data.tokenizers import (
    TextTokenizer,
    build_tokenizer,
    check_tokenizer,
    sentinel_count,
)
from lmlab.errors import (
    ConfigError,
    Preempted,
    ResumeRefused,
    RunExists,
    refuse_unknown_keys,
    refuse_unknown_top_keys,
)
from lmlab.loggers import RUN_ID_FILE
from lmlab.models.base import OPTIM_DEFAULTS, check_loss_chunk_size
from lmlab.nn.matmul import check_cpu_matmul, set_cpu_matmul
from lmlab.nn.sampling import check_sampling
from lmlab.parallel import (
    CPU_FSDP_TORCH,
    FLEX,
    FSDP,
    attention_kernel,
    attention_kernels,
    check_compile_scope,
    compile_mode,
    cpu_fsdp_supported,
    recover_folder,
    use_tf32,
)
from lmlab.paths import file_lock

log = logging.getLogger("lmlab")


def check_compatible(cfg: DictConfig) -> None:
    """Refuse a (model, objective) pair whose batch kinds do not match, naming the valid choices."""
    from lmlab.registry import valid_objectives

    model_cls = get_class(cfg.model._target_)
    objective_cls = get_class(cfg.objective._target_)
    if objective_cls.batch_kind not in model_cls.accepts:
        raise ConfigError(
            f"model={cfg.model.name} cannot train on objective={cfg.objective.name} (it makes "
            f"{objective_cls.batch_kind!r} batches; {cfg.model.name} accepts "
            f"{', '.join(model_cls.accepts)}). Valid objectives for model={cfg.model.name}: "
            f"{', '.join(valid_objectives(cfg.model.name))}"
        )


def check_model(cfg: DictConfig) -> None:
    """The model's config dataclass refuses unknown keys and checks its sizes (heads dividing
    d_model, ...) here, before any data work; the tokenizer's vocabulary size, known only later,
    is stood in for by 1."""
    config_class = get_class(cfg.model._target_).config_class
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    settings.pop("_target_", None)
    settings.pop("name", None)
    known = {f.name for f in dataclasses.fields(config_class) if f.init} - {"vocab_size"}
    refuse_unknown_keys("model", settings, sorted(known), of=f"model={cfg.model.name}")
    hints = typing.get_type_hints(config_class)
    for key, value in settings.items():
        if hints.get(key) in (int, float) and not _is_number(value, hints[key]):
            raise ConfigError(f"model.{key}={value!r} is not {_A_NUMBER[hints[key]]}")
    try:
        config_class(**settings, vocab_size=1)
    except ValueError as e:
        raise ConfigError(str(e)) from None


_A_NUMBER = {int: "an integer", float: "a finite number"}
# Numeric keys the early checks compare (global_batch_size may also be null: no accumulation).
NUMBERS = {
    "seq_len": int,
    "data.batch_size": int,
    "global_batch_size": int,
    "optim.lr": float,
    "optim.warmup_steps": int,
    "trainer.max_steps": int,
}


def _is_number(value, kind) -> bool:
    """An int for ``int``; a finite int or float for ``float`` (NaN passes every comparison that
    would refuse it: ``optim.weight_decay=nan`` is not ``< 0``)."""
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    return isinstance(value, int | float) and math.isfinite(value)


def check_numbers(cfg: DictConfig) -> None:
    """A typed value given as text (``optim.lr=abc``) is named here, not met as a TypeError
    inside a later check; ``trainer.max_steps`` must end the run (the schedule needs a length)."""
    for key, kind in NUMBERS.items():
        value = OmegaConf.select(cfg, key)
        if value is None and key == "global_batch_size":
            continue
        if not _is_number(value, kind):
            raise ConfigError(f"{key}={value!r} is not {_A_NUMBER[kind]}")
    if cfg.trainer.max_steps < 1 and not cfg.trainer.get("fast_dev_run"):
        raise ConfigError(
            f"trainer.max_steps={cfg.trainer.max_steps}: training needs a length (the learning-rate "
            "schedule decays over it); set trainer.max_steps to a number of optimizer steps"
        )
    gbs = cfg.get("global_batch_size")
    if gbs is not None and gbs < 1:
        raise ConfigError(f"global_batch_size={gbs} must be >= 1 (or null: no accumulation)")


SAMPLE_SETTINGS = ("prompts", "max_new_tokens", "temperature", "top_k", "top_p")


def check_optim_and_sampling(cfg: DictConfig) -> None:
    """Settings that would otherwise fail late (the samples at the first validation) or silently
    (a negative clip value flipped the gradients' sign): clipping, AdamW, the schedule, samples."""
    clip = cfg.trainer.get("gradient_clip_val")
    if clip is not None and (not _is_number(clip, float) or clip < 0):
        raise ConfigError(
            f"trainer.gradient_clip_val={clip!r} must be >= 0 (0 or null: no clipping)"
        )
    refuse_unknown_keys("optim", cfg.optim, ("lr", *OPTIM_DEFAULTS))
    o = {**OPTIM_DEFAULTS, **OmegaConf.to_container(cfg.optim, resolve=True)}
    wd, ratio, eps = o["weight_decay"], o["min_lr_ratio"], o["eps"]
    if not _is_number(wd, float) or wd < 0:
        raise ConfigError(f"optim.weight_decay={wd!r} must be >= 0")
    if not _is_number(ratio, float) or not 0 <= ratio <= 1:
        raise ConfigError(
            f"optim.min_lr_ratio={ratio!r} must be in [0, 1] (the final learning rate over the peak)"
        )
    if not _is_number(eps, float) or eps <= 0:
        raise ConfigError(f"optim.eps={eps!r} must be > 0")
    betas = o["betas"]
    if (
        not isinstance(betas, list | tuple)
        or len(betas) != 2
        or not all(_is_number(b, float) and 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(f"optim.betas={betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if o["warmup_steps"] < 0:
        raise ConfigError(f"optim.warmup_steps={o['warmup_steps']} must be >= 0")
    check_master_weights(o["master_weights"], cfg.trainer)
    if not isinstance(o["compile_master_step"], bool):
        raise ConfigError(
            f"optim.compile_master_step={o['compile_master_step']!r} must be true or false"
        )
    sample = cfg.get("sample")
    if sample is not None:
        refuse_unknown_keys("sample", sample, SAMPLE_SETTINGS)
        try:
            check_sampling(sample.temperature, sample.top_k, sample.top_p, prefix="sample.")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        n = sample.max_new_tokens
        if not _is_number(n, int) or n < 0:
            raise ConfigError(f"sample.max_new_tokens={n!r} must be a whole number >= 0")
        prompts = sample.get("prompts")
        if prompts is not None and (  # a string would give one prompt per character
            not isinstance(prompts, ListConfig)
            or not all(
                isinstance(p, str | int | float) and not isinstance(p, bool) for p in prompts
            )
        ):
            raise ConfigError(
                f"sample.prompts={prompts!r} must be a list of texts, e.g. "
                '\'sample.prompts=["ROMEO:",""]\' ([] or null: none)'
            )


def check_objective(cfg: DictConfig, data_key: str = "data.train") -> None:
    """The objective refuses unknown keys and settings that are wrong whatever the data (its
    ``check_settings``) here, and data of the wrong kind, before any data work; ``data_key``: the
    files key its messages name (evaluate reads ``data.val``)."""
    objective = get_class(cfg.objective._target_)
    settings = OmegaConf.to_container(cfg.objective, resolve=True)
    settings.pop("_target_", None)
    known = objective.settings()
    own = sorted(objective.objective_settings())
    refuse_unknown_keys("objective", settings, own, of=f"objective={cfg.objective.name}")
    tok = cfg.get("tokenizer") or {}
    known_kind = tok.get("kind") in ("bpe", "byte", "pretrained")  # else check_tokenizer refuses it
    sentinels = sentinel_count(tok) if known_kind else None
    values = {k: v for k, v in known.items() if v is not inspect.Parameter.empty}
    everything = {**values, **settings, "seq_len": cfg.seq_len}
    objective.check_settings(**everything, num_sentinels=sentinels)
    data = cfg.get("data") or {}
    pair, pairs_data = (
        objective.pair_fields,
        isinstance(text_fields(data.get("text_field", "text")), tuple),
    )
    tables = table_data(data)
    named = data.get("train") or data.get("val")  # data=files without files: refused later
    if objective.tables and not tables and (data.get("source") != "files" or named):
        raise ConfigError(
            f"objective={cfg.objective.name} trains on tables, but data={data.get('name')} reads "
            "text; use CSV or TSV files (their first row the column names): data=files "
            f"{data_key}='tables/*.csv' (or data.format=csv for other file names)"
        )
    if tables and (pair or not objective.pairs_as_text):
        raise ConfigError(
            f"objective={cfg.objective.name} reads "
            + ("pairs of texts" if pair else "sentences")
            + ", but the data files are tables (.csv / .tsv); use "
            + ("JSONL rows of pairs" if pair else "text files, or data.format=text")
        )
    if not pair and not objective.pairs_as_text and pairs_data:
        raise ConfigError(
            f"objective={cfg.objective.name} cuts text into segments, but data.text_field lists "
            "two fields (pairs of texts), whose separator would fall inside them; use one field"
        )
    if pair and not pairs_data:
        raise ConfigError(
            f"objective={cfg.objective.name} trains on pairs of texts ({pair[0]}, {pair[1]}), "
            f"but data={data.get('name')} reads one text per document; use JSONL rows of pairs: "
            f"data=files {data_key}=pairs.jsonl data.text_field=[{pair[0]},{pair[1]}] (the two "
            "fields)"
        )
    max_target = cfg.model.get("max_target_len")
    if max_target is not None and hasattr(objective, "target_length"):
        target = objective.target_length(**everything)
        if target > max_target:
            raise ConfigError(
                f"objective={cfg.objective.name} with seq_len={cfg.seq_len} makes targets of "
                f"{target} tokens, more than model.max_target_len={max_target} (the decoder's "
                f"positions); set model.max_target_len={target} or more"
            )


def check_settings(cfg: DictConfig) -> None:
    refuse_unknown_top_keys(cfg, "train", "python -m lmlab")
    check_numbers(cfg)
    if cfg.seq_len < 1:  # before the model's: its max_seq_len is ${seq_len} unless set
        raise ConfigError(f"seq_len must be >= 1, got {cfg.seq_len}")
    check_optim_and_sampling(cfg)
    check_model(cfg)
    check_tokenizer(cfg.tokenizer)  # before the objective's checks, which count its sentinels
    check_objective(cfg)
    max_len = cfg.model.get("max_seq_len")
    if max_len is not None and cfg.seq_len > max_len:
        raise ConfigError(
            f"seq_len={cfg.seq_len} exceeds model.max_seq_len={max_len}; lower seq_len or raise "
            "model.max_seq_len"
        )
    check_data(cfg.data)
    try:  # the module's own checks, before any work
        check_loss_chunk_size(cfg.get("loss_chunk_size"))
        compile_mode(cfg.get("compile"))
        check_compile_scope(cfg.get("compile_scope", "model"))
        check_attention_masks(cfg, attention_kernels(cfg.get("attention"), uses_cuda(cfg.trainer)))
        check_cpu_matmul(cfg.get("cpu_matmul", "onednn"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not 0 < cfg.optim.lr < 1:
        raise ConfigError(f"optim.lr={cfg.optim.lr} is out of range; use a value in (0, 1)")
    max_steps, warmup = cfg.trainer.get("max_steps", -1), cfg.optim.get("warmup_steps", 0)
    fast_dev_run = cfg.trainer.get("fast_dev_run", False)
    if fast_dev_run:  # Lightning then runs that many steps (true: one)
        max_steps = 1 if fast_dev_run is True else int(fast_dev_run)
    if max_steps > 0 and warmup >= max_steps:
        steps = "fast_dev_run" if fast_dev_run else "max_steps"
        raise ConfigError(
            f"optim.warmup_steps={warmup} must be below trainer.{steps}={max_steps}; lower it"
        )
    check_wandb_login(cfg)
    check_sampler(cfg.trainer)
    check_devices(cfg.trainer)
    check_strategy(cfg.trainer)
    check_nodes(cfg.trainer)
    check_launch(cfg.trainer)
    check_cuda_graphs(cfg)
    accumulation(cfg)


def check_cuda_graphs(cfg: DictConfig) -> None:
    """compile=reduce-overhead (CUDA graphs) with several processes is said, not refused:
    PyTorch supports it, lmlab has not tested it (DDP's and FSDP's communication around the
    graphed parts). Said on rank zero, before any work."""
    processes = processes_per_node(cfg.trainer) * cfg.trainer.get("num_nodes", 1)
    if compile_mode(cfg.get("compile")) != "reduce-overhead" or processes < 2:
        return
    if rank_zero_only.rank == 0:
        log.warning(
            "compile=reduce-overhead (CUDA graphs) with %d processes is untested in lmlab; "
            "experiment=gpt2_124m_1gpu sets it for one GPU: for several, experiment=gpt2_124m "
            "(compile=true) is the tested preset",
            processes,
        )


def check_attention_masks(cfg: DictConfig, kernels: list[str] | None) -> None:
    """GPUs' flash kernel takes no attention mask: ``attention=flash`` alone is refused where the
    objective's batches need one (prefix LM, document masks), instead of failing at the first step
    with "No available kernel" (CPUs' flash kernel takes masks). ``attention=flex`` is refused
    where there are no document masks for it to take (objective.document_mask's, with the decoder
    or the encoder)."""
    if kernels == [FLEX]:
        backbone = getattr(get_class(cfg.model._target_), "backbone_class", None)
        if not hasattr(backbone, "flex_masks"):
            raise ConfigError(
                f"attention=flex: FlexAttention block masks are built for the document masks "
                f"of the decoder and the encoder; model={cfg.model.name} has none: use "
                "attention=auto"
            )
        if not cfg.objective.get("document_mask"):
            raise ConfigError(
                "attention=flex: FlexAttention takes the document masks of "
                "objective.document_mask=true, which this run does not set: add it, or use "
                "attention=auto"
            )
        return
    if kernels is None or set(kernels) != {"flash"} or not uses_cuda(cfg.trainer):
        return
    objective = get_class(cfg.objective._target_)
    if objective.batch_kind == "prefix":
        needs = f"objective={cfg.objective.name}'s prefix"
    elif cfg.objective.get("document_mask"):
        needs = "objective.document_mask"
    else:
        return
    raise ConfigError(
        f"attention=flash: on GPUs the flash kernel takes no attention mask, which {needs} "
        "needs in every step; use attention=auto, or a kernel that takes masks, e.g. "
        "attention=efficient"
    )


def accumulation(cfg: DictConfig) -> int:
    """Gradient accumulation: derived from ``global_batch_size`` when it is set (sequences per
    optimizer step = data.batch_size x accumulation x devices x nodes), else the trainer's own."""
    gbs = cfg.get("global_batch_size")
    if not gbs:
        return int(cfg.trainer.get("accumulate_grad_batches", 1))
    t = cfg.trainer
    devices = processes_per_node(t)  # "auto" is every visible GPU, as Lightning resolves it
    per_pass = cfg.data.batch_size * devices * t.get("num_nodes", 1)
    if gbs % per_pass:
        raise ConfigError(
            f"global_batch_size={gbs} is not a multiple of data.batch_size x trainer.devices x "
            f"trainer.num_nodes = {cfg.data.batch_size} x {devices} x {t.get('num_nodes', 1)} = "
            f"{per_pass}; change one of them (accumulation = global / that product)"
        )
    own = t.get("accumulate_grad_batches", 1)
    if own not in (None, 1, gbs // per_pass):
        raise ConfigError(
            f"global_batch_size={gbs} sets the gradient accumulation to {gbs // per_pass} "
            f"(= {gbs} / {per_pass} sequences per pass), but trainer.accumulate_grad_batches={own}; "
            "set only one of them"
        )
    return gbs // per_pass


def check_step_batches(t: DictConfig, accumulation: int) -> None:
    """With gradient accumulation, ``limit_train_batches`` must make whole optimizer steps while
    validations are counted across epochs (``check_val_every_n_epoch: null``): Lightning counts
    them in micro-batches over the whole run, and an epoch that ended inside a step (a short last
    step) would move every later validation, and the checkpoints written there, into the middle of
    a step. (The natural epoch is whole steps: lmlab's sampler deals them so.) A fractional
    ``val_check_interval`` (a share of the epoch, counted in batches) is refused likewise."""
    interval = t.get("val_check_interval")
    if accumulation > 1 and isinstance(interval, float) and interval != 1.0:
        raise ConfigError(
            f"trainer.val_check_interval={interval} (a share of the epoch, which Lightning counts "
            f"in batches) can fall inside an optimizer step of {accumulation} accumulated batches, "
            "and so would the checkpoints written there; give it in optimizer steps (an integer)"
        )
    limit = t.get("limit_train_batches")
    if accumulation <= 1 or limit is None or t.get("check_val_every_n_epoch") is not None:
        return
    if isinstance(limit, float):  # a share of the epoch: Lightning rounds it to batches later
        if limit == 1.0:
            return
        fix = f"give it as a number of batches, a multiple of {accumulation}"
    elif limit % accumulation == 0:
        return
    else:
        lower = limit - limit % accumulation
        options = f"{lower} or {lower + accumulation}" if lower else f"{accumulation}"
        fix = f"use a multiple of {accumulation} ({options})"
    raise ConfigError(
        f"trainer.limit_train_batches={limit} does not make whole optimizer steps of "
        f"{accumulation} accumulated batches: validations are counted in batches across epochs, "
        f"and each epoch's short last step would move them into the middle of later steps; {fix} "
        "(or validate per epoch: trainer.check_val_every_n_epoch=1)"
    )


def check_sampler(t: DictConfig) -> None:
    """lmlab's samplers deal the windows to the ranks themselves (lmlab/data/base.py); Lightning's
    distributed sampler on top would deal each rank's share again, and every rank would train on
    1/N of it without any error."""
    processes = processes_per_node(t) * t.get("num_nodes", 1)
    if processes > 1 and t.get("use_distributed_sampler", True):
        raise ConfigError(
            f"trainer.use_distributed_sampler=true with {processes} processes would shard lmlab's "
            "already sharded data again (each rank would see 1/N of its share); set "
            "trainer.use_distributed_sampler=false, as every trainer preset does"
        )


def uses_cuda(t: DictConfig) -> bool:
    """Whether the trainer settings ``t`` run on CUDA GPUs (as Lightning would pick them)."""
    accelerator = t.get("accelerator")
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def check_devices(t: DictConfig) -> None:
    """GPUs asked of a machine without any, or more devices than the machine has, are refused
    here, with the count, not deep in Lightning or a launcher after the data is prepared."""
    gpu = uses_cuda(t)
    if gpu and torch.cuda.device_count() == 0 and torch.backends.mps.is_available():
        return  # accelerator=gpu means Apple's MPS there (one device), which Lightning checks
    if gpu and torch.cuda.device_count() == 0:
        build = (
            "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        )
        raise ConfigError(
            f"trainer.accelerator={t.get('accelerator')} but this machine has no CUDA GPU (torch "
            f"{torch.__version__} is {build}); use trainer=cpu, or trainer=ddp_sim for several "
            "CPU processes"
        )
    devices = t.get("devices")
    if not isinstance(devices, int) or devices < 1:
        return  # "auto", -1 or a list of ids: Lightning resolves and checks those
    have = torch.cuda.device_count() if gpu else os.cpu_count() or 1
    if devices > have:
        kind = "CUDA GPUs" if gpu else "CPU cores"
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {have} {kind}; lower trainer.devices"
            + ("" if not gpu else " or use trainer=cpu")
        )


def processes_per_node(t: DictConfig) -> int:
    """How many processes Lightning would start on this machine for ``trainer.devices``: a count,
    a list of ids (or ``"0,1"``), or ``"auto"`` / -1 (every visible GPU; one process on a CPU)."""
    devices = t.get("devices")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        return len(devices)
    if t.get("accelerator") == "cpu":
        return 1  # "auto" / -1 on the CPU: one process
    return max(1, torch.cuda.device_count())


def table_data(data) -> bool:
    """Whether ``data`` (the data group) reads tables: data=files with data.format csv / tsv, or
    auto with every data.train / data.val pattern ending in .csv / .tsv (what the config says,
    before any file is read; the token store's kind is checked again once built)."""
    if data.get("source") != "files":
        return False
    fmt = data.get("format", "auto")
    if fmt != "auto":
        return fmt in ("csv", "tsv")
    patterns = [
        p
        for key in ("train", "val")
        for p in ([data.get(key)] if isinstance(data.get(key), str) else data.get(key) or [])
    ]
    return bool(patterns) and all(file_kind(str(p), "auto") in ("csv", "tsv") for p in patterns)


def check_master_weights(value: Any, t: DictConfig) -> None:
    """``optim.master_weights`` keeps fp32 copies of bf16 weights: only bf16-true has such weights
    (bf16-mixed's are fp32 already), and FSDP keeps fp32 shards itself (its param_dtype)."""
    if not isinstance(value, bool):
        raise ConfigError(f"optim.master_weights={value!r} must be true or false")
    if not value:
        return
    precision = str(t.get("precision"))
    if precision != "bf16-true":
        raise ConfigError(
            f"optim.master_weights=true keeps fp32 copies of bf16 weights, but "
            f"trainer.precision={precision} has no bf16 weights (under bf16-mixed and 32-true "
            "they are fp32 already; fp16 ones would need loss scaling): add "
            "trainer.precision=bf16-true, or drop optim.master_weights"
        )
    strategy = t.get("strategy")
    if isinstance(strategy, str) and strategy.startswith(("fsdp", "deepspeed")):
        raise ConfigError(
            f"optim.master_weights=true does not combine with trainer.strategy={strategy}, which "
            "shards the weights and keeps its own fp32 copies; use trainer=fsdp with "
            "trainer.precision=32-true trainer.strategy.param_dtype=bf16, or trainer=ddp"
        )
    if uses_fsdp(t):
        raise ConfigError(
            "optim.master_weights=true does not combine with trainer=fsdp: FSDP keeps the fp32 "
            "weights itself and computes in bf16 with trainer.precision=32-true "
            "trainer.strategy.param_dtype=bf16; use that, or drop optim.master_weights "
            "(experiment=gpt2_124m_1gpu sets it for one GPU: with trainer=fsdp use "
            "experiment=gpt2_124m)"
        )
    if (isinstance(strategy, str) and "find_unused_parameters_true" in strategy) or (
        isinstance(strategy, DictConfig) and strategy.get("find_unused_parameters")
    ):
        raise ConfigError(
            "optim.master_weights=true does not combine with DDP's find_unused_parameters: the "
            "masters' fp32 all-reduce would give a weight that no micro-batch used a zero "
            "gradient (which AdamW's decay still moves) where DDP leaves it none; lmlab's models "
            "use every weight at every step: drop find_unused_parameters"
        )


def uses_fsdp(t: DictConfig) -> bool:
    """trainer=fsdp (lmlab's FSDP2 strategy)."""
    strategy = t.get("strategy")
    target = strategy.get("_target_") if isinstance(strategy, DictConfig) else None
    try:
        return isinstance(target, str) and issubclass(get_class(target), FSDP)
    except Exception:  # not a class: building the Trainer names the problem
        return False


def check_strategy(t: DictConfig) -> None:
    """trainer=fsdp in CPU processes on a torch whose FSDP2 cannot run there is refused here, not
    as a stream error inside the first forward pass."""
    if uses_fsdp(t) and not uses_cuda(t) and not cpu_fsdp_supported():
        raise ConfigError(
            f"trainer=fsdp in CPU processes needs torch >= {CPU_FSDP_TORCH} (its FSDP2 needs CUDA "
            f"streams before that; this is torch {torch.__version__}): upgrade torch, train on GPUs "
            "(trainer.accelerator=gpu), or use trainer=ddp_sim for several CPU processes"
        )


def check_nodes(t: DictConfig) -> None:
    """Refuse ``trainer.num_nodes`` > 1 in a process that no multi-node launcher started: Lightning
    would start this machine's processes and wait for the other nodes' forever."""
    nodes = t.get("num_nodes") or 1
    if nodes <= 1:
        return
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    env = os.environ
    if (
        "NODE_RANK" in env  # the same command started on every node by hand (Lightning's own)
        or {"WORLD_SIZE", "RANK", "MASTER_ADDR"} <= env.keys()  # Kubeflow, other launchers
        or "OMPI_COMM_WORLD_SIZE" in env
        or "PMI_SIZE" in env  # mpirun
        or TorchElasticEnvironment.detect()  # torchrun
        or SLURMEnvironment.detect()  # srun
        or LSFEnvironment.detect()  # jsrun
    ):
        return
    raise ConfigError(
        f"trainer.num_nodes={nodes} but no multi-node launcher started this process (no torchrun, "
        "SLURM srun, LSF or MPI variables, no NODE_RANK): it would wait for the other nodes forever. "
        f"Start it on every node with torchrun --nnodes={nodes} --nproc-per-node=<GPUs per node> "
        "--rdzv-backend=c10d --rdzv-endpoint=<first node>:29500 -m lmlab ..., or srun (commands in "
        "conf/trainer/ddp.yaml), or set MASTER_ADDR, MASTER_PORT and NODE_RANK on each node"
    )


def check_launch(t: DictConfig) -> None:
    """Refuse multi-process jobs in a sweep run by Hydra's in-process launcher.

    Lightning starts a job's extra processes by re-running the command line; inside ``-m`` that
    command is the whole sweep, so each process would launch every job again. Under
    ``hydra/launcher=slurm`` every job is its own SLURM job with one task per device, and
    ``torchrun`` starts the processes itself: both are fine."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN or not str(hc.launcher.get("_target_", "")).endswith(
        "BasicLauncher"
    ):
        return
    if processes_per_node(t) * t.get("num_nodes", 1) > 1 and "LOCAL_RANK" not in os.environ:
        raise ConfigError(
            f"trainer.devices={t.get('devices')} (num_nodes={t.get('num_nodes', 1)}) starts one "
            "process per device by re-running the command line, which inside a -m sweep with "
            "Hydra's basic launcher would re-run the whole sweep. Sweep multi-process jobs with "
            "hydra/launcher=slurm (each job its own SLURM job, one task per device; pip install -e "
            "'.[sweeps]'), or run them one at a time without -m"
        )


def check_wandb_login(cfg: DictConfig) -> None:
    """``logger=wandb`` online needs credentials; say so before any work, not after training."""
    wb = (cfg.get("logger") or {}).get("wandb")
    if not wb or wb.get("offline") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return
    if os.environ.get("WANDB_API_KEY") or _wandb_key_saved():
        return
    raise ConfigError(
        "logger=wandb is online but W&B has no credentials: run `wandb login` (or set "
        "WANDB_API_KEY), or log offline with WANDB_MODE=offline / logger.wandb.offline=true"
    )


def _wandb_key_saved() -> bool:
    """Whether `wandb login` stored a key (it writes ~/.netrc, or $NETRC), read without side effects
    (``wandb.login`` would fix the W&B process settings for the rest of the process)."""
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


# Module arguments that may change between a run and its resumption: they change how the model is
# optimised or executed, not the weights' shapes.
RUNTIME_SETTINGS = (
    "optim",
    "compile",
    "compile_scope",
    "activation_checkpointing",
    "loss_chunk_size",
    "sentence_weight",
    "token_weight",
    "prefix_prompts",  # how generation reads prompts (checkpoints before 2026-11-28 lack it)
)
# Module arguments the objective sets (its auxiliary heads), named in a refused resume's message
HEAD_TASKS = ("sentence_task", "token_task")
OBJECTIVE_HEADS = (*HEAD_TASKS, "sentence_classes", "token_classes")


def check_one_file_under_fsdp(ckpt_path: str, out: Path) -> None:
    """A one-file checkpoint of a DDP or single-process run (its optimizer state keyed by position)
    is refused under trainer=fsdp: Lightning maps those positions onto the sharded weights in the
    module's parameter order, which lmlab's optimizer groups (matrices first) do not follow, so
    the AdamW moments would land on other weights (an error where the shapes differ, silently
    where they agree)."""
    states = read_checkpoint(ckpt_path, weights=False).get("optimizer_states") or []
    if any(isinstance(key, int) for state in states for key in state.get("state", {})):
        if rank_zero_only.rank == 0:
            restore_hydra_files(out)
        raise ResumeRefused(
            f"{ckpt_path} is a one-file checkpoint of a run without FSDP; trainer=fsdp cannot "
            "resume its optimizer state (Lightning would pair it with the wrong weights): resume "
            "it with the trainer that wrote it (trainer=ddp / gpu / cpu), or start a new FSDP run"
        )


def check_resume_compatible(
    ckpt_path: str, tokenizer: TextTokenizer, model, val_docs: str | None = None
) -> int:
    """Refuse to resume a checkpoint trained with other validation documents, another tokenizer
    or model shape; returns the checkpoint's global step."""
    ckpt = read_checkpoint(ckpt_path, weights=False)
    check_val_docs(ckpt["lmlab"], val_docs, str(ckpt_path), resume=True)
    if ckpt["lmlab"].get("tokenizer") != tokenizer.to_str():
        raise ConfigError(
            f"{ckpt_path} was trained with a different tokenizer than this run's (a BPE is trained "
            "on the training split: other data, or a checkpoint from before lmlab's split change "
            "of 2026-11-26, gives another); resume with the run's own: tokenizer=pretrained "
            "tokenizer.path=<run dir>/tokenizer.json, and check the data is the same"
        )
    saved, now = ckpt.get("hyper_parameters", {}), dict(model.hparams)
    # a module argument added since the checkpoint was written has its default there
    defaults = {
        name: p.default
        for name, p in inspect.signature(type(model).__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    # the heads' tasks first: a refusal names them rather than their sizes
    for key in sorted(set(saved) | set(now), key=lambda k: (k not in HEAD_TASKS, k)):
        was = saved.get(key, defaults.get(key))
        if key in RUNTIME_SETTINGS or was == now.get(key):
            continue
        if key in OBJECTIVE_HEADS:
            trained = ckpt["lmlab"].get("config", {}).get("objective", {}).get("name")
            raise ConfigError(
                f"{ckpt_path} does not fit this run's objective: its {key} is {was!r}, this "
                f"run's objective gives {now.get(key)!r} (the auxiliary heads come with the "
                f"objective); resume with the checkpoint's objective"
                + (f" (objective={trained})" if trained else "")
            )
        raise ConfigError(
            f"{ckpt_path} does not fit this model: model.{key} is {saved.get(key)!r} in the "
            f"checkpoint but {now.get(key)!r} now; use the checkpoint's settings to resume"
        )
    return int(ckpt.get("global_step", 0))


def check_val_docs(
    info: dict, val_docs: str | None, ckpt_path: str, *, resume: bool = False
) -> None:
    """The checkpoint's held-out documents against this run's (``Corpus.identity``): resuming on
    other ones would validate on other text and may train on text it validated on (refused);
    evaluating a run's own data on other ones may score text it trained on (a warning).
    Checkpoints from before the record (lmlab changed its held-out choice on 2026-11-26) are
    only warned about."""
    saved = info.get("val_docs")
    if val_docs is None:
        return
    if saved is None:
        log.warning(
            "%s does not record its validation documents (it predates the record, added when "
            "lmlab's choice of held-out documents changed on 2026-11-26): if it was trained "
            "before that change, these documents may include text it trained on",
            ckpt_path,
        )
    elif saved != val_docs and resume:
        raise ConfigError(
            f"{ckpt_path} held out other validation documents than this run's data settings "
            "give (other settings, or files added, removed or renamed since: without data.val the "
            "held-out ones are chosen among the files found): resumed, it would validate on "
            "other text and could train on text it validated on; resume with the run's own data "
            "settings and files"
        )
    elif saved != val_docs:
        log.warning(
            "the evaluated documents are not the ones %s held out: scores may include text the "
            "model trained on",
            ckpt_path,
        )


def prepare_data(cfg: DictConfig) -> tuple[TextTokenizer, Any, Any]:
    """Corpus -> tokenizer -> (train, val) token stores, all cached under ``paths.cache_dir``."""
    corpus = make_corpus(cfg.data)
    objective = cfg.get("objective") or {}
    tables = isinstance(corpus, Corpus) and any(d.table and d.part for d in corpus.val)
    if tables and get_class(objective["_target_"]).tables:
        raise ConfigError(
            f"objective={objective.get('name')} on one table: its held-out rows would have the "
            "training rows' column names, so validation would score memory, not prediction; "
            "give two tables or more (whole ones are held out), or name validation tables with "
            "data.val"
        )
    cache = Path(cfg.paths.cache_dir)
    train_fp, val_fp = corpus.fingerprint(corpus.train), corpus.fingerprint(corpus.val)
    t0 = time.perf_counter()
    # One process prepares, others starting at once (the ranks of a launch) wait and open its
    # results: the tokenizer and both stores under one lock, so the process that reads the
    # training side also builds the validation store (a stream's held-out rows are kept by that
    # read: lmlab.data.hf). Each store also has its own lock (evaluate builds one alone).
    tok_settings = json.dumps(OmegaConf.to_container(cfg.tokenizer, resolve=True), sort_keys=True)
    job = hashlib.sha256(f"{train_fp}|{val_fp}|{tok_settings}".encode()).hexdigest()[:16]
    with file_lock(cache / f".prepare-{job}.lock", "data preparation"):
        tok = build_tokenizer(
            cfg.tokenizer, lambda: plain_texts(corpus.texts(corpus.train)), train_fp, cache
        )
        stores = []
        for split, docs in (("train", corpus.train), ("val", corpus.val)):
            key = store_key(corpus.fingerprint(docs), tok)
            total = corpus.total_bytes(docs)
            stores.append(
                build_store(corpus.texts(docs), tok, cache, key, total_bytes=total, label=split)
            )
    train, val = stores
    val.docs_id = corpus.identity(corpus.val)
    log.info(
        "Data: %s, %d train / %d val documents, %d / %d tokens (%.1f s)",
        corpus.name,
        train.n_docs,
        val.n_docs,
        len(train),
        len(val),
        time.perf_counter() - t0,
    )
    return tok, train, val


def check_fresh_start(output_dir: Path) -> None:
    """A run that starts from scratch in ``output_dir``: refused where the folder holds a
    checkpoint, ``last.ckpt`` or any other (its saves would overwrite them, and its logs the
    run's); else the folder's W&B run id and TensorBoard event files, of an attempt that ended
    before its first checkpoint, are dropped (process 0), so this run is a new W&B run, as its
    metrics.csv rows are new (LMModule.on_train_start drops the attempt's rows)."""
    last = output_dir / "checkpoints" / "last.ckpt"
    _recover_sharded(last)  # a run whose sharded save was stopped mid-swap still holds a run
    held = sorted(p.name for p in last.parent.glob("*.ckpt"))
    if held:
        if rank_zero_only.rank == 0:
            restore_hydra_files(output_dir)
        resume = (
            "resume it with ckpt_path=last (or auto)"
            if last.exists()  # else another run's, or one whose last.ckpt was removed
            else f"resume from one of them with ckpt_path=<its path> (there is no {last.name})"
        )
        raise RunExists(
            f"{output_dir} already holds a run ({', '.join(held)} in {last.parent}); {resume}, "
            "or start a new run in another folder (hydra.run.dir=...): starting afresh here would "
            "overwrite its checkpoints and logs"
        )
    if rank_zero_only.rank == 0:
        (output_dir / RUN_ID_FILE).unlink(missing_ok=True)
        # and its TensorBoard curves (logger=tensorboard), which TensorBoard would show with this
        # run's as one run's
        for events in (output_dir / "tensorboard").glob("**/events.out.tfevents.*"):
            events.unlink()


# the .hydra files of the run's latest start (keep_hydra_files)
HYDRA_KEPT = ".hydra.run"


def keep_hydra_files(output_dir: Path) -> None:
    """Copy the ``.hydra`` files Hydra wrote for this start (config, overrides) to
    ``<run>/.hydra.run``: Hydra writes ``.hydra`` before lmlab can refuse a start, so a refused
    fresh start in this folder (a sweep re-run by mistake) would leave its overrides over this
    run's, and reports would label the run with them."""
    files = _hydra_files(output_dir)
    if files:
        kept = output_dir / HYDRA_KEPT
        kept.mkdir(exist_ok=True)
        for f in files:
            shutil.copy2(f, kept / f.name)


def purge_tensorboard(trainer: L.Trainer, step: int) -> None:
    """TensorBoard hides the points a crashed attempt logged from ``step`` on (the checkpoint's):
    the resumed run logs those steps again (``SummaryWriter(purge_step=...)``, set before the
    logger opens its writer), as metrics.csv drops such rows."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and logger._experiment is None:
            logger._kwargs.setdefault("purge_step", step)


def warn_changed_overrides(output_dir: Path) -> None:
    """A resume whose command-line overrides set a key to another value than the run's latest
    start did: named in the log. Meant when one run is extended (more steps, another learning
    rate); in a sweep a warning: a sweep re-run with another list of values resumes each job's
    folder by its number, and a job would continue another job's run with its own values."""
    import yaml

    from lmlab.report import read_overrides

    kept = output_dir / HYDRA_KEPT / "overrides.yaml"
    files = [f for f in _hydra_files(output_dir) if f.name == "overrides.yaml"]
    if not kept.is_file() or not files:
        return
    try:
        before, now = read_overrides(kept), read_overrides(files[0])
    except (yaml.YAMLError, TypeError, OSError):
        return
    changed = [
        f"{k}={now[k]} (was {before[k]})"
        for k in sorted(set(before) & set(now))
        if before[k] != now[k]  # ckpt_path is left out by read_overrides
    ]
    if not changed:
        return
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        log.warning(
            "resuming %s with other values than its latest start: %s (a sweep re-run with other "
            "values resumes each job's folder by its number: use the sweep's own values or a new "
            "hydra.sweep.dir)",
            output_dir,
            ", ".join(changed),
        )
    else:  # one run, extended or changed on purpose (README: raise trainer.max_steps)
        log.info(
            "resuming %s with other values than its latest start: %s",
            output_dir,
            ", ".join(changed),
        )


def restore_hydra_files(output_dir: Path) -> None:
    kept = output_dir / HYDRA_KEPT
    if kept.is_dir() and _hydra_files(output_dir):
        for f in kept.glob("*.yaml"):
            shutil.copy2(f, _hydra_output_subdir(output_dir) / f.name)
        log.info("%s: the run's .hydra files are kept as they were", output_dir)


def _hydra_output_subdir(output_dir: Path) -> Path | None:
    """This Hydra job's ``.hydra`` folder when it is ``output_dir``'s (None outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.output_subdir is None or Path(hc.runtime.output_dir).resolve() != output_dir.resolve():
        return None
    return output_dir / hc.output_subdir


def _hydra_files(output_dir: Path) -> list[Path]:
    folder = _hydra_output_subdir(output_dir)
    return sorted(folder.glob("*.yaml")) if folder is not None and folder.is_dir() else []


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``last``: the run folder's ``checkpoints/last.ckpt`` (an error if missing). ``auto``: the same
    when it exists, else a fresh start: what a requeued job (SLURM, submitit) passes so that its
    first start and every restart run the same command; a requeued SLURM job (``SLURM_RESTART_COUNT``
    above 0) without a ckpt_path is treated as ``auto``. A sharded checkpoint is a folder."""
    if not ckpt_path and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        ckpt_path = "auto"  # a requeued SLURM job (hydra/launcher=slurm) continues its folder
        log.info("SLURM requeue (SLURM_RESTART_COUNT>0): resuming from last.ckpt if there is one")
    if not ckpt_path:
        return None
    if ckpt_path in ("last", "auto"):
        path = output_dir / "checkpoints" / "last.ckpt"
        _recover_sharded(path)
        if path.exists():
            return str(path)
        if ckpt_path == "auto":
            return None
        raise ConfigError(
            f"ckpt_path=last but {path} does not exist; point hydra.run.dir (or paths.output_dir) "
            "at the run to resume, pass ckpt_path=<file>, or ckpt_path=auto to start fresh when "
            "there is none"
        )
    _recover_sharded(Path(ckpt_path))
    if not Path(ckpt_path).exists():
        raise ConfigError(f"ckpt_path={ckpt_path} does not exist; pass an existing .ckpt file")
    return ckpt_path


def _recover_sharded(path: Path) -> None:
    """A sharded ``path`` that a kill left between the two renames of its save comes back
    (:func:`lmlab.parallel.recover_folder`), before ``ckpt_path=auto`` would take its absence for a
    fresh start; every process of a launch checks, one at a time."""
    if path.exists() or not path.with_name(f".{path.name}.old").is_dir():
        return
    with file_lock(path.with_name(f".{path.name}.lock"), f"recovering {path}"):
        if recover_folder(path):
            log.warning(
                "%s was missing: a sharded save was stopped while replacing it; recovered it "
                "from that save's folders",
                path,
            )


def build(node: DictConfig, **runtime):
    """``node._target_(**node, **runtime)``: like Hydra's instantiate, but runtime objects (token
    stores, tokenizers) are passed as they are instead of being converted into configs."""
    kwargs = OmegaConf.to_container(node, resolve=True)
    cls = get_class(kwargs.pop("_target_"))
    return cls(**kwargs, **runtime)


def build_datamodule(cfg: DictConfig, tokenizer, train, val, num_workers: int | None = None):
    """The objective's DataModule over the token stores, with the run's shapes and seed."""
    return build(
        cfg.objective,
        tokenizer=tokenizer,
        train=train,
        val=val,
        seq_len=cfg.seq_len,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.get("eval_batch_size"),
        num_workers=cfg.data.num_workers if num_workers is None else num_workers,
        seed=cfg.seed,
    )


def _instantiate_all(group: DictConfig | None) -> list:
    if not group:
        return []
    return [instantiate(c) for c in group.values() if c is not None and "_target_" in c]


def build_run(cfg: DictConfig) -> dict[str, Any]:
    """Everything a run needs, built in the order above; returns the objects by name."""
    check_compatible(cfg)
    check_settings(cfg)
    set_cpu_matmul(cfg.get("cpu_matmul", "onednn"))
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out)
    if ckpt_path is None:
        check_fresh_start(out)

    # The trainer first: Lightning and the strategy refuse their settings here, before any data work
    trainer_cfg = cfg.trainer.copy()
    with open_dict(trainer_cfg):
        skip_nonfinite = bool(trainer_cfg.pop("skip_nonfinite", False))
        trainer_cfg.accumulate_grad_batches = accumulation(cfg)
        check_step_batches(trainer_cfg, trainer_cfg.accumulate_grad_batches)
        if isinstance(trainer_cfg.get("val_check_interval"), int):
            # lmlab counts it in optimizer steps (conf/trainer), Lightning in micro-batches
            trainer_cfg.val_check_interval *= trainer_cfg.accumulate_grad_batches
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if not trainer_cfg.get("enable_progress_bar", True):  # Lightning refuses a bar it may not show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBarBase)]
    if not trainer_cfg.get("enable_checkpointing", True):  # and checkpoint callbacks, likewise
        callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
    loggers = _instantiate_all(cfg.get("logger"))
    try:
        # _convert_: plain lists (Lightning 2.4 took a ListConfig of plugins for one bad plugin)
        trainer: L.Trainer = instantiate(
            trainer_cfg,
            callbacks=callbacks,
            logger=loggers,
            plugins=[AtomicCheckpointIO()],
            _convert_="all",
        )
    except InstantiationException as e:
        raise ConfigError(f"the trainer settings are refused: {e.__cause__ or e}") from e
    if skip_nonfinite and trainer.world_size > 1:
        raise ConfigError(
            "trainer.skip_nonfinite=true needs one process: Lightning cannot skip a step in "
            "distributed training (it raises at the first non-finite loss, mid-run); leave it false "
            "with several processes (the run then stops at a non-finite loss, and "
            "checkpoints/last.ckpt holds the last good state)"
        )
    if ckpt_path and is_sharded(ckpt_path) and not isinstance(trainer.strategy, FSDP):
        # Lightning would fail on the folder after the data work (IsADirectoryError)
        if rank_zero_only.rank == 0:
            restore_hydra_files(out)
        raise ResumeRefused(
            f"{ckpt_path} is a sharded checkpoint (trainer=fsdp): resume it with trainer=fsdp, or "
            f"with this trainer from one file: python -m lmlab.checkpoint consolidate {ckpt_path} "
            f"writes {ckpt_path}.consolidated.ckpt; then ckpt_path=<that file>"
        )
    if ckpt_path:
        try:  # a file that is no lmlab checkpoint (cut short, another tool's): before data work
            read_checkpoint(ckpt_path, weights=False)  # mapped, not read: cheap for any size
        except ConfigError as e:
            if rank_zero_only.rank == 0:
                restore_hydra_files(out)
            raise ResumeRefused(str(e)) from None
    if ckpt_path and isinstance(trainer.strategy, FSDP) and not is_sharded(ckpt_path):
        check_one_file_under_fsdp(ckpt_path, out)
    tokenizer, train_store, val_store = prepare_data(cfg)
    datamodule = build_datamodule(cfg, tokenizer, train_store, val_store)
    model = build(
        cfg.model,
        vocab_size=tokenizer.vocab_size,
        special_ids=tokenizer.special,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        compile=cfg.compile,
        compile_scope=cfg.get("compile_scope", "model"),
        activation_checkpointing=cfg.activation_checkpointing,
        loss_chunk_size=cfg.loss_chunk_size,
        init_device="meta" if getattr(trainer.strategy, "meta_init", False) else None,
        **datamodule.model_settings(),  # an auxiliary head's task and size (nsp, sop)
    )
    model.skip_nonfinite = skip_nonfinite
    if attention_kernels(cfg.get("attention"), uses_cuda(cfg.trainer)) == [FLEX]:
        model.backbone.flex_masks = True  # document masks as block masks (checked above)
    model.set_token_bytes(tokenizer.token_bytes(), val_store.byte_scale(tokenizer.token_bytes()))
    if abs(model.byte_scale - 1) > 1e-9:
        log.info(
            "Bits per byte: the tokens' byte counts are scaled by %.4f to the validation text's "
            "bytes (this tokenizer's pieces do not spell the text exactly)",
            model.byte_scale,
        )
    model.extra_checkpoint = {
        "version": __version__,
        "model_class": cfg.model._target_,
        "tokenizer": tokenizer.to_str(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "val_docs": val_store.docs_id,
    }
    ckpt_step = None
    if ckpt_path:
        try:
            ckpt_step = check_resume_compatible(ckpt_path, tokenizer, model, val_store.docs_id)
        except ConfigError as e:
            if rank_zero_only.rank == 0:
                restore_hydra_files(out)  # the refused attempt's overrides are not the run's
            raise ResumeRefused(str(e)) from None
    # after the resume checks: a refused resume leaves the run's own tokenizer.json, which its
    # message tells the user to resume with
    tokenizer.save(out / "tokenizer.json")
    if ckpt_step is not None:
        purge_tensorboard(trainer, ckpt_step)
    return {
        "cfg": cfg,
        "tokenizer": tokenizer,
        "datamodule": datamodule,
        "model": model,
        "trainer": trainer,
        "ckpt_path": ckpt_path,
        "ckpt_step": ckpt_step,
        "output_dir": out,
    }


def describe(objects: dict[str, Any]) -> None:
    cfg, model, trainer = objects["cfg"], objects["model"], objects["trainer"]
    tokens_per_step = (
        cfg.data.batch_size * cfg.seq_len * trainer.accumulate_grad_batches * trainer.world_size
    )
    log.info(
        "Model: %s, %.2fM parameters (%.2fM without embeddings), vocab %d",
        cfg.model.name,
        model.num_params(False) / 1e6,
        model.num_params(True) / 1e6,
        model.vocab_size,
    )
    log.info(
        "Tokens per step: %d (batch %d x seq_len %d x accumulation %d x devices %d); max_steps %d",
        tokens_per_step,
        cfg.data.batch_size,
        cfg.seq_len,
        trainer.accumulate_grad_batches,
        trainer.world_size,
        trainer.max_steps,
    )


def write_summary(path: Path, metrics: dict[str, float]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    tmp.replace(path)


def _floats(metrics: dict) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        v = float(v.detach().cpu()) if isinstance(v, torch.Tensor) else v
        if isinstance(v, int | float) and math.isfinite(v):
            out[k.removesuffix("_step").removesuffix("_epoch")] = float(v)
    return out


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run one training job; return (final metrics, objects). Writes summary.json to the run dir."""
    t0 = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    use_tf32(cfg.get("tf32", True))
    objects = build_run(cfg)
    model, trainer, dm = objects["model"], objects["trainer"], objects["datamodule"]
    summary = objects["output_dir"] / "summary.json"
    if (objects["ckpt_step"] or 0) >= cfg.trainer.max_steps and summary.is_file():
        # A finished run started again (a requeue, ckpt_path=auto): nothing to train, and
        # validating again would replace summary.json with one that lacks the training metrics.
        log.warning(
            "%s is at step %d = trainer.max_steps: nothing to train (raise trainer.max_steps to "
            "continue); the run's summary.json is kept",
            objects["ckpt_path"],
            objects["ckpt_step"],
        )
        if rank_zero_only.rank == 0:
            restore_hydra_files(objects["output_dir"])  # the run is as it was
        return json.loads(summary.read_text()), objects
    if rank_zero_only.rank == 0:
        if objects["ckpt_path"]:
            warn_changed_overrides(objects["output_dir"])
        keep_hydra_files(objects["output_dir"])
        # an earlier finish's summary (a run extended): it would stand for this attempt's result,
        # also where this one fails (metrics.csv keeps every value)
        summary.unlink(missing_ok=True)
    describe(objects)
    log_config(trainer, cfg)
    status = "failed"  # what the loggers are told at the end, unless the run gets further
    try:
        with (
            attention_kernel(cfg.get("attention"), uses_cuda(cfg.trainer)),
            resuming_quietly(objects["ckpt_path"]),
        ):
            try:
                trainer.fit(model, datamodule=dm, ckpt_path=objects["ckpt_path"])
            except SIGTERMException:
                status = "preempted"
                raise Preempted(
                    f"stopped by a preemption signal after step {trainer.global_step}; "
                    f"{objects['output_dir'] / 'checkpoints' / 'last.ckpt'} holds it: resume with "
                    f"ckpt_path=last hydra.run.dir={objects['output_dir']}"
                ) from None
            # the last step's training loss, ppl, bpb (logged on logging steps only)
            metrics = _floats({**trainer.callback_metrics, **model.final_train_metrics})
            if "train/loss" not in metrics and trainer.global_step > 0:
                # resumed with nothing left to train (a crash in the final validation): the
                # training values its attempts logged
                from lmlab.report import last_logged

                metrics = {
                    **last_logged(objects["output_dir"] / "metrics.csv", "train/"),
                    **metrics,
                }
            if "val/loss" not in metrics or model.last_val_step != trainer.global_step:
                # Logged under the last step's index, as the validations inside training are
                # (Lightning's counter of steps done moves on after them): one convention for the
                # rows, and a resumed run's clean-up (ResumableCSVLogger.drop_rows_from) keeps it.
                loop = trainer.fit_loop.epoch_loop
                shift = int(loop._batches_that_stepped > 0)
                loop._batches_that_stepped -= shift
                try:
                    trainer.validate(model, datamodule=dm, verbose=False)
                finally:
                    loop._batches_that_stepped += shift
                metrics.update(_floats(trainer.callback_metrics))
                keep_best(trainer)
        metrics["trainer/global_step"] = float(trainer.global_step)
        metrics["wall_s"] = time.perf_counter() - t0
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary.update(metrics)
            write_summary(objects["output_dir"] / "summary.json", metrics)
            # an auxiliary head's accuracy too (val/sop_acc, ...)
            aux = "".join(
                f"  {name} {metrics[name]:.4f}"
                for name in sorted(metrics)
                if name.startswith("val/") and name.endswith("_acc") and name != "val/acc"
            )
            log.info(
                "Final: val/loss %.4f  val/ppl %.2f  val/bpb %.4f%s  (%d steps, %.0f s)",
                metrics.get("val/loss", float("nan")),
                metrics.get("val/ppl", float("nan")),
                metrics.get("val/bpb", float("nan")),
                aux,
                trainer.global_step,
                metrics["wall_s"],
            )
            if "train/tokens_per_sec" in metrics:
                mfu = metrics.get("train/mfu")
                log.info(
                    "Throughput: %.0f tokens/s%s",
                    metrics["train/tokens_per_sec"],
                    "" if mfu is None else f", MFU {100 * mfu:.1f}%",
                )
        status = "success"
    finally:
        finish_loggers(trainer, status)
    return metrics, objects


@contextlib.contextmanager
def resuming_quietly(ckpt_path: str | None):
    """ModelCheckpoint warns at every resume that its folder "exists and is not empty": the run's
    own checkpoints, there by design. Not hidden on a fresh start, where it is news."""
    with warnings.catch_warnings():
        if ckpt_path:
            warnings.filterwarnings(
                "ignore", message=r"Checkpoint directory .* exists and is not empty"
            )
        yield


def keep_best(trainer: L.Trainer) -> None:
    """The final validation (``trainer.validate`` after ``fit``, when the last step was not a
    validation step) competes for the best checkpoint too: ModelCheckpoint saves only inside
    ``fit``, so a better last validation left ``best.ckpt`` at an earlier step. Lightning's own
    top-k bookkeeping (private; tests/test_reliability.py names the private names lmlab uses).
    ``last.ckpt`` follows where no callback wrote it at this step (without ``last_checkpoint`` it
    stayed at the last validation inside ``fit``, older than ``best.ckpt``). Where one did (before
    this validation), the ranking it recorded is brought up to date in it: a run extended from it
    would otherwise count the earlier best, and let a worse validation replace ``best.ckpt``."""
    last_saved = last_saved_at_step(trainer)
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.save_top_k:
            candidates = cb._monitor_candidates(trainer)
            before = ranking(cb)
            cb._save_topk_checkpoint(trainer, candidates)
            if cb.save_last and not last_saved:
                cb._save_last_checkpoint(trainer, candidates)
                last_saved = True
            elif last_saved and ranking(cb) != before:
                record_callback_state(trainer)


def ranking(cb: ModelCheckpoint) -> list[tuple[str, float]]:
    """A checkpoint callback's top-k record: (path, score) pairs."""
    return sorted((path, float(score)) for path, score in cb.best_k_models.items())


def record_callback_state(trainer: L.Trainer) -> None:
    """Write the checkpoint callbacks' current state into ``last.ckpt`` (a sharded one's
    ``meta.pt``), saved at this step, leaving the rest of it as it is (process 0; atomically)."""
    paths = {  # the callbacks' last.ckpt (in a resumed run they may not have written it themselves)
        Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
        for cb in trainer.checkpoint_callbacks
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath
    }
    for path in paths if trainer.is_global_zero else ():
        target = path / SHARDED_META if path.is_dir() else path
        if not target.is_file():
            continue
        ckpt = torch.load(target, map_location="cpu", weights_only=False, mmap=True)
        for cb in trainer.checkpoint_callbacks:
            if cb.state_key in ckpt.get("callbacks", {}):
                ckpt["callbacks"][cb.state_key] = cb.state_dict()
        AtomicCheckpointIO().save_checkpoint(ckpt, target)
    trainer.strategy.barrier()


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"n_layers": 4}} -> {"model.n_layers": 4}: the names users type as overrides."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def log_config(trainer: L.Trainer, cfg: DictConfig) -> None:
    """The resolved config, flat, to every logger but CSV (whose hparams.yaml holds the model's)."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.config.update(flat, allow_val_change=True)
        elif not isinstance(logger, CSVLogger):
            logger.log_hyperparams(flat)


def finish_loggers(trainer: L.Trainer, status: str = "success") -> None:
    """Always close W&B runs at job end, or a multirun would merge its jobs into one run.
    ``status``: success, preempted (ends as success: the run resumes under the same W&B id) or
    failed (a crash or a non-finite loss: W&B marks the run failed)."""
    failed = status == "failed"
    for logger in trainer.loggers:
        logger.finalize("failed" if failed else "success")
        if isinstance(logger, WandbLogger):
            import wandb

            wandb.finish(exit_code=1 if failed else 0)
