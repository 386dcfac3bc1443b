"""The segmented KV cache that feeds a KV-boundary-rewritten graph (see :mod:`inferos_cli.graphs.kv_segments`).

Segments, in feed order ``[int8 tier | int4 tier | fp]`` (attention does not depend on the order of
cached keys, as long as keys and values share it and the mask is given in that order):

- **fp**: ``sinks`` first tokens + a ring buffer of the ``window`` most recent tokens, in the model's
  float type. No shifting: a token that leaves the window frees its slot for the next one.
- **quantized tiers**: tokens leaving the window are quantized *once* into the tier chosen by
  :mod:`inferos_cli.kv.tiers` and appended; int4 tokens are packed two per byte.

Memory follows the KV bytes because nothing holds every layer's floats at once: storage is per layer
and holds exactly each tier's columns (``[batch, heads, n, dim]``, fed as is; an append builds
``[old | new]`` one layer at a time); new columns are quantized one layer at a time; a prefill chunk's
float columns land in host buffers (:meth:`SegmentedCache.output_buffers`), not in onnxruntime's arena,
and the default chunk keeps them under :data:`CHUNK_FLOAT_BYTES`.

Demotion int8 -> int4 (under pressure/budget) re-quantizes the dequantized int8 values once: error <=
s8/2 + s4/2 (the int8 step is ~1/17 of the int4 step, so ~1.06x the direct int4 bound). Eviction removes
quantized columns (never sinks or the window); positions stay true because the engine takes them from
:attr:`seen_tokens`, not from the mask.

Per-step host work is O(new tokens) apart from the copy an append makes of the tiers it extends:
single-tier plans do no scoring at all, and the importance normaliser (min/max of the resident key
norms) is kept incrementally, rescanned only after columns were removed (demotion, eviction) or rows
changed (select, merge).

The rewrite gives ``GroupQueryAttention`` graphs ``position_ids`` and an attention bias (see
:func:`inferos_cli.graphs.kv_gqa.gqa_positions_and_mask`), so eviction and merging rows of different
lengths work for them too. Only if a graph cannot take positions is nothing evicted (a warning, once)
and rows merge only at equal lengths. Sliding-window layers keep the whole context here; since the feed
order is not token order, the graph windows them by position, from each past column's true position
(``past_key_positions``, fed with the segments when the rewrite takes it; :mod:`inferos_cli.graphs.kv_gqa`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from inferos_cli.errors import InferosError
from inferos_cli.events import KVStats
from inferos_cli.graphs.kv_gqa import KEY_POSITIONS
from inferos_cli.graphs.kv_segments import new_output_name, segment_name
from inferos_cli.graphs.rotation import hadamard
from inferos_cli.kv import tiers as pol
from inferos_cli.kv.base import KVCache
from inferos_cli.kv.quant import QTensor, dequantize, quantize
from inferos_cli.kv.tier_store import Tier

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo

log = logging.getLogger(__name__)
KINDS = ("key", "value")
BIND_MIN_COLUMNS = 16  # steps with at least this many new columns write them into host buffers
CHUNK_FLOAT_BYTES = 256 * 2**20  # a default prefill chunk's new columns (every layer, in float) stay under this
_NP = {"float32": np.float32, "float16": np.float16}


@dataclass
class CacheConfig:
    """Everything the segmented cache needs from the policy and the rewrite."""

    plan: pol.TierPlan
    sinks: int = 4
    window: int = 128
    group: int = 32
    rotation: str = "none"  # qk | host | none (see kv.rewrite)
    l1_int8: float = 0.8
    l3_evict: float = 0.4
    budget_bytes: int | None = None
    max_tokens: int | None = None
    pressure: Callable[[], float] | None = None
    track: bool = False  # keep the positions quantized (tests: each token quantized exactly once)
    positions: bool = True  # the graph takes position_ids: masked columns anywhere, eviction allowed
    key_positions: bool = False  # the graph takes past_key_positions (sliding windows applied by position)


class SegmentedCache(KVCache):
    """The KV cache of rewritten graphs: sinks + fp window ring + int8/int4 tiers."""

    def __init__(self, info: "ModelInfo", batch: int, config: CacheConfig) -> None:
        self.info = info
        self.cfg = config
        self.L, self.H, self.D = info.num_layers, info.num_kv_heads, info.head_dim
        self.G = self.D // config.group
        self.dtype = _NP.get(info.kv_dtype, np.float32)
        self.packed = not config.positions  # rows must be contiguous runs (plain GQA semantics)
        self.can_evict = config.positions
        self._batch = int(batch)
        self.cap_fp = config.sinks + config.window
        b = self._batch
        self.fp = {k: np.zeros((self.L, b, self.H, self.cap_fp, self.D), dtype=self.dtype) for k in KINDS}
        self.fp_n = 0
        self.fp_mask = np.zeros((self.cap_fp, b), dtype=np.int64)
        self.fp_norm = np.full((self.cap_fp, b), np.nan, dtype=np.float32)
        self.fp_pos = np.full((self.cap_fp, b), -1, dtype=np.int64)
        self.fp_age = np.zeros(self.cap_fp, dtype=np.int64)
        self._clock = 0
        self._plan: list | None = None  # feeds() plan, built on first use
        self._fed: dict[str, np.ndarray] | None = None  # the last feeds, kept alive until append()
        self._range: np.ndarray | None = np.array([np.inf, -np.inf], dtype=np.float32)  # None: recompute
        self.tiers = [Tier(name, {"key": config.plan.key_bits[name], "value": config.plan.value_bits[name]})
                      for name in config.plan.tiers]
        for tier in self.tiers:
            self._empty(tier)
        self.seen_tokens = np.zeros(b, dtype=np.int64)
        self.evicted = 0
        self.demoted = 0
        self.quantized_positions: list[np.ndarray] = []
        self.notes: list[str] = []
        self._h = hadamard(self.D) if config.rotation == "host" else None
        self._names = {(l, k): {s: segment_name(info, l, k, s) for s in ("q8", "q8s", "q8z", "q4", "q4s", "q4z", "fp")}
                       for l in range(self.L) for k in KINDS}
        self._out = {(l, k): new_output_name(l, k) for l in range(self.L) for k in KINDS}

    # ----- storage helpers -----------------------------------------------------------------------------
    def _dim(self, bits: int) -> int:
        return self.D if bits == 8 else self.D // 2

    def _empty(self, tier: Tier) -> None:
        """Give ``tier`` zero columns."""
        b = self._batch
        for kind in KINDS:
            dim = self._dim(tier.bits[kind])
            tier.codes[kind] = [np.empty((b, self.H, 0, dim), dtype=np.uint8) for _ in range(self.L)]
            tier.scale[kind] = [np.empty((b, self.H, 0, self.G), dtype=np.float16) for _ in range(self.L)]
            tier.zero[kind] = [np.empty((b, self.H, 0, self.G), dtype=np.uint8) for _ in range(self.L)]
        tier.mask = np.zeros((0, b), dtype=np.int64)
        tier.norm = np.zeros((0, b), dtype=np.float32)
        tier.pos = np.zeros((0, b), dtype=np.int64)

    # ----- protocol ------------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        """Rows in the cache."""
        return self._batch

    @property
    def prefill_chunk(self) -> int:  # type: ignore[override]
        """Default prefill chunk: 512 tokens, fewer (a multiple of 64) where a chunk's float columns of every
        layer would pass :data:`CHUNK_FLOAT_BYTES` (7B-shaped fp32, 1 MiB a token: 256 tokens)."""
        per_token = 2 * self.L * self.H * self.D * np.dtype(self.dtype).itemsize * max(1, self._batch)
        return int(max(64, min(512, CHUNK_FLOAT_BYTES // per_token)) // 64 * 64)

    @property
    def past_len(self) -> int:
        """Columns the next run sees: quantized tiers + filled fp slots."""
        return sum(t.n for t in self.tiers) + self.fp_n

    def _order(self, kind: str) -> list[Tier]:
        """Tiers in feed order for ``kind``: the 8-bit segment first, then the 4-bit one."""
        return sorted(self.tiers, key=lambda t: 0 if t.bits[kind] == 8 else 1)

    def feeds(self) -> dict[str, np.ndarray]:
        """Segment inputs of every layer, head-major: each tier's arrays as they are (no copy), as the 2-D
        codes / 1-D scales the rewritten graph takes; the fp window (a view once the ring is full). The
        (name, store, layer) plan is built once per cache."""
        if getattr(self, "_plan", None) is None:
            plan = []
            for kind in KINDS:
                by_bits = {t.bits[kind]: t for t in self.tiers}
                for layer in range(self.L):
                    names = self._names[(layer, kind)]
                    for bits, tier in by_bits.items():
                        seg = "q8" if bits == 8 else "q4"
                        plan.append((tier, kind, layer, names[seg], names[seg + "s"], names[seg + "z"],
                                     self.cfg.group if bits == 8 else self.D // 2))
            self._plan = plan
            self._fp_names = [(kind, layer, self._names[(layer, kind)]["fp"]) for kind in KINDS
                              for layer in range(self.L)]
        out: dict[str, np.ndarray] = {}
        for tier, kind, layer, c_name, s_name, z_name, width in self._plan:
            out[c_name] = tier.codes[kind][layer].reshape(-1, width)
            out[s_name] = tier.scale[kind][layer].reshape(-1)
            out[z_name] = tier.zero[kind][layer].reshape(-1)
        fp_n = self.fp_n
        for kind, layer, name in self._fp_names:  # a view once the ring is full; contiguous (bindable) always
            out[name] = np.ascontiguousarray(self.fp[kind][layer, :, :, :fp_n])
        if self.cfg.key_positions:  # sliding-window layers: the true position of every past column
            out[KEY_POSITIONS] = self._feed_order("pos")
        self._fed = out  # an IOBinding holds only pointers: the copies must live until append()
        return out

    def output_buffers(self, n_new: int) -> dict[str, np.ndarray] | None:
        """Host arrays a long step's new columns (``kvnew.*``, ``[B, H, T, D]``) are written into, so they are
        not kept in onnxruntime's arena (which holds its peak) nor copied out of it; None for short steps."""
        if n_new < BIND_MIN_COLUMNS:
            return None
        shape = (self._batch, self.H, int(n_new), self.D)
        return {self._out[(layer, kind)]: np.empty(shape, dtype=self.dtype)
                for layer in range(self.L) for kind in KINDS}

    def past_mask(self) -> np.ndarray:
        """int64 ``[batch, past_len]`` in feed order."""
        return self._feed_order("mask")

    def _feed_order(self, what: str) -> np.ndarray:
        """Per-column ``mask`` or ``pos`` (int64 ``[batch, past_len]``) in feed order."""
        parts = [getattr(t, what)[: t.n] for t in self._order("key")] + [getattr(self, "fp_" + what)[: self.fp_n]]
        return np.ascontiguousarray(np.concatenate(parts, axis=0).T)

    def append(self, outputs: dict[str, np.ndarray], n_new: int, new_mask: np.ndarray) -> None:
        """Take this step's new columns (``kvnew.*`` outputs ``[B, H, T, D]``), one layer at a time: no
        copy of every layer's columns at once (a long prefill chunk's float columns of all layers are as
        large as the whole cache in fp32), only one layer's float temporaries while quantizing."""
        self._fed = None  # the run that read the last feeds is over
        t = int(n_new)
        new_mask = np.asarray(new_mask, dtype=np.int64).reshape(self._batch, t)
        new = {kind: [outputs[self._out[(l, kind)]] for l in range(self.L)] for kind in KINDS}
        # mean key norm over layers and heads -> [T, B] (per-layer norms [L, B, H, T] are small)
        per_layer = np.stack([np.sqrt(np.square(k, dtype=np.float32).sum(-1)) for k in new["key"]])
        norms = per_layer.mean(axis=(0, 2)).T
        mask_tb = new_mask.T
        norms = np.where(mask_tb > 0, norms, np.nan).astype(np.float32)
        pos = (self.seen_tokens[:, None] + np.cumsum(new_mask, axis=1) - 1).T
        pos = np.where(mask_tb > 0, pos, -1)
        self.seen_tokens = self.seen_tokens + new_mask.sum(axis=1)

        j = 0
        sinks, window = self.cfg.sinks, self.cfg.window
        if self.fp_n < sinks:  # sinks are the first columns, kept forever
            k = min(sinks - self.fp_n, t)
            self._put_fp(list(range(self.fp_n, self.fp_n + k)), new, slice(0, k), mask_tb[:k], norms[:k], pos[:k])
            self.fp_n += k
            j = k
        rest = t - j
        if rest <= 0:
            self._enforce()
            return
        w_n = self.fp_n - sinks
        overflow = max(0, w_n + rest - window)
        from_window = min(overflow, w_n)
        from_new = overflow - from_window
        win_slots = np.arange(sinks, self.fp_n)
        old = win_slots[np.argsort(self.fp_age[sinks: self.fp_n], kind="stable")[:from_window]]
        if overflow:
            cols = slice(j, j + from_new)

            def leaving(layer: int, kind: str) -> np.ndarray:
                """Layer ``layer``'s columns leaving the window: the oldest ring slots, then new ones."""
                fresh = new[kind][layer][:, :, cols]
                if not len(old):
                    return fresh
                return np.concatenate([self.fp[kind][layer][:, :, old], fresh], axis=2)

            self._quantize_into_tiers(
                leaving,
                np.concatenate([self.fp_mask[old], mask_tb[j: j + from_new]]),
                np.concatenate([self.fp_norm[old], norms[j: j + from_new]]),
                np.concatenate([self.fp_pos[old], pos[j: j + from_new]]),
            )
        start = j + from_new
        n_place = t - start
        fresh = n_place - from_window
        slots = list(old) + list(range(self.fp_n, self.fp_n + fresh))
        self._put_fp(slots, new, slice(start, t), mask_tb[start:], norms[start:], pos[start:])
        self.fp_n += fresh
        self._enforce()

    def _put_fp(self, slots: list[int], new: dict[str, list[np.ndarray]], cols: slice, mask: np.ndarray,
                norms: np.ndarray, pos: np.ndarray) -> None:
        if not slots:
            return
        idx = np.asarray(slots, dtype=np.int64)
        for kind in KINDS:
            for layer, arr in enumerate(new[kind]):
                self.fp[kind][layer][:, :, idx] = arr[:, :, cols]
        self.fp_mask[idx] = mask
        self.fp_norm[idx] = norms
        self.fp_pos[idx] = pos
        self.fp_age[idx] = self._clock + np.arange(len(idx))
        self._widen(norms)
        self._clock += len(idx)

    def _all_norms(self) -> np.ndarray:
        parts = [t.norm[: t.n].ravel() for t in self.tiers] + [self.fp_norm[: self.fp_n].ravel()]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _widen(self, norms: np.ndarray) -> None:
        """Extend the cached min/max of the resident norms by newly stored ``norms`` (O(new tokens))."""
        if self._range is None:
            return
        fin = np.asarray(norms, dtype=np.float32)
        fin = fin[np.isfinite(fin)]
        if fin.size:
            self._range = np.array([min(self._range[0], fin.min()), max(self._range[1], fin.max())], np.float32)

    def _norm_range(self) -> np.ndarray:
        """``[min, max]`` of the finite norms of every resident column (what :func:`policy.importance`
        normalises by), kept incrementally; recomputed only after columns were removed or rows changed."""
        if self._range is None:
            fin = self._all_norms()
            fin = fin[np.isfinite(fin)]
            self._range = (np.array([fin.min(), fin.max()], np.float32) if fin.size
                           else np.array([np.inf, -np.inf], np.float32))
        return self._range

    def _column_scores(self, norms: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        """One score per column (``norms`` ``[m, B]``): the max over the column's real rows."""
        ref = self._norm_range() if extra is None else np.concatenate([self._norm_range(), extra.ravel()])
        s = pol.importance(norms, ref)
        s = np.where(np.isfinite(norms), s, -1.0)
        col = s.max(axis=1) if s.size else np.zeros(norms.shape[0], np.float32)
        return np.where(col < 0, 1.0, col).astype(np.float32)

    def _quantize_into_tiers(self, cols: Callable[[int, str], np.ndarray], mask: np.ndarray, norms: np.ndarray,
                             pos: np.ndarray) -> None:
        """Quantize the columns ``cols(layer, kind)`` (``[B, H, m, D]``) once and append them to their tiers,
        one layer at a time (only that layer's float temporaries are alive)."""
        live = mask.any(axis=1)
        keep = None
        if not live.all():  # padding in every row (e.g. a merged row's empty ring slots): nothing to keep
            keep = np.nonzero(live)[0]
            mask, norms, pos = mask[keep], norms[keep], pos[keep]
        m = mask.shape[0]
        if m == 0:
            return
        if len(self.tiers) == 1:  # one tier: nothing to decide, no scoring
            tier_of = np.zeros(m, dtype=np.int64)
        else:
            scores = self._column_scores(norms, norms)
            tier_of = pol.assign_tier(self.cfg.plan, scores, self.cfg.l1_int8, self._pressure())
        if self.cfg.track:
            self.quantized_positions.append(pos[:, 0].copy())
        for ti, tier in enumerate(self.tiers):
            sel = np.nonzero(tier_of == ti)[0]
            if sel.size == 0:
                continue
            pick = sel if keep is None else keep[sel]
            every = keep is None and sel.size == m

            def part(layer: int, kind: str, tier: Tier = tier, pick: np.ndarray = pick, every: bool = every) -> QTensor:
                x = cols(layer, kind)
                x = x if every else x[:, :, pick]
                if kind == "key" and self._h is not None:
                    x = x @ self._h
                return quantize(x, tier.bits[kind], self.cfg.group)

            self._append_tier(tier, part, mask[sel], norms[sel], pos[sel])

    def _append_tier(self, tier: Tier, part: Callable[[int, str], QTensor], mask: np.ndarray, norms: np.ndarray,
                     pos: np.ndarray) -> None:
        """Append ``mask.shape[0]`` columns to ``tier``; ``part(layer, kind)`` quantizes one layer's. Each
        layer's arrays are replaced by ``[old | new]`` in turn: one layer's copy is alive at a time."""
        k = mask.shape[0]
        for layer in range(self.L):
            for kind in KINDS:
                q = part(layer, kind)
                for store, new in ((tier.codes, q.codes), (tier.scale, q.scale), (tier.zero, q.zero)):
                    old = store[kind][layer]
                    store[kind][layer] = np.concatenate((old, new.astype(old.dtype, copy=False)), axis=2)
        tier.mask = np.concatenate((tier.mask, mask))
        tier.norm = np.concatenate((tier.norm, np.asarray(norms, dtype=np.float32)))
        tier.pos = np.concatenate((tier.pos, pos))
        tier.n += k
        tier.cap = max(tier.cap, tier.n)
        self._widen(norms)

    def _remove(self, tier: Tier, drop: np.ndarray) -> None:
        """Compact ``tier`` without the columns flagged in ``drop`` (bool ``[n]``)."""
        keep = np.nonzero(~drop)[0]
        self._range = None
        for store, kind, layer in tier.arrays():  # one layer's copy of the kept columns at a time
            store[kind][layer] = store[kind][layer][:, :, keep]
        tier.mask, tier.norm, tier.pos = tier.mask[keep], tier.norm[keep], tier.pos[keep]
        tier.n = keep.size

    # ----- pressure, budget, eviction -------------------------------------------------------------------
    def _pressure(self) -> float:
        if self.cfg.pressure is None:
            return 0.0
        try:
            return float(self.cfg.pressure())
        except Exception:  # a broken monitor must not break decoding
            return 0.0

    def total_bytes(self) -> int:
        """Resident bytes of every segment (used columns)."""
        fp = sum(self.fp[k][:, :, :, : self.fp_n].nbytes for k in KINDS)
        return int(fp + sum(t.used_bytes() for t in self.tiers))

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            log.warning(text)

    def demote(self, count: int | None = None) -> int:
        """Move up to ``count`` (default all) int8-tier tokens to the int4 tier, lowest score first."""
        if len(self.tiers) < 2:
            return 0
        hi, lo = self.tiers[0], self.tiers[-1]
        if hi.n == 0:
            return 0
        scores = self._column_scores(hi.norm[: hi.n])
        order = np.argsort(scores, kind="stable")
        pick = order[: hi.n if count is None else min(count, hi.n)]
        sel = np.sort(pick)

        def part(layer: int, kind: str) -> QTensor:  # one layer's float temporaries at a time
            q8 = QTensor(hi.codes[kind][layer][:, :, sel], hi.scale[kind][layer][:, :, sel],
                         hi.zero[kind][layer][:, :, sel], 8, self.cfg.group)
            return quantize(dequantize(q8), lo.bits[kind], self.cfg.group)

        self._append_tier(lo, part, hi.mask[sel].copy(), hi.norm[sel].copy(), hi.pos[sel].copy())
        drop = np.zeros(hi.n, dtype=bool)
        drop[sel] = True
        self._remove(hi, drop)
        self.demoted += sel.size
        return int(sel.size)

    def evict(self, count: int | None = None) -> int:
        """Evict up to ``count`` (default all) candidates below ``L3_evict``, lowest score first; only
        quantized tokens (never sinks or the window) and only on graphs with ``position_ids``."""
        if not self.can_evict:
            self._note("eviction skipped: this graph takes no position_ids; "
                       "KV memory is reduced by quantization only")
            return 0
        cands = []
        ref = self._norm_range()
        for ti, tier in enumerate(self.tiers):
            if tier.n == 0:
                continue
            s = pol.importance(tier.norm[: tier.n], ref)
            s = np.where(np.isfinite(tier.norm[: tier.n]), s, -1.0).max(axis=1)
            s = np.where(s < 0, 1.0, s)
            for c in np.nonzero(pol.eviction_candidates(s, self.cfg.l3_evict))[0]:
                cands.append((float(s[c]), ti, int(c)))
        cands.sort()
        if count is not None:
            cands = cands[:count]
        removed = 0
        for ti, tier in enumerate(self.tiers):
            cols = [c for _, t, c in cands if t == ti]
            if not cols:
                continue
            drop = np.zeros(tier.n, dtype=bool)
            drop[cols] = True
            removed += int(tier.mask[: tier.n][drop].sum())
            self._remove(tier, drop)
        self.evicted += removed
        return removed

    def _valid_tokens(self) -> int:
        per_row = sum(t.mask[: t.n].sum(axis=0) for t in self.tiers) + self.fp_mask[: self.fp_n].sum(axis=0)
        return int(np.max(per_row)) if np.size(per_row) else 0

    def _enforce(self) -> None:
        p = self._pressure()
        if p >= pol.DEMOTE_AT:
            self.demote()
        if p >= pol.EVICT_AT:
            self.evict()
        budget, max_tokens = self.cfg.budget_bytes, self.cfg.max_tokens
        if max_tokens is not None and self._valid_tokens() > max_tokens:
            self.evict(self._valid_tokens() - max_tokens)
        if budget is not None and self.total_bytes() > budget:
            if len(self.tiers) > 1 and self.tiers[0].n:
                hi, lo = self.tiers[0], self.tiers[-1]
                saving = max(1, hi.bytes_per_column() - max(lo.bytes_per_column(), 1))
                need = -(-(self.total_bytes() - budget) // saving)
                self.demote(int(need))
            while self.total_bytes() > budget:
                per = max((t.bytes_per_column() for t in self.tiers if t.n), default=0)
                if per == 0:
                    break
                if self.evict(max(1, -(-(self.total_bytes() - budget) // per))) == 0:
                    break
            if self.total_bytes() > budget:
                self._note(f"KV budget {budget} B not met: sinks, window and tokens above L3_evict are kept")

    # ----- rows ------------------------------------------------------------------------------------------
    def select(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in the given order)."""
        idx = np.asarray(list(rows), dtype=np.int64)
        for kind in KINDS:
            self.fp[kind] = np.ascontiguousarray(self.fp[kind][:, idx])
        for t in self.tiers:
            for store, kind, layer in t.arrays():
                store[kind][layer] = store[kind][layer][idx]
        for t in self.tiers:
            t.mask, t.norm, t.pos = t.mask[:, idx], t.norm[:, idx], t.pos[:, idx]
        self.fp_mask, self.fp_norm, self.fp_pos = self.fp_mask[:, idx], self.fp_norm[:, idx], self.fp_pos[:, idx]
        self.seen_tokens = self.seen_tokens[idx]
        self._batch = len(idx)
        self._range = None
        self._drop_dead_columns()

    def _drop_dead_columns(self) -> None:
        """Remove quantized-tier columns no remaining row attends to (the columns of retired rows), so a
        batch that never empties (continuous batching) stays about as wide as its longest live row, as
        ``PlainCache.select`` does. Attention is unchanged (those columns are masked for every row) and
        positions come from :attr:`seen_tokens`. The fp ring (sinks + window) is bounded and kept as is."""
        if not self._batch:
            return
        for tier in self.tiers:
            if tier.n == 0:
                continue
            dead = ~tier.mask[: tier.n].any(axis=1)
            if dead.any():
                self._remove(tier, dead)

    def merge(self, other: "SegmentedCache") -> None:  # type: ignore[override]
        """Append ``other``'s rows, padding each segment of the shorter one with masked columns."""
        if not isinstance(other, SegmentedCache) or other.cfg.plan != self.cfg.plan:
            raise TypeError("can only merge a SegmentedCache with the same tier plan")
        if other.batch == 0:
            return
        if self.packed:
            same = self.fp_n == other.fp_n and all(a.n == b.n for a, b in zip(self.tiers, other.tiers))
            full = all(int(c.past_mask().min(initial=1)) == 1 for c in (self, other))
            if not (same and full):
                raise InferosError(
                    "the segmented KV cache cannot batch rows of different lengths on a GroupQueryAttention graph",
                    "use --profile baseline for batched decoding of this model, or batch 1",
                )
        b0, b1 = self._batch, other.batch

        def pad_cols(x: np.ndarray, n: int, axis: int, fill: float | int) -> np.ndarray:
            extra = n - x.shape[axis]
            if extra <= 0:
                return x
            shape = list(x.shape)
            shape[axis] = extra
            return np.concatenate([x, np.full(shape, fill, dtype=x.dtype)], axis=axis)

        n_fp = max(self.fp_n, other.fp_n)
        for kind in KINDS:
            self.fp[kind] = np.concatenate([self.fp[kind], other.fp[kind]], axis=1)
        self.fp_mask = np.concatenate([self.fp_mask, other.fp_mask], axis=1)
        self.fp_norm = np.concatenate([self.fp_norm, other.fp_norm], axis=1)
        self.fp_pos = np.concatenate([self.fp_pos, other.fp_pos], axis=1)
        self.fp_n = n_fp
        for t, u in zip(self.tiers, other.tiers):
            n = max(t.n, u.n)
            for store_t, store_u in ((t.codes, u.codes), (t.scale, u.scale), (t.zero, u.zero)):
                for kind in KINDS:
                    store_t[kind] = [np.concatenate([pad_cols(a, n, 2, 0), pad_cols(c, n, 2, 0)], axis=0)
                                     for a, c in zip(store_t[kind], store_u[kind])]
            for attr, fill in (("mask", 0), ("norm", np.nan), ("pos", -1)):
                mine, theirs = getattr(t, attr)[: t.n], getattr(u, attr)[: u.n]
                setattr(t, attr, np.concatenate([pad_cols(mine, n, 0, fill), pad_cols(theirs, n, 0, fill)], axis=1))
            t.n = t.cap = n
        self.seen_tokens = np.concatenate([self.seen_tokens, other.seen_tokens])
        self._batch = b0 + b1
        self.evicted += other.evicted
        self._range = None

    # ----- statistics ------------------------------------------------------------------------------------
    def token_bytes(self, tier: str) -> int:
        """Bytes one token of one row takes in ``tier`` (keys and values of every layer; for quantized
        tiers the codes plus each group's fp16 scale and uint8 zero point)."""
        if tier == "fp":
            return 2 * self.L * self.H * self.D * np.dtype(self.dtype).itemsize
        bits = next(t.bits for t in self.tiers if t.name == tier)
        return sum(self.L * self.H * (self._dim(bits[kind]) + self.G * 3) for kind in KINDS)

    def stats(self) -> KVStats:
        """Tokens and the bytes holding them per tier (``fp``, ``int8``, ``int4`` or ``k8v4``): tokens x
        :meth:`token_bytes`; ``reserved``: the allocated segments (the whole sinks + window ring, each
        tier's capacity, batch padding included); the fp16 reference of the same tokens."""
        tokens = {"fp": int(self.fp_mask[: self.fp_n].sum())}
        reserved = {"fp": int(sum(self.fp[k].nbytes for k in KINDS))}
        for t in self.tiers:
            tokens[t.name] = int(t.mask[: t.n].sum())
            reserved[t.name] = t.used_bytes()
        held = {name: n * self.token_bytes(name) for name, n in tokens.items()}
        per_token_fp16 = 2 * self.L * self.H * self.D * 2
        return KVStats(tokens=tokens, bytes=held, bytes_fp16=sum(tokens.values()) * per_token_fp16,
                       evicted=int(self.evicted), reserved=reserved)
