"""Experimental switches: ``OFFLOAD_*`` environment variables that kernels and speculation read once, at import.

Each is documented where it is read, beside what was measured with it. A value that cannot be used is named in a
warning and the default is kept: the variables are read while ``offload`` is imported, before any caller could
catch an error.
"""

from __future__ import annotations

import os
import warnings

from .errors import OffloadWarning
from .inputs import ascii_int

ON_OFF = {"0": False, "1": True}


def integer(name: str, default: int, least: int = 0) -> int:
    """``$name`` as a whole number of at least ``least``; ``default`` when unset or unusable (with a warning)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = ascii_int(raw)  # (int() reads "４" too)
    except ValueError:
        value = None
    if value is None or value < least:
        warnings.warn(f"{name}={raw!r} is not a whole number of at least {least}; using {default}", OffloadWarning,
                      stacklevel=2)
        return default
    return value


def choice(name: str, values: dict, default):
    """``values[$name]`` (``values`` maps each value the switch takes, ``ON_OFF`` for ``0``/``1``); ``default``
    when unset, or when set to anything else (with a warning naming the values it takes)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw not in values:
        warnings.warn(f"{name}={raw!r} is not one of {', '.join(values)}; using the default", OffloadWarning,
                      stacklevel=2)
        return default
    return values[raw]
