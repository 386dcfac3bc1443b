"""The plan: for each phase (prefill, decode), which graph, KV layout, session/provider and IOBinding the
engine uses. Decided once, from the policy, the model and the provider probes (:func:`make_plan`), and
reported from the same object (:meth:`Plan.describe`, :meth:`Plan.to_json`, :attr:`Plan.notes`,
:meth:`Plan.warnings`), so what is printed is what runs.

The decisions, in order:

1. **graph of a one-session CUDA plan**: a float32 ``GroupQueryAttention`` graph is swapped for its
   ``Attention``-op twin (onnxruntime's CUDA GQA kernel is fp16/bf16 only, so the float32 GQA nodes would
   run on the CPU); the twin's cache is a plain concat cache (:func:`cuda_graph`).
2. **KV layout** (:func:`inferos_cli.kv.layouts.kv_layout`); ``kv.quant = auto`` picks the fused int8
   cache when :func:`auto_fused` says the graph and the phases' providers take it; ``fp16`` the float16
   GQA graph (:mod:`inferos_cli.graphs.half_kv`), which gets no CUDA prefill twin.
3. **last-position logits**: the sessions load the graph with a ``logits_keep`` input
   (:mod:`inferos_cli.graphs.last_logits`), so a prefill runs the LM head once.
4. **prefill twin**: a two-session plan prefilling a float32 GQA graph on CUDA runs the prefill session
   on the ``Attention``-op twin and hands its presents to the decode cache (:func:`prefill_twin_graph`).
5. **sessions and providers** (:func:`inferos_cli.engine.scheduler.open_sessions`): phases that land on
   one device (asked for it, or fell back to it) share one session, so the weights are held once
   (:func:`one_session`); a plan with two sessions says what the second copy costs. Fallbacks are
   visible in the labels and the description; a fallback is warned (:meth:`Plan.warnings`) only where
   the user asked for the device (flag, environment, config), not where a profile prefers it.
6. **IOBinding**: steps bind the cache's buffers as past inputs and present outputs (in place) when
   ``io.enable_iobinding`` is on and the layout preallocates shared buffers; otherwise every step is a
   plain ``session.run``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from inferos_cli.engine.scheduler import (
    asked_by,
    cuda_phases,
    is_request,
    open_sessions,
    phase_devices,
    phase_threads,
    settle_mode,
    weight_bytes,
)
from inferos_cli.engine.sessions import (
    PhaseSession,
    available_providers,
    default_threads,
    landing_device,
    provider_name,
)
from inferos_cli.graphs.fused import supported as fused_supported
from inferos_cli.kv.layouts import kv_layout

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.kv.base import KVLayout
    from inferos_cli.models.info import ModelInfo
    from inferos_cli.settings import Policy

PREFILL_TWIN_NOTE = "prefill graph: GroupQueryAttention -> Attention op (CUDA)"
CUDA_GRAPH_NOTE = "graph: GroupQueryAttention -> Attention op (CUDA runs float32 GQA on the CPU)"
IOBINDING_NOTE = "IOBinding on"


@dataclass
class Plan:
    """What each phase runs: ``prefill`` and ``decode`` sessions (one InferenceSession when ``shared``;
    the same :class:`PhaseSession` object when the mode itself runs one session), the decode graph
    ``onnx_path``, and the decisions behind them (see the module docstring).

    ``info``: the model as run (its graph may be the CUDA twin); ``layout``: the KV layout (None for a
    bare-graph plan from :meth:`open`); ``prefill_twin``: prefill runs the Attention-op twin;
    ``iobinding``: steps bind shared past/present buffers in place; ``logits``: how many positions the LM
    head computes; ``extra_weight_bytes``: what the second session of a two-session plan holds again."""

    mode: str
    prefill: PhaseSession
    decode: PhaseSession
    onnx_path: Path
    notes: list[str] = field(default_factory=list)
    info: "ModelInfo | None" = None
    layout: "KVLayout | None" = None
    prefill_twin: bool = False
    iobinding: bool = False
    logits: str = "all positions (last_logits off)"
    extra_weight_bytes: int = 0

    @classmethod
    def open(cls, onnx_path: Path | str, policy: "Policy", *, threads: int | None = None, strict: bool = False,
             prefill_path: Path | str | None = None, sources: Mapping[str, str] | None = None,
             share: bool | None = None) -> "Plan":
        """The sessions ``policy.scheduler`` asks for on one graph, with no model decisions (a bare graph).
        ``sources``: the settings layer of each policy key (:attr:`~inferos_cli.settings.Resolved.sources`),
        which tells a user's request from a profile's preference; None: the policy is a request.
        ``share``: run both phases on one session (default: :func:`one_session`)."""
        policy = settle_mode(policy, sources)
        if share is None:
            share = prefill_path is None and one_session(policy, threads)
        prefill, decode, notes = open_sessions(onnx_path, policy, threads=threads, strict=strict,
                                               prefill_path=prefill_path, share=share)
        plan = cls(mode=policy.scheduler.mode, prefill=prefill, decode=decode, onnx_path=Path(onnx_path),
                   notes=notes)
        pre_src, dec_src = asked_by(policy, sources)
        for ps, src in ((prefill, pre_src), (decode, dec_src)):
            ps.asked_by, ps.preferred = src, not is_request(src)
        if not plan.shared:
            plan.extra_weight_bytes = weight_bytes(onnx_path)
            plan.notes.insert(0, plan.sessions_note())
        plan.notes.extend(plan.preference_notes())
        return plan

    @property
    def shared(self) -> bool:
        """True when both phases run on one session (one copy of the weights)."""
        return self.prefill.session is self.decode.session

    def phases(self) -> list[tuple[str, PhaseSession]]:
        """``[("prefill+decode", ps)]`` when the mode runs one session, else one entry per phase."""
        if self.prefill is self.decode:
            return [("prefill+decode", self.prefill)]
        return [("prefill", self.prefill), ("decode", self.decode)]

    def providers(self) -> dict[str, str]:
        """``{"prefill": label, "decode": label}`` for ``Event.provider`` and tables."""
        return {"prefill": self.prefill.label(), "decode": self.decode.label()}

    def warnings(self) -> list[str]:
        """One line per phase that fell back from a device the user asked for (flag, environment, config;
        the CLI prints them). A profile's preferred device that is not here is reported by
        :meth:`describe` and the notes instead, not warned on every run."""
        return [f"{name}: {ps.label()}" for name, ps in self.phases() if ps.fallback_reason and not ps.preferred]

    def sessions_note(self) -> str:
        """What a two-session plan costs: ``two CPU sessions (prefill 2 threads, decode 1): KV handed
        across on the host; weights held twice, +105.0 MiB``."""
        from inferos_cli.units import format_bytes

        pre, dec = self.prefill, self.decode
        if pre.device == dec.device:
            head = f"two {pre.device.upper()} sessions (prefill {pre.threads} threads, decode {dec.threads})"
        else:
            head = f"two sessions (prefill on {pre.device}, decode on {dec.device})"
        return f"{head}: KV handed across on the host; weights held twice, +{format_bytes(self.extra_weight_bytes)}"

    def preference_notes(self) -> list[str]:
        """``prefill: dml preferred by profile:7b (size class), not usable here: runs on cpu`` for each
        phase whose profile-preferred device fell back."""
        return [f"{name}: {ps.requested} preferred by {ps.asked_by or 'default'}, not usable here: runs on "
                f"{ps.device}" for name, ps in self.phases() if ps.fallback_reason and ps.preferred]

    def describe(self) -> str:
        """One line: ``cpu: cpu (1 session, 2 threads)``, ``hybrid: prefill dml -> cpu (...), decode npu ->
        cpu (...) (1 session, 2 threads)`` or ``hybrid: prefill cuda (2 threads), decode cpu (2 threads);
        2 sessions: weights held twice, +3.6 GiB``."""
        from inferos_cli.units import format_bytes

        if self.prefill is self.decode:
            return f"{self.mode}: {self.prefill.label()} (1 session, {self.prefill.threads} threads)"
        if self.shared:
            return (f"{self.mode}: prefill {self.prefill.label()}, decode {self.decode.label()} "
                    f"(1 session, {self.decode.threads} threads)")
        return (
            f"{self.mode}: prefill {self.prefill.label()} ({self.prefill.threads} threads), "
            f"decode {self.decode.label()} ({self.decode.threads} threads); "
            f"2 sessions: weights held twice, +{format_bytes(self.extra_weight_bytes)}"
        )

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--format json`` and bench records."""
        return {
            "mode": self.mode,
            "shared": self.shared,
            "sessions": 1 if self.shared else 2,
            "extra_weight_bytes": self.extra_weight_bytes,
            "prefill": self.prefill.to_json(),
            "decode": self.decode.to_json(),
            "notes": list(self.notes),
        }


