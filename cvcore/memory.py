"""Memory budgets: how many bytes one Jacobian block may take."""

from __future__ import annotations

import os

from cvcore.errors import InputError

#: Fraction of the currently available memory a block may use by default.
DEFAULT_FRACTION = 0.25
#: Never default to more than this (bytes), however much memory is free.
DEFAULT_CAP = 4 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def available_memory() -> int | None:
    """Bytes of physical memory available now (Linux ``MemAvailable``), if known."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def default_budget() -> int:
    """A quarter of the available host memory, at most 4 GiB (1 GiB if unknown)."""
    free = available_memory()
    if free is None:
        return 1 << 30
    return max(16 << 20, min(DEFAULT_CAP, int(free * DEFAULT_FRACTION)))


def parse_budget(value: str | int | None) -> int:
    """Turn ``"512MB"``, ``"2GiB"``, ``1048576`` or ``None`` (the default) into bytes.

    >>> parse_budget("512MB")
    536870912
    >>> parse_budget(1024)
    1024
    """
    if value is None:
        return default_budget()
    if isinstance(value, int):
        n = value
    else:
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits):]
        try:
            n = int(float(digits) * _UNITS[unit])
        except (KeyError, ValueError):
            raise InputError(
                f"expected a memory budget such as '512MB' or '2GiB', got {value!r}"
            ) from None
    if n <= 0:
        raise InputError(f"expected a positive memory budget, got {value!r}")
    return n
