"""The fused int8 KV cache: a packed plain cache whose buffers hold the int8 codes that the fused graph's
``GroupQueryAttention`` reads and writes (:mod:`inferos_cli.graphs.fused` derives and calibrates the
graph).

``kv.quant = int8-fused`` trades the segmented cache's structure (sinks and a recent window in full
precision, tiers, eviction) for speed: past and present share one preallocated buffer, so a decode step
copies nothing on the host and reads a quarter of the fp32 cache's bytes, instead of dequantizing the
whole past each step as the standard-op rewrite (:mod:`inferos_cli.graphs.kv_segments`) must. Graphs the
fused path cannot take get the segmented ``int8`` cache, with a note (:func:`inferos_cli.kv.layouts.kv_layout`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inferos_cli.graphs.fused import KEY_MARGIN, VALUE_MARGIN, fused_graph, graph_scales
from inferos_cli.kv.base import KVLayout
from inferos_cli.kv.plain import ALIGN, PlainCache, layout_line

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo


# onnxruntime's quantized-cache GQA kernel (CPU) reads each head's codes in tiles of this many bytes from
# column 0: a bounded sliding-window cache gives bit-identical results only when its window starts on such
# a tile (measured on onnxruntime 1.32: head_dim 64 / 128 / 256 need 512 / 256 / 128-token alignment)
INT8_TILE_BYTES = 32768


def window_align(info: "ModelInfo") -> int:
    """The alignment (tokens) of a compacted sliding-window buffer of int8 codes (:data:`INT8_TILE_BYTES`)."""
    return max(ALIGN, INT8_TILE_BYTES // max(1, info.head_dim))


class FusedCache(PlainCache):
    """A :class:`PlainCache` (packed GQA layout) whose buffers hold int8 codes; the graph's scales turn
    them back into keys and values inside attention."""

    tier = "int8"
    """:meth:`stats` counts one byte per element; the static scales are part of the graph, not per token."""

    def __init__(self, info: "ModelInfo", batch: int, *, capacity: int | None = None, windowed: bool = True) -> None:
        super().__init__(info, batch, layout="packed", capacity=capacity, dtype=np.int8, windowed=windowed,
                         align=window_align(info))


class FusedLayout(KVLayout):
    """The fused-int8 graph fed by a :class:`FusedCache` (shared past/present buffers when preallocated;
    ``shared_buffer=False`` lets the session allocate the presents instead)."""

    def __init__(self, info: "ModelInfo", *, shared_buffer: bool = True) -> None:
        self.info = info
        self.shared_buffer = shared_buffer
        self.path, self.note = fused_graph(info)
        self._scales: dict[str, np.ndarray] | None = None

    @property
    def onnx_path(self) -> Path:
        """The fused graph."""
        return self.path

    def new_cache(self, batch: int, capacity: int | None = None) -> FusedCache:
        """An empty int8 cache; ``capacity`` preallocates the shared buffers."""
        return FusedCache(self.info, batch, capacity=capacity if self.shared_buffer else None)

    def scales(self) -> dict[str, np.ndarray]:
        """The graph's static scales by past *and* present name (read once from the fused graph)."""
        if self._scales is None:
            self._scales = graph_scales(self.path, self.info)
        return self._scales

    def describe(self) -> str:
        """One line for tables."""
        text = (f"int8-fused: every token int8 in GroupQueryAttention (per-channel static scales, "
                f"keys x{KEY_MARGIN} of the RoPE pair bound, values x{VALUE_MARGIN})")
        if self.shared_buffer:
            text += ", shared past/present buffer"
        text += ", prefill in float"
        return layout_line(text, self.info, self.note, window_align(self.info))
