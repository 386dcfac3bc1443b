"""The in-process engine: prefill + decode over ONNX Runtime sessions, yielding typed events.

One primitive, :meth:`Engine.forward`, runs ``input_ids`` through the session of a phase against a KV
cache (built from ``cache.past_mask()`` + ``new_mask``: ``attention_mask``; from each row's true length:
``position_ids``), then hands the ``present.*`` outputs back to the cache. :meth:`Engine.generate`
(one sequence) and :meth:`Engine.generate_batch` (several sequences in the batch dimension, finished
rows retiring) are loops over it that sample and time, and produce :class:`~inferos_cli.events.Event`.

Per-step host work is O(new tokens): the cache keeps the session's output arrays as the next past
(no copy), and for ``GroupQueryAttention`` graphs the past buffers are preallocated and bound as both
past input and present output via IOBinding, so ORT writes the new keys in place
(``past_present_share_buffer``, as onnxruntime-genai does). Between two runs a decode step allocates
almost nothing: the all-ones attention mask is a view of one engine-owned ones buffer, the cache's mask
grows in place, only the mask is bound again, and events are built field by field. Measured in-process
against the previous engine (SmolLM2-135M int4, 1 thread): the Python work between runs went from
~0.29-0.34 ms to ~0.19-0.25 ms per token; most of what is left is ``cache.stats()``, the RSS read and the
streaming detokenizer (~30 µs each with the caches cold after a run). The memory a generation adds is
backed with huge pages afterwards (:meth:`Engine._settle_huge_pages`, :mod:`inferos_cli.engine.sessions`).

Prefill computes logits for the last position only: the sessions load the graph with a ``logits_keep``
input (:mod:`inferos_cli.graphs.last_logits`), so the LM head runs once instead of once per prompt
token (TTFT -31% at 512 tokens on SmolLM2-135M int4, same tokens); ``forward(..., logits="all")`` (the
default, used by perplexity) still returns every position. Prompts longer than ``AUTO_PREFILL_CHUNK``
tokens are prefilled in chunks.

Context: a prompt that does not fit the model's context raises
:class:`~inferos_cli.errors.ContextOverflowError`; generation that reaches the context end stops with
``finish_reason="length"``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import numpy as np

from inferos_cli.errors import ContextOverflowError, UsageError
from inferos_cli.events import Event
from inferos_cli.engine.sampling import GenerationConfig, sample

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.kv.base import KVCache
    from inferos_cli.models.info import ModelInfo
    from inferos_cli.settings import Policy, Resolved

Phase = Literal["prefill", "decode"]
# prompts longer than this are prefilled in chunks of this many tokens unless --prefill-chunk says otherwise
AUTO_PREFILL_CHUNK = 2048

__all__ = ["Engine", "GenerationConfig", "StopMatcher"]


class _RSSReader:
    """This process's resident set size, cheap enough to read at every event: on Linux one ``pread`` of
    an open ``/proc/self/statm`` (psutil opens and parses the file on each call), elsewhere psutil's
    ``memory_info`` (one system call on Windows/macOS). None when it cannot be read."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._page = 4096
        self._proc: Any = None
        if sys.platform.startswith("linux") and hasattr(os, "pread"):
            try:
                self._fd = os.open("/proc/self/statm", os.O_RDONLY)
                self._page = os.sysconf("SC_PAGE_SIZE")
            except OSError:
                self._fd = None

    def __call__(self) -> int | None:
        if self._fd is not None:
            try:
                return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
            except (OSError, IndexError, ValueError):
                self._fd = None
        try:
            if self._proc is None:
                import psutil

                self._proc = psutil.Process()
            return int(self._proc.memory_info().rss)
        except Exception:  # pragma: no cover - psutil missing or process info denied
            return None


_rss = _RSSReader()


