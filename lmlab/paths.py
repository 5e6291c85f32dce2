"""Where lmlab's own files live (configs ship inside the package so an installed lmlab finds them),
and a lock for files that several processes write."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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
    A process that has to wait says so (``what`` names the work it waits for).

    The lock file is left in place, writable by everyone (a cache shared by several users), and
    one that cannot be written is locked through a read-only descriptor. On Windows the block runs
    unlocked; where the file cannot be opened or the file system refuses ``flock`` (some Lustre
    mounts), unlocked with a warning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock_fd(path, what)
    try:
        if fd is not None:
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("Waiting for another process: %s (lock %s)", what, path)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                log.warning("%s without a lock (%s: %s)", what, path, e)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock_fd(path: Path, what: str) -> int | None:
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        with suppress(OSError):  # someone else's file stays as they made it
            os.fchmod(fd, 0o666)  # past the umask, for other users of a shared cache
        return fd
    except PermissionError:
        pass
    try:
        return os.open(path, os.O_RDONLY)  # flock needs no write access
    except OSError as e:
        log.warning("%s without a lock (%s: %s)", what, path, e)
        return None
