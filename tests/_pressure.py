"""A fixed memory-pressure source for tests (what ``machine.pressure.MemoryPressure`` offers, at one level)."""

from __future__ import annotations


class StaticPressure:
    """A fixed level in 0..1 (clamped) and its reason."""

    def __init__(self, level: float = 0.0, reason: str = "fixed") -> None:
        self._level = max(0.0, min(1.0, float(level)))
        self._reason = reason

    def level(self) -> float:
        """The fixed level."""
        return self._level

    def reason(self) -> str:
        """The fixed reason."""
        return self._reason
