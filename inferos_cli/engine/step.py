"""One forward step: ``input_ids`` through a phase's session against a KV cache.

:meth:`Step.forward` builds the small inputs (``attention_mask`` from ``cache.past_mask()`` + the new
tokens' mask, ``position_ids`` from each row's true length, ``logits_keep``), runs the session and hands
the ``present.*`` outputs back to the cache. Per-step host work is O(new tokens):

- a cache with shared past/present buffers (GQA graphs, :attr:`~inferos_cli.kv.base.KVCache.shares_buffers`)
  is bound with an IOBinding as both past input and present output, so onnxruntime writes the new keys in
  place (``past_present_share_buffer``, as onnxruntime-genai does); the binding is kept while the buffers
  do not move, so a decode step binds only what changed;
- any other cache keeps the session's output arrays as the next past (no copy);
- the all-ones attention mask of an unpadded step is a view of one step-owned ones buffer;
- a cache that keeps only the window of the sliding-window layers (:meth:`~inferos_cli.kv.base.KVCache.local_mask`)
  gets those layers' own mask, ``local_attention_mask``, built the same way.

A plan with a prefill twin (:mod:`inferos_cli.engine.plan`) prefills on the ``Attention``-op graph and
moves the new columns into the packed GQA cache the decode session reads (:meth:`Step.prefill_via_twin`).

:func:`chunked_prefill` runs a prompt whole or in chunks and keeps the last real token's logits per row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np

from inferos_cli.models.info import LOCAL_MASK

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.engine.plan import Plan
    from inferos_cli.kv.base import KVCache

Phase = Literal["prefill", "decode"]
# prompts longer than this are prefilled in chunks of this many tokens unless --prefill-chunk says otherwise
AUTO_PREFILL_CHUNK = 2048


class Binding:
    """An IOBinding of one session kept between steps: the cache buffers' ``generation`` it was made for
    (``key``), the pybind objects the hot path calls directly (None when this onnxruntime build hides
    them) and what is bound now by name: ``(array, shape, dtype)``, holding the array so its memory stays
    put."""

    __slots__ = ("key", "io", "raw", "run", "dev", "bound")

    def __init__(self, key: Any, session: Any, dev: Any) -> None:
        self.key = key
        self.io = session.io_binding()
        raw = getattr(self.io, "_iobinding", None)
        sess = getattr(session, "_sess", None)
        ok = raw is not None and sess is not None and dev is not None
        self.raw = raw if ok else None
        self.run: Callable[..., Any] | None = sess.run_with_iobinding if ok else None
        self.dev = dev
        self.bound: dict[str, tuple[np.ndarray, tuple[int, ...], np.dtype]] = {}


def raw_cpu_device() -> Any:
    """onnxruntime's pybind ``OrtDevice`` for host memory, None when this build does not expose it."""
    try:
        from onnxruntime.capi import _pybind_state as C

        return C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
    except Exception:  # pragma: no cover - private API moved
        return None


