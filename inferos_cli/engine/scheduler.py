"""Which session runs prefill and which runs decode (``scheduler.mode``).

- ``cpu``: one CPU session for both phases.
- ``gpu_only``: one session on the GPU device (``prefill_device`` or ``decode_device`` when one of them is
  ``dml``/``cuda``, else ``dml`` on Windows and ``cuda`` elsewhere).
- ``npu_only``: one session on the NPU.
- ``hybrid``: two sessions of the same graph, prefill on ``prefill_device`` and decode on
  ``decode_device``. The KV cache lives on the host (numpy) between runs, so handing it from the prefill
  session to the decode session is the engine feeding the same cache arrays to the other session. Both
  directions are expressible (the integration guide's prefill=dml/decode=npu, and Lemonade's reverse).
  On a CPU-only machine hybrid still opens two CPU sessions, each with its own thread count, so the
  handoff is exercised.

Threads per phase: ``scheduler.prefill_threads`` / ``scheduler.decode_threads`` when set, else the
``threads`` argument (``--threads``), else the physical core count. The engine runs the phases one after
the other, never at once, so each phase may use every core; the two CPU pools of a hybrid plan are opened
with spinning off so an idle pool does not burn the cores the other phase needs.

A requested provider that does not work falls back to CPU with a visible reason
(``PhaseSession.label()`` -> ``npu -> cpu (VitisAIExecutionProvider not available)``); ``strict=True``
(``--strict-devices``) raises :class:`~inferos_cli.errors.ProviderError` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferos_cli.engine.sessions import PhaseSession, is_windows, open_session

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.settings import Policy

GPU_DEVICES = ("dml", "cuda")


@dataclass
class SessionPlan:
    """The sessions of one model: ``prefill`` and ``decode`` (the same object when ``shared``)."""

    mode: str
    prefill: PhaseSession
    decode: PhaseSession
    onnx_path: Path
    notes: list[str] = field(default_factory=list)

    @property
    def shared(self) -> bool:
        """True when both phases run on one session."""
        return self.prefill is self.decode

    def for_phase(self, phase: str) -> PhaseSession:
        """The session of ``phase`` (``prefill`` or ``decode``)."""
        return self.prefill if phase == "prefill" else self.decode

    def providers(self) -> dict[str, str]:
        """``{"prefill": label, "decode": label}`` for ``Event.provider`` and tables."""
        return {"prefill": self.prefill.label(), "decode": self.decode.label()}

    def warnings(self) -> list[str]:
        """One line per phase that fell back to CPU (the CLI prints them; never silent)."""
        seen: list[str] = []
        for ps in (self.prefill, self.decode):
            if ps.fallback_reason:
                line = f"{ps.phase}: {ps.label()}"
                if self.shared:
                    line = f"prefill+decode: {ps.label()}"
                if line not in seen:
                    seen.append(line)
        return seen

    def describe(self) -> str:
        """One line: ``cpu (1 session, 2 threads)`` or ``hybrid: prefill dml, decode npu -> cpu (...)``."""
        if self.shared:
            return f"{self.mode}: {self.prefill.label()} (1 session, {self.prefill.threads} threads)"
        return (
            f"{self.mode}: prefill {self.prefill.label()} ({self.prefill.threads} threads), "
            f"decode {self.decode.label()} ({self.decode.threads} threads)"
        )

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--format json`` and bench records."""
        return {
            "mode": self.mode,
            "shared": self.shared,
            "prefill": self.prefill.to_json(),
            "decode": self.decode.to_json(),
            "notes": list(self.notes),
        }


def gpu_device(policy: "Policy") -> str:
    """The GPU a ``gpu_only`` plan uses: a configured dml/cuda device, else dml on Windows, cuda elsewhere."""
    for dev in (policy.scheduler.prefill_device, policy.scheduler.decode_device):
        if dev in GPU_DEVICES:
            return dev
    return "dml" if is_windows() else "cuda"


def phase_devices(policy: "Policy") -> tuple[str, str, bool]:
    """(prefill device, decode device, shared session?) for ``policy.scheduler``."""
    sch = policy.scheduler
    if sch.mode == "cpu":
        return "cpu", "cpu", True
    if sch.mode == "gpu_only":
        dev = gpu_device(policy)
        return dev, dev, True
    if sch.mode == "npu_only":
        return "npu", "npu", True
    return sch.prefill_device, sch.decode_device, False


def cuda_phases(policy: "Policy") -> tuple[bool, bool]:
    """(prefill, decode) each True when that phase is asked to run on ``cuda`` and the CUDA provider
    passes the strict probe here."""
    from inferos_cli.engine.sessions import probe_provider

    pre_dev, dec_dev, _ = phase_devices(policy)
    if "cuda" not in (pre_dev, dec_dev) or not probe_provider("cuda").works:
        return False, False
    return pre_dev == "cuda", dec_dev == "cuda"


def build_sessions(
    onnx_path: Path | str, policy: "Policy", *, threads: int | None = None, strict: bool = False,
    prefill_path: Path | str | None = None,
) -> SessionPlan:
    """Open the sessions ``policy.scheduler`` asks for on ``onnx_path`` (see the module docstring).
    ``prefill_path``: a twin of the graph for the prefill session of a two-session plan (same inputs,
    outputs and weights; :mod:`~inferos_cli.graphs.attention`)."""
    onnx_path = Path(onnx_path)
    sch = policy.scheduler
    pre_dev, dec_dev, shared = phase_devices(policy)
    notes: list[str] = []
    if shared:
        n = sch.decode_threads or sch.prefill_threads or threads
        ps = open_session(onnx_path, policy, "decode", pre_dev, threads=n, strict=strict)
        ps_prefill = ps
        notes.extend(ps.notes)
    else:
        ps_prefill = open_session(
            Path(prefill_path or onnx_path), policy, "prefill", pre_dev, threads=sch.prefill_threads or threads,
            strict=strict, allow_spinning=False,
        )
        ps = open_session(
            onnx_path, policy, "decode", dec_dev, threads=sch.decode_threads or threads, strict=strict,
            allow_spinning=False,
        )
        if ps_prefill.device == "cpu" and ps.device == "cpu":
            notes.append(
                "two CPU sessions (hybrid on this machine): KV handed across on the host; "
                "each session holds its own copy of the weights"
            )
        notes.extend(n for n in ps_prefill.notes + ps.notes if n not in notes)
    if ps.iobinding:
        notes.append("IOBinding on")
    return SessionPlan(mode=sch.mode, prefill=ps_prefill, decode=ps, onnx_path=onnx_path, notes=notes)
