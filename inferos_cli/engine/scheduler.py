"""Which device runs prefill and which runs decode (``scheduler.mode``), and opening their sessions.

- ``cpu``: one CPU session for both phases.
- ``gpu_only``: one session on the GPU device (``prefill_device`` or ``decode_device`` when one of them is
  ``dml``/``cuda``, else ``dml`` on Windows and ``cuda`` elsewhere; devices set to ``cpu`` by a settings
  layer, with no GPU named, mean the CPU: :func:`settle_mode`).
- ``npu_only``: one session on the NPU.
- ``hybrid``: prefill on ``prefill_device`` and decode on ``decode_device``. The KV cache lives on the host
  (numpy) between runs, so handing it from the prefill session to the decode session is the engine feeding
  the same cache arrays to the other session. Both directions are expressible (the integration guide's
  prefill=dml/decode=npu, and Lemonade's reverse).

One copy of the weights: phases that land on the same device (both asked for it, or a fallback brought
them there, e.g. the 7b profile's dml/npu on a host with neither) share ONE session when they run the
same graph with the same thread count. onnxruntime's Python API cannot share prepacked weights between
sessions (``SessionOptions.add_initializer`` shares the unpacked initializers only; each session still
packs its own copy), so a second session costs a second copy of the weights; the plan says so, with the
weight bytes, wherever it opens two.

Threads per phase: ``scheduler.prefill_threads`` / ``scheduler.decode_threads`` when set, else the
``threads`` argument (``--threads``), else :func:`~inferos_cli.engine.sessions.default_threads`. The
engine runs the phases one after the other, never at once, so each phase may use every core; the two
CPU pools of a two-session plan are opened with spinning off so an idle pool does not burn the cores
the other phase needs.

A requested provider that does not work falls back to CPU with a visible reason
(``PhaseSession.label()`` -> ``npu -> cpu (VitisAIExecutionProvider not available)``); ``strict=True``
(``--strict-devices``) raises :class:`~inferos_cli.errors.ProviderError` instead. Whether a fallback is
also *warned* depends on who named the device (:func:`asked_by`): a device named by a flag, the
environment or a config file is the user's request; one named by a profile (the size class's defaults
included) or left at the default is a preference, reported in the plan but not warned on every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from inferos_cli.engine.sessions import PhaseSession, is_windows, open_session

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.settings import Policy

GPU_DEVICES = ("dml", "cuda")
MODE_KEY, PREFILL_KEY, DECODE_KEY = "scheduler.mode", "scheduler.prefill_device", "scheduler.decode_device"


def gpu_device(policy: "Policy") -> str:
    """The GPU a ``gpu_only`` plan uses: a configured dml/cuda device, else dml on Windows, cuda elsewhere."""
    for dev in (policy.scheduler.prefill_device, policy.scheduler.decode_device):
        if dev in GPU_DEVICES:
            return dev
    return "dml" if is_windows() else "cuda"


def phase_devices(policy: "Policy") -> tuple[str, str, bool]:
    """(prefill device, decode device, one session by mode?) for ``policy.scheduler``."""
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


def settle_mode(policy: "Policy", sources: Mapping[str, str] | None) -> "Policy":
    """``policy`` with a ``gpu_only`` mode whose devices name no GPU but were set to ``cpu`` by some
    settings layer (``INFEROS_SCHEDULER__PREFILL_DEVICE=cpu`` over the 3b profile's ``gpu_only``) turned
    into ``cpu``: asking for the CPU never yields a GPU request (and its fallback message). Otherwise
    ``policy`` unchanged (``gpu_only`` with devices left at their default still means this platform's GPU)."""
    sch = policy.scheduler
    if sch.mode != "gpu_only" or sources is None:
        return policy
    devices = {PREFILL_KEY: sch.prefill_device, DECODE_KEY: sch.decode_device}
    if any(dev in GPU_DEVICES for dev in devices.values()):
        return policy
    if not any(dev == "cpu" and sources.get(key, "default") != "default" for key, dev in devices.items()):
        return policy
    return policy.model_copy(update={"scheduler": sch.model_copy(update={"mode": "cpu"})})


def is_request(source: str | None) -> bool:
    """True for a settings layer that is the user's own request (a flag, the environment, a config file,
    or a policy handed over whole: ``None``); False for a profile (size class included) or the default."""
    if source is None:
        return True
    return source in ("flag", "env") or source.startswith("config:")


def asked_by(policy: "Policy", sources: Mapping[str, str] | None) -> tuple[str | None, str | None]:
    """The settings layer that decided each phase's device (prefill, decode): the device key's layer, or
    the mode's where the mode alone names the device (``npu_only``, ``gpu_only`` on the platform's GPU).
    ``None`` when there are no sources (a policy given whole, which counts as a request)."""
    if sources is None:
        return None, None
    sch = policy.scheduler
    mode = sources.get(MODE_KEY)
    if sch.mode == "cpu":
        return mode, mode
    if sch.mode == "npu_only":
        return mode, mode
    if sch.mode == "gpu_only":
        key = next((k for k, dev in ((PREFILL_KEY, sch.prefill_device), (DECODE_KEY, sch.decode_device))
                    if dev in GPU_DEVICES), None)
        source = sources.get(key) if key else mode
        return source, source
    return sources.get(PREFILL_KEY), sources.get(DECODE_KEY)


def phase_threads(policy: "Policy", threads: int | None) -> tuple[int | None, int | None]:
    """(prefill, decode) intra-op threads of a hybrid plan (None: the session default)."""
    sch = policy.scheduler
    return sch.prefill_threads or threads, sch.decode_threads or threads


def weight_bytes(onnx_path: Path | str) -> int:
    """Bytes of ``onnx_path`` plus the external data files it references: what a session loads as
    weights (the figure a second session of the same model costs again)."""
    import onnx

    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    files = {entry.value for init in model.graph.initializer for entry in init.external_data
             if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files
                                     if (path.parent / f).is_file())


def open_sessions(
    onnx_path: Path | str, policy: "Policy", *, threads: int | None = None, strict: bool = False,
    prefill_path: Path | str | None = None, share: bool = False,
) -> tuple[PhaseSession, PhaseSession, list[str]]:
    """Open the sessions ``policy.scheduler`` asks for on ``onnx_path`` (see the module docstring):
    ``(prefill, decode, notes)``; the same object twice when the mode runs one session. ``share``: a
    hybrid plan whose phases land on one device runs both on one session (two :class:`PhaseSession`
    labels, one InferenceSession). ``prefill_path``: a twin of the graph for the prefill session of a
    two-session plan (same inputs, outputs and weights; :mod:`~inferos_cli.graphs.attention`)."""
    onnx_path = Path(onnx_path)
    sch = policy.scheduler
    pre_dev, dec_dev, shared = phase_devices(policy)
    notes: list[str] = []
    if shared:
        n = sch.decode_threads or sch.prefill_threads or threads
        ps = open_session(onnx_path, policy, "decode", pre_dev, threads=n, strict=strict)
        notes.extend(ps.notes)
        return ps, ps, notes
    pre_threads, dec_threads = phase_threads(policy, threads)
    ps_prefill = open_session(
        Path(prefill_path or onnx_path), policy, "prefill", pre_dev, threads=pre_threads, strict=strict,
        allow_spinning=False,
    )
    if share:
        ps = ps_prefill.for_phase("decode", dec_dev, strict=strict)
        notes.extend(ps.notes)
        return ps_prefill, ps, notes
    ps = open_session(onnx_path, policy, "decode", dec_dev, threads=dec_threads, strict=strict, allow_spinning=False)
    notes.extend(n for n in ps_prefill.notes + ps.notes if n not in notes)
    return ps_prefill, ps, notes
