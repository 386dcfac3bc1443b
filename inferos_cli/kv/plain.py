"""The baseline KV cache: full-precision past tensors exactly as the original graph produced them.

Two layouts, chosen from the graph:

- ``concat`` (graphs without ``GroupQueryAttention``: optimum exports, inferos conversions with small heads). ``present`` = past + new columns,
  so the cache keeps the session's output arrays as the next past (no host copy) and the mask grows by
  the step's ``new_mask``. Rows may hold masked columns anywhere (left padding, merged rows).
- ``packed`` (``GroupQueryAttention`` graphs: onnxruntime-genai, inferos conversions). GQA derives each row's length from the
  attention-mask row sum and writes new keys right after the row's real past, so every row is
  right-padded: real tokens first, then padding. The mask is rebuilt from row lengths. With
  ``capacity`` set, the past tensors are preallocated to that many columns and the session writes the
  new keys into them in place (GQA's ``past_present_share_buffer``): the engine binds the same buffers
  as past inputs and present outputs, so a decode step copies nothing on the host.

Eviction and left padding cannot be expressed for ``packed`` rows (GQA places new keys by row length,
whatever positions RoPE is given).

Sliding-window layers (``packed`` caches of graphs that take ``local_attention_mask``,
:attr:`~inferos_cli.models.info.ModelInfo.kv_windows`): a layer whose queries see only the last ``window``
keys needs only each row's last ``window - 1`` tokens, so those layers get their own, short buffers with
their own row lengths (fed as ``local_attention_mask``; RoPE reads the true ``position_ids``). Preallocated,
they hold ``2 * window + align`` columns: when a step would not fit, every row first keeps its last
``window - 1`` tokens (plus up to ``align - 1`` older ones, see :data:`ALIGN`), moved to the front in place
(amortised over about ``window`` steps), and a longer prefill chunk resizes them to what it needs until the
next compaction. Exact: every query's window sees the same keys, in the same summation blocks.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from inferos_cli.events import KVStats
from inferos_cli.kv.base import KVCache

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo

Layout = Literal["concat", "packed"]
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
_INT64 = np.dtype(np.int64)
_GENERATIONS = itertools.count(1)  # process-unique ids of buffer layouts (for cached IOBindings)
# a compacted sliding-window buffer starts at a position that is a multiple of this (the default ``align``),
# so every kept key keeps its column modulo ALIGN: onnxruntime's CPU attention sums keys in fixed blocks, and
# aligned keys meet the same blocks as in a full-length cache, so logits are bit-identical (float32 and
# float16 kernels: 4 was enough on this AVX2 host, 32 leaves room for wider vectors; the int8 kernel needs
# more, kv/fused.py; figures in benchmarks/README.md)
ALIGN = 32


class PlainCache(KVCache):
    """Full-precision KV cache for ``batch`` rows of one model."""

    tier = "fp"
    """The name its tokens are counted under in :meth:`stats`."""

    def __init__(
        self,
        info: "ModelInfo",
        batch: int,
        *,
        layout: Layout | None = None,
        capacity: int | None = None,
        dtype: "np.dtype | type | None" = None,
        windowed: bool = True,
        align: int = ALIGN,
    ) -> None:
        """``windowed=False`` keeps the whole context in the sliding-window layers too; ``align``: the
        block a compacted window starts on (:data:`ALIGN`)."""
        self.info = info
        self.layout: Layout = layout or ("packed" if info.uses_gqa_op else "concat")
        if capacity is not None and self.layout != "packed":
            raise ValueError("a preallocated (shared-buffer) cache needs the packed layout of GQA graphs")
        # ``dtype`` overrides the model's float type for caches that hold codes (kv/fused.py: int8)
        self.dtype = np.dtype(dtype) if dtype is not None else _NP_DTYPES.get(info.kv_dtype, np.float32)
        self._batch = int(batch)
        self._names = [
            (info.past_key_fmt % i, info.past_value_fmt % i, info.present_key_fmt % i, info.present_value_fmt % i)
            for i in range(info.num_layers)
        ]
        self.capacity = capacity
        # sliding-window layers with bounded buffers (module docstring); one window for all of them
        local = info.windowed_layers if windowed and self.layout == "packed" else []
        self.window = max((info.kv_windows[i] for i in local), default=0)
        self.local_layers = len(local)
        self._local = frozenset(name for i in local for name in self._names[i])  # past and present names
        self._local_pasts = [name for i in local for name in self._names[i][:2]]
        self.align = int(align)
        self.local_base = 2 * self.window + self.align  # columns of a local buffer between compactions
        self.local_capacity = min(capacity, self.local_base) if capacity is not None and local else None
        self._past: dict[str, np.ndarray] = {}
        for pk, pv, _, _ in self._names:
            cols = (self.local_capacity if pk in self._local else capacity) or 0
            shape = (self._batch, info.num_kv_heads, cols, info.head_dim)
            self._past[pk] = np.zeros(shape, dtype=self.dtype)
            self._past[pv] = np.zeros(shape, dtype=self.dtype)
        self._global_key = next((n[0] for n in self._names if n[0] not in self._local), None)
        # the local layers' rows: lengths, and their mask (ones up to each length) in a buffer
        self._llens = [0] * self._batch
        self._llen = 0  # local past columns the next run sees
        self._lbuf = np.zeros((self._batch, self.local_capacity or 0), dtype=np.int64)
        self._len = 0  # logical past columns (<= capacity when preallocated)
        self._mask = np.zeros((self._batch, 0), dtype=np.int64)
        self.seen_tokens = np.zeros(self._batch, dtype=np.int64)  # true positions per row
        # changes whenever the buffers move (new arrays): lets the engine keep an IOBinding between steps
        self.generation: int | None = next(_GENERATIONS)
        self._out_cache: tuple[int | None, dict[str, np.ndarray]] | None = None

    # mask buffer and row lengths of the shared-buffer path (see _append_shared); built on first use
    _mask_buf: np.ndarray | None = None
    _row_lens: list[int] = []

    # ----- protocol -------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        """Rows in the cache."""
        return self._batch

    @property
    def past_len(self) -> int:
        """Logical past columns the next run sees."""
        return self._len

    @property
    def shares_buffers(self) -> bool:
        """True when past and present share preallocated buffers (GQA in-place decoding)."""
        return self.capacity is not None

    def feeds(self) -> dict[str, np.ndarray]:
        """Past inputs by name: ``[batch, kv_heads, past_len, head_dim]`` (or the whole buffer when shared)."""
        return self._past

    def past_mask(self) -> np.ndarray:
        """int64 ``[batch, past_len]``. For a shared-buffer cache it is a view of the cache's mask buffer
        that the next :meth:`append` may update: copy it to keep it."""
        return self._mask

    def output_buffers(self, n_new: int) -> dict[str, np.ndarray] | None:
        """Preallocated arrays the session should write ``present.*`` into, or None (it allocates).

        For a shared-buffer cache these are the past buffers themselves (grown first when ``n_new``
        more columns would not fit)."""
        if self.capacity is None:
            return None
        if self._len + n_new > self.capacity:
            self.reserve(max(self._len + n_new, 2 * self.capacity))
        self._local_room(n_new)  # no-op after local_mask(n_new)
        cached = self._out_cache
        if cached is None or cached[0] != self.generation:
            bufs = {present: self._past[past] for names in self._names for past, present in
                    ((names[0], names[2]), (names[1], names[3]))}
            cached = self._out_cache = (self.generation, bufs)
        return cached[1]

    def reserve(self, capacity: int) -> None:
        """Grow the preallocated buffers to ``capacity`` columns (O(context) copy; amortised)."""
        if self.capacity is None or capacity <= self.capacity:
            return
        for name, arr in self._past.items():
            if name in self._local:
                continue  # the window's buffers size themselves (_local_room)
            grown = np.zeros(arr.shape[:2] + (capacity,) + arr.shape[3:], dtype=arr.dtype)
            grown[:, :, : self._len] = arr[:, :, : self._len]
            self._past[name] = grown
        self.capacity = capacity
        self.generation = next(_GENERATIONS)

    def append(self, outputs: dict[str, np.ndarray], n_new: int, new_mask: np.ndarray) -> None:
        """Take the step's presents. ``new_mask`` is int ``[batch, n_new]`` (1 = real token)."""
        if type(new_mask) is not np.ndarray or new_mask.dtype is not _INT64:
            new_mask = np.asarray(new_mask, dtype=np.int64)
        if self.capacity is not None:
            self._append_shared(new_mask)
            return
        real_new = new_mask.sum(axis=1)
        if self.layout == "concat":
            for pk, pv, ok, ov in self._names:
                self._past[pk] = outputs[ok]
                self._past[pv] = outputs[ov]
            self._mask = np.concatenate([self._mask, new_mask], axis=1) if self._len else new_mask.copy()
            self._len += n_new
        else:
            lengths = self._mask.sum(axis=1) + real_new
            for pk, pv, ok, ov in self._names:
                self._past[pk] = outputs[ok]
                self._past[pv] = outputs[ov]
            if self._global_key is not None:
                self._len = int(self._past[self._global_key].shape[2])
            else:
                self._len += n_new
            self._mask = (np.arange(self._len)[None, :] < lengths[:, None]).astype(np.int64)
            if self._local:
                self._llen = int(self._past[self._local_pasts[0]].shape[2])  # the session's present width
                self._grow_local(real_new, self._llen)
        self.seen_tokens = self.seen_tokens + real_new

    def _append_shared(self, new_mask: np.ndarray) -> None:
        """:meth:`append` for the shared-buffer (packed) cache: the session already wrote the new columns
        in place, so only the mask and the row lengths move, in O(new tokens) and without allocating.

        The mask lives in a preallocated ``[batch, capacity]`` int64 buffer (ones up to each row's length,
        zeros after) and ``_mask`` is a view of its first ``past_len`` columns. When ``_mask`` is not such
        a view (first append, or ``select``/``merge``/``reserve`` replaced it) the buffer and the
        row lengths are rebuilt from it first. Same result as the packed rule of :meth:`append`: each row
        grows by its real new tokens, ``past_len`` = the longest row."""
        buf = self._mask_buf
        if buf is None or self._mask.base is not buf or buf.shape != (self._batch, self.capacity):
            buf = np.zeros((self._batch, self.capacity), dtype=np.int64)
            width = self._mask.shape[1]
            if width:
                buf[:, :width] = self._mask
            self._mask_buf = buf
            self._row_lens = [int(n) for n in self._mask.sum(axis=1)]
        lens = self._row_lens
        if self._batch == 1:
            real_new = new_mask.item() if new_mask.size == 1 else int(new_mask.sum())
            start = lens[0]
            end = start + real_new
            if end > start:
                buf[0, start:end] = 1
            lens[0] = end
            width = end
        else:
            real_new = new_mask.sum(axis=1)
            for row, real in enumerate(real_new.tolist()):
                if real:
                    buf[row, lens[row]:lens[row] + real] = 1
                    lens[row] += real
            width = max(lens) if lens else 0
        self._len = width
        self._mask = buf[:, :width]
        self.seen_tokens = self.seen_tokens + real_new
        if self._local:
            self._grow_local(real_new)
            self._llen = max(self._llens)

    # ----- the sliding-window layers ---------------------------------------------------------------
    def local_mask(self, n_new: int) -> np.ndarray | None:
        """The sliding-window layers' past mask ``[batch, local_past_len]`` (a view: copy it to keep it),
        after making room for ``n_new`` columns; None without bounded windows."""
        if not self._local:
            return None
        self._local_room(n_new)
        return self._lbuf[:, :self._llen]

    def _grow_local(self, real_new: "np.ndarray | int", width: int = 0) -> None:
        """Each row's local length grows by its real new tokens (right after its past, as GQA wrote them);
        the mask buffer is made at least ``width`` columns wide."""
        news = [int(real_new)] if np.ndim(real_new) == 0 else [int(n) for n in real_new]
        lens, buf = self._llens, self._lbuf
        top = max([width] + [length + n for length, n in zip(lens, news)])
        if top > buf.shape[1]:  # only without preallocation: the mask buffer follows the session's presents
            wider = np.zeros((self._batch, max(top, 2 * buf.shape[1])), dtype=np.int64)
            wider[:, :buf.shape[1]] = buf
            buf = self._lbuf = wider
        for row, n in enumerate(news):
            if n:
                buf[row, lens[row]:lens[row] + n] = 1
                lens[row] += n

    def _local_room(self, n_new: int) -> None:
        """Make ``n_new`` more local columns fit: when they would not (preallocated: past the buffers'
        capacity; otherwise: past :attr:`local_base` columns), every row keeps its last ``window - 1``
        tokens, extended back to a position that is a multiple of :attr:`align`, moved to the front (so a
        column stays congruent to its position modulo ``align``); preallocated buffers are then resized to
        what is needed, at least double their size up to :attr:`local_base` (a prefill chunk longer than
        the window grows them beyond it, the next compaction shrinks them back)."""
        if not self._local:
            return
        base = self.local_base
        limit = self.local_capacity if self.local_capacity is not None else base
        if self._llen + n_new <= limit:
            return
        keep = self.window - 1
        lens, buf = self._llens, self._lbuf
        shared = self.local_capacity is not None
        names = self._local_pasts
        for row, length in enumerate(lens):
            end = int(self.seen_tokens[row])  # the position after the row's last token
            first = max(end - length, (end - keep) // self.align * self.align)  # a block start <= end - keep
            kept = end - first
            if kept >= length:
                continue
            for name in names:
                arr = self._past[name]
                arr[row, :, :kept] = arr[row, :, length - kept:length]  # numpy copies overlapping ranges safely
            buf[row, kept:length] = 0
            lens[row] = kept
        self._llen = max(lens, default=0)
        need = self._llen + n_new
        if shared:
            target = max(need, min(base, 2 * self.local_capacity))  # doubling up to base, or the chunk's need
            if target != self.local_capacity:
                self._resize_local(target)
        else:
            for name in names:
                self._past[name] = np.ascontiguousarray(self._past[name][:, :, :self._llen])

    def _resize_local(self, cols: int) -> None:
        """Reallocate the local buffers (and their mask buffer) to ``cols`` columns, keeping the past."""
        self._out_cache = None  # drop the old buffers as each is replaced
        width = self._llen
        for name in self._local_pasts:
            arr = self._past[name]
            new = np.zeros(arr.shape[:2] + (cols,) + arr.shape[3:], dtype=arr.dtype)
            new[:, :, :width] = arr[:, :, :width]
            self._past[name] = new
            del arr
        buf = np.zeros((self._batch, cols), dtype=np.int64)
        buf[:, :width] = self._lbuf[:, :width]
        self._lbuf = buf
        self.local_capacity = cols
        self.generation = next(_GENERATIONS)

    def select(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in the given order)."""
        idx = np.asarray(list(rows), dtype=np.int64)
        for name, arr in self._past.items():
            self._past[name] = np.ascontiguousarray(arr[idx])
        self._mask = self._mask[idx]
        self.seen_tokens = self.seen_tokens[idx]
        self._batch = len(idx)
        self.generation = next(_GENERATIONS)
        if self._local:
            self._lbuf = np.ascontiguousarray(self._lbuf[idx])
            self._llens = [self._llens[i] for i in idx.tolist()]
            used = max(self._llens, default=0)
            if self.local_capacity is None and used < self._llen:  # trailing all-padding columns
                for name in self._local_pasts:
                    self._past[name] = np.ascontiguousarray(self._past[name][:, :, :used])
                self._llen = used
            elif self.local_capacity is not None:
                self._llen = used
        if self.layout == "concat" and self._batch and self._len:
            # drop the leading columns no remaining row attends to (left padding of retired rows), so a
            # batch that never empties (continuous batching) stays as long as its longest live row
            live = self._mask.any(axis=0)
            first = int(np.argmax(live)) if live.any() else self._len
            if first > 0:
                for name, arr in self._past.items():
                    self._past[name] = np.ascontiguousarray(arr[:, :, first:])
                self._mask = self._mask[:, first:]
                self._len -= first
        if self.layout == "packed" and self.capacity is None and self._batch:
            used = int(self._mask.sum(axis=1).max())  # drop trailing all-padding columns
            if used < self._len:
                for name, arr in self._past.items():
                    if name not in self._local:
                        self._past[name] = np.ascontiguousarray(arr[:, :, :used])
                self._len = used
                self._mask = self._mask[:, :used]

    def merge(self, other: "PlainCache") -> None:  # type: ignore[override]
        """Append ``other``'s rows; the shorter past is padded with masked columns (left for ``concat``,
        right for ``packed``)."""
        if not isinstance(other, PlainCache) or other.layout != self.layout or other._local != self._local:
            raise TypeError("can only merge a PlainCache of the same layout and windows")
        if other.batch == 0:
            return
        if self._batch == 0:
            self.__dict__.update({k: v for k, v in other.__dict__.items()})
            self._past = dict(other._past)
            self.generation = next(_GENERATIONS)
            return
        width = max(self._len, other._len)
        cap = None
        if self.capacity is not None or other.capacity is not None:
            cap = max(self.capacity or 0, other.capacity or 0, width)

        def padded(arr: np.ndarray, length: int, cols: int) -> np.ndarray:
            extra = cols - arr.shape[2]
            if extra <= 0:
                return arr
            pad = np.zeros(arr.shape[:2] + (extra,) + arr.shape[3:], dtype=arr.dtype)
            if self.layout == "concat":
                return np.concatenate([pad, arr], axis=2)
            return np.concatenate([arr, pad], axis=2)

        cols = cap if cap is not None else width
        lwidth = max(self._llen, other._llen)
        lcap = None
        if self.local_capacity is not None or other.local_capacity is not None:
            lcap = max(self.local_capacity or 0, other.local_capacity or 0, lwidth)
        lcols = lcap if lcap is not None else lwidth
        for name in self._past:
            n = lcols if name in self._local else cols
            a = padded(self._past[name], self._len, n)
            b = padded(other._past[name], other._len, n)
            self._past[name] = np.concatenate([a, b], axis=0)
        if self._local:
            bufs = [m._lbuf[:, :lcols] for m in (self, other)]
            self._lbuf = np.concatenate([np.pad(m, ((0, 0), (0, lcols - m.shape[1]))) for m in bufs], axis=0)
            self._llens = self._llens + other._llens
            self._llen = lwidth
            self.local_capacity = lcap

        def mask_to(m: np.ndarray, w: int) -> np.ndarray:
            extra = w - m.shape[1]
            if extra <= 0:
                return m
            pad = np.zeros((m.shape[0], extra), dtype=np.int64)
            return np.concatenate([pad, m] if self.layout == "concat" else [m, pad], axis=1)

        self._mask = np.concatenate([mask_to(self._mask, width), mask_to(other._mask, width)], axis=0)
        self.seen_tokens = np.concatenate([self.seen_tokens, other.seen_tokens])
        self._batch += other.batch
        self._len = width
        self.capacity = cap
        self.generation = next(_GENERATIONS)

    def stats(self) -> KVStats:
        """Real tokens and the bytes holding them (keys and values of every layer in the cache's dtype: all
        tokens in full layers, each row's window in sliding-window ones) in tier :attr:`tier`;
        ``reserved``: the allocated buffers (preallocated capacity and batch padding included);
        ``bytes_fp16`` for the same entries in fp16."""
        tokens = int(self._mask.sum())
        per_layer = 2 * self.info.num_kv_heads * self.info.head_dim  # elements per token and layer
        # held entries: every context token in the full layers, each row's window in the local ones
        entries = tokens * (self.info.num_layers - self.local_layers) + sum(self._llens) * self.local_layers
        elements = entries * per_layer
        reserved = int(sum(arr.nbytes for arr in self._past.values()))
        tier = self.tier
        return KVStats(tokens={tier: tokens}, bytes={tier: elements * np.dtype(self.dtype).itemsize},
                       bytes_fp16=elements * 2, reserved={tier: reserved})


def window_note(info: "ModelInfo", align: int = ALIGN) -> str:
    """``sliding-window layers 0-4,6-10,12-16 (15 of 18) hold each row's last 511 tokens (up to 542,
    block-aligned)`` for a model whose packed cache bounds them (:attr:`~inferos_cli.models.info.ModelInfo.kv_windows`),
    else ``""``."""
    local = info.windowed_layers if info.uses_gqa_op else []
    if not local:
        return ""
    runs: list[list[int]] = []
    for i in local:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    spans = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    keep = max(info.kv_windows[i] for i in local) - 1
    return (f"sliding-window layers {spans} ({len(local)} of {info.num_layers}) hold each row's last {keep} "
            f"tokens (up to {keep + align - 1}, block-aligned)")


def layout_line(text: str, info: "ModelInfo", note: str = "", align: int = ALIGN) -> str:
    """A layout's one-line description: ``text``, the :func:`window_note` when local layers are bounded, and
    the layout's note (why a requested policy is not applied) after a semicolon."""
    windows = window_note(info, align)
    if windows:
        text += f", {windows}"
    return f"{text}; {note}" if note else text