def landing(policy: "Policy") -> tuple[str, str]:
    """(prefill, decode): the device each phase runs on here, after any fallback (a CUDA phase runs on
    CUDA only where :func:`~inferos_cli.engine.scheduler.cuda_phases` says the provider works)."""
    pre, dec, _ = phase_devices(policy)
    on_cuda = cuda_phases(policy)

    def land(dev: str, cuda: bool) -> str:
        if dev == "cuda":
            return "cuda" if cuda else "cpu"
        return landing_device(dev)

    return land(pre, on_cuda[0]), land(dec, on_cuda[1])


def one_session(policy: "Policy", threads: int | None = None) -> bool:
    """True when both phases run on one session: the mode asks for one, or the phases land on the same
    device (:func:`landing`) with the same thread count. Two pools of different sizes on one device are
    two sessions (and two copies of the weights), as asked."""
    if phase_devices(policy)[2]:
        return True
    pre, dec = landing(policy)
    pre_threads, dec_threads = phase_threads(policy, threads)
    return pre == dec and (pre_threads or default_threads()) == (dec_threads or default_threads())


def float_gqa(info: "ModelInfo") -> bool:
    """True for a float32 ``GroupQueryAttention`` graph (the graphs the CUDA twins and the fused cache take)."""
    return bool(info.uses_gqa_op) and info.kv_dtype == "float32"