class Step:
    """The forward step of one plan (its sessions, KV layout and model), with the buffers it reuses."""

    def __init__(self, plan: "Plan", vocab_size: int) -> None:
        self.plan = plan
        self.vocab_size = int(vocab_size)
        sess = plan.decode.session
        self.input_names = [i.name for i in sess.get_inputs()]
        self.output_names = [o.name for o in sess.get_outputs()]
        self.has_position_ids = "position_ids" in self.input_names
        self.has_logits_keep = "logits_keep" in self.input_names
        self.bindings: dict[int, Binding] = {}
        self._cpu_device = raw_cpu_device()
        # decode-loop scratch: one logits buffer per shape, reused while the caller asks for it (reuse=True)
        self._logits_bufs: dict[tuple[int, int], np.ndarray] = {}
        self._keep = {1: np.array([1], dtype=np.int64)}
        self._ones: dict[tuple[int, int], np.ndarray] = {}
        self._ones_flat = np.ones(4096, dtype=np.int64)  # attention masks of unpadded steps view this
        self._ones_flat.flags.writeable = False
        self._ones_ptr = int(self._ones_flat.ctypes.data)

    def forward(
        self,
        input_ids: np.ndarray,
        cache: "KVCache",
        *,
        phase: Phase = "prefill",
        new_mask: np.ndarray | None = None,
        logits: Literal["all", "last"] = "all",
        reuse: bool = False,
    ) -> np.ndarray:
        """See :meth:`inferos_cli.engine.engine.Engine.forward`."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != cache.batch:
            raise ValueError(f"input_ids must be [batch={cache.batch}, T], got {ids.shape}")
        b, t = ids.shape
        past_mask = cache.past_mask()
        past = past_mask.shape[1]
        local = cache.local_mask(t)  # the sliding-window layers' own (bounded) past, or None
        if new_mask is None:
            new = self._ones.get((b, t)) if t == 1 else None
            if new is None:
                new = np.ones((b, t), dtype=np.int64)
                if t == 1:  # a decode step's all-ones mask: one read-only array per batch size
                    new.flags.writeable = False
                    self._ones[(b, t)] = new
            if not past or np.count_nonzero(past_mask) == past_mask.size:
                # an all-ones attention mask (every decode step of an unpadded sequence) is a view of
                # one preallocated ones buffer: no per-step concatenation (and its allocation)
                mask = self.ones_view(b, past + t)
            else:
                mask = np.concatenate((past_mask, new), axis=1)
        else:
            new = np.ascontiguousarray(new_mask, dtype=np.int64)
            mask = np.concatenate((past_mask, new), axis=1) if past else new
        small: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        if local is not None:
            lp = local.shape[1]
            if new_mask is None and (not lp or np.count_nonzero(local) == local.size):
                small[LOCAL_MASK] = self.ones_view(b, lp + t)
            else:
                small[LOCAL_MASK] = np.concatenate((local, new), axis=1) if lp else new
        kept = t
        if self.has_logits_keep:
            kept = 1 if logits == "last" else t
            keep = self._keep.get(kept)
            small["logits_keep"] = keep if keep is not None else np.array([kept], dtype=np.int64)
        if self.has_position_ids:
            pos = np.asarray(cache.seen_tokens, dtype=np.int64)[:, None] + np.cumsum(new, axis=1) - 1
            small["position_ids"] = np.where(new > 0, pos, 0).astype(np.int64)
        plan = self.plan
        if phase == "prefill" and plan.prefill_twin and local is None:  # the twin fills full-length caches
            out = self.prefill_via_twin(cache, small, new, past, t)
            if out is not None:
                return out
            phase = "decode"  # a ragged batch without shared buffers: the GQA graph's session prefills
        ps = plan.prefill if phase == "prefill" else plan.decode
        out_bufs = cache.output_buffers(t)
        if out_bufs:
            out = self.run_bound(ps.session, small, out_bufs, cache, (b, kept), reuse)
            presents = out_bufs
        else:
            feeds = dict(cache.feeds())
            feeds.update(small)
            # session.run wraps numpy inputs without a copy
            presents = dict(zip(self.output_names, ps.session.run(None, feeds)))
            out = presents.pop("logits")
        cache.append(presents, t, new)
        return out

    def prefill_via_twin(self, cache: "KVCache", small: dict[str, np.ndarray], new: np.ndarray, past: int,
                         t: int) -> np.ndarray | None:
        """Prefill on the Attention-op twin (concat presents) and move the new columns into the packed GQA
        cache the decode session reads: row ``r``'s real new keys go right after its real past, where
        GroupQueryAttention would have written them. None when the cache holds neither shared buffers nor
        rows of one length (the caller then prefills on the decode session)."""
        past_mask = cache.past_mask()
        lens = past_mask.sum(axis=1) if past else np.zeros(cache.batch, dtype=np.int64)
        n_new = new.sum(axis=1)
        shared = cache.shares_buffers
        layout = self.plan.layout
        scales = layout.scales() if layout is not None else None  # int8 codes (fused)
        if not shared and (scales is not None or np.any(lens != past) or np.any(n_new != t)):
            return None
        feeds = dict(small)
        for name, arr in cache.feeds().items():
            past_cols = arr[:, :, :past] if shared else arr
            if scales is not None:
                past_cols = past_cols.astype(np.float32) * scales[name]
            feeds[name] = np.ascontiguousarray(past_cols)
        ps = self.plan.prefill
        takes = {i.name for i in ps.session.get_inputs()}  # a twin without logits_keep returns every position
        feeds = {k: v for k, v in feeds.items() if k in takes}
        names = [o.name for o in ps.session.get_outputs()]
        res = dict(zip(names, ps.session.run(names, feeds)))
        logits = res.pop("logits")
        bufs = cache.output_buffers(t) if shared else None
        if bufs:
            for present, buf in bufs.items():
                src = res[present][:, :, past:]
                if scales is not None:  # the fused graph's own rule: round half to even, clip to int8
                    src = np.clip(np.rint(src / scales[present]), -128, 127).astype(np.int8)
                for r in range(cache.batch):
                    n = int(n_new[r])
                    buf[r, :, int(lens[r]): int(lens[r]) + n] = src[r, :, :n]
        cache.append(res, t, new)
        return logits

    def ones_view(self, b: int, width: int) -> np.ndarray:
        """A contiguous read-only all-ones int64 ``[b, width]`` view of the step's ones buffer (grown
        by doubling when too small)."""
        n = b * width
        flat = self._ones_flat
        if flat.size < n:
            flat = np.ones(max(n, 2 * flat.size), dtype=np.int64)
            flat.flags.writeable = False
            self._ones_flat = flat
            self._ones_ptr = int(flat.ctypes.data)
        return flat[:n].reshape(b, width)

    def run_bound(
        self, session: Any, small: dict[str, np.ndarray], out_bufs: dict[str, np.ndarray], cache: "KVCache",
        bt: tuple[int, int], reuse: bool = False,
    ) -> np.ndarray:
        """Run with an IOBinding whose past inputs and present outputs are the cache's shared buffers.
        The binding of the buffers is kept while they do not move (``cache.generation`` unchanged), so a
        step binds only ``input_ids``, ``attention_mask`` (and ``position_ids``) and the logits; of those,
        an array already bound with the same shape and dtype (the decode loop's token array, the constant
        ``logits_keep``, a reused logits buffer) is not bound again: a binding is a pointer that ORT reads
        at run time, so the current contents are what it sees. "Already bound" is object identity: the
        binding keeps a reference to each bound array, so its memory cannot move or be reused meanwhile."""
        key = cache.generation
        entry = self.bindings.get(id(session))
        if entry is None or key is None or entry.key != key:
            entry = Binding(key, session, self._cpu_device)
            for name, arr in cache.feeds().items():
                entry.io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            for name, arr in out_bufs.items():
                entry.io.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            self.bindings[id(session)] = entry
        logits = self._logits_bufs.get(bt) if reuse else None
        if logits is None:
            logits = np.empty((bt[0], bt[1], self.vocab_size), dtype=np.float32)
            if reuse:
                self._logits_bufs[bt] = logits
        raw = entry.raw
        if raw is not None:
            # the pybind objects directly: the public wrapper builds an OrtDevice per bind call
            bound, dev, ones = entry.bound, entry.dev, self._ones_flat
            for name, arr in small.items():
                prev = bound.get(name)
                if prev is None or prev[0] is not arr or prev[1] != arr.shape or prev[2] != arr.dtype:
                    # a view of the ones buffer starts at its first element: its address is known
                    ptr = self._ones_ptr if arr.base is ones else arr.ctypes.data
                    raw.bind_input(name, dev, arr.dtype, arr.shape, ptr)
                    bound[name] = (arr, arr.shape, arr.dtype)
            prev = bound.get("logits")
            if prev is None or prev[0] is not logits:
                raw.bind_output("logits", dev, logits.dtype, logits.shape, logits.ctypes.data)
                # only the step-owned (reused) buffer is remembered: holding a caller's [B, T, V]
                # logits here would keep up to hundreds of MB alive after a long "all" prefill
                bound.pop("logits", None)
                if reuse:
                    bound["logits"] = (logits, logits.shape, logits.dtype)
            entry.run(raw, None)
        else:  # pragma: no cover - other onnxruntime builds
            io = entry.io
            for name, arr in small.items():
                io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            io.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
            session.run_with_iobinding(io)
        return logits


def chunked_prefill(forward: Callable[..., np.ndarray], ids: np.ndarray, cache: "KVCache", chunk: int | None,
                    vocab_size: int, new_mask: np.ndarray | None = None) -> np.ndarray:
    """Run the prompt ``ids`` ``[B, T]`` through ``forward`` whole or in chunks of ``chunk`` tokens (default:
    :data:`AUTO_PREFILL_CHUNK`, or the cache's shorter ``prefill_chunk``, when longer); return the logits of
    each row's last real token ``[B, V]``."""
    b, t = ids.shape
    mask = np.ones((b, t), dtype=np.int64) if new_mask is None else new_mask
    if not chunk or chunk <= 0:
        # a whole long prompt would return logits of T x vocab floats (8192 tokens x 49152 = 1.6 GB); a
        # cache may ask for shorter chunks (the segmented cache takes each chunk's new columns in float)
        limit = min(AUTO_PREFILL_CHUNK, cache.prefill_chunk or AUTO_PREFILL_CHUNK)
        chunk = limit if t > limit else t
    step = int(chunk)
    last = np.zeros((b, vocab_size), dtype=np.float32)
    for start in range(0, t, step):
        part = slice(start, min(t, start + step))
        m = mask[:, part]
        has = m.sum(axis=1) > 0
        # rows that end this chunk on a real token (no right padding) need only the last column
        tail_only = bool(np.all(m[has, -1] > 0))
        logits = forward(ids[:, part], cache, phase="prefill", new_mask=m, logits="last" if tail_only else "all")
        if has.any():
            rows = np.nonzero(has)[0]
            if tail_only:
                last[rows] = logits[rows, -1]
            else:  # index of the last real token of each row within this chunk
                idx = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)
                last[rows] = logits[rows, idx[rows]]
    return last
