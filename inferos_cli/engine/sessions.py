"""Execution providers: device names, SessionOptions from the Policy, and a strict provider probe.

``onnxruntime.get_available_providers()`` lists what was compiled in, not what works, and a session whose
provider fails silently falls back to CPU. :func:`probe_provider` therefore builds a one-node model, opens
it with ``session.disable_cpu_ep_fallback=1`` and compares ``get_providers()`` with what was asked.

Device aliases (the ``scheduler.*_device`` values):

- ``dml``  -> ``DmlExecutionProvider`` (Windows, package onnxruntime-directml)
- ``npu``  -> ``VitisAIExecutionProvider`` (AMD Ryzen AI); on Intel ``OpenVINOExecutionProvider`` with
  ``device_type=NPU`` is used when VitisAI is absent and OpenVINO is present
- ``cuda`` -> ``CUDAExecutionProvider`` (onnxruntime-gpu)
- ``cpu``  -> ``CPUExecutionProvider``

``Policy.io`` mapping (what each provider really supports):

- ``io.enable_iobinding``: the plan (:mod:`inferos_cli.engine.plan`) lets a step bind the cache's shared
  past/present buffers in place; off, every step is a plain ``session.run``.
- ``io.dml_pool_bytes``: CUDA's ``gpu_mem_limit``. DirectML has no memory-limit option (its provider
  options are ``device_id``, ``performance_preference``, ``device_filter``), so the value is not applied
  there and :func:`provider_spec` says so in its notes.
- ``io.host_pool_bytes``: the reference of the memory-pressure feedback (``machine.pressure``). It is not
  an onnxruntime cap: a CPU arena registered with ``OrtArenaCfg(max_mem)`` and used through
  ``session.use_env_allocators=1`` does not enforce its limit (checked on onnxruntime 1.31), so inferos
  does not pretend it does.
- DirectML's required session options: ``enable_mem_pattern=False`` and ``ORT_SEQUENTIAL`` execution.

Huge pages for the weights (Linux, CPU sessions): onnxruntime keeps a model's (prepacked) weights in
ordinary 4 KiB heap pages, and batch-1 decoding streams all of them once per token, so the TLB misses of
the weights are a visible share of a step. :func:`back_with_huge_pages` asks the kernel to back the
memory a session creation added with transparent huge pages (``MADV_HUGEPAGE`` + ``MADV_COLLAPSE``,
Linux >= 6.1; with THP ``madvise`` or ``always``); ``Engine`` does the same after each generation that
grew the heap (the session's arena, the KV cache). ``INFEROS_HUGEPAGES=0`` turns it off; on other
systems, or when the kernel refuses, nothing changes.

A CPU session reads its external weights from read-only maps of their files that are trimmed while and
after it is built (:mod:`inferos_cli.engine.weightmaps`): what onnxruntime prepacked is not kept twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from inferos_cli.engine import weightmaps
from inferos_cli.errors import ProviderError

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort

    from inferos_cli.settings import Policy

Phase = Literal["prefill", "decode"]

DEVICE_PROVIDERS: dict[str, str] = {
    "dml": "DmlExecutionProvider",
    "npu": "VitisAIExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
NPU_ALTERNATIVES: tuple[str, ...] = ("VitisAIExecutionProvider", "OpenVINOExecutionProvider")
PROVIDER_DEVICES: dict[str, str] = {v: k for k, v in DEVICE_PROVIDERS.items()} | {"OpenVINOExecutionProvider": "npu"}
INSTALL_HINTS: dict[str, str] = {
    "DmlExecutionProvider": "install onnxruntime-directml (Windows) instead of onnxruntime",
    "VitisAIExecutionProvider": "install the AMD Ryzen AI software (it ships the VitisAI provider)",
    "OpenVINOExecutionProvider": "install onnxruntime-openvino",
    "CUDAExecutionProvider": "install onnxruntime-gpu with a matching CUDA runtime",
    "CPUExecutionProvider": "reinstall onnxruntime",
}


def provider_name(device: str) -> str:
    """``dml`` -> ``DmlExecutionProvider`` etc.; a full provider name is returned unchanged."""
    if device in DEVICE_PROVIDERS:
        return DEVICE_PROVIDERS[device]
    if device.endswith("ExecutionProvider"):
        return device
    raise ProviderError(
        f"unknown device {device!r}", f"use one of: {', '.join(DEVICE_PROVIDERS)}"
    )


def device_of(provider: str) -> str:
    """``DmlExecutionProvider`` -> ``dml``; unknown providers map to their own name."""
    return PROVIDER_DEVICES.get(provider, provider)


def available_providers() -> list[str]:
    """Providers compiled into the installed onnxruntime (not a promise that they work)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def npu_provider() -> str:
    """The NPU provider to use here: VitisAI when present, else OpenVINO (Intel NPU), else VitisAI (absent)."""
    have = available_providers()
    for name in NPU_ALTERNATIVES:
        if name in have:
            return name
    return NPU_ALTERNATIVES[0]