def cuda_graph(info: "ModelInfo", policy: "Policy", one: bool | None = None) -> tuple["ModelInfo", str]:
    """For a one-session plan on CUDA (``one``: both phases on one session; default: the mode runs one),
    the model with its float32 GQA graph swapped for the Attention-op twin (every node on CUDA instead of
    GQA on the CPU; the twin's cache is a plain concat cache) and a note; otherwise ``info`` unchanged."""
    one = phase_devices(policy)[2] if one is None else one
    if not float_gqa(info) or not one or not all(cuda_phases(policy)):
        return info, ""
    from inferos_cli.graphs.attention import attention_op_graph

    twin = attention_op_graph(info.onnx_path)
    if twin is None:
        return info, ""
    return dataclasses.replace(info, onnx_path=twin, uses_gqa_op=False), CUDA_GRAPH_NOTE


def twin_prefill(device: str, info: "ModelInfo") -> bool:
    """True when a prefill on ``device`` runs the float Attention-op twin of the graph and hands int8 codes
    to the CPU decode (CUDA only, graphs whose GQA reads ``position_ids``)."""
    if device != "cuda" or not info.uses_gqa_op:
        return False
    from inferos_cli.graphs.attention import has_twin

    return has_twin(info.onnx_path)


def auto_fused(info: "ModelInfo", policy: "Policy") -> bool:
    """``kv.quant = auto``: the fused int8 cache when the graph takes it (float32 ``GroupQueryAttention``),
    the policy wants speed rather than the last bit of quality (``kv.mode`` is not ``quality_optimized``) and
    nothing asks for eviction (no ``kv.budget_bytes`` / ``kv.max_tokens``, which only the segmented cache
    honours), and decode runs on the CPU (asked for, or the asked-for provider is not installed), as does
    prefill unless it is a CUDA prefill on the Attention-op twin (the engine quantizes its float presents
    with the graph's scales): the quantized-cache kernel and the float-prefill ``If`` run on onnxruntime's
    CPU provider, and a GPU/NPU provider would hand the attention nodes back to the CPU one by one;
    otherwise the tiered segmented cache (comparisons in ``benchmarks/README.md``)."""
    kv = policy.kv
    if kv.mode == "quality_optimized" or kv.budget_bytes is not None or kv.max_tokens is not None:
        return False
    installed = set(available_providers())
    prefill, decode, _ = phase_devices(policy)
    if decode != "cpu" and provider_name(decode) in installed:
        return False
    if prefill != "cpu" and provider_name(prefill) in installed and not twin_prefill(prefill, info):
        return False
    return fused_supported(info)


