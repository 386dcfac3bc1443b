"""The typed events every consumer reads (run, bench, eval, serve): the one flow of ARCHITECTURE.md.

Metric definitions (same as Lemonade's bench):
- ``ttft_s``: prompt handed to the engine -> first generated token available (prefill + first sampling).
- ``prefill_tps`` = prompt tokens / TTFT.
- ``decode_tps`` = (generated - 1) / (t_last - t_first); None until two tokens exist.
- ``kv_bytes``: resident bytes per tier (sum of the cache arrays' ``nbytes``); ``kv_bytes_fp16``: the
  same tokens in fp16. ``rss_bytes``: the process RSS at the event. ``util``: a real counter or None.
Values that cannot be measured are None, never a guess.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

EventKind = Literal["prefill", "token", "done"]


@dataclass(slots=True)
class KVStats:
    """A snapshot of the KV cache: tokens and resident bytes per tier, and the fp16 reference."""

    tokens: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    bytes_fp16: int = 0
    evicted: int = 0

    @property
    def total_bytes(self) -> int:
        """Sum of resident bytes over tiers."""
        return sum(self.bytes.values())

    @property
    def ratio_vs_fp16(self) -> float | None:
        """Resident bytes / fp16 bytes of the same tokens, None for an empty cache."""
        return self.total_bytes / self.bytes_fp16 if self.bytes_fp16 else None


@dataclass(slots=True)
class Event:
    """One step of generation. ``kind``: ``prefill`` (prompt consumed), ``token`` (one new token per
    sequence), ``done`` (generation ended; ``finish_reason`` says why)."""

    kind: EventKind
    t: float
    seq: int = 0
    token_id: int | None = None
    text: str = ""
    prompt_tokens: int = 0
    generated: int = 0
    ttft_s: float | None = None
    prefill_tps: float | None = None
    decode_tps: float | None = None
    kv: KVStats | None = None
    rss_bytes: int | None = None
    util: dict[str, float | None] = field(default_factory=dict)
    provider: dict[str, str] = field(default_factory=dict)
    finish_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--json`` lines and the server; KV stats flattened with their ratio."""
        data = asdict(self)
        if self.kv is not None:
            data["kv"]["total_bytes"] = self.kv.total_bytes
            data["kv"]["ratio_vs_fp16"] = self.kv.ratio_vs_fp16
        return data
