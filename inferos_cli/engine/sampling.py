"""Next-token selection from one row of logits: greedy, temperature, top-k, top-p, repetition penalty.

Work is on the last position's logits only (``[vocab]`` per row); greedy is a plain ``argmax``. Each
sequence has its own :class:`numpy.random.Generator` so a seed reproduces a run exactly.

Two sets of defaults: :class:`GenerationConfig` itself is greedy (the engine API, bench and eval must be
deterministic, as mlx-lm's ``generate_step``), while :meth:`GenerationConfig.chat` fills what a user
typing a prompt expects from Ollama: temperature 0.8, top-k 40, top-p 0.9 and a repetition penalty of
1.1 over the last 64 tokens (Ollama's ``temperature``, ``top_k``, ``top_p``, ``repeat_penalty``,
``repeat_last_n``). Greedy decoding of a small model loops on its own output within a few sentences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

CHAT_TEMPERATURE = 0.8
CHAT_TOP_K = 40
CHAT_TOP_P = 0.9
CHAT_REPETITION_PENALTY = 1.1
REPETITION_WINDOW = 64


@dataclass
class GenerationConfig:
    """How to generate: length, sampling, stops, prefill chunking. The defaults are greedy; see
    :meth:`chat` for the interactive ones. ``repetition_window``: how many of the latest tokens (prompt
    included) the repetition penalty looks at (0 = all of them)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    prefill_chunk: int | None = None
    ignore_eos: bool = False
    repetition_window: int = REPETITION_WINDOW

    @property
    def greedy(self) -> bool:
        """True when the choice is deterministic argmax."""
        return self.temperature <= 0.0 or self.top_k == 1

    @classmethod
    def chat(cls, *, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None, **rest: Any) -> "GenerationConfig":
        """A config with Ollama's chat defaults for each sampling field left None. ``temperature=0`` is
        plain greedy decoding: the penalty then stays off unless given."""
        temperature = CHAT_TEMPERATURE if temperature is None else temperature
        if repetition_penalty is None:
            repetition_penalty = CHAT_REPETITION_PENALTY if temperature > 0 else 1.0
        return cls(temperature=temperature, top_k=CHAT_TOP_K if top_k is None else top_k,
                   top_p=CHAT_TOP_P if top_p is None else top_p, repetition_penalty=repetition_penalty, **rest)


def apply_repetition_penalty(logits: np.ndarray, previous: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty (as in transformers and llama.cpp): divide the positive and multiply the
    negative logits of the ids in ``previous`` by ``penalty``, once per id however often it occurs."""
    if penalty == 1.0:
        return logits
    ids = previous if isinstance(previous, np.ndarray) else np.fromiter(previous, dtype=np.int64)
    if ids.size == 0:
        return logits
    out = logits.copy()
    vals = out[ids]  # a repeated id reads and writes the same value: penalised once
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def sample(
    logits: np.ndarray,
    config: GenerationConfig,
    rng: np.random.Generator | None = None,
    previous: Iterable[int] = (),
) -> int:
    """Pick the next id from ``logits`` (``[vocab]`` float) under ``config``: penalty on ``previous``, then
    argmax (greedy), or temperature -> top-k -> top-p -> a draw from ``rng``."""
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