@dataclass(frozen=True)
class ProbeResult:
    """Outcome of a strict one-node probe: compiled in (``available``), and really ran (``works``)."""

    name: str
    available: bool
    works: bool
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain data for doctor's JSON."""
        return {"name": self.name, "available": self.available, "works": self.works, "reason": self.reason}


def _probe_model_bytes() -> bytes:
    """A one-node float32 ``Add`` model, ONNX IR version 10 (onnxruntime 1.31 loads IR <= 13)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph([node], "inferos_probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


@lru_cache(maxsize=None)
def probe_provider(name: str) -> ProbeResult:
    """Strictly probe a provider (alias or full name): open a one-node model on it alone with CPU
    fallback disabled, run it, check the output and that ``get_providers()`` lists it. Cached per process."""
    import numpy as np
    import onnxruntime as ort

    provider = npu_provider() if name == "npu" else provider_name(name)
    if provider not in available_providers():
        return ProbeResult(provider, False, False, f"{provider} not available ({INSTALL_HINTS.get(provider, 'not compiled into this onnxruntime')})")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if provider != "CPUExecutionProvider":
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if provider == "DmlExecutionProvider":
        opts.enable_mem_pattern = False
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    prov_opts: dict[str, str] = {"device_type": "NPU"} if provider == "OpenVINOExecutionProvider" else {}
    # onnxruntime's Python wrapper prints an "EP Error" banner to stdout and retries on other providers
    # when a GPU provider fails to initialise (TensorRT without its libraries); keep it off the user's
    # screen and report its first line, which names the real cause, instead of the retry's error
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            sess = ort.InferenceSession(_probe_model_bytes(), sess_options=opts, providers=[(provider, prov_opts)])
        got = sess.get_providers()
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        (y,) = sess.run(["y"], {"x": x})
    except Exception as exc:  # any EP failure: driver missing, device absent, unsupported op
        msg = _ep_error(printed.getvalue()) or (str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return ProbeResult(provider, True, False, f"{provider} failed to run a one-node model: {msg[:200]}")
    if not got or got[0] != provider:
        return ProbeResult(provider, True, False, f"{provider} was asked for but the session runs on {got}")
    if not np.allclose(y, x + x):
        return ProbeResult(provider, True, False, f"{provider} returned a wrong result on a one-node Add model")
    return ProbeResult(provider, True, True, "")


def _ep_error(printed: str) -> str:
    """The cause from onnxruntime's printed "EP Error" banner (the text after the C++ location), or ''."""
    for line in printed.splitlines():
        if line.startswith("EP Error"):
            text = line.split(")", 1)[1].strip() if ")" in line else line[len("EP Error"):].strip()
            return text.split(". ")[0].strip().rstrip(".")
    return ""


HOST_POOL_NOTE = (
    "io.host_pool_bytes is the memory-pressure reference, not an onnxruntime cap: a CPU arena registered "
    "with max_mem (OrtArenaCfg + session.use_env_allocators) was checked not to enforce the limit in "
    "onnxruntime 1.31"
)


# ---------------------------------------------------------------------------------------------------------
# session / provider options from the Policy


