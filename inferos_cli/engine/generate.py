"""Generation: the token loop, and the one wrapper that times it and turns it into events.

- :func:`token_steps` is the loop (like mlx-lm's ``generate_step``): from the prefill logits it samples
  each sequence's first token, then decodes one token for every sequence still running per step,
  retiring finished rows from the cache (``cache.select``) between steps. It yields tokens and knows
  nothing about time or text.
- :func:`stream_events` is the one place that measures (like ``stream_generate``): it stamps each step,
  and turns the tokens into :class:`~inferos_cli.events.Event` (``prefill``, ``token``, ``done``) with
  :func:`prefill_event`, :func:`accept` and :func:`finish`, which the continuous batcher uses too
  (through :class:`~inferos_cli.engine.engine.Engine`'s public methods).
- :func:`generate` (one sequence, optionally continuing a cache) and :func:`generate_batch` (several
  sequences in the batch dimension) prefill and hand over to those two.

Context: generation that reaches the context end stops with ``finish_reason="length"``.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence as Seq

import numpy as np

from inferos_cli.engine.sampling import GenerationConfig, sample
from inferos_cli.engine.stops import StopMatcher
from inferos_cli.errors import UsageError
from inferos_cli.events import Event
from inferos_cli.machine.rss import current_rss

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.kv.base import KVCache
    from inferos_cli.models.info import ModelInfo


class Engine(Protocol):
    """What generation needs of :class:`inferos_cli.engine.engine.Engine` (named here so this module does
    not import the engine that imports it)."""

    info: "ModelInfo"
    tokenizer: Any
    providers: dict[str, str]
    uses_gqa: bool

    def util(self) -> dict[str, float | None]: ...
    def new_cache(self, batch: int = 1, capacity: int | None = None) -> "KVCache": ...
    def new_sequence(self, prompt: list[int], config: GenerationConfig, row: int = 0) -> "Sequence": ...
    def forward(self, input_ids: np.ndarray, cache: "KVCache", **kwargs: Any) -> np.ndarray: ...
    def prefill(self, ids: np.ndarray, cache: "KVCache", chunk: int | None = None,
                new_mask: np.ndarray | None = None) -> np.ndarray: ...
    def check_context(self, n_prompt: int, past: int = 0) -> None: ...
    def settle_huge_pages(self) -> None: ...


class Sequence:
    """Book-keeping of one generated sequence: its prompt and tokens, timings, sampler state (its own
    seeded generator, the ids the repetition penalty looks at), streamed text and stop strings.
    ``row`` is its index in a batch (``Event.seq``); ``finish`` is set once it ends."""

    def __init__(self, row: int, prompt: list[int], config: GenerationConfig, stream: Any) -> None:
        self.row = row
        self.prompt = prompt
        self.generated: list[int] = []
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.ttft: float | None = None
        self.prefill_tps: float | None = None  # set with ttft by prefill_event
        self.rng = np.random.default_rng(None if config.seed is None else config.seed + row)
        self.stream = stream
        self.stops = StopMatcher(config.stop)
        self.finish: str | None = None
        self.text_parts: list[str] = []
        # ids the repetition penalty looks at (the last ``repetition_window`` of prompt + generated, or a
        # set of all of them), kept only when the penalty is on
        self.track = config.repetition_penalty != 1.0
        window = config.repetition_window
        self.seen: deque[int] | set[int] = (
            (deque(prompt[-window:], maxlen=window) if window > 0 else set(prompt)) if self.track else set())

    def remember(self, tok: int) -> None:
        """Add a generated id to the ones the repetition penalty looks at."""
        seen = self.seen
        if type(seen) is set:
            seen.add(tok)
        else:
            seen.append(tok)  # type: ignore[union-attr]

    def decode_tps(self) -> float | None:
        """(generated - 1) / (t_last - t_first); None before two tokens."""
        n = len(self.generated)
        if n < 2 or self.t_first is None or self.t_last is None or self.t_last <= self.t_first:
            return None
        return (n - 1) / (self.t_last - self.t_first)


def machine_fields(engine: "Engine", cache: "KVCache") -> dict[str, Any]:
    """The fields every event carries about the machine: KV stats, RSS, utilisation, providers."""
    return {"kv": cache.stats(), "rss_bytes": current_rss(), "util": engine.util(), "provider": engine.providers}


def prefill_event(engine: "Engine", seq: Sequence, cache: "KVCache", t0: float, now: float) -> Event:
    """The ``prefill`` event of ``seq``: its prompt was handed over at ``t0``, its first token is ready at ``now``."""
    seq.ttft = now - t0
    n = len(seq.prompt)
    seq.prefill_tps = (n / seq.ttft) if seq.ttft > 0 else None
    return Event(kind="prefill", t=now, seq=seq.row, prompt_tokens=n, ttft_s=seq.ttft,
                 prefill_tps=seq.prefill_tps, **machine_fields(engine, cache))


def accept(engine: "Engine", seq: Sequence, tok: int, now: float, cache: "KVCache", config: GenerationConfig,
           max_new: int) -> Event | None:
    """Record a sampled token; return its ``token`` event (None for an EOS that ends the sequence) and
    set ``seq.finish`` when the sequence ends. Runs once per token: the fields are passed straight to the
    slots dataclass (no merged dicts)."""
    if not config.ignore_eos and tok in engine.tokenizer.eos_token_ids:
        seq.finish = "stop"
        return None
    generated = seq.generated
    generated.append(tok)
    if seq.track:
        seq.remember(tok)
    first = seq.t_first
    if first is None:
        first = seq.t_first = now
    seq.t_last = now
    stops = seq.stops
    text = seq.stream.push(tok)
    if stops.stops:
        text = stops.push(text)
    n = len(generated)
    if stops.hit is not None:
        seq.finish = "stop"
    elif n >= max_new:
        seq.finish = "length"
        text += stops.push(seq.stream.flush()) + stops.flush()
    seq.text_parts.append(text)
    return Event(
        kind="token", t=now, seq=seq.row, token_id=tok, text=text, prompt_tokens=len(seq.prompt),
        generated=n, ttft_s=seq.ttft,
        prefill_tps=seq.prefill_tps if seq.ttft else None,
        decode_tps=(n - 1) / (now - first) if n > 1 and now > first else None,
        kv=cache.stats(), rss_bytes=current_rss(), util=engine.util(), provider=engine.providers,
    )


def finish(engine: "Engine", seq: Sequence, cache: "KVCache", reason: str | None,
           extra: dict[str, Any] | None = None) -> Event:
    """The ``done`` event of ``seq`` (held-back text flushed unless a stop string or the length ended it);
    ``extra`` holds ``output_text``, the stop string hit, and the caller's own fields."""
    tail = ""
    if reason != "length" and seq.stops.hit is None:
        tail = seq.stops.push(seq.stream.flush()) + seq.stops.flush()
    if tail:
        seq.text_parts.append(tail)
    return Event(
        kind="done", t=time.perf_counter(), seq=seq.row, text=tail, prompt_tokens=len(seq.prompt),
        generated=len(seq.generated), ttft_s=seq.ttft,
        prefill_tps=(len(seq.prompt) / seq.ttft) if seq.ttft else None,
        decode_tps=seq.decode_tps(), finish_reason=reason or "stop",
        extra={"output_text": "".join(seq.text_parts), "stop": seq.stops.hit, **(extra or {})},
        **machine_fields(engine, cache),
    )


