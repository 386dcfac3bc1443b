"""The typed events every consumer reads (run, bench, eval, serve), and :class:`RunStats`, the one fold
of an event stream that every view uses (live table, ``--json``, bench, server metrics, Prometheus).

Metric definitions (same as Lemonade's bench; ``docs/architecture.md`` has the full list):
- ``ttft_s``: prompt handed to the engine -> first generated token available (prefill + first sampling).
- ``prefill_tps`` = prompt tokens / TTFT.
- ``decode_tps`` = (generated - 1) / (t_last - t_first); None until two tokens exist.
- ``kv_bytes``: bytes per tier that hold tokens (tokens held x that tier's bytes per token, per-token
  scales included); ``kv_bytes_fp16``: the same tokens in fp16; ``reserved``: bytes per tier the cache
  allocated (preallocated capacity and batch padding included), at least the held bytes. ``rss_bytes``: the process RSS at the event. ``util``: a real counter or None.
Values that cannot be measured are None, never a guess.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

EventKind = Literal["prefill", "token", "done"]


@dataclass(slots=True)
class KVStats:
    """A snapshot of the KV cache: tokens and the bytes holding them per tier, the fp16 reference, and the
    bytes allocated per tier (``reserved``)."""

    tokens: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    bytes_fp16: int = 0
    evicted: int = 0
    reserved: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Bytes holding tokens, all tiers."""
        return sum(self.bytes.values())

    @property
    def reserved_bytes(self) -> int:
        """Bytes allocated, all tiers (never less than :attr:`total_bytes`)."""
        return max(sum(self.reserved.values()), self.total_bytes)

    @property
    def ratio_vs_fp16(self) -> float | None:
        """Held bytes / fp16 bytes of the same tokens, None for an empty cache."""
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
        """Plain data for ``--json`` lines and the server; KV stats flattened with their totals and ratio."""
        data = asdict(self)
        if self.kv is not None:
            data["kv"]["total_bytes"] = self.kv.total_bytes
            data["kv"]["reserved_bytes"] = self.kv.reserved_bytes
            data["kv"]["ratio_vs_fp16"] = self.kv.ratio_vs_fp16
        return data


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``, as the server's p50/p95 use it; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class RunStats:
    """The one fold of an event stream (one request, one run, or one batch of rows).

    ``t0`` is when the prompt was handed over (``time.perf_counter``). :meth:`add` takes each event and the
    consumer's clock (default: the event's own ``t``). Times of first/last tokens are the consumer's, so a
    view measures what it saw; values the engine reports itself (``ttft_s``, ``decode_tps``) win where
    present, since they exclude the consumer's own work. Every derived value is None until measurable.
    """

    t0: float = field(default_factory=time.perf_counter)
    keep_token_times: bool = False
    prompt_by_row: dict[int, int] = field(default_factory=dict)
    generated_by_row: dict[int, int] = field(default_factory=dict)
    t_first: float | None = None
    t_last: float | None = None
    t_end: float | None = None
    engine_ttft_s: float | None = None
    engine_decode_tps: float | None = None
    engine_prefill_tps: float | None = None
    kv: KVStats | None = None
    kv_peak: KVStats | None = None
    rss_bytes: int | None = None
    rss_peak: int | None = None
    providers: dict[str, str] = field(default_factory=dict)
    util: dict[str, float | None] = field(default_factory=dict)
    finish_by_row: dict[int, str | None] = field(default_factory=dict)
    token_times: list[float] = field(default_factory=list)
    batch_tps: float | None = None

    def add(self, ev: Event, now: float | None = None) -> None:
        """Fold one event in."""
        now = ev.t if now is None else now
        if ev.provider:
            self.providers = dict(ev.provider)
        if ev.kind == "prefill" and ev.prompt_tokens:
            self.prompt_by_row[ev.seq] = ev.prompt_tokens
        if ev.kind == "token":
            if self.t_first is None:
                self.t_first = now
            self.t_last = now
            self.generated_by_row[ev.seq] = max(self.generated_by_row.get(ev.seq, 0) + 1, ev.generated)
            if self.keep_token_times:
                self.token_times.append(now)
        if ev.kind == "done":
            self.finish_by_row[ev.seq] = ev.finish_reason
            self.t_end = now
            if ev.generated:
                self.generated_by_row[ev.seq] = max(self.generated_by_row.get(ev.seq, 0), ev.generated)
            if ev.prompt_tokens:
                self.prompt_by_row[ev.seq] = max(self.prompt_by_row.get(ev.seq, 0), ev.prompt_tokens)
        if ev.ttft_s is not None and (self.engine_ttft_s is None or ev.seq == 0):
            self.engine_ttft_s = ev.ttft_s
        if ev.prefill_tps is not None:
            self.engine_prefill_tps = ev.prefill_tps
        if ev.decode_tps is not None:
            self.engine_decode_tps = ev.decode_tps
        if ev.kv is not None:
            self.kv = ev.kv
            if self.kv_peak is None or ev.kv.total_bytes >= self.kv_peak.total_bytes:
                self.kv_peak = ev.kv
        if ev.rss_bytes is not None:
            self.rss_bytes = ev.rss_bytes
            self.rss_peak = max(self.rss_peak or 0, ev.rss_bytes)
        if ev.util:
            self.util = dict(ev.util)
        batch = ev.extra.get("batch") if ev.extra else None
        if isinstance(batch, dict) and batch.get("tokens_per_s") is not None:
            self.batch_tps = batch["tokens_per_s"]

    # -- derived metrics: the definitions every view shares --------------------------------------------
    @property
    def rows(self) -> int:
        """Rows (sequences) seen."""
        return max(len(self.prompt_by_row), len(self.generated_by_row), 1)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens over all rows."""
        return sum(self.prompt_by_row.values())

    @property
    def generated(self) -> int:
        """Generated tokens over all rows."""
        return sum(self.generated_by_row.values())

    @property
    def ttft_s(self) -> float | None:
        """Prompt handed over -> first token: the engine's own figure, else the consumer's clock."""
        if self.engine_ttft_s is not None:
            return self.engine_ttft_s
        return None if self.t_first is None else self.t_first - self.t0

    @property
    def measured_ttft_s(self) -> float | None:
        """Prompt handed over -> first token event, on the consumer's clock (what a client sees)."""
        return None if self.t_first is None else self.t_first - self.t0

    @property
    def prefill_tps(self) -> float | None:
        """Prompt tokens / TTFT."""
        ttft = self.ttft_s
        if self.engine_prefill_tps is not None and self.rows == 1:
            return self.engine_prefill_tps
        return self.prompt_tokens / ttft if ttft and self.prompt_tokens else None

    @property
    def measured_prefill_tps(self) -> float | None:
        """Prompt tokens / :attr:`measured_ttft_s` (the consumer's clock, e.g. the bench worker's)."""
        ttft = self.measured_ttft_s
        return self.prompt_tokens / ttft if ttft and self.prompt_tokens else None

    @property
    def decode_tps(self) -> float | None:
        """Per-stream decode rate: the engine's figure, else (generated - 1) / (last - first token)."""
        if self.engine_decode_tps is not None:
            return self.engine_decode_tps
        return self.aggregate_decode_tps

    @property
    def aggregate_decode_tps(self) -> float | None:
        """All rows together: (tokens - one first token per row) / (last token - first token), consumer clock."""
        if self.t_first is None or self.t_last is None or self.t_last <= self.t_first:
            return None
        tokens = self.generated - sum(1 for n in self.generated_by_row.values() if n > 0)
        return tokens / (self.t_last - self.t_first) if tokens > 0 else None

    @property
    def finish_reason(self) -> str | None:
        """The finish reason of the last row that ended."""
        reasons = [r for r in self.finish_by_row.values() if r]
        return reasons[-1] if reasons else None

    @property
    def decode_token_times(self) -> list[float]:
        """Seconds between consecutive tokens (needs ``keep_token_times``)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]
