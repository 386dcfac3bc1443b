"""The KV layouts (a graph plus the cache type that feeds it) and the rule that picks one.

``kv_layout(info, policy)`` returns a :class:`~inferos_cli.kv.base.KVLayout`: :class:`PlainLayout`
(original graph, full-precision cache) when ``kv.mode = disabled``, else :class:`SegmentedLayout`
(the KV-boundary-rewritten graph of :mod:`inferos_cli.graphs.kv_segments` + the segmented, quantized cache of
:mod:`inferos_cli.kv.segmented`), or, for ``kv.quant = int8-fused`` on ``GroupQueryAttention`` graphs (and
``auto`` when the engine's plan says so), :class:`~inferos_cli.kv.fused.FusedLayout` (int8 codes read
inside the attention operator), or, for ``kv.quant = fp16`` on such graphs, :class:`~inferos_cli.kv.half.HalfLayout`
(a float16 cache read by GroupQueryAttention in float16).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferos_cli.graphs.fused import supported as fused_supported
from inferos_cli.graphs.half_kv import supported as half_supported
from inferos_cli.kv.base import KVLayout
from inferos_cli.kv.fused import FusedLayout
from inferos_cli.kv.half import HalfLayout
from inferos_cli.kv.plain import PlainCache, layout_line

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.kv.segmented import SegmentedCache
    from inferos_cli.models.info import ModelInfo
    from inferos_cli.settings import Policy


class PlainLayout(KVLayout):
    """The original ONNX graph fed by a :class:`PlainCache`."""

    def __init__(self, info: "ModelInfo", *, note: str = "", shared_buffer: bool | None = None) -> None:
        self.info = info
        self.note = note
        # GQA graphs can decode in place into preallocated past buffers (see kv/plain.py)
        self.shared_buffer = info.uses_gqa_op if shared_buffer is None else (shared_buffer and info.uses_gqa_op)

    @property
    def onnx_path(self) -> Path:
        """The original graph."""
        return Path(self.info.onnx_path)

    def new_cache(self, batch: int, capacity: int | None = None) -> PlainCache:
        """An empty plain cache; ``capacity`` preallocates shared past/present buffers (GQA graphs)."""
        cap = capacity if (self.shared_buffer and self.info.uses_gqa_op and capacity) else None
        return PlainCache(self.info, batch, capacity=cap)

    def describe(self) -> str:
        """e.g. ``plain float32`` (+ a note when a requested policy is not applied)."""
        text = f"plain {self.info.kv_dtype}"
        if self.shared_buffer:
            text += " (shared past/present buffer)"
        return layout_line(text, self.info, self.note)


class SegmentedLayout(KVLayout):
    """The KV-boundary-rewritten graph fed by a :class:`~inferos_cli.kv.segmented.SegmentedCache`."""

    def __init__(self, info: "ModelInfo", policy: "Policy", *, pressure: Any = None, note: str = "") -> None:
        from inferos_cli.kv.segmented import CacheConfig
        from inferos_cli.kv.tiers import TierPlan
        from inferos_cli.graphs.rotation import can_rotate
        from inferos_cli.graphs.kv_segments import RewriteSpec, rewritten_graph

        kv = policy.kv
        self.info = info
        self.plan = TierPlan.from_quant(kv.quant)
        # keys are rotated when asked and some tier stores 4-bit keys (int8 keys need no rotation)
        four_bit_keys = any(b == 4 for b in self.plan.key_bits.values())
        rotate = bool(kv.rotate_keys and four_bit_keys and can_rotate(info.head_dim))
        # tiny heads (stories260K: head_dim 8) get one group per head
        group = int(kv.group_size) if info.head_dim >= int(kv.group_size) else info.head_dim
        self.spec = RewriteSpec(group_size=group, rotate_keys=rotate,
                                key_bits=tuple(sorted(set(self.plan.key_bits.values()), reverse=True)),
                                value_bits=tuple(sorted(set(self.plan.value_bits.values()), reverse=True)))
        self.rewrite = rewritten_graph(info, self.spec)
        self.note = "; ".join(n for n in (note, self.rewrite.note) if n)
        level = None
        if pressure is not None:
            level = pressure.level if hasattr(pressure, "level") else pressure
        self.config = CacheConfig(
            plan=self.plan,
            sinks=int(kv.sink_tokens),
            window=int(kv.recent_window),
            group=group,
            rotation=self.rewrite.rotation,
            l1_int8=float(kv.level_thresholds.L1_int8),
            l3_evict=float(kv.level_thresholds.L3_evict),
            budget_bytes=kv.budget_bytes,
            max_tokens=kv.max_tokens,
            pressure=level,
            positions=self.rewrite.positions,
            key_positions=self.rewrite.key_positions,
        )

    @property
    def onnx_path(self) -> Path:
        """The rewritten graph (cached beside the model or in the inferos cache)."""
        return self.rewrite.path

    def new_cache(self, batch: int, capacity: int | None = None) -> "SegmentedCache":
        """An empty segmented cache (its tiers hold exactly their columns: nothing to preallocate)."""
        from inferos_cli.kv.segmented import SegmentedCache

        return SegmentedCache(self.info, batch, self.config)

    def describe(self) -> str:
        """e.g. ``int4 (keys rotated qk), group 32, window 64 + 4 sinks``."""
        c = self.config
        rot = {"qk": "keys Hadamard-rotated (q,k after RoPE)", "host": "keys Hadamard-rotated (un-rotated per step)",
               "none": "keys not rotated"}[c.rotation]
        text = f"{self.plan.name} segmented, group {c.group}, window {c.window} + {c.sinks} sinks, {rot}"
        if c.budget_bytes is not None:
            text += f", budget {c.budget_bytes} B"
        if c.max_tokens is not None:
            text += f", max {c.max_tokens} tokens"
        if not self.rewrite.positions:
            text += ", no eviction (graph takes no position_ids)"
        if any(self.info.kv_windows):
            text += ", sliding-window layers keep the whole context (bounded only in packed caches)"
        return f"{text}; {self.note}" if self.note else text


FUSED_UNSUPPORTED = ("int8-fused needs a float32 GroupQueryAttention graph (onnxruntime-genai / Lemonade folders, "
                     "inferos conversions) and onnxruntime >= 1.25: using the segmented int8 cache")


def half_unsupported(info: "ModelInfo") -> str:
    """Why ``kv.quant = fp16`` runs the plain cache on ``info`` (the note of that layout)."""
    if info.kv_dtype != "float32":
        return f"fp16: the graph's own cache is already {info.kv_dtype}: using the plain cache"
    return ("fp16 needs a float32 GroupQueryAttention graph (onnxruntime-genai / Lemonade folders, inferos "
            "conversions) and a float16 GroupQueryAttention in onnxruntime's CPU provider: using the plain "
            f"{info.kv_dtype} cache")


def kv_layout(info: "ModelInfo", policy: "Policy", *, pressure: Any = None, auto_fused: bool = False,
              shared_buffer: bool = True) -> KVLayout:
    """``kv.mode = disabled``: the original graph + :class:`PlainCache` (the baseline); ``int8-fused`` on a
    GQA graph: :class:`~inferos_cli.kv.fused.FusedLayout`; ``fp16`` on a GQA graph:
    :class:`~inferos_cli.kv.half.HalfLayout` (elsewhere the plain cache, with a note); ``auto``: the fused layout when ``auto_fused``
    (the plan's decision, :func:`inferos_cli.engine.plan.auto_fused`); otherwise the rewritten graph +
    :class:`SegmentedCache`. ``pressure``: an object with ``level() -> 0..1`` or a callable; tightens the
    segmented cache under memory pressure. ``shared_buffer=False`` (``io.enable_iobinding = false``): no
    layout preallocates shared past/present buffers, so no step binds them in place."""
    if not policy.kv.enabled:
        return PlainLayout(info, shared_buffer=shared_buffer)
    quant = policy.kv.quant
    if quant == "auto" and auto_fused:
        return FusedLayout(info, shared_buffer=shared_buffer)
    if quant == "int8-fused":
        if fused_supported(info):
            return FusedLayout(info, shared_buffer=shared_buffer)
        return SegmentedLayout(info, policy, pressure=pressure, note=FUSED_UNSUPPORTED)
    if quant == "fp16":
        if half_supported(info):
            return HalfLayout(info, shared_buffer=shared_buffer)
        return PlainLayout(info, note=half_unsupported(info), shared_buffer=shared_buffer)
    return SegmentedLayout(info, policy, pressure=pressure)