def default_threads(batched: bool = False) -> int:
    """Intra-op threads when neither ``--threads`` nor the profile sets them: half the physical cores
    (psutil; else half the logical cores), at least 1, at most 8.

    Why half: batch-1 decode is memory-bound and made of a few hundred small ops per token; every extra
    pool thread costs a wake-up per op, and a core busy with something else (the user's other programs)
    stalls each op until its slice of the work is done. Leaving half the cores free keeps a laptop
    responsive and keeps decode fast under load; onnxruntime-genai's own default (half the logical cores)
    is the same number on machines with SMT. More threads pay off for long prefills on an idle machine:
    set ``--threads`` or ``scheduler.prefill_threads`` / ``decode_threads`` in a profile.

    ``batched=True`` (``run --prompts-file``, ``serve``): every physical core. Decoding several rows at
    once is compute-bound, not wake-up-bound (``benchmarks/batch_throughput.py``)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil is a dependency; stay safe anyway
        n = None
    if not n:
        n = os.cpu_count() or 1
    if batched:
        return max(1, n)
    return max(1, min(8, n // 2))


def session_options(
    policy: "Policy",
    phase: Phase,
    threads: int | None,
    *,
    provider: str = "CPUExecutionProvider",
    allow_spinning: bool = False,
) -> "ort.SessionOptions":
    """SessionOptions for one phase on one provider: threads, DirectML's required options, spinning.
    ``threads`` None means :func:`default_threads`.

    Spinning is off by default (``session.intra_op.allow_spinning=0``): idle pool threads sleep instead of
    busy-waiting for the next op. A spinning thread takes the core the op's other half needs, and a
    second session (hybrid scheduling) would spin while the other phase runs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = int(threads or default_threads())
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.logid = f"inferos-{phase}"
    if provider == "DmlExecutionProvider":
        # Required by DirectML (its documentation): no memory pattern, sequential execution.
        opts.enable_mem_pattern = False
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def vitisai_config_file() -> Path | None:
    """The Ryzen AI ``vaip_config.json``: ``INFEROS_VITISAI_CONFIG``, else under
    ``RYZEN_AI_INSTALLATION_PATH`` (Ryzen AI >= 1.3 does not need one)."""
    explicit = os.environ.get("INFEROS_VITISAI_CONFIG")
    if explicit:
        return Path(explicit)
    root = os.environ.get("RYZEN_AI_INSTALLATION_PATH")
    if root:
        found = sorted(Path(root).glob("voe-*/vaip_config.json"))
        if found:
            return found[-1]
    return None


@dataclass
class ProviderSpec:
    """A provider with its options, and notes on policy values it could or could not apply."""

    provider: str
    options: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def provider_spec(provider: str, policy: "Policy", *, model_key: str = "model") -> ProviderSpec:
    """Provider options for ``provider`` from ``policy.io`` (documented option names only)."""
    spec = ProviderSpec(provider)
    pool = policy.io.dml_pool_bytes
    if provider == "CUDAExecutionProvider":
        spec.options = {"device_id": "0", "gpu_mem_limit": str(pool), "arena_extend_strategy": "kSameAsRequested"}
        spec.notes.append(f"gpu_mem_limit {pool} B from io.dml_pool_bytes")
    elif provider == "DmlExecutionProvider":
        spec.options = {"device_id": "0"}
        spec.notes.append("io.dml_pool_bytes not applied: DirectML has no memory-limit option")
    elif provider == "VitisAIExecutionProvider":
        from inferos_cli import paths

        cache = paths.cache_dir() / "vitisai"
        spec.options = {"cache_dir": str(cache), "cache_key": model_key}
        cfg = vitisai_config_file()
        if cfg is not None:
            spec.options["config_file"] = str(cfg)
    elif provider == "OpenVINOExecutionProvider":
        spec.options = {"device_type": "NPU"}
    else:
        spec.notes.append(HOST_POOL_NOTE)
    return spec


# ---------------------------------------------------------------------------------------------------------
# a phase's session