def choose_layout(info: "ModelInfo", policy: "Policy", *, pressure: Callable[[], float] | None = None) -> "KVLayout":
    """The KV layout for ``info`` under ``policy`` (``kv.quant = auto`` resolved by :func:`auto_fused`); no
    layout preallocates shared buffers when ``io.enable_iobinding`` is off."""
    return kv_layout(info, policy, pressure=pressure,
                     auto_fused=policy.kv.quant == "auto" and auto_fused(info, policy),
                     shared_buffer=bool(policy.io.enable_iobinding))


def prefill_twin_graph(graph: Path, info: "ModelInfo", layout: "KVLayout", policy: "Policy", *,
                       last_logits: bool, one: bool | None = None) -> Path | None:
    """The Attention-op twin for a CUDA prefill session of a two-session plan (``one`` False; default:
    the mode runs two) on a float32 GQA graph, when the KV cache is the plain one (twin of ``graph``) or
    the fused int8 one (twin of the original float graph, ``logits_keep`` added like ``graph``; the step
    quantizes its presents); else None."""
    from inferos_cli.kv.fused import FusedLayout
    from inferos_cli.kv.layouts import PlainLayout

    one = phase_devices(policy)[2] if one is None else one
    if not isinstance(layout, (PlainLayout, FusedLayout)) or not float_gqa(info) or one:
        return None
    if not cuda_phases(policy)[0]:
        return None
    from inferos_cli.graphs.attention import attention_op_graph

    if isinstance(layout, FusedLayout):
        from inferos_cli.graphs.last_logits import last_logits_graph

        src = Path(info.onnx_path)
        graph = (last_logits_graph(src) or src) if last_logits else src
    return attention_op_graph(graph)


def make_plan(info: "ModelInfo", policy: "Policy", *, threads: int | None = None, strict: bool = False,
              pressure: Callable[[], float] | None = None, last_logits: bool = True,
              sources: Mapping[str, str] | None = None) -> Plan:
    """Decide every phase's graph, KV layout, session and IOBinding (module docstring), open the sessions.
    ``sources``: the settings layer of each policy key (a user's request warns on fallback, a profile's
    preference does not; None: the policy is a request)."""
    policy = settle_mode(policy, sources)
    one = one_session(policy, threads)
    info, graph_note = cuda_graph(info, policy, one)
    layout = choose_layout(info, policy, pressure=pressure)
    graph = Path(layout.onnx_path)
    logits = "all positions (last_logits off)"
    sliced = None
    if last_logits:
        from inferos_cli.graphs.last_logits import last_logits_graph

        sliced = last_logits_graph(graph)
        logits = "last position in prefill" if sliced else "all positions (LM head pattern not found)"
        graph = sliced or graph
    twin = prefill_twin_graph(graph, info, layout, policy, last_logits=sliced is not None, one=one)
    plan = Plan.open(graph, policy, threads=threads, strict=strict, prefill_path=twin, sources=sources,
                     share=one and twin is None)
    plan.info, plan.layout, plan.logits = info, layout, logits
    plan.prefill_twin = twin is not None and not plan.shared
    plan.iobinding = bool(policy.io.enable_iobinding) and layout.shared_buffer
    plan.decode.iobinding = plan.iobinding
    plan.prefill.iobinding = plan.iobinding and (plan.shared or not plan.prefill_twin)
    if plan.iobinding:
        plan.notes.append(IOBINDING_NOTE)
    for note in (graph_note, PREFILL_TWIN_NOTE if plan.prefill_twin else ""):
        if note:
            plan.notes.append(note)
    return plan
