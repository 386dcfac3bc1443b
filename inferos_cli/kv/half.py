"""The fp16 KV cache: a packed plain cache whose buffers hold float16 keys and values, for the graph of
:mod:`inferos_cli.graphs.half_kv` (``GroupQueryAttention`` in float16 between casts).

``kv.quant = fp16`` keeps the baseline's structure (one packed buffer per layer, past and present shared
in place, no tiers, no eviction) at half its bytes, with nothing calibrated. Graphs that cannot take it
(no float32 GroupQueryAttention, or no float16 GQA kernel in this onnxruntime) run the plain baseline
cache with a note (:func:`inferos_cli.kv.layouts.kv_layout`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inferos_cli.graphs.half_kv import half_graph
from inferos_cli.kv.base import KVLayout
from inferos_cli.kv.plain import PlainCache, layout_line

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo


SCORES_BYTES = 256 * 2**20
"""What one default prefill chunk's attention scores (float32 ``[batch, heads, chunk, columns]``) may take."""


class HalfCache(PlainCache):
    """A :class:`PlainCache` (packed GQA layout) in float16 whatever the model's own float type."""

    tier = "fp16"
    """:meth:`stats` counts two bytes per element under this tier."""

    def __init__(self, info: "ModelInfo", batch: int, *, capacity: int | None = None) -> None:
        super().__init__(info, batch, layout="packed", capacity=capacity, dtype=np.float16)

    @property
    def prefill_chunk(self) -> int | None:  # type: ignore[override]
        """Default prefill chunk: the longest (a multiple of 64) whose float32 attention scores over the
        buffer's columns stay under :data:`SCORES_BYTES`; the engine's own default still caps it.
        onnxruntime's float16 GroupQueryAttention on the CPU holds them for the whole chunk: with 32 heads
        and 4,096 columns, 2,048-token chunks raised the prefill's peak by 1 GiB over the float32 cache's
        (``benchmarks/README.md``), so its RSS did not follow its halved KV bytes; 512-token chunks do."""
        columns = self.capacity or self.past_len
        per_token = 4 * self.info.num_heads * max(1, columns) * max(1, self.batch)
        return int(max(64, SCORES_BYTES // per_token) // 64 * 64)


class HalfLayout(KVLayout):
    """The fp16 KV graph fed by a :class:`HalfCache` (shared past/present buffers when preallocated;
    ``shared_buffer=False`` lets the session allocate the presents instead)."""

    def __init__(self, info: "ModelInfo", *, shared_buffer: bool = True) -> None:
        self.info = info
        self.shared_buffer = shared_buffer
        self.path, self.note = half_graph(info)

    @property
    def onnx_path(self) -> Path:
        """The fp16 KV graph."""
        return self.path

    def new_cache(self, batch: int, capacity: int | None = None) -> HalfCache:
        """An empty float16 cache; ``capacity`` preallocates the shared buffers."""
        return HalfCache(self.info, batch, capacity=capacity if self.shared_buffer else None)

    def describe(self) -> str:
        """One line for tables."""
        text = "fp16: float16 past/present, GroupQueryAttention in float16 (weights and other ops float32)"
        if self.shared_buffer:
            text += ", shared past/present buffer"
        return layout_line(text, self.info, self.note)
