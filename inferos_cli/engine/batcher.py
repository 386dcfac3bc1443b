"""Continuous batching: sequences decoded together in the batch dimension, joining and leaving between steps.

One worker thread owns the :class:`~inferos_cli.engine.engine.Engine` (ONNX Runtime sessions and the
shared KV cache are never touched from two threads). :meth:`ContinuousBatcher.submit` is thread-safe: it
queues the request and returns an iterator over that request's own events.

Each worker step:

1. **admit** waiting requests while fewer than ``max_batch`` rows are active: the newcomer's prompt is
   prefilled in its own one-row cache (so it never sees another request's keys), its first token is
   sampled, and the row is appended to the shared cache with ``cache.merge`` (the shorter past gets
   masked padding columns: left padding for graphs with ``position_ids``, right padding for
   ``GroupQueryAttention`` graphs, whose rows are right-padded by construction);
2. **accept** every row's pending token (``token`` / ``done`` events to its request);
3. **retire** finished (or abandoned) rows with ``cache.select``;
4. **decode** one token for all remaining rows with one session run (``phase="decode"``).

Attention masks keep rows apart; position ids continue each row's true length (``Engine.forward``), so a
greedy sequence decoded in a batch equals the same sequence decoded alone.

When a cache cannot merge rows (``merge`` raises anything: a cache type without support, or the
segmented KV cache refusing rows of different lengths), requests are queued until the batch drains and
run one batch-row at a time instead; their events say so in ``extra["batcher"]``.

Failure: if the worker itself fails, every request not finished yet (waiting, being admitted or active)
gets the error from its iterator and the batcher closes; ``submit`` on a closed batcher raises. Queueing
and closing happen under one lock, so no request can slip in after the final hand-out and hang.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from inferos_cli.errors import InferosError, UsageError
from inferos_cli.events import Event
from inferos_cli.engine.sampling import GenerationConfig, sample

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.engine.engine import Engine
    from inferos_cli.engine.generate import Sequence as SeqState
    from inferos_cli.kv.base import KVCache

_IDS = itertools.count()
_END = object()


@dataclass
class _Request:
    """One submitted sequence: its prompt, config, event queue and decode state."""

    rid: int
    prompt: list[int]
    config: GenerationConfig
    t_submit: float
    out: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    state: "SeqState | None" = None
    max_new: int = 0
    pending: int | None = None  # sampled, not yet accepted token
    feed: int = 0  # the last accepted token: the next decode step's input
    admitted_at_step: int | None = None
    part: Any = None  # the newcomer's own prefilled cache until it joins the batch


class ContinuousBatcher:
    """Admits, decodes and retires sequences between steps; see the module docstring."""

    def __init__(
        self, engine: "Engine", max_batch: int = 8, *, start: bool = True, name: str = "inferos-batcher"
    ) -> None:
        if max_batch < 1:
            raise UsageError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.max_batch = int(max_batch)
        self._waiting: list[_Request] = []  # submitted, not admitted yet (guarded by _lock)
        self._admitting: _Request | None = None  # popped from _waiting, prefilling/merging now
        self._active: list[_Request] = []
        self._cache: "KVCache | None" = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self.can_merge = True
        self.merge_reason: str | None = None
        self.steps = 0
        self.generated = 0
        self.peak_batch = 0
        self.admitted = 0
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
            self._thread.start()

    # ----- public API ---------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], config: GenerationConfig | None = None) -> Iterator[Event]:
        """Queue one sequence; iterate the result for its ``prefill``, ``token`` and ``done`` events.

        Thread-safe. Context errors are raised here, in the caller's thread; an error inside the worker is
        re-raised from the iterator. Closing the iterator early retires the row at the next step.
        Events look like ``Engine.generate``'s (``seq`` 0, TTFT counted from this call, queueing
        included); ``extra["batcher"]`` holds the request id, the batch size and the admission step."""
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise UsageError("empty prompt", "give at least one token")
        self.engine.check_context(len(prompt))
        req = _Request(next(_IDS), prompt, config or GenerationConfig(), time.perf_counter())
        with self._wake:  # the closed check and the queueing are one step w.r.t. _fail_all
            if self._closed.is_set():
                raise UsageError("the batcher is closed", "create a new ContinuousBatcher")
            self._waiting.append(req)
            self._wake.notify()
        return self._events(req)

    def close(self, timeout: float = 30.0) -> None:
        """Stop: the worker ends after its current step; unfinished requests get a UsageError."""
        with self._wake:
            self._closed.set()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        else:
            self._fail_all(UsageError("the batcher was closed before this request finished"))

    def __enter__(self) -> "ContinuousBatcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def cache(self) -> "KVCache | None":
        """The shared cache of the active rows (None while none is active)."""
        return self._cache

    def stats(self) -> dict[str, Any]:
        """Rows active and waiting (a request being prefilled for admission counts as waiting, and as
        ``admitting``), decode steps run, tokens generated, peak batch, merge support."""
        with self._lock:
            admitting = 0 if self._admitting is None else 1
            return {
                "active": len(self._active), "waiting": len(self._waiting) + admitting, "admitting": admitting,
                "steps": self.steps, "generated": self.generated, "peak_batch": self.peak_batch,
                "admitted": self.admitted, "max_batch": self.max_batch, "can_merge": self.can_merge,
                "merge_reason": self.merge_reason,
            }

    @staticmethod
    def _events(req: _Request) -> Iterator[Event]:
        try:
            while True:
                item = req.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            req.cancelled.set()

    # ----- worker -------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One worker iteration: take queued requests, admit, accept/retire, decode one token for the
        active rows. Returns False when there was nothing to do. The worker thread calls it in a loop;
        with ``start=False`` a caller may drive it by hand (single-threaded use and tests)."""
        with self._lock:
            if not self._active and not self._waiting:
                return False
        self._admit()
        self._accept_and_retire()
        if self._active:
            self._decode_step()
        return True

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._closed.is_set() and not self._active and not self._waiting:
                        self._wake.wait()
                    if self._closed.is_set():
                        break
                self.step()
        except BaseException as exc:  # deliver the failure to every waiting caller, never hang them
            err = exc if isinstance(exc, InferosError) else RuntimeError(f"batcher worker failed: {exc!r}")
            self._fail_all(err)
            return
        self._fail_all(UsageError("the batcher was closed before this request finished"))

    def _fail_all(self, err: BaseException) -> None:
        """Close, then hand ``err`` to every request not finished yet (active, being admitted, waiting)
        and forget them. Under the lock: a concurrent ``submit`` either lands before (and gets ``err``)
        or sees the batcher closed."""
        with self._wake:
            self._closed.set()
            pending = self._active + ([self._admitting] if self._admitting is not None else []) + self._waiting
            self._active, self._waiting, self._admitting, self._cache = [], [], None, None
        for req in pending:
            req.out.put(err)

    def _admit(self) -> None:
        """Prefill waiting requests in their own caches and merge them into the shared cache."""
        eng = self.engine
        while True:
            with self._lock:
                if not self._waiting or len(self._active) >= self.max_batch:
                    return
                if not self.can_merge and self._active:
                    return  # queued: this cache type cannot take rows mid-flight
                req = self._admitting = self._waiting.pop(0)
            if req.cancelled.is_set():
                with self._lock:
                    self._admitting = None
                req.out.put(_END)
                continue
            if req.part is None:
                cfg = req.config
                room = eng.info.context_length - len(req.prompt)
                req.max_new = max(0, min(cfg.max_tokens, room))
                # row 0, as Engine.generate: a seeded request samples exactly as it would alone
                req.state = eng.new_sequence(req.prompt, cfg)
                try:
                    part = eng.new_cache(1, capacity=len(req.prompt) + req.max_new + 1)
                    last = eng.prefill(np.asarray([req.prompt], dtype=np.int64), part, cfg.prefill_chunk)
                except Exception as exc:  # this request fails alone; the running rows go on
                    with self._lock:
                        self._admitting = None
                    req.out.put(exc if isinstance(exc, InferosError) else RuntimeError(f"prefill failed: {exc!r}"))
                    continue
                req.pending = sample(last[0], cfg, req.state.rng, req.prompt) if req.max_new > 0 else None
                ev = eng.prefill_event(req.state, part, req.t_submit, time.perf_counter())
                req.admitted_at_step = self.steps
                ev.extra["batcher"] = self._extra(req, len(self._active) + 1)
                req.out.put(ev)
                req.part = part
            if self._cache is None or not self._active:
                self._cache = req.part
            else:
                try:
                    self._cache.merge(req.part)
                except Exception as exc:  # noqa: BLE001 - any refusal means "cannot merge", never a dead worker
                    # this cache cannot take the row mid-flight: the newcomer waits for an empty batch
                    detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                    with self._lock:
                        self.can_merge = False
                        self.merge_reason = f"{type(self._cache).__name__} cannot merge rows ({detail}); requests queue"
                        self._waiting.insert(0, req)
                        self._admitting = None
                    return
            req.part = None
            with self._lock:
                self._active.append(req)
                self._admitting = None
                self.admitted += 1
                self.peak_batch = max(self.peak_batch, len(self._active))

    def _extra(self, req: _Request, batch: int | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"request": req.rid, "batch": batch if batch is not None else len(self._active),
                                "admitted_at_step": req.admitted_at_step}
        if not self.can_merge:
            data["queued"] = self.merge_reason
        return data

    def _accept_and_retire(self) -> None:
        eng = self.engine
        cache = self._cache
        assert cache is not None or not self._active
        keep: list[int] = []
        now = time.perf_counter()
        for pos, req in enumerate(self._active):
            st = req.state
            if req.cancelled.is_set():
                st.finish = "cancelled"
            elif req.max_new == 0 or req.pending is None:
                st.finish = st.finish or "length"
            else:
                req.feed = int(req.pending)
                ev = eng.accept(st, req.feed, now, cache, req.config, req.max_new)
                req.pending = None
                if ev is not None:
                    with self._lock:
                        self.generated += 1
                    ev.extra["batcher"] = self._extra(req)
                    req.out.put(ev)
            if st.finish is None:
                keep.append(pos)
            else:
                if st.finish != "cancelled":
                    done = eng.finish(st, cache, st.finish, {"batcher": self._extra(req)})
                    req.out.put(done)
                req.out.put(_END)
        if len(keep) != len(self._active):
            with self._lock:
                self._active = [self._active[p] for p in keep]
            if not self._active:
                self._cache = None  # drop the padding history with the last row
            else:
                assert cache is not None
                cache.select(keep)  # PlainCache.select also drops the padding columns no kept row uses

    def _decode_step(self) -> None:
        eng = self.engine
        assert self._cache is not None
        step = np.asarray([[r.feed] for r in self._active], dtype=np.int64)
        logits = eng.forward(step, self._cache, phase="decode")
        for pos, req in enumerate(self._active):
            st = req.state
            req.pending = sample(logits[pos, -1], req.config, st.rng, st.seen)
        with self._lock:
            self.steps += 1
