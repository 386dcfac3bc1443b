"""How numbers are written for people, in one place: sizes in binary units, durations in ms, any value
with its unit; ``n/a`` for a value that was not measured (None), never a guess."""

from __future__ import annotations

MiB = 2**20
GiB = 2**30


def format_bytes(n: int | float | None) -> str:
    """Human-readable binary size with its unit (``512 B``, ``1.5 MiB``), or ``n/a``."""
    if n is None:
        return "n/a"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def mib(n: float) -> str:
    """Whole mebibytes (``1024 MiB``), the unit of memory-pressure reasons."""
    return f"{n / MiB:.0f} MiB"


def format_value(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` in format ``spec`` followed by ``suffix`` (e.g. ``" tok/s"``), or ``n/a``."""
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def format_ms(seconds: float | None) -> str:
    """A duration given in seconds, written in milliseconds (``12.3 ms``), or ``n/a``."""
    return format_value(None if seconds is None else seconds * 1000, ".1f", " ms")