class StopMatcher:
    """Streams text while watching for stop strings: text that could start a stop string is held back
    until it is known not to be one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.hit: str | None = None

    def push(self, text: str) -> str:
        """Add generated text; return what may be shown now (sets ``hit`` when a stop string appears)."""
        if not self.stops:
            return text
        buf = self._held + text
        first = None
        for stop in self.stops:
            pos = buf.find(stop)
            if pos >= 0 and (first is None or pos < first[0]):
                first = (pos, stop)
        if first is not None:
            self.hit = first[1]
            self._held = ""
            return buf[: first[0]]
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """Held-back text at the end (no stop string came)."""
        out, self._held = self._held, ""
        return out


class _Binding:
    """An IOBinding of one session kept between steps: the cache layout it was made for (``key``), the
    pybind objects the hot path calls directly (None when this onnxruntime build hides them) and what is
    bound now by name: ``(array, shape, dtype)``, holding the array so its memory stays put."""

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


class _SeqState:
    """Book-keeping of one generated sequence."""

    def __init__(self, row: int, prompt: list[int], config: GenerationConfig, stream: Any) -> None:
        self.row = row
        self.prompt = prompt
        self.generated: list[int] = []
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.ttft: float | None = None
        self.prefill_tps: float | None = None  # set with ttft by Engine._prefill_event
        self.rng = np.random.default_rng(None if config.seed is None else config.seed + row)
        self.stream = stream
        self.stops = StopMatcher(config.stop)
        self.finish: str | None = None
        self.text_parts: list[str] = []
        # ids the repetition penalty looks at (prompt + generated), kept only when the penalty is on
        self.seen: set[int] = set(prompt) if config.repetition_penalty != 1.0 else set()
        self._track = config.repetition_penalty != 1.0

    def decode_tps(self) -> float | None:
        n = len(self.generated)
        if n < 2 or self.t_first is None or self.t_last is None or self.t_last <= self.t_first:
            return None
        return (n - 1) / (self.t_last - self.t_first)


class Engine:
    """A model loaded for generation: tokenizer, KV backend, prefill/decode sessions."""

    def __init__(
        self,
        info: "ModelInfo",
        resolved: "Resolved",
        *,
        threads: int | None = None,
        strict_devices: bool = False,
        telemetry: Callable[[], dict[str, float | None]] | None = None,
        pressure: Any = None,
        last_logits: bool = True,
    ) -> None:
        from inferos_cli.kv.layouts import kv_backend
        from inferos_cli.models.tokenizer import Tokenizer

        self.info = info
        self.resolved = resolved
        self.policy: "Policy" = resolved.policy
        self.tokenizer = Tokenizer.from_model(info)
        # pressure: a runtime.pressure source (level() -> 0..1) the KV cache reads to tighten its tiers;
        # read late, so run/serve may attach it after construction (engine.pressure = monitoring.pressure)
        self.pressure = pressure
        from inferos_cli.engine.sessions import anonymous_regions, huge_pages_wanted

        # memory this engine adds from here on is backed with huge pages (see _settle_huge_pages)
        self._huge_mark: dict[int, int] | None = anonymous_regions() if huge_pages_wanted() else None
        info, twin_note = _cuda_graph(info, self.policy)
        self.info = info
        self.backend = kv_backend(info, self.policy, pressure=self.pressure_level)
        graph = Path(self.backend.onnx_path)
        # generation samples only the last position: a graph input lets the LM head skip the others
        self.logits_note = "all positions (last_logits off)"
        sliced = None
        if last_logits:
            from inferos_cli.graphs.last_logits import last_logits_graph

            sliced = last_logits_graph(graph)
            self.logits_note = "last position in prefill" if sliced else "all positions (LM head pattern not found)"
            graph = sliced or graph
        # a float32 GQA graph prefilling on CUDA: the prefill session runs the Attention-op twin
        # (graph_attention: onnxruntime's CUDA GQA kernel is fp16/bf16 only), decode keeps the GQA graph
        twin = _prefill_twin(graph, info, self.backend, self.policy, last_logits=sliced is not None)
        self.plan = _build_plan(graph, self.policy, threads=threads, strict=strict_devices, prefill_path=twin)
        self.prefill_twin = twin is not None and not self.plan.shared
        for note in (twin_note, "prefill graph: GroupQueryAttention -> Attention op (CUDA)" if self.prefill_twin else ""):
            if note:
                self.plan.notes.append(note)
        self.telemetry = telemetry
        sess = self.plan.decode.session
        self.input_names = [i.name for i in sess.get_inputs()]
        self.output_names = [o.name for o in sess.get_outputs()]
        self.has_position_ids = "position_ids" in self.input_names
        self.has_logits_keep = "logits_keep" in self.input_names
        self.uses_gqa = bool(info.uses_gqa_op)
        self.providers = self.plan.providers()
        self._bindings: dict[int, _Binding] = {}
        self._cpu_device = _raw_cpu_device()
        # decode-loop scratch: one logits buffer per shape, reused while the caller asks for it (reuse=True)
        self._logits_bufs: dict[tuple[int, int], np.ndarray] = {}
        self._keep = {1: np.array([1], dtype=np.int64)}
        self._ones: dict[tuple[int, int], np.ndarray] = {}
        self._ones_flat = np.ones(4096, dtype=np.int64)  # attention masks of unpadded steps view this
        self._ones_flat.flags.writeable = False
        self._ones_ptr = int(self._ones_flat.ctypes.data)
        self._util_cache: tuple[float, dict[str, float | None]] | None = None

    def pressure_level(self) -> float:
        """Memory pressure 0..1 from the attached ``runtime.pressure`` source (0 when none)."""
        return float(self.pressure.level()) if self.pressure is not None else 0.0

    # ----- construction -------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str | None = None,
        profile: str | None = None,
        config: Path | None = None,
        flags: dict[str, Any] | None = None,
        threads: int | None = None,
        strict_devices: bool = False,
        progress: bool = False,
    ) -> "Engine":
        """Resolve ``model`` (alias, folder, file; default model when None), resolve the settings once,
        open the sessions."""
        from inferos_cli.profiles import resolve_settings
        from inferos_cli.models.resolve import resolve_model

        info = resolve_model(model, progress=progress)
        resolved = resolve_settings(profile, param_count=info.param_count, config_path=config, flags=flags)
        return cls(info, resolved, threads=threads, strict_devices=strict_devices)

    def describe(self) -> dict[str, Any]:
        """Model, profile, providers and KV backend for headers and bench records."""
        return {
            "model": self.info.name,
            "profiles": list(self.resolved.profiles),
            "providers": dict(self.providers),
            "kv": self.backend.describe(),
            "logits": self.logits_note,
            "plan": self.plan.describe() if hasattr(self.plan, "describe") else None,
        }

    # ----- the primitive --------------------------------------------------------------------------------
    def new_cache(self, batch: int = 1, capacity: int | None = None) -> "KVCache":
        """An empty cache of ``batch`` rows; ``capacity`` (columns) lets GQA graphs decode in place."""
        try:
            return self.backend.new_cache(batch, capacity=capacity)  # type: ignore[call-arg]
        except TypeError:
            return self.backend.new_cache(batch)

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
        """Run ``input_ids`` (int64 ``[B, T]``) through ``phase``'s session against ``cache``; return logits
        ``[B, T, V]`` (``logits="last"``: ``[B, 1, V]`` for the last column when the graph can skip the
        others, else still ``[B, T, V]``: read ``[:, -1]``) and append the step's presents to the cache.

        ``new_mask`` (``[B, T]``, 1 = real token) marks padding among the new tokens; default all ones.
        ``position_ids`` continue each row's true length (``cache.seen_tokens`` when the cache keeps it,
        else the row sum of its past mask).

        ``reuse=True`` (the decode loops, which sample before the next step) lets the logits land in an
        engine-owned buffer that the next ``reuse=True`` call of the same shape overwrites: no fresh
        ``[B, 1, V]`` allocation (and its page faults) per token. With the unchanged bindings kept (see
        :meth:`_run_bound`): decode about 1.03x tokens/s and 0.97x CPU per token on SmolLM2-135M int4
        (paired medians, both engines in one process, both creation orders)."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != cache.batch:
            raise ValueError(f"input_ids must be [batch={cache.batch}, T], got {ids.shape}")
        b, t = ids.shape
        past_mask = cache.past_mask()
        past = past_mask.shape[1]
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
                mask = self._ones_view(b, past + t)
            else:
                mask = np.concatenate((past_mask, new), axis=1)
        else:
            new = np.ascontiguousarray(new_mask, dtype=np.int64)
            mask = np.concatenate((past_mask, new), axis=1) if past else new
        small: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": mask}
        kept = t
        if self.has_logits_keep:
            kept = 1 if logits == "last" else t
            keep = self._keep.get(kept)
            small["logits_keep"] = keep if keep is not None else np.array([kept], dtype=np.int64)
        if self.has_position_ids:
            base = getattr(cache, "seen_tokens", None)
            if base is None:
                base = past_mask.sum(axis=1)
            pos = np.asarray(base, dtype=np.int64)[:, None] + np.cumsum(new, axis=1) - 1
            small["position_ids"] = np.where(new > 0, pos, 0).astype(np.int64)
        if phase == "prefill" and self.prefill_twin:
            out = self._prefill_via_twin(cache, small, new, past, t)
            if out is not None:
                return out
            phase = "decode"  # a ragged batch without shared buffers: the GQA graph's session prefills
        ps = self.plan.prefill if phase == "prefill" else self.plan.decode
        buffers = getattr(cache, "output_buffers", None)
        out_bufs = buffers(t) if buffers is not None else None
        if out_bufs:
            out = self._run_bound(ps.session, small, out_bufs, cache, (b, kept), reuse)
            presents = out_bufs
        else:
            feeds = dict(cache.feeds())
            feeds.update(small)
            # session.run wraps numpy inputs without a copy; running on OrtValues (outputs as numpy views)
            # measured no faster (benchmarks/engine_vs_ortgenai.py, CPU ms/token at 128 and 512 tokens)
            presents = dict(zip(self.output_names, ps.session.run(None, feeds)))
            out = presents.pop("logits")
        cache.append(presents, t, new)
        return out

    def _prefill_via_twin(self, cache: Any, small: dict[str, np.ndarray], new: np.ndarray, past: int,
                          t: int) -> np.ndarray | None:
        """Prefill on the Attention-op twin (concat presents) and move the new columns into the packed GQA
        cache the decode session reads: row ``r``'s real new keys go right after its real past, where
        GroupQueryAttention would have written them. None when the cache holds neither shared buffers nor
        rows of one length (the caller then prefills on the decode session)."""
        past_mask = cache.past_mask()
        lens = past_mask.sum(axis=1) if past else np.zeros(cache.batch, dtype=np.int64)
        n_new = new.sum(axis=1)
        shared = bool(getattr(cache, "shares_buffers", False))
        scales = self.backend.scales() if hasattr(self.backend, "scales") else None  # int8 codes (fused)
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
        if shared:
            bufs = cache.output_buffers(t)
            for present, buf in bufs.items():
                src = res[present][:, :, past:]
                if scales is not None:  # the fused graph's own rule: round half to even, clip to int8
                    src = np.clip(np.rint(src / scales[present]), -128, 127).astype(np.int8)
                for r in range(cache.batch):
                    n = int(n_new[r])
                    buf[r, :, int(lens[r]): int(lens[r]) + n] = src[r, :, :n]
        cache.append(res, t, new)
        return logits

    def _ones_view(self, b: int, width: int) -> np.ndarray:
        """A contiguous read-only all-ones int64 ``[b, width]`` view of the engine's ones buffer (grown
        by doubling when too small)."""
        n = b * width
        flat = self._ones_flat
        if flat.size < n:
            flat = np.ones(max(n, 2 * flat.size), dtype=np.int64)
            flat.flags.writeable = False
            self._ones_flat = flat
            self._ones_ptr = int(flat.ctypes.data)
        return flat[:n].reshape(b, width)

    def _run_bound(
        self, session: Any, small: dict[str, np.ndarray], out_bufs: dict[str, np.ndarray], cache: Any,
        bt: tuple[int, int], reuse: bool = False,
    ) -> np.ndarray:
        """Run with an IOBinding whose past inputs and present outputs are the cache's shared buffers.
        The binding of the buffers is kept while they do not move (``cache.generation`` unchanged), so a
        step binds only ``input_ids``, ``attention_mask`` (and ``position_ids``) and the logits; of those,
        an array already bound with the same shape and dtype (the decode loop's token array, the constant
        ``logits_keep``, a reused logits buffer) is not bound again: a binding is a pointer that ORT reads
        at run time, so the current contents are what it sees. "Already bound" is object identity: the
        binding keeps a reference to each bound array, so its memory cannot move or be reused meanwhile."""
        key = getattr(cache, "generation", None)
        entry = self._bindings.get(id(session))
        if entry is None or key is None or entry.key != key:
            entry = _Binding(key, session, self._cpu_device)
            for name, arr in cache.feeds().items():
                entry.io.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            for name, arr in out_bufs.items():
                entry.io.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            self._bindings[id(session)] = entry
        logits = self._logits_bufs.get(bt) if reuse else None
        if logits is None:
            logits = np.empty((bt[0], bt[1], self.info.vocab_size), dtype=np.float32)
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
                # only the engine-owned (reused) buffer is remembered: holding a caller's [B, T, V]
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

    # ----- prompts ----------------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompt: str,
        chat: bool | None = None,
        system: str | None = None,
        history: list[dict[str, str]] | None = None,
    ) -> list[int]:
        """Token ids of ``prompt``; with ``chat`` (default: when the model has a chat template) the
        prompt becomes a user message after ``system`` and ``history`` in the model's template."""
        use_chat = self.tokenizer.has_chat_template if chat is None else chat
        if use_chat:
            if not self.tokenizer.has_chat_template:
                raise UsageError(f"model {self.info.name} has no chat template", "run with --no-chat")
            messages: list[dict[str, str]] = []
            if system:
                messages.append({"role": "system", "content": system})
            messages.extend(history or [])
            messages.append({"role": "user", "content": prompt})
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return self.tokenizer.encode(text, add_bos=False)
        return self.tokenizer.encode(prompt)

    def check_context(self, n_prompt: int, past: int = 0) -> None:
        """Raise ContextOverflowError when ``past + n_prompt`` leaves no room for one new token."""
        ctx = self.info.context_length
        if past + n_prompt >= ctx:
            raise ContextOverflowError(
                f"prompt of {n_prompt} tokens" + (f" after {past} cached tokens" if past else "")
                + f" does not fit the context of {self.info.name} ({ctx} tokens)",
                "shorten the prompt (or start a new conversation)",
            )

    # ----- generation ---------------------------------------------------------------------------------------
    def _settle_huge_pages(self) -> None:
        """After a generation: back with huge pages what the process's anonymous memory grew by since the
        last mark (the session's arena for activations, the KV buffers; the weights were done when the
        session opened), :func:`~inferos_cli.engine.sessions.back_with_huge_pages`. One read of
        ``/proc/self/maps`` (~0.3 ms) when nothing grew; runs after the ``done`` event is handed over, so
        no reported timing includes it. Linux only; ``INFEROS_HUGEPAGES=0`` turns it off."""
        if self._huge_mark is None:
            return
        from inferos_cli.engine.sessions import anonymous_regions, back_with_huge_pages

        now = anonymous_regions()
        if now != self._huge_mark:
            back_with_huge_pages(self._huge_mark, now)
            now = anonymous_regions()  # madvise split the regions: the next growth is measured from here
        self._huge_mark = now

    def _util(self) -> dict[str, float | None]:
        """The telemetry's ``{cpu, gpu, npu}``, re-read at most every 100 ms (the sampler's own fastest
        cadence), so per-token events do not each merge every monitor's reading."""
        if self.telemetry is None:
            return {}
        now = time.perf_counter()
        if self._util_cache is None or now - self._util_cache[0] >= 0.1:
            self._util_cache = (now, dict(self.telemetry()))
        return self._util_cache[1]

    def _event_common(self, cache: "KVCache", with_rss: bool = True) -> dict[str, Any]:
        """The fields every event carries about the machine: KV stats, RSS, utilisation, providers."""
        return {
            "kv": cache.stats(),
            "rss_bytes": _rss() if with_rss else None,
            "util": self._util(),
            "provider": self.providers,
        }

    def generate(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig | None = None,
        *,
        cache: "KVCache | None" = None,
    ) -> Iterator[Event]:
        """Generate one sequence after ``prompt_ids``. Events: ``prefill`` (prompt consumed, TTFT known),
        one ``token`` per generated token, ``done``. Pass ``cache`` to continue a conversation (the
        prompt is then only the new turn); its final state includes the generated tokens."""
        config = config or GenerationConfig()
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise UsageError("empty prompt", "give at least one token (models with a BOS id get it automatically)")
        t0 = time.perf_counter()
        if cache is not None and cache.batch != 1:
            raise ValueError(f"generate() continues a 1-row cache, got {cache.batch} rows (use generate_batch)")
        past = int(cache.seen_tokens[0]) if cache is not None and hasattr(cache, "seen_tokens") else (
            cache.past_len if cache is not None else 0)
        self.check_context(len(prompt), past)
        room = self.info.context_length - past - len(prompt)
        max_new = max(0, min(config.max_tokens, room))
        if cache is None:
            cache = self.new_cache(1, capacity=len(prompt) + max_new + 1)
        elif hasattr(cache, "reserve"):
            cache.reserve(cache.past_len + len(prompt) + max_new + 1)
        state = _SeqState(0, prompt, config, self.tokenizer.stream(prompt))
        logits = self._prefill(np.asarray([prompt], dtype=np.int64), cache, config.prefill_chunk)
        if max_new == 0:
            yield self._prefill_event(state, cache, t0, time.perf_counter())
            yield self._done(state, cache, "length")
            self._settle_huge_pages()
            return
        tok = sample(logits[0], config, state.rng, prompt)
        now = time.perf_counter()
        yield self._prefill_event(state, cache, t0, now)
        step = np.empty((1, 1), dtype=np.int64)
        # plain greedy: a decode step's logits are [1, 1, V], so the argmax of the whole array is sample()'s
        plain_greedy = config.greedy and config.repetition_penalty == 1.0
        while True:
            ev = self._accept(state, tok, now, cache, config, max_new)
            if ev is not None:
                yield ev
            if state.finish is not None:
                break
            step[0, 0] = tok
            logits = self.forward(step, cache, phase="decode", logits="last", reuse=True)
            if plain_greedy and logits.shape[1] == 1:
                tok = int(logits.argmax())
            else:
                tok = sample(logits[0, -1], config, state.rng, state.seen)
            now = time.perf_counter()
        yield self._done(state, cache, state.finish)
        self._settle_huge_pages()

    def _prefill(self, ids: np.ndarray, cache: "KVCache", chunk: int | None, new_mask: np.ndarray | None = None) -> np.ndarray:
        """Run the prompt (whole or in chunks); return the logits of each row's last real token ``[B, V]``."""
        b, t = ids.shape
        mask = np.ones((b, t), dtype=np.int64) if new_mask is None else new_mask
        if not chunk or chunk <= 0:
            # a whole long prompt would return logits of T x vocab floats (8192 tokens x 49152 = 1.6 GB)
            chunk = AUTO_PREFILL_CHUNK if t > AUTO_PREFILL_CHUNK else t
        step = int(chunk)
        last = np.zeros((b, self.info.vocab_size), dtype=np.float32)
        for start in range(0, t, step):
            part = slice(start, min(t, start + step))
            m = mask[:, part]
            has = m.sum(axis=1) > 0
            # rows that end this chunk on a real token (no right padding) need only the last column
            tail_only = bool(np.all(m[has, -1] > 0))
            logits = self.forward(ids[:, part], cache, phase="prefill", new_mask=m,
                                  logits="last" if tail_only else "all")
            if has.any():
                rows = np.nonzero(has)[0]
                if tail_only:
                    last[rows] = logits[rows, -1]
                else:  # index of the last real token of each row within this chunk
                    idx = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)
                    last[rows] = logits[rows, idx[rows]]
        return last

    def _prefill_event(self, state: _SeqState, cache: "KVCache", t0: float, now: float) -> Event:
        state.ttft = now - t0
        n = len(state.prompt)
        state.prefill_tps = (n / state.ttft) if state.ttft > 0 else None
        return Event(
            kind="prefill", t=now, seq=state.row, prompt_tokens=n, ttft_s=state.ttft,
            prefill_tps=state.prefill_tps, **self._event_common(cache),
        )

    def _accept(
        self, state: _SeqState, tok: int, now: float, cache: "KVCache", config: GenerationConfig, max_new: int
    ) -> Event | None:
        """Record a sampled token; return its ``token`` event (None for an EOS that ends the sequence).
        Runs once per token: the fields are passed straight to the slots dataclass (no merged dicts)."""
        if not config.ignore_eos and tok in self.tokenizer.eos_token_ids:
            state.finish = "stop"
            return None
        generated = state.generated
        generated.append(tok)
        if state._track:
            state.seen.add(tok)
        first = state.t_first
        if first is None:
            first = state.t_first = now
        state.t_last = now
        stops = state.stops
        text = state.stream.push(tok)
        if stops.stops:
            text = stops.push(text)
        n = len(generated)
        if stops.hit is not None:
            state.finish = "stop"
        elif n >= max_new:
            state.finish = "length"
            text += stops.push(state.stream.flush()) + stops.flush()
        state.text_parts.append(text)
        return Event(
            kind="token", t=now, seq=state.row, token_id=tok, text=text, prompt_tokens=len(state.prompt),
            generated=n, ttft_s=state.ttft,
            prefill_tps=state.prefill_tps if state.ttft else None,
            decode_tps=(n - 1) / (now - first) if n > 1 and now > first else None,
            kv=cache.stats(), rss_bytes=_rss(), util=self._util(), provider=self.providers,
        )

    def _done(self, state: _SeqState, cache: "KVCache", reason: str | None, extra: dict[str, Any] | None = None) -> Event:
        tail = ""
        if reason != "length" and state.stops.hit is None:
            tail = state.stops.push(state.stream.flush()) + state.stops.flush()
        if tail:
            state.text_parts.append(tail)
        return Event(
            kind="done", t=time.perf_counter(), seq=state.row, text=tail, prompt_tokens=len(state.prompt),
            generated=len(state.generated), ttft_s=state.ttft,
            prefill_tps=(len(state.prompt) / state.ttft) if state.ttft else None,
            decode_tps=state.decode_tps(), finish_reason=reason or "stop",
            extra={"output_text": "".join(state.text_parts), "stop": state.stops.hit, **(extra or {})},
            **self._event_common(cache),
        )

    # ----- static batching ------------------------------------------------------------------------------------
    def generate_batch(
        self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None
    ) -> Iterator[Event]:
        """Decode several prompts together in the batch dimension. Each row keeps its true positions
        (left padding + attention mask + position ids; GQA graphs: per-row prefill merged into one
        right-padded cache); a finished row retires (``cache.select``) while the others continue.
        ``Event.seq`` is the row index; every ``done`` event carries the batch totals so far in
        ``extra["batch"]`` (the last one: aggregate tokens/s of the whole batch)."""
        config = config or GenerationConfig()
        rows = [[int(i) for i in p] for p in prompts]
        if not rows:
            return
        if any(not r for r in rows):
            raise UsageError("empty prompt in batch", "remove empty lines from the prompts file")
        t0 = time.perf_counter()
        for r in rows:
            self.check_context(len(r))
        longest = max(len(r) for r in rows)
        max_new = max(0, min(config.max_tokens, self.info.context_length - longest))
        states = [_SeqState(i, r, config, self.tokenizer.stream(r)) for i, r in enumerate(rows)]
        if self.uses_gqa:
            # GQA places keys by row length, so rows are right-padded: prefill each row alone, merge the caches.
            cache = None
            last_list = []
            for r in rows:
                part = self.new_cache(1, capacity=longest + max_new + 1)
                last_list.append(self._prefill(np.asarray([r], dtype=np.int64), part, config.prefill_chunk)[0])
                if cache is None:
                    cache = part
                else:
                    cache.merge(part)
            last = np.stack(last_list)
        else:
            cache = self.new_cache(len(rows))
            ids = np.zeros((len(rows), longest), dtype=np.int64)
            mask = np.zeros((len(rows), longest), dtype=np.int64)
            pad = self.info.pad_token_id if self.info.pad_token_id is not None else (self.tokenizer.eos_token_ids or [0])[0]
            for i, r in enumerate(rows):
                ids[i, :] = pad
                ids[i, longest - len(r):] = r
                mask[i, longest - len(r):] = 1
            last = self._prefill(ids, cache, config.prefill_chunk, mask)
        assert cache is not None
        now = time.perf_counter()
        toks = [sample(last[i], config, s.rng, s.prompt) for i, s in enumerate(states)]
        now = time.perf_counter()
        for s in states:
            yield self._prefill_event(s, cache, t0, now)
        active = list(range(len(rows)))  # original row index of each cache row
        total_generated = 0
        while True:
            still: list[int] = []
            for pos, row in enumerate(active):
                s = states[row]
                if max_new == 0:
                    s.finish = "length"
                    ev = None
                else:
                    ev = self._accept(s, toks[pos], now, cache, config, max_new)
                if ev is not None:
                    total_generated += 1
                    yield ev
                if s.finish is None:
                    still.append(pos)
                else:
                    elapsed = time.perf_counter() - t0
                    yield self._done(s, cache, s.finish, {"batch": {
                        "rows": len(rows), "generated_total": total_generated, "elapsed_s": elapsed,
                        "tokens_per_s": total_generated / elapsed if elapsed > 0 else None,
                    }})
            if not still:
                break
            if len(still) != len(active):
                cache.select(still)
                toks = [toks[p] for p in still]
                active = [active[p] for p in still]
            step = np.asarray(toks, dtype=np.int64).reshape(-1, 1)
            logits = self.forward(step, cache, phase="decode", logits="last", reuse=True)
            toks = []
            for pos, row in enumerate(active):
                s = states[row]
                toks.append(sample(logits[pos, -1], config, s.rng, s.seen))
            now = time.perf_counter()
        self._settle_huge_pages()