@dataclass
class PhaseSession:
    """The session that runs one phase, where it really runs, and why it is not where it was asked to."""

    phase: Phase
    session: "ort.InferenceSession"
    device: str
    provider: str
    fallback_reason: str | None = None
    requested: str | None = None
    threads: int | None = None
    iobinding: bool = False  # set by the plan: this phase's steps bind shared past/present buffers
    notes: list[str] = field(default_factory=list)
    asked_by: str | None = None  # the settings layer that named ``requested`` (None: a policy given whole)
    preferred: bool = False  # ``requested`` is a profile's preference: a fallback is reported, not warned

    def label(self) -> str:
        """``cpu``, or ``npu -> cpu (VitisAIExecutionProvider not available)`` after a fallback."""
        if self.fallback_reason and self.requested and self.requested != self.device:
            return f"{self.requested} -> {self.device} ({self.fallback_reason})"
        return self.device

    def to_json(self) -> dict[str, Any]:
        """Plain data for tables and bench records."""
        return {
            "phase": self.phase, "device": self.device, "provider": self.provider, "requested": self.requested,
            "fallback_reason": self.fallback_reason, "threads": self.threads, "iobinding": self.iobinding,
            "label": self.label(), "notes": list(self.notes), "asked_by": self.asked_by,
            "preferred": self.preferred,
        }

    def for_phase(self, phase: Phase, device: str, strict: bool = False) -> "PhaseSession":
        """This session also running ``phase``, which asked for ``device``: the same InferenceSession (one
        copy of the weights) under that phase's own label, e.g. ``npu -> cpu (... not available)`` when
        ``device`` falls back to where this session runs. Raises like :func:`open_session` when ``strict``."""
        provider, fallback = choose_provider(device, phase, strict)
        if provider != self.provider:  # the device works here, but this session could not use it
            fallback = self.fallback_reason or f"{provider} was asked for but the session runs on {self.provider}"
        return dataclasses.replace(self, phase=phase, requested=device, fallback_reason=fallback,
                                   notes=list(self.notes), asked_by=None, preferred=False)


_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
_HUGE_PAGE = 2 << 20


def huge_pages_wanted() -> bool:
    """True on Linux with transparent huge pages not ``never`` and ``INFEROS_HUGEPAGES`` not ``0``."""
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("INFEROS_HUGEPAGES", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(encoding="ascii")
    except OSError:
        return False
    return "[never]" not in mode


def anonymous_regions() -> dict[int, int]:
    """``start -> end`` of this process's writable private anonymous mappings (``[heap]`` included), from
    ``/proc/self/maps``; empty when it cannot be read."""
    regions: dict[int, int] = {}
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) < 5 or not parts[1].startswith("rw") or not parts[1].endswith("p"):
                    continue
                if len(parts) > 5 and parts[5] != "[heap]":
                    continue
                start, end = parts[0].split("-")
                regions[int(start, 16)] = int(end, 16)
    except (OSError, ValueError):
        return {}
    return regions


