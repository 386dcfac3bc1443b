"""The one teacher-forced loop: prefill a prefix, then feed the rest one token at a time through each
engine's public step API (:meth:`Engine.new_cache` + :meth:`Engine.forward`), so the KV cache fills and
tiers exactly as in serving. ``eval``, the auto-tuner and the eval RSS probe all score through it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-probabilities of one logits row, in float64."""
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


@dataclass
class Step:
    """One scored position: the token to predict, each engine's logits for it, and each engine's cache."""

    index: int
    target: int
    logits: list[np.ndarray]
    caches: list[Any]


def teacher_forced(engines: Sequence[Any], ids: Sequence[int], prefix: int, *,
                   capacity: int | None = None) -> Iterator[Step]:
    """Yield one :class:`Step` per position ``prefix .. len(ids)-1``; all engines advance in lockstep on
    the same tokens (so cross-engine comparisons are exact). The next token is fed after the consumer has
    read the step."""
    caches = [eng.new_cache(1, capacity=capacity) for eng in engines]
    first = np.asarray([list(ids[:prefix])], dtype=np.int64)
    last = [eng.forward(first, cache, phase="prefill")[0, -1] for eng, cache in zip(engines, caches)]
    step = np.empty((1, 1), dtype=np.int64)
    for i in range(prefix, len(ids)):
        yield Step(index=i, target=int(ids[i]), logits=last, caches=caches)
        if i + 1 < len(ids):
            step[0, 0] = ids[i]
            last = [eng.forward(step, cache, phase="decode")[0, -1] for eng, cache in zip(engines, caches)]


def perplexity(engine: Any, ids: Sequence[int], prefix: int) -> tuple[float, float | None, int | None]:
    """Perplexity of ``ids[prefix:]`` given the prefix, the decode rate of the scoring steps (tokens/s,
    None with fewer than two) and the cache's resident KV bytes at the end."""
    nll, count, cache = 0.0, 0, None
    t0 = time.perf_counter()
    for st in teacher_forced([engine], ids, prefix, capacity=len(ids) + 1):
        if count == 0:
            t0 = time.perf_counter()  # time the decode steps only, not the prefill
        nll -= float(log_softmax(st.logits[0])[st.target])
        count += 1
        cache = st.caches[0]
    elapsed = time.perf_counter() - t0
    steps = max(0, count - 1)
    tps = steps / elapsed if steps and elapsed > 0 else None
    kv = cache.stats().total_bytes if cache is not None else None
    return math.exp(nll / max(count, 1)), tps, kv
