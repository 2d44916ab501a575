"""Integer switches: ``OFFLOAD_*`` environment variables that kernels and speculation read once, at import.

Each is documented where it is read, beside what was measured with it. A value that cannot be used is named in a
warning and the default is kept: the variables are read while ``offload`` is imported, before any caller could
catch an error. (The on/off switches are read where they are used; only their documented values count.)
"""

from __future__ import annotations

import os
import warnings

from .errors import OffloadWarning


def integer(name: str, default: int, least: int = 0) -> int:
    """``$name`` as a whole number of at least ``least``; ``default`` when unset or unusable (with a warning)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < least:
        warnings.warn(f"{name}={raw!r} is not a whole number of at least {least}; using {default}", OffloadWarning,
                      stacklevel=2)
        return default
    return value