def back_with_huge_pages(before: dict[int, int], after: dict[int, int] | None = None) -> int:
    """Back the anonymous memory added between ``before`` and ``after`` (:func:`anonymous_regions`
    snapshots; ``after`` defaults to now: grown regions' new tail, new regions whole) with transparent huge
    pages now; return the bytes collapsed (0 when nothing could be, e.g. an older kernel without
    ``MADV_COLLAPSE``). Only whole 2 MiB pages inside those ranges are touched, and any refusal is
    ignored: this changes speed, never results."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):  # pragma: no cover - no libc
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    done = 0
    for start, end in (anonymous_regions() if after is None else after).items():
        old_end = before.get(start)
        if old_end is not None:
            start = old_end  # a region that existed before: only its new tail
        lo = (start + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        hi = end & ~(_HUGE_PAGE - 1)
        if hi - lo < _HUGE_PAGE:
            continue
        if madvise(lo, hi - lo, _MADV_HUGEPAGE) != 0:
            continue
        if madvise(lo, hi - lo, _MADV_COLLAPSE) == 0:
            done += hi - lo
    return done


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim(0)``): onnxruntime folds constants
    and prepacks weights while it builds a session, and the freed buffers would otherwise stay in RSS
    (0.2 GiB for a 7B-shaped Q4_K_M model's folded block offsets). False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols, as back_with_huge_pages reads madvise
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return False
    return True


def choose_provider(device: str, phase: Phase, strict: bool = False) -> tuple[str, str | None]:
    """``(provider, fallback reason)`` for ``phase`` asking for ``device``: the device's provider when its
    strict probe passes here, else ``CPUExecutionProvider`` and why (a :class:`ProviderError` when
    ``strict``)."""
    probe = probe_provider(device)
    if probe.works:
        return probe.name, None
    if strict:
        raise ProviderError(
            f"{phase} on {device}: {probe.reason}",
            "drop --strict-devices to fall back to CPU, or pick another device with --profile/--config",
        )
    return "CPUExecutionProvider", probe.reason.split(" (")[0] if not probe.available else probe.reason


def landing_device(device: str) -> str:
    """Where a phase asking for ``device`` runs here: ``device`` when its provider passes the strict probe,
    else ``cpu`` (the fallback)."""
    return device if probe_provider(device).works else "cpu"


def _model_key(onnx_path: Path) -> str:
    st = onnx_path.stat()
    return f"{onnx_path.stem}-{st.st_size}-{int(st.st_mtime)}"


def open_session(
    onnx_path: Path,
    policy: "Policy",
    phase: Phase,
    device: str,
    *,
    threads: int | None = None,
    strict: bool = False,
    allow_spinning: bool = False,
) -> PhaseSession:
    """Open ``onnx_path`` for ``phase`` on ``device``; fall back to CPU (visible reason) when the device's
    provider does not work, or raise :class:`ProviderError` when ``strict``. A CPU session reads its
    weights from trimmed read-only file maps (:mod:`inferos_cli.engine.weightmaps`)."""
    onnx_path = Path(onnx_path)
    provider, fallback = choose_provider(device, phase, strict)
    spec = provider_spec(provider, policy, model_key=_model_key(onnx_path) if onnx_path.exists() else "model")
    opts = session_options(policy, phase, threads, provider=provider, allow_spinning=allow_spinning)
    if provider != "CPUExecutionProvider":
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1" if strict else "0")
    providers: list[Any] = [(provider, spec.options)]
    if provider != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    before = anonymous_regions() if huge_pages_wanted() else None
    try:
        sess = weightmaps.inference_session(
            onnx_path, opts, providers, provider,
            lambda: session_options(policy, phase, threads, provider=provider, allow_spinning=allow_spinning))
    except Exception as exc:
        if provider == "CPUExecutionProvider":
            from inferos_cli.errors import ModelError

            raise ModelError(f"onnxruntime cannot load {onnx_path}: {str(exc).strip().splitlines()[0][:200]}") from None
        if strict:
            raise ProviderError(f"{phase} on {device}: {provider} cannot load the model: {str(exc)[:160]}") from None
        fallback = f"{provider} cannot load the model"
        provider = "CPUExecutionProvider"
        opts = session_options(policy, phase, threads, allow_spinning=allow_spinning)
        sess = weightmaps.inference_session(
            onnx_path, opts, [provider], provider,
            lambda: session_options(policy, phase, threads, allow_spinning=allow_spinning))
        spec = ProviderSpec(provider)
    real = sess.get_providers()[0]
    release_free_heap()  # what building the session freed: folded constants, unpacked weights
    if before is not None and real == "CPUExecutionProvider":
        back_with_huge_pages(before)  # the weights this session just allocated (module docstring)
    if real != provider and fallback is None:
        fallback = f"{provider} was asked for but the session runs on {real}"
        if strict:
            raise ProviderError(f"{phase} on {device}: {fallback}")
    notes = list(spec.notes)
    return PhaseSession(
        phase=phase,
        session=sess,
        device=device_of(real),
        provider=real,
        fallback_reason=fallback,
        requested=device,
        threads=opts.intra_op_num_threads,
        notes=notes,
    )


def is_windows() -> bool:
    """True on Windows (DirectML and PDH live there)."""
    return sys.platform == "win32"


__all__ = [
    "DEVICE_PROVIDERS", "PhaseSession", "ProbeResult", "ProviderSpec", "available_providers", "choose_provider",
    "default_threads", "device_of", "landing_device", "open_session", "probe_provider", "provider_name",
    "provider_spec", "session_options",
]
