"""Memory pressure for the KV policy: a level in 0..1 and the reason, refreshed on the mid loop.

Interface (what ``inferos_cli/kv/tiers.py`` reads): any object with ``level() -> float`` (0 = no pressure, 1 = at or
over the limit) and ``reason() -> str``. Tiers tighten as the level rises (int8 -> int4 -> evict); the
mapping from level to tiers belongs to the KV policy.

:class:`MemoryPressure` computes the level from two real quantities and takes the larger:

- host: ``1 - available / io.host_pool_bytes`` (psutil's available memory; 0 while at least the host
  pool is free, rising to 1 as available memory runs out);
- KV: ``resident KV bytes / kv.budget_bytes`` when a KV budget is set and a KV size source is given.

Nothing here is estimated: when psutil cannot read memory and there is no KV budget, the level is 0 and
the reason says the pressure is unknown (``known`` is False).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Protocol

from inferos_cli.machine import host
from inferos_cli.units import mib

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.settings import Policy


class PressureSource(Protocol):
    """What the KV policy reads: a level in 0..1 and why."""

    def level(self) -> float:
        """0 = no pressure, 1 = at or over the memory limit."""
        ...

    def reason(self) -> str:
        """One line: which limit drives the level, with the numbers."""
        ...


def _available_bytes() -> int | None:
    try:
        return host.memory()[1]
    except Exception:  # psutil missing or unable to read: unknown, not zero
        return None


class MemoryPressure:
    """Host-memory and KV-budget pressure; :meth:`update` is the mid-loop callback, reads are thread-safe."""

    def __init__(
        self,
        host_pool_bytes: int,
        kv_budget_bytes: int | None = None,
        *,
        kv_bytes: Callable[[], int | None] | None = None,
        available: Callable[[], int | None] = _available_bytes,
    ) -> None:
        self.host_pool_bytes = int(host_pool_bytes)
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_bytes = kv_bytes
        self.available = available
        self._lock = threading.Lock()
        self._level = 0.0
        self._reason = "not sampled yet"
        self.known = False
        self.host_level: float | None = None
        self.kv_level: float | None = None
        self.available_bytes: int | None = None

    @classmethod
    def from_policy(cls, policy: "Policy", kv_bytes: Callable[[], int | None] | None = None,
                    available: Callable[[], int | None] = _available_bytes) -> "MemoryPressure":
        """Limits from ``io.host_pool_bytes`` and ``kv.budget_bytes``."""
        return cls(policy.io.host_pool_bytes, policy.kv.budget_bytes, kv_bytes=kv_bytes, available=available)

    def update(self) -> float:
        """Read available memory and KV bytes now; returns the new level."""
        avail = self.available()
        host_level = kv_level = None
        parts: list[str] = []
        if avail is not None and self.host_pool_bytes > 0:
            host_level = max(0.0, min(1.0, 1.0 - avail / self.host_pool_bytes))
            parts.append(f"host {host_level:.2f} ({mib(avail)} available of a {mib(self.host_pool_bytes)} pool)")
        used = self.kv_bytes() if self.kv_bytes is not None else None
        if self.kv_budget_bytes and used is not None:
            kv_level = max(0.0, min(1.0, used / self.kv_budget_bytes))
            parts.append(f"kv {kv_level:.2f} ({mib(used)} of a {mib(self.kv_budget_bytes)} budget)")
        levels = [x for x in (host_level, kv_level) if x is not None]
        with self._lock:
            self.available_bytes = avail
            self.host_level, self.kv_level = host_level, kv_level
            self.known = bool(levels)
            self._level = max(levels) if levels else 0.0
            self._reason = "; ".join(parts) if parts else "unknown: available memory unreadable and no KV budget"
            return self._level

    def level(self) -> float:
        """The level from the last :meth:`update` (0 before the first)."""
        with self._lock:
            return self._level

    def reason(self) -> str:
        """Why the level is what it is."""
        with self._lock:
            return self._reason

    def snapshot(self) -> dict[str, object]:
        """``{"level", "known", "host", "kv", "available_bytes", "reason"}`` for the run table / JSON."""
        with self._lock:
            return {
                "level": self._level if self.known else None,
                "known": self.known,
                "host": self.host_level,
                "kv": self.kv_level,
                "available_bytes": self.available_bytes,
                "reason": self._reason,
            }
