"""Checkpoint writing that a kill cannot corrupt."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file *next to* the target, then renames it over the target.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the system
    temp folder; when that is another filesystem than the run folder (a local /tmp, a shared outputs
    disk) the final move is a copy, and a kill during it truncates ``last.ckpt``. A rename within one
    folder is atomic (``os.replace``), so the previous checkpoint survives any kill.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
