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
    folder is atomic (``os.replace``), so the previous checkpoint survives any kill. The new file's
    data reaches the disk before the rename (``fsync``), and the rename before the save returns (the
    folder's ``fsync``): after a power loss or a crash of the machine too, the path holds the old
    checkpoint or the whole new one, never a file whose data was still in memory. A temporary file
    that a killed save left behind (another process id's) goes at the next save of that path.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        path = Path(path)
        prefix = f".{path.name}.tmp"
        tmp = path.with_name(f"{prefix}{os.getpid()}")
        for stale in path.parent.glob(f"{prefix}*"):
            # a killed save's file (one process writes a run's files); a killed sharded save's
            # folder is lmlab.parallel's to handle
            if stale != tmp and stale.is_file():
                stale.unlink(missing_ok=True)
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(path.parent)
        finally:
            tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk; a folder that cannot be opened
    for it (some filesystems, Windows) is left to the system."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)
