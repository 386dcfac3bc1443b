"""The request path of `inferos serve` (the response generator): one served model, a swappable policy,
a request queue or the continuous batcher, and each request's event stream.

Transport-agnostic: the FastAPI app (:mod:`inferos_cli.server.app`) is a thin view of this object. Engines
come from :class:`~inferos_cli.engine.provider.EngineProvider`; measurements go to
:class:`~inferos_cli.server.metrics.MetricsRecorder`. The service is the auto-tuner's ``TuneTarget``.

Isolation: every request gets its own KV cache (``Engine.generate`` or a batcher row), so concurrent
requests never see each other's cache. Without the batcher, one worker thread runs requests one after
the other (queued, not batched) - the honest fallback.

Policy changes (``set_policy`` / ``set_baseline``) validate the whole merged policy first and then swap
one reference under a lock, so a malformed policy never half-applies; requests already running keep
the engine (and cache) they started with, new requests get an engine built for the new policy.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from inferos_cli.errors import ContextOverflowError, InferosError
from inferos_cli.events import Event
from inferos_cli.quality.autotune import baseline_policy
from inferos_cli.engine.provider import EngineFactory, EngineProvider, default_engine_factory, policy_key
from inferos_cli.server.metrics import DTYPE_BYTES, SNAPSHOT_INTERVAL_S, MetricsRecorder, RequestRecord
from inferos_cli.settings import Policy, Resolved, deep_merge

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo


class ServiceBusy(InferosError):
    """The request queue is full."""


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
        """Client side: stop generating (the client went away). A queued job is dropped when the worker
        reaches it; a running one stops at its next event (the batcher retires the row at its next step)."""
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
    """One served model, its policy, its workers; measurements in :attr:`recorder`."""

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
        from inferos_cli.machine.telemetry import TelemetrySampler

        self.profile = profile
        self.resolved = resolved
        self._policy = resolved.policy
        self.policy_version = 0
        self.baseline_mode = not resolved.policy.kv.enabled
        self.ctx_size = info.context_length
        self.max_batch = max(1, int(max_batch))
        self.max_queue = max_queue
        self.started = time.time()
        self.telemetry = TelemetrySampler(resolved.policy.loops).start()
        self.recorder = MetricsRecorder()
        self._lock = threading.RLock()
        factory = engine_factory or default_engine_factory(threads, strict_devices, self.telemetry.util)
        self.engines = EngineProvider(info, factory, lock=self._lock, on_evict=self._retire_batcher)
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

    @property
    def info(self) -> "ModelInfo":
        """The served model."""
        return self.engines.info

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

    # -- engines and batchers ---------------------------------------------------------------------
    def engine(self, policy: Policy | None = None) -> Any:
        """The engine for ``policy`` (default: the current one)."""
        return self.engines.get(policy or self.policy)

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
        """The batcher new requests of ``policy`` join (None: use the queue worker)."""
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

    def _retire_batcher(self, key: str) -> None:
        """The engine of ``key`` left the cache: its batcher drains (closed by :meth:`_reap`)."""
        retired = self._batchers.pop(key, None)
        if retired is not None:
            self._draining.append(retired)

    def _reap(self) -> None:
        """Close recycled batchers once their last rows finished (in a thread: close() joins)."""
        with self._lock:
            done = [batcher for batcher in self._draining if not self._inflight.get(batcher)]
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
                self.engines.swap(info)
                self._draining.extend(b for b in self._batchers.values() if b is not None)
                self._batchers.clear()
                self.policy_version += 1
            self._reap()
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
        limit = self.ctx_size
        if len(prompt_ids) + int(getattr(config, "max_tokens", 0)) > limit:
            if len(prompt_ids) >= limit:
                raise ContextOverflowError(
                    f"prompt has {len(prompt_ids)} tokens; the context holds {limit}", "shorten the prompt"
                )
            config.max_tokens = limit - len(prompt_ids)
        with self._lock:
            policy = self.policy
            record = RequestRecord(id=next(self._ids), submitted_tokens=len(prompt_ids),
                                   policy_version=self.policy_version, baseline=self.baseline_mode,
                                   kv_fp_bytes=DTYPE_BYTES.get(self.info.kv_dtype, 4))
            self.recorder.open(record)
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
            self.recorder.discard(record)
            raise
        job = _Job(list(prompt_ids), config, stream, engine)
        if events is not None:
            thread = threading.Thread(target=self._pump, args=(events, stream, policy, job, batcher), daemon=True)
            thread.start()
            return stream
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self.recorder.discard(record)
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
        rec = stream.record
        try:
            for ev in events:
                self.recorder.observe(rec, ev)
                stream.put(ev)
                if stream.cancelled.is_set():
                    close = getattr(events, "close", None)
                    if close:
                        close()
                    rec.cancelled = True
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the request thread
            if batched is not None:
                self._drop_batcher(batched, str(exc), source)
                if retry is not None and rec.generated == 0 and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    rec.restart()
                    try:
                        self._jobs.put_nowait(retry)
                        return  # the queue worker finishes this stream
                    except queue.Full:
                        pass
            rec.error = str(exc) or type(exc).__name__
            stream.put(exc)
        self._finish(rec)
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
                job.stream.record.cancelled = True
                self._finish(job.stream.record)
                job.stream.finish()
                continue
            self._pump(job.engine.generate(job.prompt_ids, job.config), job.stream)

    def _finish(self, rec: RequestRecord) -> None:
        self.recorder.finish(rec)
        if self._draining:
            self._reap()

    # -- measurements (also the auto-tuner's TuneTarget) ---------------------------------------------
    def kv_bytes(self) -> int | None:
        """KV bytes the latest request's cache allocated (None before any)."""
        return self.recorder.kv_bytes()

    def live_tps(self) -> float | None:
        """Median per-request decode tokens/s over the recent requests (``/v1/metrics`` ``tps``)."""
        return self.metrics()["tps"]

    def publish_estimate(self, delta_ppl: float, source: str | None = None) -> None:
        """The auto-tuner's measured delta-PPL (``quality`` in ``/v1/metrics``)."""
        self.recorder.delta_ppl_est = delta_ppl
        if source is not None:
            self.recorder.delta_ppl_source = source

    def record_decision(self, kind: str, reason: str, details: dict[str, Any] | None = None) -> None:
        """Add a decision (policy change, baseline toggle, auto-tune step) to the history."""
        self.recorder.record_decision(kind, reason, details)

    def history_tail(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` history entries, oldest first."""
        return self.recorder.history_tail(limit)

    def util(self) -> dict[str, float | None]:
        """``{cpu, gpu, npu}`` in percent from the telemetry sampler (real counters); None where unreadable."""
        return dict(self.telemetry.util())

    def vram_gb(self) -> float | None:
        """Device memory in use (GB) where a monitor reads it, else None."""
        value = self.telemetry.snapshot().get("vram_bytes")
        return value / 1e9 if isinstance(value, (int, float)) else None

    def metrics(self) -> dict[str, Any]:
        """The `/v1/metrics` document: every value measured or null."""
        return self.recorder.document(policy=self.policy, policy_version=self.policy_version,
                                      baseline_mode=self.baseline_mode, queued=self._jobs.qsize(),
                                      util=self.util(), vram_gb=self.vram_gb())

    def _snapshot_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.recorder.record_snapshot(self.metrics())
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
    info: "ModelInfo",
    resolved: Resolved,
    *,
    profile: str | None = None,
    threads: int | None = None,
    strict_devices: bool = False,
    max_batch: int = 4,
    auto_tune: bool = False,
    target_tps: float | None = None,
    use_batcher: bool = True,
) -> InferenceService:
    """Load the engine for the resolved model and settings, start the workers (and the tuner)."""
    service = InferenceService(info, resolved, profile=profile, max_batch=max_batch, use_batcher=use_batcher,
                               threads=threads, strict_devices=strict_devices)
    if auto_tune or target_tps is not None:
        from inferos_cli.quality.autotune import AutoTuner

        service.tuner = AutoTuner(service, service.engine, target_tps=target_tps).start()
    return service
