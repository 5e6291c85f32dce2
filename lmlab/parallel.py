"""Parallelism applied to a backbone from outside: activation checkpointing, compile, FSDP2.

Backbones (:mod:`lmlab.nn`) are single-device modules that name their repeated block class
(``block_class``); this module wraps those blocks without renaming any parameter, so checkpoints are
the same with and without these options. ``LMModule.configure_model`` calls :func:`parallelize`,
which applies them in the order that works for all of them together (as in torchtitan):
checkpointing, then per-block compile, then sharding, then materialising a meta-device model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.torch_version import Version
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32}
# torch.compile's modes: "reduce-overhead" adds CUDA graphs, "max-autotune" also searches kernel
# configurations (long first steps), "max-autotune-no-cudagraphs" the search alone.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# What compile=true compiles: "model", the whole loss computation as one graph; "blocks", each
# Transformer block on its own (one graph that every block of a kind reuses, so the first step's
# compile time does not grow with depth) and the output head + loss as another (PyTorch's "regional
# compilation"). FSDP always compiles by blocks, each block inside its hooks.
COMPILE_SCOPES = ("model", "blocks")


def compile_mode(value: bool | str | None) -> str | None:
    """The ``compile`` setting as a ``torch.compile`` mode: ``None`` (off) for false / null,
    ``"default"`` for true, a mode name as itself. Anything else is an error naming the choices."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ValueError(
        f"compile={value!r} is not a setting; use false, true (= default) or a torch.compile mode: "
        f"{', '.join(COMPILE_MODES)}"
    )


@contextlib.contextmanager
def eager():
    """Code that ``torch.compile`` compiled runs uncompiled inside this block. For generation: its
    shapes change at every token (the KV cache grows), and under ``compile_scope=blocks`` (and FSDP)
    the blocks it calls are compiled ones, so each new length would compile them again until torch's
    recompile limit, which all blocks share; after that a new training shape would run eager."""
    if hasattr(torch.compiler, "set_stance"):  # torch >= 2.6
        with torch.compiler.set_stance("force_eager"):
            yield
    else:
        with torch._dynamo.config.patch(disable=True):
            yield


def check_compile_scope(value: str) -> str:
    """The ``compile_scope`` setting, checked: one of :data:`COMPILE_SCOPES`."""
    if value not in COMPILE_SCOPES:
        raise ValueError(
            f"compile_scope={value!r} is not a setting; use {' or '.join(COMPILE_SCOPES)}"
        )
    return value


# F.scaled_dot_product_attention's kernels under the names the `attention` key takes. CPUs have two.
ATTENTION_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
CPU_ATTENTION_KERNELS = ("flash", "math")
# attention=flex: document masks through FlexAttention's block masks (the other calls
# with PyTorch's own SDPA choice); alone, and on CUDA only: FlexAttention has no backward on CPUs
FLEX = "flex"


def attention_kernels(value: Any, cuda: bool) -> list[str] | None:
    """The ``attention`` setting as kernel names in the order to try them: ``None`` for auto
    (PyTorch's own order), else the name or list given (``["flex"]`` for flex). Unknown names, and
    kernels the device does not have (``cuda`` false: only flash and math), are errors naming the
    choices."""
    if value is None or value == "auto":
        return None
    if value == FLEX:
        if not cuda:
            raise ValueError(
                "attention=flex: FlexAttention has no backward pass on CPUs (PyTorch's); train "
                "with attention=auto there (document masks as dense masks)"
            )
        return [FLEX]
    names = [value] if isinstance(value, str) else list(value)
    if FLEX in names:
        raise ValueError(
            f"attention={value!r}: flex stands alone (FlexAttention for document masks, "
            "PyTorch's own choice for the rest); use attention=flex"
        )
    unknown = [n for n in names if n not in ATTENTION_KERNELS]
    if unknown or not names:
        raise ValueError(
            f"attention={value!r}: {unknown[0] if unknown else 'an empty list'} is not a kernel; "
            f"use auto, flex, one of {', '.join(ATTENTION_KERNELS)}, or a list of them in the order to "
            "try, e.g. [cudnn, flash]"
        )
    if not cuda:
        missing = [n for n in names if n not in CPU_ATTENTION_KERNELS]
        if missing:
            raise ValueError(
                f"attention={value!r}: {missing[0]} attention needs a CUDA GPU; on CPUs use auto, "
                f"{' or '.join(CPU_ATTENTION_KERNELS)}"
            )
    return names


