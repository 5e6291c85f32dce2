"""Loading a run's checkpoint outside training: the module, its tokenizer and the run's config.

Every lmlab checkpoint carries ``checkpoint["lmlab"]`` = {version, model_class, tokenizer (JSON),
config (resolved)}, so ``generate`` and ``evaluate`` need nothing but the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from lmlab.checkpoint_io import AtomicCheckpointIO
from lmlab.data.tokenizers import TextTokenizer
from lmlab.errors import ConfigError, refuse_unknown_top_keys

# What Lightning's sharded (FSDP) checkpoint folder keeps besides the shards.
SHARDED_META = "meta.pt"


def check_command_keys(cfg: DictConfig, command: str) -> None:
    """The keys of a checkpoint command (``generate``, ``evaluate``): none its config lacks, and a
    ``ckpt_path`` (a missing one was a MissingMandatoryValue traceback)."""
    refuse_unknown_top_keys(cfg, command, f"python -m lmlab.{command}")
    missing = OmegaConf.is_missing(cfg, "ckpt_path")
    if missing or not isinstance(cfg.ckpt_path, str | os.PathLike):
        given = "" if missing else f" (not {cfg.ckpt_path!r})"
        raise ConfigError(
            f"ckpt_path is required: python -m lmlab.{command} "
            f"ckpt_path=<run dir>/checkpoints/last.ckpt{given}"
        )
    output = cfg.get("output_file")  # evaluate's: a path or null
    if output is not None and not isinstance(output, str | os.PathLike):
        raise ConfigError(
            f"output_file={output!r} is not a path; pass a file name: output_file=m.json"
        )


def is_sharded(path: str | Path) -> bool:
    """A checkpoint written shard by shard (``trainer=fsdp``) is a folder with a ``meta.pt``."""
    return (Path(path) / SHARDED_META).is_file()


def read_checkpoint(path: str | Path, *, weights: bool = True) -> dict:
    """The checkpoint at ``path`` (a file, or a sharded folder gathered into one dict on the CPU).
    ``weights=False`` reads a sharded folder's metadata only (config, tokenizer, hyperparameters)."""
    path = Path(path).expanduser()
    if path.is_dir() and not is_sharded(path):
        inside = path / "checkpoints" / "last.ckpt"
        if inside.exists():  # a run folder given for its checkpoint
            raise ConfigError(
                f"{path} is a run folder, not a checkpoint: pass ckpt_path={inside} (or "
                f"{inside.with_name('best.ckpt')})"
            )
        raise ConfigError(
            f"{path} is a folder but not a sharded lmlab checkpoint (no {SHARDED_META}); pass a "
            ".ckpt file or a sharded checkpoint folder"
        )
    if not path.exists():
        named = str(path) in ("last", "auto")  # training's names for a run folder's checkpoint
        raise ConfigError(
            f"checkpoint not found: {path}; pass ckpt_path=<run dir>/checkpoints/last.ckpt"
            + (
                f" (ckpt_path={path} names a run's own checkpoint in training only)"
                if named
                else ""
            )
        )
    target = path / SHARDED_META if path.is_dir() else path
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    unreadable = (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError)
    try:
        # Without the weights a file's tensors are mapped, not read: every process of a resume
        # checks the checkpoint before Lightning loads it (a full read cost its size in memory)
        mmap = not weights and not path.is_dir()
        ckpt = torch.load(target, map_location="cpu", weights_only=False, mmap=mmap)
        if path.is_dir() and weights:
            ckpt.update(_load_shards(path))
    except (*unreadable, pickle.UnpicklingError, CheckpointException) as e:
        raise ConfigError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)}); "
            "it may be truncated by an interrupted save: use another checkpoint (e.g. best.ckpt)"
        ) from None
    if not isinstance(ckpt, dict) or "lmlab" not in ckpt:
        raise ConfigError(
            f"{path} is not an lmlab checkpoint (no 'lmlab' entry); pass a .ckpt written by "
            "`python -m lmlab`"
        )
    if weights and "state_dict" not in ckpt:
        inside = path.parent if path.name == SHARDED_META and is_sharded(path.parent) else None
        fix = f"pass the sharded folder {inside}" if inside else "pass a checkpoint with weights"
        raise ConfigError(f"{path} holds no weights (no 'state_dict'); {fix}")
    return ckpt


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _load_shards(folder: Path) -> dict:
    """Gather a ``torch.distributed.checkpoint`` folder into full tensors in this one process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(
        state,
        storage_reader=FileSystemReader(folder),
        planner=_EmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    optimizers = sorted(k for k in state if k.startswith("optimizer_"))
    if optimizers:
        state["optimizer_states"] = [state.pop(k) for k in optimizers]
    return state


def consolidate(folder: str | Path, output: str | Path | None = None) -> Path:
    """Write a sharded checkpoint folder as one ordinary ``.ckpt`` file (weights, optimizer state,
    everything ``ckpt_path`` needs); the default output is ``<folder>.consolidated.ckpt``, and an
    output that is a folder gets that name inside it."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ConfigError(f"{folder} does not exist; pass a sharded checkpoint folder")
    if not is_sharded(folder):
        raise ConfigError(f"{folder} is not a sharded checkpoint folder (no {SHARDED_META})")
    name = folder.name + ".consolidated.ckpt"
    output = Path(output).expanduser() if output else folder.with_name(name)
    if output.is_dir():
        output = output / name
    if not output.parent.is_dir():
        raise ConfigError(f"{output.parent} does not exist; create it or pass another output path")
    if output.resolve().is_relative_to(folder.resolve()):
        raise ConfigError(
            f"{output} is inside the sharded checkpoint it would be made from (its shards would "
            f"then hold a stray file); write it elsewhere, e.g. the default {folder.with_name(name)}"
        )
    AtomicCheckpointIO().save_checkpoint(read_checkpoint(folder), output)
    return output


