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


class HalfCache(PlainCache):
    """A :class:`PlainCache` (packed GQA layout) in float16 whatever the model's own float type."""

    tier = "fp16"
    """:meth:`stats` counts two bytes per element under this tier."""

    def __init__(self, info: "ModelInfo", batch: int, *, capacity: int | None = None) -> None:
        super().__init__(info, batch, layout="packed", capacity=capacity, dtype=np.float16)


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