@contextlib.contextmanager
def attention_kernel(value: Any, cuda: bool):
    """Within the block, ``F.scaled_dot_product_attention`` uses only the kernels of the
    ``attention`` setting, on CUDA in its order (the first that supports a call wins; CPUs keep
    their own order, flash before math); auto changes nothing. The choice is process-wide while it
    lasts, and ``torch.compile`` traces it."""
    names = attention_kernels(value, cuda)
    if names is None or names == [FLEX]:  # flex: the backbone's masks say it, not SDPA's choice
        yield
        return
    kernels = [ATTENTION_KERNELS[n] for n in names]
    try:
        chosen = sdpa_kernel(kernels, set_priority=True)
    except TypeError:  # torch < 2.6: these kernels only, tried in PyTorch's own order
        chosen = sdpa_kernel(kernels)
    with chosen:
        yield


# PyTorch's own kernel order (torch >= 2.6), read at import before any `attention` setting, to be
# restored inside one (any_attention_kernel)
try:
    _SDPA_ORDER = [SDPBackend(i) for i in torch._C._get_sdp_priority_order()]
except AttributeError:  # torch < 2.6: no order to set, kernels are tried in PyTorch's fixed one
    _SDPA_ORDER = None


@contextlib.contextmanager
def any_attention_kernel():
    """Within the block PyTorch's own choice is back (every kernel, in its order; the first that
    supports a call wins): for work inside an ``attention`` setting that is not a training or
    validation step, such as the samples generated at validation (float32, with a KV cache), which
    the chosen kernel may not take (cuDNN's needs bf16 or fp16)."""
    if _SDPA_ORDER is None:
        chosen = sdpa_kernel(list(ATTENTION_KERNELS.values()))
    else:
        chosen = sdpa_kernel(_SDPA_ORDER, set_priority=True)
    with chosen:
        yield


def use_tf32(enabled: bool) -> None:
    """Float32 matrix products and convolutions on NVIDIA GPUs on TF32 tensor cores (float32's
    range, a 10-bit mantissa; several times faster from Ampere on): what bf16-mixed leaves in fp32
    and all of 32-true. CUDA only: CPU numerics are untouched (``set_float32_matmul_precision``
    would also switch oneDNN's float32 matmuls to TF32 where the CPU has it)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


# FSDP2 runs in CPU processes (gloo) from this torch on; before it, fully_shard's stream handling
# fails there ("FSDP requires CUDA for streams" on 2.5, "'Stream' object has no attribute
# 'record_event'" on 2.6; 2.7.1, 2.8, 2.11 and 2.13 run tests/test_scale.py's FSDP tests, 2026-11-27).
CPU_FSDP_TORCH = "2.7"


def cpu_fsdp_supported(version: str | None = None) -> bool:
    """Whether this torch (or ``version``) runs FSDP2 in CPU processes. Releases are compared, so
    that 2.7's release candidates and source builds (2.7.0rc1, 2.7.0a0+git...) count as 2.7."""
    release = Version(str(version or torch.__version__)).release[:2]
    return release >= tuple(int(n) for n in CPU_FSDP_TORCH.split("."))


