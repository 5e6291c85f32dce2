"""``python -m lmlab.generate ckpt_path=… prompt="ROMEO:" max_new_tokens=200``: text from a checkpoint."""

from __future__ import annotations

import logging
import sys

import hydra
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from lmlab.checkpoint import check_command_keys, load_run, read_checkpoint, run_info
from lmlab.errors import ConfigError, show_warnings
from lmlab.models.base import GENERATION_KEYS
from lmlab.nn.sampling import check_sampling
from lmlab.paths import CONF_DIR

log = logging.getLogger(__name__)


def pick_device(name) -> str:
    """The torch device of ``device=`` (auto | cpu | cuda | cuda:N), checked before the model loads."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = str(name).partition(":")
    if name == "cpu":
        return name
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(
            f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return name


def check_settings(cfg: DictConfig) -> str:
    """The command's settings, before the model loads; returns the prompt as text (Hydra reads
    ``prompt=1984`` as a number and ``prompt=null`` as None)."""
    check_command_keys(cfg, "generate")
    try:
        check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key, least in (("max_new_tokens", 0), ("num_samples", 1), ("seed", 0)):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{key}={value!r} must be a whole number >= {least}")
    if isinstance(cfg.prompt, bool | float) or not isinstance(cfg.prompt, str | int | None):
        # Hydra parsed it (prompt=[a,b], prompt=true, prompt=3.10): its str() is not what was typed
        raise ConfigError(
            f"prompt={cfg.prompt!r} is not text as typed (Hydra parsed it); quote it for Hydra "
            "inside the shell's quotes: 'prompt=\"...\"'"
        )
    prompt = "" if cfg.prompt is None else str(cfg.prompt)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes of another encoding on the command line
        raise ConfigError(
            "the prompt is not valid UTF-8 text (the terminal's encoding?); pass it as UTF-8"
        ) from None
    return prompt


def check_read(cfg: DictConfig, model_class: type) -> None:
    """A warning for sampling settings changed from conf/generate.yaml's defaults that the
    checkpoint's family does not read: an encoder fills masks (top_k candidates each), so a
    temperature, seed or more samples gave the same text without a word."""
    defaults = OmegaConf.load(CONF_DIR / "generate.yaml")
    unread = [
        f"{key}={cfg.get(key)!r}"
        for key in GENERATION_KEYS
        if key not in model_class.generation_settings and cfg.get(key) != defaults.get(key)
    ]
    if unread:
        log.warning(
            "%s: not read by this checkpoint's model (%s, whose generation takes %s only)",
            ", ".join(unread),
            model_class.__name__,
            ", ".join(model_class.generation_settings),
        )


def model_class(ckpt_path) -> type:
    """The LightningModule class of a checkpoint, from its settings (its tensors mapped, not read)."""
    info = run_info(read_checkpoint(ckpt_path, weights=False), ckpt_path)["lmlab"]
    return get_class(info["model_class"])


def generate(cfg: DictConfig) -> list[str]:
    prompt = check_settings(cfg)
    device = pick_device(cfg.device)
    check_read(cfg, model_class(cfg.ckpt_path))
    module, tokenizer, _ = load_run(cfg.ckpt_path, device)
    return module.generate_text(
        tokenizer,
        [prompt] * cfg.num_samples,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
    )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def main(cfg: DictConfig) -> None:
    show_warnings()  # e.g. a prompt cut to fit the model's positions
    try:
        texts = generate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"=== sample {i} ===")
        print(text)


if __name__ == "__main__":
    main()
