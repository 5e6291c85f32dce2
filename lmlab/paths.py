"""Where lmlab's own files live (configs ship inside the package so an installed lmlab finds them),
and a lock for files that several processes write."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl  # POSIX; elsewhere file_lock runs unlocked
except ImportError:  # pragma: no cover (Windows)
    fcntl = None

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR.parent / "conf"


@contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created, with its folder, if missing) for the
    ``with`` block, so processes sharing a file system (on Linux, NFS included) take turns: sweep
    jobs updating one summary, the ranks of a ``torchrun`` / SLURM launch building one token store.
    Where locks are not supported (Windows, some Lustre mounts) the block runs unlocked, with a
    warning that ``what`` happens without a lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as held:
        if fcntl is not None:
            try:
                fcntl.flock(held, fcntl.LOCK_EX)  # released when the file is closed
            except OSError as e:
                log.warning("%s without a lock (%s: %s)", what, path, e)
        yield
