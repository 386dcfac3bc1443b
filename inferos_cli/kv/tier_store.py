"""Storage of one quantized tier of the segmented KV cache (:mod:`inferos_cli.kv.segmented`): per kind and
layer the codes, scales and zero points of exactly the tier's columns, plus per-column mask, key norm and
position (kept apart from the cache so that module stays one concern: what goes where, and when)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Tier:
    """One quantized tier. Per kind and layer, codes ``[B, H, n, D or D/2]`` and scales / zero points
    ``[B, H, n, G]`` holding exactly the tier's ``n`` columns (contiguous, so a step feeds them without a
    copy); per-column metadata ``[n, B]``. ``cap`` is 0 until the tier first held columns."""

    name: str
    bits: dict[str, int]
    n: int = 0
    cap: int = 0
    codes: dict[str, list[np.ndarray]] = field(default_factory=dict)
    scale: dict[str, list[np.ndarray]] = field(default_factory=dict)
    zero: dict[str, list[np.ndarray]] = field(default_factory=dict)
    mask: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    norm: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    pos: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))

    def arrays(self) -> list[tuple[dict[str, list[np.ndarray]], str, int]]:
        """``(store, kind, layer)`` of every per-layer array."""
        return [(store, kind, layer) for store in (self.codes, self.scale, self.zero) for kind in store
                for layer in range(len(store[kind]))]

    def used_bytes(self) -> int:
        return int(sum(store[kind][layer].nbytes for store, kind, layer in self.arrays()))

    def bytes_per_column(self) -> int:
        if self.cap == 0:
            return 0
        total = 0
        for store, kind, layer in self.arrays():
            b, h, _, width = store[kind][layer].shape
            total += b * h * width * store[kind][layer].itemsize
        return int(total)
