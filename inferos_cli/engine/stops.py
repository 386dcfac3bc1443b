"""Stop strings in streamed text."""

from __future__ import annotations

from typing import Sequence


class StopMatcher:
    """Streams text while watching for stop strings: text that could start a stop string is held back
    until it is known not to be one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.hit: str | None = None

    def push(self, text: str) -> str:
        """Add generated text; return what may be shown now (sets ``hit`` when a stop string appears)."""
        if not self.stops:
            return text
        buf = self._held + text
        first = None
        for stop in self.stops:
            pos = buf.find(stop)
            if pos >= 0 and (first is None or pos < first[0]):
                first = (pos, stop)
        if first is not None:
            self.hit = first[1]
            self._held = ""
            return buf[: first[0]]
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """Held-back text at the end (no stop string came)."""
        out, self._held = self._held, ""
        return out