def _raw_cpu_device() -> Any:
    """onnxruntime's pybind ``OrtDevice`` for host memory, None when this build does not expose it."""
    try:
        from onnxruntime.capi import _pybind_state as C

        return C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
    except Exception:  # pragma: no cover - private API moved
        return None


def _build_plan(onnx_path: Path, policy: "Policy", *, threads: int | None, strict: bool,
                prefill_path: Path | None = None) -> Any:
    """Sessions from ``runtime.scheduler.build_sessions``."""
    from inferos_cli.engine.scheduler import build_sessions

    return build_sessions(onnx_path, policy, threads=threads, strict=strict, prefill_path=prefill_path)


def _float_gqa(info: "ModelInfo") -> bool:
    return bool(info.uses_gqa_op) and info.kv_dtype == "float32"


def _cuda_graph(info: "ModelInfo", policy: "Policy") -> tuple["ModelInfo", str]:
    """For a one-session plan on CUDA, the model with its float32 GQA graph swapped for the Attention-op
    twin (every node on CUDA instead of GQA on the CPU; the twin's cache is a plain concat cache) and a
    note; otherwise ``info`` unchanged."""
    import dataclasses

    from inferos_cli.engine.scheduler import cuda_phases, phase_devices

    if not _float_gqa(info) or not phase_devices(policy)[2] or not all(cuda_phases(policy)):
        return info, ""
    from inferos_cli.graphs.attention import attention_op_graph

    twin = attention_op_graph(info.onnx_path)
    if twin is None:
        return info, ""
    return (dataclasses.replace(info, onnx_path=twin, uses_gqa_op=False),
            "graph: GroupQueryAttention -> Attention op (CUDA runs float32 GQA on the CPU)")


def _prefill_twin(graph: Path, info: "ModelInfo", backend: Any, policy: "Policy", *, last_logits: bool) -> Path | None:
    """The Attention-op twin for a CUDA prefill session of a two-session plan on a float32 GQA graph, when
    the KV cache is the plain one (twin of ``graph``) or the fused int8 one (twin of the original float
    graph, ``logits_keep`` added like ``graph``; the engine quantizes its presents); else None."""
    from inferos_cli.kv.layouts import PlainBackend
    from inferos_cli.kv.fused import FusedBackend
    from inferos_cli.engine.scheduler import cuda_phases, phase_devices

    if not isinstance(backend, (PlainBackend, FusedBackend)) or not _float_gqa(info) or phase_devices(policy)[2]:
        return None
    if not cuda_phases(policy)[0]:
        return None
    from inferos_cli.graphs.attention import attention_op_graph

    if isinstance(backend, FusedBackend):
        from inferos_cli.graphs.last_logits import last_logits_graph

        src = Path(info.onnx_path)
        graph = (last_logits_graph(src) or src) if last_logits else src
    return attention_op_graph(graph)