def token_steps(engine: "Engine", seqs: list[Sequence], cache: "KVCache", last: np.ndarray,
                config: GenerationConfig) -> Iterator[list[tuple[Sequence, int]]]:
    """The token loop. ``last``: the prefill logits ``[len(seqs), V]`` (cache row ``i`` is ``seqs[i]``).
    Yields ``(sequence, token)`` for every running sequence, first the tokens sampled from ``last``, then
    one decode step's per yield. A sequence whose ``finish`` the consumer set meanwhile retires before
    the next step; the loop ends when none runs."""
    active = list(seqs)
    toks = [sample(last[i], config, s.rng, s.seen) for i, s in enumerate(active)]
    # plain greedy: a decode step's logits are [B, 1, V], so a row's argmax is sample()'s
    plain_greedy = config.greedy and config.repetition_penalty == 1.0
    steps: dict[int, np.ndarray] = {}  # one token array per batch size, rewritten in place
    while True:
        yield list(zip(active, toks))
        if any(s.finish is not None for s in active):
            keep = [p for p, s in enumerate(active) if s.finish is None]
            if not keep:
                return
            cache.select(keep)
            active = [active[p] for p in keep]
            toks = [toks[p] for p in keep]
        n = len(active)
        step = steps.get(n)
        if step is None:
            step = steps[n] = np.empty((n, 1), dtype=np.int64)
        step[:, 0] = toks
        logits = engine.forward(step, cache, phase="decode", logits="last", reuse=True)
        if plain_greedy and logits.shape[1] == 1:
            toks = logits[:, 0].argmax(axis=-1).tolist()
        else:
            toks = [sample(logits[p, -1], config, s.rng, s.seen) for p, s in enumerate(active)]


