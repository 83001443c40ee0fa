"""Numbers, sizes and durations as the launcher prints them (progress lines, reports, the plan)."""

from __future__ import annotations

import datetime
import math


def number_text(value, spec: str = ".4f") -> str:
    """`value` formatted with `spec`; nan, inf and non-numbers as they are."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # a tensor or numpy scalar
        except (TypeError, ValueError):
            return str(value)
    return format(value, spec) if math.isfinite(value) else str(value)


def bytes_text(n: float) -> str:
    """Decimal units, as disks and GPUs are sold: 1 GB = 10^9 bytes."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def duration_text(seconds: float) -> str:
    """H:MM:SS (with days past 24 hours); years for a run of absurd length (max_steps=10**16) that still prints its
    progress."""
    if not seconds < 100 * 86400:
        return f"{seconds / (365.25 * 86400):.3g} years" if math.isfinite(seconds) else "unknown"
    return str(datetime.timedelta(seconds=round(seconds)))
