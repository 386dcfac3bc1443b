"""The in-process engine: a model loaded for generation, and the public API the commands, the server, the
batcher and the quality tools call.

:class:`Engine` holds the plan (:mod:`inferos_cli.engine.plan`: which graph, KV layout, session and
IOBinding each phase uses), the forward step (:mod:`inferos_cli.engine.step`) and the tokenizer. The
primitive is :meth:`Engine.forward`; :meth:`Engine.generate` and :meth:`Engine.generate_batch` are the
token loop and its timing wrapper (:mod:`inferos_cli.engine.generate`), producing
:class:`~inferos_cli.events.Event`. The continuous batcher drives its own loop with the step API:
:meth:`Engine.new_sequence`, :meth:`Engine.prefill`, :meth:`Engine.prefill_event`, :meth:`Engine.accept`,
:meth:`Engine.finish`.

Prefill computes logits for the last position only (the plan loads the graph with a ``logits_keep``
input); ``forward(..., logits="all")`` (the default, used by perplexity) still returns every position.
Prompts longer than ``AUTO_PREFILL_CHUNK`` tokens are prefilled in chunks.

Context: a prompt that does not fit the model's context raises
:class:`~inferos_cli.errors.ContextOverflowError`; generation that reaches the context end stops with
``finish_reason="length"``. The memory a generation adds is backed with huge pages afterwards
(:meth:`Engine.settle_huge_pages`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import numpy as np

from inferos_cli.engine import generate as gen
from inferos_cli.engine.generate import Sequence as GenSequence
from inferos_cli.engine.plan import make_plan
from inferos_cli.engine.sampling import GenerationConfig
from inferos_cli.engine.sessions import anonymous_regions, back_with_huge_pages, huge_pages_wanted
from inferos_cli.engine.step import AUTO_PREFILL_CHUNK, Phase, Step, chunked_prefill
from inferos_cli.engine.stops import StopMatcher
from inferos_cli.errors import ContextOverflowError, UsageError
from inferos_cli.events import Event

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.kv.base import KVCache, KVLayout
    from inferos_cli.models.info import ModelInfo
    from inferos_cli.settings import Policy, Resolved

__all__ = ["AUTO_PREFILL_CHUNK", "Engine", "GenerationConfig", "StopMatcher"]


class Engine:
    """A model loaded for generation: plan (graph, KV layout, sessions per phase), step, tokenizer."""

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
        from inferos_cli.models.tokenizer import Tokenizer

        self.resolved = resolved
        self.policy: "Policy" = resolved.policy
        self.tokenizer = Tokenizer.from_model(info)
        # pressure: a machine.pressure source (level() -> 0..1) the KV cache reads to tighten its tiers;
        # read late, so run/serve may attach it after construction (engine.pressure = monitoring.pressure)
        self.pressure = pressure
        self.telemetry = telemetry
        # memory this engine adds from here on is backed with huge pages (see settle_huge_pages)
        self._huge_mark: dict[int, int] | None = anonymous_regions() if huge_pages_wanted() else None
        self.plan = make_plan(info, self.policy, threads=threads, strict=strict_devices,
                              pressure=self.pressure_level, last_logits=last_logits, sources=resolved.sources)
        assert self.plan.info is not None and self.plan.layout is not None
        self.info: "ModelInfo" = self.plan.info
        self.layout: "KVLayout" = self.plan.layout
        self.step = Step(self.plan, self.info.vocab_size)
        self.providers = self.plan.providers()
        self.uses_gqa = bool(self.info.uses_gqa_op)
        self._util_cache: tuple[float, dict[str, float | None]] | None = None

    @property
    def logits_note(self) -> str:
        """How many positions the LM head computes (from the plan)."""
        return self.plan.logits

    @property
    def prefill_twin(self) -> bool:
        """True when prefill runs the Attention-op twin (from the plan)."""
        return self.plan.prefill_twin

    @property
    def input_names(self) -> list[str]:
        """The decode graph's inputs."""
        return self.step.input_names

    @property
    def output_names(self) -> list[str]:
        """The decode graph's outputs."""
        return self.step.output_names

    @property
    def has_position_ids(self) -> bool:
        """True when the graph takes ``position_ids``."""
        return self.step.has_position_ids

    @property
    def has_logits_keep(self) -> bool:
        """True when the graph takes ``logits_keep`` (last-position logits)."""
        return self.step.has_logits_keep

    def pressure_level(self) -> float:
        """Memory pressure 0..1 from the attached pressure source (0 when none)."""
        return float(self.pressure.level()) if self.pressure is not None else 0.0

    def describe(self) -> dict[str, Any]:
        """Model, profile, providers and KV layout for headers and bench records."""
        return {
            "model": self.info.name,
            "profiles": list(self.resolved.profiles),
            "providers": dict(self.providers),
            "kv": self.layout.describe(),
            "logits": self.plan.logits,
            "plan": self.plan.describe(),
        }

    # ----- the primitive --------------------------------------------------------------------------------
    def new_cache(self, batch: int = 1, capacity: int | None = None) -> "KVCache":
        """An empty cache of ``batch`` rows; ``capacity`` (columns) lets GQA graphs decode in place."""
        return self.layout.new_cache(batch, capacity=capacity)

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
        ``position_ids`` continue each row's true length (``cache.seen_tokens``).

        ``reuse=True`` (the decode loops, which sample before the next step) lets the logits land in a
        step-owned buffer that the next ``reuse=True`` call of the same shape overwrites: no fresh
        ``[B, 1, V]`` allocation (and its page faults) per token."""
        return self.step.forward(input_ids, cache, phase=phase, new_mask=new_mask, logits=logits, reuse=reuse)

    # ----- the step API (generation loops and the continuous batcher) ------------------------------------
    def new_sequence(self, prompt: list[int], config: GenerationConfig, row: int = 0) -> GenSequence:
        """Book-keeping for one sequence generated after ``prompt`` (row ``row`` of a batch; a seeded
        config samples row ``r`` with ``seed + r``)."""
        return GenSequence(row, prompt, config, self.tokenizer.stream(prompt))

    def prefill(self, ids: np.ndarray, cache: "KVCache", chunk: int | None = None,
                new_mask: np.ndarray | None = None) -> np.ndarray:
        """Run the prompt ``ids`` ``[B, T]`` (whole or in chunks of ``chunk`` tokens) into ``cache``; return
        the logits of each row's last real token ``[B, V]``."""
        return chunked_prefill(self.forward, ids, cache, chunk, self.info.vocab_size, new_mask)

    def prefill_event(self, seq: GenSequence, cache: "KVCache", t0: float, now: float) -> Event:
        """The ``prefill`` event of ``seq`` (prompt handed over at ``t0``, first token ready at ``now``)."""
        return gen.prefill_event(self, seq, cache, t0, now)

    def accept(self, seq: GenSequence, tok: int, now: float, cache: "KVCache", config: GenerationConfig,
               max_new: int) -> Event | None:
        """Record a sampled token of ``seq``; its ``token`` event, or None for an ending EOS
        (``seq.finish`` is set when the sequence ends)."""
        return gen.accept(self, seq, tok, now, cache, config, max_new)

    def finish(self, seq: GenSequence, cache: "KVCache", reason: str | None,
               extra: dict[str, Any] | None = None) -> Event:
        """The ``done`` event of ``seq`` (``extra`` is merged into ``Event.extra``)."""
        return gen.finish(self, seq, cache, reason, extra)

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
        return gen.generate(self, prompt_ids, config, cache=cache)

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], config: GenerationConfig | None = None
    ) -> Iterator[Event]:
        """Decode several prompts together in the batch dimension. Each row keeps its true positions
        (left padding + attention mask + position ids; GQA graphs: per-row prefill merged into one
        right-padded cache); a finished row retires (``cache.select``) while the others continue.
        ``Event.seq`` is the row index; every ``done`` event carries the batch totals so far in
        ``extra["batch"]`` (the last one: aggregate tokens/s of the whole batch)."""
        return gen.generate_batch(self, prompts, config)

    def util(self) -> dict[str, float | None]:
        """The telemetry's ``{cpu, gpu, npu}``, re-read at most every 100 ms (the sampler's own fastest
        cadence), so per-token events do not each merge every monitor's reading."""
        if self.telemetry is None:
            return {}
        now = time.perf_counter()
        if self._util_cache is None or now - self._util_cache[0] >= 0.1:
            self._util_cache = (now, dict(self.telemetry()))
        return self._util_cache[1]

    def settle_huge_pages(self) -> None:
        """After a generation: back with huge pages what the process's anonymous memory grew by since the
        last mark (the session's arena for activations, the KV buffers; the weights were done when the
        session opened), :func:`~inferos_cli.engine.sessions.back_with_huge_pages`. One read of
        ``/proc/self/maps`` when nothing grew; runs after the ``done`` event is handed over, so no reported
        timing includes it. Linux only; ``INFEROS_HUGEPAGES=0`` turns it off."""
        if self._huge_mark is None:
            return
        now = anonymous_regions()
        if now != self._huge_mark:
            back_with_huge_pages(self._huge_mark, now)
            now = anonymous_regions()  # madvise split the regions: the next growth is measured from here
        self._huge_mark = now