def stream_events(engine: "Engine", seqs: list[Sequence], cache: "KVCache", last: np.ndarray,
                  config: GenerationConfig, max_new: int, t0: float, *, batch: bool = False) -> Iterator[Event]:
    """Run :func:`token_steps` and turn it into events, timed here: ``prefill`` per sequence (TTFT from
    ``t0``, when the prompt was handed over, to the first token), a ``token`` per accepted token and a
    ``done`` per sequence. ``batch``: every ``done`` carries the batch totals so far in
    ``extra["batch"]``. Backs the process's new memory with huge pages at the end."""
    rows = len(seqs)
    total = 0

    def done(seq: Sequence) -> Event:
        extra = None
        if batch:
            elapsed = time.perf_counter() - t0
            extra = {"batch": {"rows": rows, "generated_total": total, "elapsed_s": elapsed,
                               "tokens_per_s": total / elapsed if elapsed > 0 else None}}
        return finish(engine, seq, cache, seq.finish, extra)

    if max_new == 0:
        now = time.perf_counter()
        for seq in seqs:
            yield prefill_event(engine, seq, cache, t0, now)
        for seq in seqs:
            seq.finish = "length"
            yield done(seq)
        engine.settle_huge_pages()
        return
    started = False
    for pairs in token_steps(engine, seqs, cache, last, config):
        now = time.perf_counter()
        if not started:
            started = True
            for seq in seqs:
                yield prefill_event(engine, seq, cache, t0, now)
        for seq, tok in pairs:
            ev = accept(engine, seq, tok, now, cache, config, max_new)
            if ev is not None:
                total += 1
                yield ev
            if seq.finish is not None:
                yield done(seq)
    engine.settle_huge_pages()


def generate(engine: "Engine", prompt_ids: Seq[int], config: GenerationConfig | None = None, *,
             cache: "KVCache | None" = None) -> Iterator[Event]:
    """One sequence after ``prompt_ids`` (see :meth:`inferos_cli.engine.engine.Engine.generate`)."""
    config = config or GenerationConfig()
    prompt = [int(i) for i in prompt_ids]
    if not prompt:
        raise UsageError("empty prompt", "give at least one token (models with a BOS id get it automatically)")
    t0 = time.perf_counter()
    if cache is not None and cache.batch != 1:
        raise ValueError(f"generate() continues a 1-row cache, got {cache.batch} rows (use generate_batch)")
    past = int(cache.seen_tokens[0]) if cache is not None else 0
    engine.check_context(len(prompt), past)
    room = engine.info.context_length - past - len(prompt)
    max_new = max(0, min(config.max_tokens, room))
    if cache is None:
        cache = engine.new_cache(1, capacity=len(prompt) + max_new + 1)
    else:
        cache.reserve(cache.past_len + len(prompt) + max_new + 1)
    seq = engine.new_sequence(prompt, config)
    last = engine.prefill(np.asarray([prompt], dtype=np.int64), cache, config.prefill_chunk)
    yield from stream_events(engine, [seq], cache, last, config, max_new, t0)


def generate_batch(engine: "Engine", prompts: Seq[Seq[int]], config: GenerationConfig | None = None) -> Iterator[Event]:
    """Several prompts decoded together (see :meth:`inferos_cli.engine.engine.Engine.generate_batch`)."""
    config = config or GenerationConfig()
    rows = [[int(i) for i in p] for p in prompts]
    if not rows:
        return
    if any(not r for r in rows):
        raise UsageError("empty prompt in batch", "remove empty lines from the prompts file")
    t0 = time.perf_counter()
    for r in rows:
        engine.check_context(len(r))
    longest = max(len(r) for r in rows)
    max_new = max(0, min(config.max_tokens, engine.info.context_length - longest))
    seqs = [engine.new_sequence(r, config, row=i) for i, r in enumerate(rows)]
    if engine.uses_gqa:
        # GQA places keys by row length, so rows are right-padded: prefill each row alone, merge the caches.
        cache = None
        last_list = []
        for r in rows:
            part = engine.new_cache(1, capacity=longest + max_new + 1)
            last_list.append(engine.prefill(np.asarray([r], dtype=np.int64), part, config.prefill_chunk)[0])
            if cache is None:
                cache = part
            else:
                cache.merge(part)
        last = np.stack(last_list)
    else:
        cache = engine.new_cache(len(rows))
        ids = np.zeros((len(rows), longest), dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        info = engine.info
        pad = info.pad_token_id if info.pad_token_id is not None else (engine.tokenizer.eos_token_ids or [0])[0]
        for i, r in enumerate(rows):
            ids[i, :] = pad
            ids[i, longest - len(r):] = r
            mask[i, longest - len(r):] = 1
        last = engine.prefill(ids, cache, config.prefill_chunk, mask)
    assert cache is not None
    yield from stream_events(engine, seqs, cache, last, config, max_new, t0, batch=True)