def run_info(ckpt: dict, path: str | Path) -> dict:
    """``ckpt`` (:func:`read_checkpoint`'s), refused unless it holds what loading its run needs:
    the model's class, tokenizer and config that ``python -m lmlab`` saves with it."""
    missing = [k for k in ("model_class", "tokenizer", "config") if k not in ckpt["lmlab"]]
    if missing or "hyper_parameters" not in ckpt:
        raise ConfigError(
            f"{path} lacks what lmlab saves with a run's checkpoint "
            f"({', '.join(missing or ['hyper_parameters'])}); pass a .ckpt written by `python -m lmlab`"
        )
    return ckpt


def load_run(path: str | Path, device: str | torch.device = "cpu"):
    """Return (LightningModule in eval mode, TextTokenizer, run config) from an lmlab checkpoint."""
    ckpt = run_info(read_checkpoint(path), path)
    info = ckpt["lmlab"]
    hp = dict(ckpt["hyper_parameters"])
    hp["compile"] = hp["activation_checkpointing"] = False
    if info["config"].get("objective", {}).get("name") == "prefix_lm":
        hp.setdefault("prefix_prompts", True)  # a prefix LM's checkpoint from before 2026-11-28
    module = get_class(info["model_class"])(**hp)
    module.load_state_dict(ckpt["state_dict"])
    tokenizer = TextTokenizer.from_str(info["tokenizer"], kind="checkpoint")
    module.set_token_bytes(tokenizer.token_bytes())
    module.extra_checkpoint = info
    cfg: DictConfig = OmegaConf.create(info["config"])
    return module.to(device).eval(), tokenizer, cfg


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lmlab.checkpoint",
        description="Checkpoint utilities. `consolidate`: one .ckpt file from a sharded "
        "(trainer=fsdp) checkpoint folder, for sharing or for tools that want a single file "
        "(lmlab's generate and evaluate also read the folder directly).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="sharded folder -> one .ckpt file")
    c.add_argument("folder", help="e.g. <run dir>/checkpoints/last.ckpt (a folder under fsdp)")
    c.add_argument(
        "output",
        nargs="?",
        help="a file, or a folder to write it in; default: <folder>.consolidated.ckpt",
    )
    args = parser.parse_args(argv)
    try:
        print(consolidate(args.folder, args.output))
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
