"""Logger factories used by conf/logger/*.yaml."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.loggers import WandbLogger


def wandb_logger(
    *, tags: Sequence[str] = (), extra_tags: Sequence[str] = (), **kwargs
) -> WandbLogger:
    """Lightning's ``WandbLogger`` with the automatic tags (model, objective, …) plus the user's."""
    return WandbLogger(tags=list(dict.fromkeys([*tags, *extra_tags])), **kwargs)
