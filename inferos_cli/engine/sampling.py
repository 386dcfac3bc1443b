"""Next-token selection from one row of logits: greedy, temperature, top-k, top-p, repetition penalty.

Work is on the last position's logits only (``[vocab]`` per row); greedy is a plain ``argmax``. Each
sequence has its own :class:`numpy.random.Generator` so a seed reproduces a run exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np


@dataclass
class GenerationConfig:
    """How to generate: length, sampling, stops, prefill chunking."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    prefill_chunk: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        """True when the choice is deterministic argmax."""
        return self.temperature <= 0.0 or self.top_k == 1


def apply_repetition_penalty(logits: np.ndarray, previous: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty (as in transformers): divide positive, multiply negative logits of seen ids."""
    if penalty == 1.0:
        return logits
    ids = np.fromiter(previous if isinstance(previous, (set, frozenset)) else set(int(i) for i in previous),
                      dtype=np.int64)
    if ids.size == 0:
        return logits
    out = logits.copy()
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def sample(
    logits: np.ndarray,
    config: GenerationConfig,
    rng: np.random.Generator | None = None,
    previous: Iterable[int] = (),
) -> int:
    """Pick the next id from ``logits`` (``[vocab]`` float) under ``config``."""
    if config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, previous, config.repetition_penalty)
    if config.temperature <= 0.0 or config.top_k == 1:  # config.greedy, inlined: this runs per token
        return int(np.asarray(logits).argmax())
    rng = rng if rng is not None else np.random.default_rng(config.seed)
    scaled = logits.astype(np.float64) / float(config.temperature)
    if config.top_k and config.top_k > 0 and config.top_k < scaled.shape[-1]:
        idx = np.argpartition(scaled, -config.top_k)[-config.top_k:]
    else:
        idx = np.arange(scaled.shape[-1])
    vals = scaled[idx]
    order = np.argsort(vals)[::-1]
    idx, vals = idx[order], vals[order]
    probs = np.exp(vals - vals[0])
    probs /= probs.sum()
    if config.top_p < 1.0:
        cum = np.cumsum(probs)
        keep = int(np.searchsorted(cum, config.top_p) + 1)  # smallest prefix with mass >= top_p
        idx, probs = idx[:keep], probs[:keep]
        probs = probs / probs.sum()
    return int(idx[rng.choice(len(idx), p=probs)])
