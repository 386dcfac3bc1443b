"""The inference service behind `inferos serve`: one model, a swappable policy, a request queue or the
continuous batcher, per-request records, metric snapshots and the history ring buffer.

Transport-agnostic: the FastAPI app in :mod:`inferos_cli.server` is a thin view of this object, so the
same numbers feed ``/v1/metrics``, ``/api/v1/stats``, Prometheus and the auto-tuner.

Isolation: every request gets its own KV cache (``Engine.generate`` or a batcher row), so concurrent
requests never see each other's cache. Without the batcher, one worker thread runs requests one after
the other (queued, not batched) - the honest fallback.

Policy changes (``set_policy`` / ``set_baseline``) validate the whole merged policy first and then swap
one reference under a lock, so a malformed policy never half-applies; requests already running keep
the engine (and cache) they started with, new requests get an engine built for the new policy.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from inferos_cli.errors import InferosError
from inferos_cli.events import Event, KVStats
from inferos_cli.settings import Policy, Resolved, deep_merge

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo

#: Snapshot cadence of the history ring buffer (seconds) and its length.
SNAPSHOT_INTERVAL_S = 1.0
HISTORY_LEN = 3600
#: Completed requests kept for the latency percentiles.
RECORDS_LEN = 512


class ServiceBusy(InferosError):
    """The request queue is full."""


@dataclass
class RequestRecord:
    """What one request measured (all times from the engine's events)."""

    id: int
    prompt_tokens: int = 0
    generated: int = 0
    t_submit: float = 0.0
    t_first: float | None = None
    t_last: float | None = None
    t_end: float | None = None
    ttft_s: float | None = None
    decode_tps: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    policy_version: int = 0
    baseline: bool = False
    kv: KVStats | None = None

    @property
    def decode_token_times(self) -> list[float]:
        """Seconds between consecutive generated tokens (Lemonade's ``decode_token_times``)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    def to_json(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "id": self.id, "prompt_tokens": self.prompt_tokens, "generated": self.generated,
            "ttft_s": self.ttft_s, "decode_tps": self.decode_tps, "finish_reason": self.finish_reason,
            "error": self.error, "policy_version": self.policy_version, "baseline": self.baseline,
            "kv": None if self.kv is None else {
                "tokens": dict(self.kv.tokens), "bytes": dict(self.kv.bytes), "bytes_fp16": self.kv.bytes_fp16,
                "evicted": self.kv.evicted, "total_bytes": self.kv.total_bytes, "ratio_vs_fp16": self.kv.ratio_vs_fp16,
            },
        }


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def kv_levels(kv: KVStats | None) -> dict[str, int | None]:
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


def baseline_policy(policy: Policy) -> Policy:
    """The same policy with the KV quantizer off (original graph, plain cache)."""
    data = policy.model_dump()
    data["kv"]["mode"] = "disabled"
    return Policy.model_validate(data)


def policy_key(policy: Policy) -> str:
    """A stable key of a policy for the engine cache."""
    import json

    return json.dumps(policy.model_dump(mode="json"), sort_keys=True)


EngineFactory = Callable[["ModelInfo", Policy], Any]


def default_engine_factory(
    threads: int | None = None,
    strict_devices: bool = False,
    telemetry: Callable[[], dict[str, float | None]] | None = None,
) -> EngineFactory:
    """Build an :class:`~inferos_cli.engine.engine.Engine` for a model and a policy."""

    def build(info: "ModelInfo", policy: Policy) -> Any:
        from inferos_cli.engine.engine import Engine

        from inferos_cli.engine.sessions import default_threads

        # serve batches concurrent requests: batched decode wants every core (see default_threads)
        return Engine(info, Resolved(policy=policy), threads=threads or default_threads(batched=True),
                      strict_devices=strict_devices,
                      telemetry=telemetry)

    return build


class RequestStream:
    """Iterator of one request's events, fed by the worker thread or the batcher."""

    _END = object()

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self._q: queue.Queue[Any] = queue.Queue()
        self.cancelled = threading.Event()

    def put(self, item: Any) -> None:
        """Worker side: hand over one event (or an exception)."""
        self._q.put(item)

    def finish(self) -> None:
        """Worker side: no more events."""
        self._q.put(self._END)

    def cancel(self) -> None:
        """Client side: stop generating (client went away)."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[Event]:
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass
class _Job:
    prompt_ids: list[int]
    config: Any
    stream: RequestStream
    engine: Any


class InferenceService:
    """One served model, its policy, its workers and its measurements."""

    def __init__(
        self,
        info: "ModelInfo",
        resolved: Resolved,
        *,
        profile: str | None = None,
        engine_factory: EngineFactory | None = None,
        max_batch: int = 4,
        max_queue: int = 256,
        snapshot_interval_s: float = SNAPSHOT_INTERVAL_S,
        use_batcher: bool = True,
        threads: int | None = None,
        strict_devices: bool = False,
    ) -> None:
        self.info = info
        self.profile = profile
        self.resolved = resolved
        self._policy = resolved.policy
        self._base_policy = resolved.policy
        self.policy_version = 0
        self.baseline_mode = not resolved.policy.kv.enabled
        self.ctx_size = info.context_length
        self.max_batch = max(1, int(max_batch))
        self.max_queue = max_queue
        self.started = time.time()
        from inferos_cli.machine.telemetry import TelemetrySampler

        self.telemetry = TelemetrySampler(resolved.policy.loops).start()
        self._factory = engine_factory or default_engine_factory(threads, strict_devices, self.telemetry.util)
        self._lock = threading.RLock()
        self._engines: dict[str, Any] = {}
        self._batchers: dict[str, Any] = {}
        #: both KV caches drop the columns of retired rows on select (PlainCache and SegmentedCache), so a
        #: batch that never empties stays as wide as its live rows and batchers are not recycled (None).
        #: Set to N to hand new requests to a fresh batcher after N admissions while the old one drains.
        self.recycle_after: int | None = None
        self._admissions: dict[str, int] = {}
        self._draining: list[Any] = []
        self._inflight: dict[Any, int] = {}  # batcher -> its requests not finished yet
        self.batchers_recycled = 0
        self._use_batcher = use_batcher
        self._ids = itertools.count(1)
        self._records: deque[RequestRecord] = deque(maxlen=RECORDS_LEN)
        self._active: dict[int, RequestRecord] = {}
        self._last: RequestRecord | None = None
        self._latest_kv: KVStats | None = None
        self._latest_util: dict[str, float | None] = {}
        self._latest_provider: dict[str, str] = {}
        self.requests_total = 0
        self.requests_failed = 0
        self.prompt_tokens_total = 0
        self.tokens_total = 0
        self._token_clock: deque[float] = deque(maxlen=100_000)
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_LEN)
        self.listeners: list[Callable[[RequestRecord], None]] = []
        self.delta_ppl_est: float | None = None
        self.delta_ppl_source: str | None = None
        self.tuner: Any = None
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="inferos-worker", daemon=True)
        self._snapshotter = threading.Thread(
            target=self._snapshot_loop, args=(snapshot_interval_s,), name="inferos-snapshots", daemon=True
        )
        self.engine()  # load now: fail at startup, not at the first request
        self._worker.start()
        self._snapshotter.start()

    # -- policy ---------------------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        """The policy new requests run with (the baseline variant when baseline mode is on)."""
        with self._lock:
            return baseline_policy(self._policy) if self.baseline_mode else self._policy

    @property
    def configured_policy(self) -> Policy:
        """The policy as set (baseline mode not applied)."""
        with self._lock:
            return self._policy

    def set_policy(self, partial: dict[str, Any], *, reason: str = "POST /v1/policy") -> Policy:
        """Deep-merge ``partial`` onto the current policy, validate the whole, then swap atomically.

        Raises pydantic's ``ValidationError`` (the caller answers 422) and changes nothing on error."""
        with self._lock:
            merged = deep_merge(self._policy.model_dump(), partial)
            new = Policy.model_validate(merged)  # raises before anything changes
            self._policy = new
            self.policy_version += 1
            self.record_decision("policy", reason, {"policy": partial, "version": self.policy_version})
            return new

    def replace_policy(self, policy: Policy, *, reason: str, details: dict[str, Any] | None = None) -> None:
        """Swap in a whole validated policy (the auto-tuner's path)."""
        with self._lock:
            self._policy = policy
            self.policy_version += 1
            self.record_decision("autotune", reason, {**(details or {}), "version": self.policy_version})

    def set_baseline(self, enable: bool) -> bool:
        """Baseline mode on: new requests run the original graph with a plain cache (KV policy off)."""
        with self._lock:
            if self.baseline_mode != enable:
                self.baseline_mode = enable
                self.policy_version += 1
                self.record_decision("baseline", f"baseline mode {'on' if enable else 'off'}", {"enable": enable})
            return self.baseline_mode

    # -- engines ----------------------------------------------------------------------------------
    def engine(self, policy: Policy | None = None) -> Any:
        """The engine for ``policy`` (default: the current one), built once and kept (at most 3)."""
        policy = policy or self.policy
        key = policy_key(policy)
        with self._lock:
            eng = self._engines.get(key)
            if eng is None:
                eng = self._factory(self.info, policy)
                if len(self._engines) >= 3:
                    oldest = next(iter(self._engines))
                    self._engines.pop(oldest)
                    retired = self._batchers.pop(oldest, None)
                    if retired is not None:
                        self._draining.append(retired)  # closed by _reap once its requests end
                self._engines[key] = eng
            return eng

    def decode_device(self) -> str:
        """The device the decode session really runs on (after any fallback)."""
        plan = getattr(self.engine(), "plan", None)
        decode = getattr(plan, "decode", None)
        return str(getattr(decode, "device", None) or self.policy.scheduler.decode_device)

    @property
    def tokenizer(self) -> Any:
        """The served model's tokenizer."""
        return self.engine().tokenizer

    def _batcher(self, policy: Policy) -> Any | None:
        if not self._use_batcher:
            return None
        key = policy_key(policy)
        with self._lock:
            if key in self._batchers:
                current = self._batchers[key]
                if current is None:
                    return None
                self._admissions[key] = self._admissions.get(key, 0) + 1
                if self.recycle_after is None or self._admissions[key] <= self.recycle_after:
                    return current  # the caches compact themselves on retire: no recycling needed
                # recycle: the old batcher finishes its rows, new requests start a fresh shared cache
                self._draining.append(current)
                self._admissions[key] = 1
                fresh = self._new_batcher(policy)
                self._batchers[key] = fresh
                self.batchers_recycled += 1
                return fresh
            try:
                from inferos_cli.engine.batcher import ContinuousBatcher  # noqa: F401 - availability check
            except ImportError:
                self._batchers[key] = None
                return None
            # a cache that cannot merge rows (the segmented cache on a GroupQueryAttention graph) makes the
            # batcher queue requests one row at a time by itself (ContinuousBatcher.merge_reason)
            batcher = self._new_batcher(policy)
            self._batchers[key] = batcher
            self._admissions[key] = 1
            return batcher

    def _new_batcher(self, policy: Policy) -> Any | None:
        from inferos_cli.engine.batcher import ContinuousBatcher

        try:
            return ContinuousBatcher(self.engine(policy), self.max_batch)
        except InferosError:
            return None  # e.g. a model the batcher cannot pad: queue instead

    def _reap(self) -> None:
        """Close recycled batchers once their last rows finished (in a thread: close() joins)."""
        with self._lock:
            done = []
            for batcher in self._draining:
                if not self._inflight.get(batcher):
                    done.append(batcher)
            for batcher in done:
                self._draining.remove(batcher)
                self._inflight.pop(batcher, None)
        for batcher in done:
            threading.Thread(target=batcher.close, daemon=True).start()

    def _drop_batcher(self, policy: Policy, reason: str, batcher: Any = None) -> None:
        """A batcher that failed is not used again: later requests go through the queue worker."""
        key = policy_key(policy)
        with self._lock:
            current = self._batchers.get(key)
            if current is not None and (batcher is None or current is batcher):
                self._batchers[key] = None
                self.record_decision("batcher", f"continuous batcher failed, requests are queued now: {reason}")

    def load(self, model_name: str, ctx_size: int | None = None) -> dict[str, Any]:
        """Lemonade ``/load``: the served model stays; another model name is resolved and swapped in."""
        if model_name not in (self.info.name, str(self.info.path)):
            from inferos_cli.models.resolve import resolve_model

            info = resolve_model(model_name, progress=False)
            with self._lock:
                self.info = info
                self._engines.clear()
                self._batchers.clear()
                self.policy_version += 1
            self.engine()
            self.record_decision("load", f"loaded model {info.name}", {"model": info.name})
        if ctx_size:
            self.ctx_size = min(int(ctx_size), self.info.context_length)
        return {"status": "success", "model_name": self.info.name, "ctx_size": self.ctx_size}

    # -- requests -----------------------------------------------------------------------------------
    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat messages -> prompt ids (the model's chat template, or the contents joined by newlines
        for a model without one, e.g. stories260K)."""
        tok = self.tokenizer
        if getattr(tok, "has_chat_template", False):
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
            return list(tok.encode(text, add_bos=False))
        text = "\n".join(m.get("content", "") for m in messages if m.get("content"))
        return list(tok.encode(text))

    def encode_text(self, prompt: str) -> list[int]:
        """A raw completion prompt -> ids (BOS as the model wants)."""
        return list(self.tokenizer.encode(prompt))

    def submit(self, prompt_ids: list[int], config: Any) -> RequestStream:
        """Queue one request; returns its event stream. Raises ServiceBusy when the queue is full."""
        from inferos_cli.errors import ContextOverflowError

        limit = self.ctx_size
        if len(prompt_ids) + int(getattr(config, "max_tokens", 0)) > limit:
            if len(prompt_ids) >= limit:
                raise ContextOverflowError(
                    f"prompt has {len(prompt_ids)} tokens; the context holds {limit}", "shorten the prompt"
                )
            config.max_tokens = limit - len(prompt_ids)
        with self._lock:
            policy = self.policy
            record = RequestRecord(
                id=next(self._ids), prompt_tokens=len(prompt_ids), t_submit=time.perf_counter(),
                policy_version=self.policy_version, baseline=self.baseline_mode,
            )
            self._active[record.id] = record
        stream = RequestStream(record)
        try:
            engine = self.engine(policy)
            events = None
            with self._lock:  # choosing a batcher and queueing into it is atomic w.r.t. recycling/reaping
                batcher = self._batcher(policy)
                if batcher is not None:
                    try:
                        events = batcher.submit(list(prompt_ids), config)
                        self._inflight[batcher] = self._inflight.get(batcher, 0) + 1
                    except InferosError as exc:
                        if "closed" not in exc.message:
                            raise
                        self._drop_batcher(policy, exc.message, batcher)
        except BaseException:
            with self._lock:
                self._active.pop(record.id, None)
            raise
        job = _Job(list(prompt_ids), config, stream, engine)
        if events is not None:
            thread = threading.Thread(target=self._pump, args=(events, stream, policy, job, batcher), daemon=True)
            thread.start()
            return stream
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            with self._lock:
                self._active.pop(record.id, None)
            raise ServiceBusy(f"{self.max_queue} requests already queued", "retry later") from None
        return stream

    def _pump(self, events: Iterator[Event], stream: RequestStream, batched: Policy | None = None,
              retry: _Job | None = None, source: Any = None) -> None:
        """Move events from the engine/batcher to the request's stream. When the batcher fails before
        this request got its first token, the batcher is retired and the request reruns on the queue
        worker (its own fresh cache), so the client sees no error."""
        try:
            self._pump_events(events, stream, batched, retry, source)
        finally:
            self._release(source)

    def _pump_events(self, events: Iterator[Event], stream: RequestStream, batched: Policy | None,
                     retry: _Job | None, source: Any) -> None:
        tokens = 0
        try:
            for ev in events:
                if ev.kind == "token":
                    tokens += 1
                self._observe(stream.record, ev)
                stream.put(ev)
                if stream.cancelled.is_set():
                    close = getattr(events, "close", None)
                    if close:
                        close()
                    stream.record.finish_reason = stream.record.finish_reason or "cancelled"
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the request thread
            if batched is not None:
                self._drop_batcher(batched, str(exc), source)
                if retry is not None and tokens == 0 and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    rec = stream.record
                    rec.t_first = rec.ttft_s = rec.t_last = None
                    rec.token_times.clear()
                    rec.generated = 0
                    try:
                        self._jobs.put_nowait(retry)
                        return  # the queue worker finishes this stream
                    except queue.Full:
                        pass
            stream.record.error = str(exc) or type(exc).__name__
            stream.put(exc)
        self._finish(stream.record)
        stream.finish()

    def _release(self, source: Any) -> None:
        """One request of batcher ``source`` is over (finished, failed or handed to the queue)."""
        if source is None:
            return
        with self._lock:
            if self._inflight.get(source):
                self._inflight[source] -= 1
            if not self._inflight.get(source) and source not in self._draining and all(
                    b is not source for b in self._batchers.values()):
                self._inflight.pop(source, None)  # a dropped batcher: forget it
        if self._draining:
            self._reap()

    def _work(self) -> None:
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is None:
                return
            if job.stream.cancelled.is_set():
                job.stream.record.finish_reason = "cancelled"
                self._finish(job.stream.record)
                job.stream.finish()
                continue
            self._pump(job.engine.generate(job.prompt_ids, job.config), job.stream)

    def _observe(self, rec: RequestRecord, ev: Event) -> None:
        now = time.perf_counter()
        if ev.kind == "token":
            if rec.t_first is None:
                rec.t_first = now
                rec.ttft_s = ev.ttft_s if ev.ttft_s is not None else now - rec.t_submit
            rec.token_times.append(now)
            rec.t_last = now
            rec.generated = max(rec.generated + 1, ev.generated)
            self._token_clock.append(time.time())
            if ev.decode_tps is not None:
                rec.decode_tps = ev.decode_tps
        elif ev.kind == "prefill":
            if ev.prompt_tokens:
                rec.prompt_tokens = ev.prompt_tokens
        elif ev.kind == "done":
            rec.finish_reason = ev.finish_reason
            if ev.generated:
                rec.generated = ev.generated
            if ev.decode_tps is not None:
                rec.decode_tps = ev.decode_tps
            if ev.ttft_s is not None:
                rec.ttft_s = ev.ttft_s
        if ev.kv is not None:
            rec.kv = ev.kv
            self._latest_kv = ev.kv
        if ev.util:
            self._latest_util = dict(ev.util)
        if ev.provider:
            self._latest_provider = dict(ev.provider)

    def _finish(self, rec: RequestRecord) -> None:
        rec.t_end = time.perf_counter()
        if rec.decode_tps is None and rec.t_first is not None and rec.t_last and rec.t_last > rec.t_first:
            rec.decode_tps = (len(rec.token_times) - 1) / (rec.t_last - rec.t_first)
        with self._lock:
            self._active.pop(rec.id, None)
            self._records.append(rec)
            self._last = rec
            self.requests_total += 1
            self.requests_failed += 1 if rec.error else 0
            self.prompt_tokens_total += rec.prompt_tokens
            self.tokens_total += rec.generated
        if self._draining:
            self._reap()
        for listener in list(self.listeners):
            try:
                listener(rec)
            except Exception:  # noqa: BLE001 - a broken view must not break serving
                pass

    # -- measurements -------------------------------------------------------------------------------
    @property
    def last_record(self) -> RequestRecord | None:
        """The most recently finished request."""
        return self._last

    def records(self) -> list[RequestRecord]:
        """Recently finished requests, oldest first."""
        with self._lock:
            return list(self._records)

    def aggregate_tps(self, window_s: float = 10.0) -> float | None:
        """Tokens generated in the last ``window_s`` seconds / window (None before any token)."""
        if not self._token_clock:
            return None
        now = time.time()
        first = self._token_clock[0]
        span = min(window_s, now - first) if now > first else window_s
        count = sum(1 for t in reversed(self._token_clock) if now - t <= window_s)
        return count / span if span > 0 else None

    def metrics_kv_bytes(self) -> int | None:
        """Resident KV bytes of the latest request (None before any)."""
        kv = self._latest_kv
        return kv.total_bytes if kv is not None else None

    def util(self) -> dict[str, float | None]:
        """``{cpu, gpu, npu}`` in percent from the telemetry sampler (real counters); None where unreadable."""
        return dict(self.telemetry.util())

    def vram_gb(self) -> float | None:
        """Device memory in use (GB) where a monitor reads it, else None."""
        value = self.telemetry.snapshot().get("vram_bytes")
        return value / 1e9 if isinstance(value, (int, float)) else None

    def metrics(self) -> dict[str, Any]:
        """The `/v1/metrics` document: every value measured or null."""
        import psutil

        recs = [r for r in self.records() if r.error is None]
        ttfts = [r.ttft_s * 1000.0 for r in recs if r.ttft_s is not None]
        tps_values = [r.decode_tps for r in recs if r.decode_tps is not None]
        kv = self._latest_kv
        fp16 = kv.bytes_fp16 if kv else 0
        total = kv.total_bytes if kv else 0
        policy = self.policy
        return {
            "tps": percentile(tps_values, 50),
            "tps_aggregate": self.aggregate_tps(),
            "ftl_ms": percentile(ttfts, 50),
            "p95_ms": percentile(ttfts, 95),
            "mem": {
                "rss_gb": psutil.Process().memory_info().rss / 1e9,
                "vram_gb": self.vram_gb(),
                "kv_mb": total / 1e6 if kv else None,
                "kv_ratio_vs_fp16": kv.ratio_vs_fp16 if kv else None,
            },
            "util": self.util(),
            "kv": {
                "levels": kv_levels(kv),
                "compression_ratio": (fp16 / total) if kv and total else None,
                "memory_saved_mb": ((fp16 - total) / 1e6) if kv and fp16 else None,
                "bytes": dict(kv.bytes) if kv else None,
            },
            "quality": {"delta_ppl_est": self.delta_ppl_est, "max_delta_ppl": policy.quality.max_delta_ppl,
                        "source": self.delta_ppl_source},
            "requests": {"completed": self.requests_total, "failed": self.requests_failed,
                         "active": len(self._active), "queued": self._jobs.qsize()},
            "tokens": {"prompt": self.prompt_tokens_total, "generated": self.tokens_total},
            "policy_version": self.policy_version,
            "baseline_mode": self.baseline_mode,
            "provider": dict(self._latest_provider),
            "last_request": self._last.to_json() if self._last is not None else None,
            "window": {"requests": len(recs), "definition": "tps = median per-request decode tok/s; "
                       "ftl_ms/p95_ms = median/p95 time to first token over the last requests; "
                       "tps_aggregate = tokens in the last 10 s / 10 s"},
        }

    def health(self) -> dict[str, Any]:
        """The control API's `/v1/health`."""
        from inferos_cli import __version__

        return {
            "status": "ok", "baseline_mode": self.baseline_mode, "model": self.info.name,
            "profile": self.profile, "version": __version__, "uptime_s": time.time() - self.started,
        }

    def lemonade_stats(self) -> dict[str, Any]:
        """Lemonade's `/stats`: the last request's measurements (nulls before the first request)."""
        rec = self._last
        if rec is None:
            return {"time_to_first_token": None, "tokens_per_second": None, "input_tokens": None,
                    "output_tokens": None, "decode_token_times": []}
        return {
            "time_to_first_token": rec.ttft_s, "tokens_per_second": rec.decode_tps,
            "input_tokens": rec.prompt_tokens, "output_tokens": rec.generated,
            "decode_token_times": rec.decode_token_times,
        }

    def system_stats(self) -> dict[str, Any]:
        """Lemonade's `/system-stats`."""
        import psutil

        util = self.util()
        return {
            "cpu_percent": util["cpu"], "memory_gb": psutil.Process().memory_info().rss / 1e9,
            "gpu_percent": util["gpu"], "vram_gb": self.vram_gb(),
            "npu_percent": util["npu"],
        }

    # -- history ---------------------------------------------------------------------------------------
    def record_decision(self, kind: str, reason: str, details: dict[str, Any] | None = None) -> None:
        """Add a decision (policy change, baseline toggle, auto-tune step) to the history."""
        self.history.append({"t": time.time(), "type": "decision", "kind": kind, "reason": reason,
                             **({"details": details} if details else {})})

    def snapshot(self) -> dict[str, Any]:
        """One history entry: a compact copy of the metrics."""
        m = self.metrics()
        return {"t": time.time(), "type": "metrics", "tps": m["tps"], "tps_aggregate": m["tps_aggregate"],
                "ftl_ms": m["ftl_ms"], "p95_ms": m["p95_ms"], "rss_gb": m["mem"]["rss_gb"],
                "kv_mb": m["mem"]["kv_mb"], "delta_ppl_est": m["quality"]["delta_ppl_est"],
                "requests": m["requests"]["completed"], "tokens": m["tokens"]["generated"],
                "policy_version": self.policy_version, "baseline_mode": self.baseline_mode}

    def history_tail(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` history entries, oldest first."""
        items = list(self.history)
        return items[-limit:] if limit > 0 else []

    def _snapshot_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.history.append(self.snapshot())
            except Exception:  # noqa: BLE001 - keep sampling
                pass

    def close(self) -> None:
        """Stop the worker and the snapshot thread (running requests finish first)."""
        self._stop.set()
        try:
            self._jobs.put_nowait(None)
        except queue.Full:
            pass
        if self.tuner is not None:
            self.tuner.stop()
        self.telemetry.stop()
        for batcher in list(self._batchers.values()) + list(self._draining):
            close = getattr(batcher, "close", None)
            if close:
                close()


def start_service(
    *,
    model: str | None = None,
    profile: str | None = None,
    config: "Any" = None,
    flags: dict[str, Any] | None = None,
    threads: int | None = None,
    strict_devices: bool = False,
    max_batch: int = 4,
    auto_tune: bool = False,
    target_tps: float | None = None,
    use_batcher: bool = True,
) -> InferenceService:
    """Resolve the model and the settings once, load the engine, start the workers (and the tuner)."""
    from inferos_cli.profiles import resolve_settings
    from inferos_cli.models.resolve import resolve_model

    info = resolve_model(model, progress=True)
    resolved = resolve_settings(profile, param_count=info.param_count, config_path=config, flags=flags)
    service = InferenceService(info, resolved, profile=profile, max_batch=max_batch, use_batcher=use_batcher,
                               threads=threads, strict_devices=strict_devices)
    if auto_tune or target_tps is not None:
        from inferos_cli.quality.autotune import AutoTuner

        service.tuner = AutoTuner(service, target_tps=target_tps).start()
    return service
