"""What `inferos serve` measures: one :class:`RequestRecord` per request (its events folded through
:class:`~inferos_cli.events.RunStats`, the one fold every view shares), the recent records behind the
latency percentiles, running totals, the aggregate token rate, the history ring buffer (metric snapshots
and decisions) and the ``/v1/metrics`` document built from all of it.

Every value is measured or None: nothing here is a guess.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from inferos_cli.events import Event, KVStats, RunStats, percentile
from inferos_cli.machine.rss import current_rss

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.settings import Policy

#: Snapshot cadence of the history ring buffer (seconds) and its length.
SNAPSHOT_INTERVAL_S = 1.0
HISTORY_LEN = 3600
#: Completed requests kept for the latency percentiles.
RECORDS_LEN = 512
#: Window of the aggregate token rate (seconds).
AGGREGATE_WINDOW_S = 10.0

METRICS_DEFINITION = (
    "tps = median per-request decode tok/s; ftl_ms/p95_ms = median/p95 time to first token over the last "
    "requests; tps_aggregate = tokens in the last 10 s / 10 s (the time served when shorter; null when no "
    "token in that window); kv_mb = bytes holding tokens, kv_reserved_mb = bytes the cache allocated"
)
#: Bytes per element of the float types a model's KV cache can have (``ModelInfo.kv_dtype``).
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: Bytes per element of the single-tier caches whose ``bytes`` are their allocation (see :meth:`KVMemory.of`).
CODE_BYTES = {"int8": 1}


@dataclass(frozen=True)
class KVMemory:
    """One KV snapshot in the server's terms: per tier, the bytes that hold tokens (``held``) and the bytes
    the cache allocated (``reserved``: preallocated capacity and batch padding included).

    Ratios and savings compare ``held`` with ``fp16`` (the same tokens in fp16), so a compressed cache never
    shows a ratio above 1 because of room it reserved ahead."""

    tokens: dict[str, int]
    held: dict[str, int]
    reserved: dict[str, int]
    fp16: int
    evicted: int = 0

    @classmethod
    def of(cls, kv: KVStats, fp_bytes: int = 4) -> "KVMemory":
        """Read a cache's :class:`KVStats`; ``fp_bytes`` is the model's KV element size (its ``kv_dtype``).

        A cache that reports ``reserved`` says what ``bytes`` mean: bytes holding tokens. A cache without it
        whose stats have one tier (PlainCache: ``fp``, FusedCache: ``int8``) reports its whole allocation as
        ``bytes``; its tokens are fixed-width elements (no scales), so they hold exactly tokens x elements
        per token x element size, never more than the allocation. Other stats (the segmented cache: bytes
        of the used columns, scales included) are taken as held."""
        tokens = {k: int(v) for k, v in kv.tokens.items()}
        reported = {k: int(v) for k, v in kv.bytes.items()}
        reserved = getattr(kv, "reserved", None)
        if reserved:
            return cls(tokens, reported, {k: int(v) for k, v in reserved.items()}, int(kv.bytes_fp16), kv.evicted)
        held = dict(reported)
        count = sum(tokens.values())
        if len(reported) == 1 and count and kv.bytes_fp16:
            (tier, allocated), = reported.items()
            width = fp_bytes if tier == "fp" else CODE_BYTES.get(tier)
            if width is not None:
                elements = kv.bytes_fp16 // (2 * count)  # elements per token (keys and values, every layer)
                held[tier] = min(allocated, tokens.get(tier, 0) * elements * width)
        return cls(tokens, held, reported, int(kv.bytes_fp16), kv.evicted)

    @property
    def held_bytes(self) -> int:
        """Bytes holding tokens, all tiers."""
        return sum(self.held.values())

    @property
    def reserved_bytes(self) -> int:
        """Bytes allocated, all tiers (at least the held bytes)."""
        return max(sum(self.reserved.values()), self.held_bytes)

    @property
    def ratio_vs_fp16(self) -> float | None:
        """Held bytes / fp16 bytes of the same tokens (None for an empty cache)."""
        return self.held_bytes / self.fp16 if self.fp16 else None

    def to_json(self) -> dict[str, Any]:
        """The ``kv`` object of a request record."""
        return {"tokens": dict(self.tokens), "bytes": dict(self.held), "bytes_fp16": self.fp16,
                "evicted": self.evicted, "total_bytes": self.held_bytes, "ratio_vs_fp16": self.ratio_vs_fp16,
                "reserved": dict(self.reserved), "reserved_bytes": self.reserved_bytes}


@dataclass
class RequestRecord:
    """One request: who it was (id, policy version, baseline mode) and what its events measured.

    ``stats`` folds the request's events on the server's clock from ``t_submit`` (the prompt handed to
    the engine or the batcher); TTFT and decode tokens/s are RunStats' definitions."""

    id: int
    submitted_tokens: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    error: str | None = None
    cancelled: bool = False
    policy_version: int = 0
    baseline: bool = False
    #: the served model's KV element size (see KVMemory.of)
    kv_fp_bytes: int = 4
    stats: RunStats = field(init=False)

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Forget every event (the request reruns from its prompt on another worker)."""
        self.stats = RunStats(t0=self.t_submit, keep_token_times=True)

    def add(self, ev: Event, now: float | None = None) -> None:
        """Fold one event in, timed on the server's clock."""
        self.stats.add(ev, time.perf_counter() if now is None else now)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens (as the engine counted them; the submitted length before its prefill event)."""
        return self.stats.prompt_tokens or self.submitted_tokens

    @property
    def generated(self) -> int:
        """Tokens generated so far."""
        return self.stats.generated

    @property
    def ttft_s(self) -> float | None:
        """Time to first token (RunStats.ttft_s)."""
        return self.stats.ttft_s

    @property
    def decode_tps(self) -> float | None:
        """Decode tokens/s (RunStats.decode_tps)."""
        return self.stats.decode_tps

    @property
    def kv(self) -> KVStats | None:
        """The latest KV snapshot of this request's cache."""
        return self.stats.kv

    @property
    def kv_memory(self) -> KVMemory | None:
        """The latest KV snapshot as held / reserved bytes."""
        kv = self.kv
        return None if kv is None else KVMemory.of(kv, self.kv_fp_bytes)

    @property
    def finish_reason(self) -> str | None:
        """The engine's finish reason, or ``cancelled`` when the client went away first."""
        return self.stats.finish_reason or ("cancelled" if self.cancelled else None)

    @property
    def outcome(self) -> str:
        """``completed``, ``failed`` or ``cancelled`` (the client went away before the end)."""
        if self.error:
            return "failed"
        return "cancelled" if self.cancelled and not self.stats.finish_reason else "completed"

    @property
    def decode_token_times(self) -> list[float]:
        """Seconds between consecutive generated tokens (Lemonade's ``decode_token_times``)."""
        return self.stats.decode_token_times

    def to_json(self) -> dict[str, Any]:
        """Plain data."""
        kv = self.kv_memory
        return {
            "id": self.id, "prompt_tokens": self.prompt_tokens, "generated": self.generated,
            "ttft_s": self.ttft_s, "decode_tps": self.decode_tps, "finish_reason": self.finish_reason,
            "error": self.error, "policy_version": self.policy_version, "baseline": self.baseline,
            "kv": None if kv is None else kv.to_json(),
        }