class FSDP(ModelParallelStrategy):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over every process of the run, through
    Lightning's ``ModelParallelStrategy``: each Transformer block is one sharding unit, the embedding,
    final norm and (tied) head form the root unit.

    Args:
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3, least
            memory) instead of keeping them for the backward (ZeRO-2, one all-gather less per block).
        param_dtype: ``bf16`` to gather weights and compute in bfloat16 while the sharded master
            weights and the optimizer stay in fp32 (FSDP's mixed precision; use with
            ``trainer.precision=32-true``, not on top of Lightning's autocast). ``null``: as stored.
        meta_init: build the backbone on the meta device (no memory), shard it, then allocate and
            initialise only this rank's shard, for models that do not fit one device unsharded.
        save_distributed_checkpoint: ``true``: each rank writes its shard (a checkpoint is a
            folder; ``python -m lmlab.checkpoint consolidate`` makes one file of it, and generate /
            evaluate read the folder directly). ``false``: rank 0 gathers one ordinary file.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        meta_init: bool = False,
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        if param_dtype is not None and param_dtype not in DTYPES:
            raise ValueError(
                f"trainer.strategy.param_dtype={param_dtype!r} is not one of {sorted(DTYPES)} or null"
            )
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = param_dtype
        self.meta_init = meta_init

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        """Sharded saves go to a temporary folder beside the target, which then replaces it, so a
        kill during the write leaves the previous checkpoint whole (single-file saves are atomic
        through lmlab's AtomicCheckpointIO)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)  # left by a save that was killed
        self.barrier("lmlab_save_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("lmlab_save_written")
        if self.global_rank == 0:
            replace_folder(tmp, path)
        self.barrier("lmlab_save_done")

    def setup_environment(self) -> None:
        # One data-parallel dimension over all processes (Lightning's "auto" would make it 2-D:
        # data-parallel across nodes, tensor-parallel within one).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, backbone: nn.Module) -> None:
        try:
            from torch.distributed.fsdp import (
                MixedPrecisionPolicy,
                fully_shard,
                register_fsdp_forward_method,
            )
        except ImportError:  # torch < 2.6: FSDP2 before it became public
            from torch.distributed._composable.fsdp import (
                MixedPrecisionPolicy,
                fully_shard,
                register_fsdp_forward_method,
            )

        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy()
        if self.param_dtype:
            policy = MixedPrecisionPolicy(
                param_dtype=DTYPES[self.param_dtype], reduce_dtype=torch.float32
            )
        for block in blocks(backbone):
            fully_shard(
                block, mesh=mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy
            )
        fully_shard(backbone, mesh=mesh, mp_policy=policy)
        # Entry points other than forward must gather the root unit's weights too.
        for method in getattr(backbone, "fsdp_methods", ()):
            register_fsdp_forward_method(backbone, method)


def replace_folder(src: Path, dst: Path) -> None:
    """Move the folder ``src`` to ``dst``, replacing what is there. ``dst`` is missing only between
    two renames (Linux cannot swap two folders atomically from Python); ``dst`` never holds a mix of
    the two."""
    if dst.is_dir():
        old = dst.with_name(f".{dst.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        if dst.exists():
            dst.unlink()
        os.replace(src, dst)


def recover_folder(dst: Path) -> bool:
    """Finish a :func:`replace_folder` of a sharded save that a kill stopped between its two
    renames (``dst`` missing, the previous checkpoint in ``.<name>.old``): the new folder, whole by
    then (torch's ``.metadata`` and Lightning's ``meta.pt`` are written last), takes the place;
    without it the previous one goes back. True when it recovered ``dst``."""
    old, tmp = dst.with_name(f".{dst.name}.old"), dst.with_name(f".{dst.name}.tmp")
    if dst.exists() or not old.is_dir():
        return False
    if (tmp / ".metadata").is_file() and (tmp / "meta.pt").is_file():
        os.replace(tmp, dst)
        shutil.rmtree(old)
    else:
        os.replace(old, dst)
    return True


def blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's repeated Transformer blocks, in order (the units strategies wrap)."""
    return [m for m in backbone.modules() if isinstance(m, backbone.block_class)]


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(backbone: nn.Module) -> None:
    """Activation checkpointing: each block keeps only its input and recomputes its activations in
    the backward pass (about a third more compute for a fraction of the activation memory). The
    block's ``forward`` is wrapped in place, so parameter names do not change."""
    for block in blocks(backbone):
        block.forward = functools.partial(_checkpointed, block.forward)


def materialize(backbone: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device (possibly sharded) backbone on ``device`` and initialise it: each
    submodule's own ``reset_parameters`` (norm gains, rotary tables), then the backbone's."""
    # Swap the tensors inside the existing Parameter objects rather than replacing them, so a
    # parameter shared by two modules (tied embedding and head) stays one parameter.
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        backbone.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    with _random_per_shard(backbone):
        for module in backbone.modules():
            if module is not backbone and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
        backbone.reset_parameters()


@contextlib.contextmanager
def _random_per_shard(backbone: nn.Module):
    """DTensor draws a sharded parameter's random numbers as one tensor's only on CUDA-like
    meshes. On others (CPU) each process drew its shard from the same seed, so the shards were the
    same numbers: weights of repeated halves (embedding row i equal to row i + V/2, SwiGLU's gate
    equal to its up projection). There each process draws from a seed of its own: an
    initialisation of the same distribution, not the numbers one process would draw."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._random import is_rng_supported_mesh

    mesh = next((p.device_mesh for p in backbone.parameters() if isinstance(p, DTensor)), None)
    if mesh is None:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "DTensor random operators may not have complete support"
        supported = is_rng_supported_mesh(mesh)
    if supported:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() + torch.distributed.get_rank())
        yield


def parallelize(
    backbone: nn.Module,
    *,
    activation_checkpointing: bool = False,
    compile_blocks: str | None = None,
    fsdp: FSDP | None = None,
    device: torch.device | None = None,
) -> None:
    """Apply the options in place, in the order that composes (torchtitan's): checkpointing wraps
    the blocks, each block is compiled with the ``torch.compile`` mode ``compile_blocks`` (so FSDP's
    hooks stay outside the graphs), FSDP shards, and a meta-device backbone is materialised last, so
    only each rank's shard is ever allocated. (Without FSDP, ``LMModule`` compiles the blocks only
    under ``compile_scope="blocks"``; by default it compiles its whole loss computation instead.)"""
    if activation_checkpointing:
        checkpoint_blocks(backbone)
    if compile_blocks:
        for block in blocks(backbone):
            block.compile(mode=compile_blocks)  # in place: parameter names stay the same
    if fsdp is not None:
        fsdp.shard(backbone)
    if any(p.is_meta for p in backbone.parameters()):
        materialize(backbone, device or torch.device("cpu"))
