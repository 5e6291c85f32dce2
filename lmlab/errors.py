"""User-facing errors: raised before any expensive work, printed as one line by the entry points."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad configuration or input; the message names the problem and the fix."""
