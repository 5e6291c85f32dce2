"""Loading a run's checkpoint outside training: the module, its tokenizer and the run's config.

Every lmlab checkpoint carries ``checkpoint["lmlab"]`` = {version, model_class, tokenizer (JSON),
config (resolved)}, so ``generate`` and ``evaluate`` need nothing but the file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from lmlab.data.tokenizers import TextTokenizer
from lmlab.errors import ConfigError


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"checkpoint not found: {path}; pass ckpt_path=<run dir>/checkpoints/last.ckpt"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise ConfigError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); it may be "
            "truncated by an interrupted save: use another checkpoint (e.g. best.ckpt)"
        ) from None
    if not isinstance(ckpt, dict) or "lmlab" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(
            f"{path} is not an lmlab checkpoint (no 'lmlab' entry); pass a .ckpt written by "
            "`python -m lmlab`"
        )
    return ckpt


def load_run(path: str | Path, device: str | torch.device = "cpu"):
    """Return (LightningModule in eval mode, TextTokenizer, run config) from an lmlab checkpoint."""
    ckpt = read_checkpoint(path)
    info = ckpt["lmlab"]
    hp = dict(ckpt["hyper_parameters"])
    hp["compile"] = False
    module = get_class(info["model_class"])(**hp)
    module.load_state_dict(ckpt["state_dict"])
    tokenizer = TextTokenizer.from_str(info["tokenizer"], kind="checkpoint")
    module.set_token_bytes(tokenizer.token_bytes())
    module.extra_checkpoint = info
    cfg: DictConfig = OmegaConf.create(info["config"])
    return module.to(device).eval(), tokenizer, cfg
