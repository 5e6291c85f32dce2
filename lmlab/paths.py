"""Where lmlab's own files live (configs ship inside the package so an installed lmlab finds them)."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR.parent / "conf"
