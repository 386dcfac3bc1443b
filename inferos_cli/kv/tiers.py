"""Tier assignment, demotion and eviction for the segmented KV cache (pure numpy, no ORT).

Importance score of a cached token: the L2 norm of its key, averaged over layers and kv heads, mapped
to 0..1 over the tokens cached right now with ``score = 1 - (norm - min) / (max - min)``: a *lower* key
norm means *more* attention (sink-like tokens), so it scores higher. Rotation by an orthonormal
Hadamard matrix does not change norms, so the score is the same for rotated keys.

What the profile's ``kv.level_thresholds`` mean here (scores in 0..1):

- ``score >= L1_int8``: the token leaves the recent window into the **int8** tier;
- ``score <  L1_int8``: it goes to the **int4** tier (``L2_int4`` is the floor of the int4 band; there is
  no lower quantized tier, so tokens in ``[L3_evict, L2_int4)`` are int4 too);
- ``score <  L3_evict``: an **eviction candidate**, evicted only under memory pressure or a budget, and
  only when the model takes ``position_ids`` (otherwise a warning, once, and nothing is evicted).

Presets fix the bits instead: ``int8`` (all int8), ``int4`` (all int4), ``int4-k8v4`` (keys 8-bit,
values 4-bit); ``tiered`` uses the scores.

Pressure (``level`` 0..1, e.g. from ``runtime.pressure``) tightens in the order the guide asks for:
``>= 0.5``: every token leaving the window goes to int4 and int8 tokens are demoted to int4, lowest score
first; ``>= 0.8``: eviction candidates are evicted too. A budget (``kv.budget_bytes``,
``kv.max_tokens``) is met the same way: demote int8 (lowest score first), then evict candidates
(lowest first); sinks and the recent window are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEMOTE_AT = 0.5
EVICT_AT = 0.8


@dataclass(frozen=True)
class TierPlan:
    """Which tiers exist and how many bits each kind gets in each."""

    name: str  # preset: tiered | int8 | int4 | int4-k8v4
    tiers: tuple[str, ...]  # tier names in feed order
    key_bits: dict[str, int]
    value_bits: dict[str, int]

    @classmethod
    def from_quant(cls, quant: str) -> "TierPlan":
        """The plan for a ``kv.quant`` value."""
        if quant in ("int8", "int8-fused"):  # int8-fused falls back to this when the graph has no GQA
            return cls("int8", ("int8",), {"int8": 8}, {"int8": 8})
        if quant == "int4":
            return cls("int4", ("int4",), {"int4": 4}, {"int4": 4})
        if quant == "int4-k8v4":
            return cls("int4-k8v4", ("k8v4",), {"k8v4": 8}, {"k8v4": 4})
        if quant in ("tiered", "auto"):  # auto lands here when the fused cache does not apply
            return cls("tiered", ("int8", "int4"), {"int8": 8, "int4": 4}, {"int8": 8, "int4": 4})
        raise ValueError(f"unknown kv.quant {quant!r}")

    @property
    def lowest(self) -> str:
        """The tier with the fewest bits (where demoted tokens go)."""
        return self.tiers[-1]


def importance(norms: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Scores 0..1 for ``norms`` (mean key L2 norms), normalized by min/max of ``reference`` (default:
    ``norms`` itself); lower norm -> higher score. NaN norms (padding) score 1 (never evicted)."""
    ref = norms if reference is None else reference
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        return np.ones_like(norms, dtype=np.float32)
    lo, hi = float(ref.min()), float(ref.max())
    if hi <= lo:
        return np.ones_like(norms, dtype=np.float32)
    score = 1.0 - (norms - lo) / (hi - lo)
    return np.where(np.isfinite(score), np.clip(score, 0.0, 1.0), 1.0).astype(np.float32)


def assign_tier(plan: TierPlan, scores: np.ndarray, l1_int8: float, pressure: float = 0.0) -> np.ndarray:
    """Tier index (into ``plan.tiers``) for tokens leaving the window, from their scores."""
    if len(plan.tiers) == 1:
        return np.zeros(scores.shape, dtype=np.int64)
    if pressure >= DEMOTE_AT:
        return np.full(scores.shape, len(plan.tiers) - 1, dtype=np.int64)
    return np.where(scores >= l1_int8, 0, len(plan.tiers) - 1).astype(np.int64)


def eviction_candidates(scores: np.ndarray, l3_evict: float) -> np.ndarray:
    """Boolean mask of tokens below the eviction cut."""
    return scores < l3_evict