def kv_levels(kv: KVStats | KVMemory | None) -> dict[str, int | None]:
    """Tokens per guide level: L0 full precision (sinks + recent window / plain cache), L1 int8, L2 int4,
    L3 evicted. None when no KV snapshot exists yet."""
    if kv is None:
        return {"L0": None, "L1": None, "L2": None, "L3": None}
    levels = {"L0": 0, "L1": 0, "L2": 0, "L3": int(kv.evicted)}
    for tier, count in kv.tokens.items():
        name = tier.lower()
        if "k8v4" in name:  # int8 keys + int4 values: counted with the 4-bit level
            levels["L2"] += int(count)
        elif "int8" in name or name in ("q8", "l1"):
            levels["L1"] += int(count)
        elif "int4" in name or name in ("q4", "l2"):
            levels["L2"] += int(count)
        elif "evict" in name:
            levels["L3"] += int(count)
        else:
            levels["L0"] += int(count)
    return levels


def rss_gb() -> float | None:
    """This process's resident memory in GB (None where unreadable)."""
    rss = current_rss()
    return None if rss is None else rss / 1e9


class MetricsRecorder:
    """Records of finished requests, totals, the latest KV / provider readings, the quality estimate and
    the history. Thread-safe: request threads report, HTTP handlers read."""

    def __init__(self, records_len: int = RECORDS_LEN, history_len: int = HISTORY_LEN) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self._records: deque[RequestRecord] = deque(maxlen=records_len)
        self.active: dict[int, RequestRecord] = {}
        self.last: RequestRecord | None = None
        self.latest_kv: KVMemory | None = None
        self.latest_provider: dict[str, str] = {}
        #: ended requests by outcome: completed (ran to their end), failed, cancelled (client went away)
        self.requests_completed = 0
        self.requests_failed = 0
        self.requests_cancelled = 0
        self.prompt_tokens_total = 0
        self.tokens_total = 0
        self._token_clock: deque[float] = deque(maxlen=100_000)
        self.history: deque[dict[str, Any]] = deque(maxlen=history_len)
        self.listeners: list[Callable[[RequestRecord], None]] = []
        #: the auto-tuner's measured delta-PPL of the current policy, and how it was measured
        self.delta_ppl_est: float | None = None
        self.delta_ppl_source: str | None = None

    # -- requests ----------------------------------------------------------------------------------------
    def open(self, rec: RequestRecord) -> None:
        """A request was accepted."""
        with self._lock:
            self.active[rec.id] = rec

    def discard(self, rec: RequestRecord) -> None:
        """A request was refused before it ran (not counted)."""
        with self._lock:
            self.active.pop(rec.id, None)

    def observe(self, rec: RequestRecord, ev: Event) -> None:
        """One event of a running request."""
        rec.add(ev)
        if ev.kind == "token":
            self._token_clock.append(time.time())
        if ev.kv is not None:
            self.latest_kv = KVMemory.of(ev.kv, rec.kv_fp_bytes)
        if ev.provider:
            self.latest_provider = dict(ev.provider)

    def finish(self, rec: RequestRecord) -> None:
        """A request ended (done, failed or cancelled): count it and tell the listeners."""
        with self._lock:
            self.active.pop(rec.id, None)
            self._records.append(rec)
            self.last = rec
            outcome = rec.outcome
            self.requests_completed += outcome == "completed"
            self.requests_failed += outcome == "failed"
            self.requests_cancelled += outcome == "cancelled"
            self.prompt_tokens_total += rec.prompt_tokens
            self.tokens_total += rec.generated
        for listener in list(self.listeners):
            try:
                listener(rec)
            except Exception:  # noqa: BLE001 - a broken view must not break serving
                pass

    def records(self) -> list[RequestRecord]:
        """Recently finished requests, oldest first."""
        with self._lock:
            return list(self._records)

    # -- derived values ----------------------------------------------------------------------------------
    def aggregate_tps(self, window_s: float = AGGREGATE_WINDOW_S, now: float | None = None) -> float | None:
        """Tokens generated in the last ``window_s`` seconds / the window (the time since the recorder
        started when that is shorter); None when no token was generated in the window."""
        now = time.time() if now is None else now
        count = 0
        for t in reversed(self._token_clock):  # newest first: stop at the window's edge
            if now - t > window_s:
                break
            count += 1
        span = min(window_s, now - self.started)
        return count / span if count and span > 0 else None

    def kv_bytes(self) -> int | None:
        """KV bytes the latest request's cache allocated (what memory pressure feels; None before any)."""
        kv = self.latest_kv
        return kv.reserved_bytes if kv is not None else None

    def document(self, *, policy: "Policy", policy_version: int, baseline_mode: bool, queued: int,
                 util: dict[str, float | None], vram_gb: float | None) -> dict[str, Any]:
        """The ``/v1/metrics`` document."""
        recs = [r for r in self.records() if r.error is None]
        ttfts = [r.ttft_s * 1000.0 for r in recs if r.ttft_s is not None]
        tps_values = [r.decode_tps for r in recs if r.decode_tps is not None]
        kv = self.latest_kv
        held = kv.held_bytes if kv else 0
        last = self.last
        return {
            "tps": percentile(tps_values, 50),
            "tps_aggregate": self.aggregate_tps(),
            "ftl_ms": percentile(ttfts, 50),
            "p95_ms": percentile(ttfts, 95),
            "mem": {
                "rss_gb": rss_gb(),
                "vram_gb": vram_gb,
                "kv_mb": held / 1e6 if kv else None,
                "kv_reserved_mb": kv.reserved_bytes / 1e6 if kv else None,
                "kv_ratio_vs_fp16": kv.ratio_vs_fp16 if kv else None,
            },
            "util": util,
            "kv": {
                "levels": kv_levels(kv),
                "compression_ratio": (kv.fp16 / held) if kv and held else None,
                "memory_saved_mb": ((kv.fp16 - held) / 1e6) if kv and kv.fp16 else None,
                "bytes": dict(kv.held) if kv else None,
                "reserved": dict(kv.reserved) if kv else None,
            },
            "quality": {"delta_ppl_est": self.delta_ppl_est, "max_delta_ppl": policy.quality.max_delta_ppl,
                        "source": self.delta_ppl_source},
            "requests": {"completed": self.requests_completed, "failed": self.requests_failed,
                         "cancelled": self.requests_cancelled, "active": len(self.active), "queued": queued},
            "tokens": {"prompt": self.prompt_tokens_total, "generated": self.tokens_total},
            "policy_version": policy_version,
            "baseline_mode": baseline_mode,
            "provider": dict(self.latest_provider),
            "last_request": last.to_json() if last is not None else None,
            "window": {"requests": len(recs), "definition": METRICS_DEFINITION},
        }

    # -- history -----------------------------------------------------------------------------------------
    def record_decision(self, kind: str, reason: str, details: dict[str, Any] | None = None) -> None:
        """Add a decision (policy change, baseline toggle, auto-tune step) to the history."""
        self.history.append({"t": time.time(), "type": "decision", "kind": kind, "reason": reason,
                             **({"details": details} if details else {})})

    def record_snapshot(self, doc: dict[str, Any]) -> None:
        """Add a compact copy of one ``/v1/metrics`` document to the history."""
        self.history.append(snapshot_entry(doc))

    def history_tail(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` history entries, oldest first."""
        items = list(self.history)
        return items[-limit:] if limit > 0 else []


def snapshot_entry(m: dict[str, Any]) -> dict[str, Any]:
    """One history entry: the headline values of a ``/v1/metrics`` document."""
    return {"t": time.time(), "type": "metrics", "tps": m["tps"], "tps_aggregate": m["tps_aggregate"],
            "ftl_ms": m["ftl_ms"], "p95_ms": m["p95_ms"], "rss_gb": m["mem"]["rss_gb"],
            "kv_mb": m["mem"]["kv_mb"], "delta_ppl_est": m["quality"]["delta_ppl_est"],
            "requests": m["requests"]["completed"], "tokens": m["tokens"]["generated"],
            "policy_version": m["policy_version"], "baseline_mode": m["baseline_mode"]}
