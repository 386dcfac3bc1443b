"""The checks behind ``inferos doctor``: every one reads the machine, none is assumed.

Each check returns a :class:`Check` (``ok`` / ``warn`` / ``fail``, a detail line and a fix line). The CPU
path (onnxruntime importable, ``CPUExecutionProvider`` passing a strict one-node probe, settings that
resolve) decides the exit code; everything else (GPU, NPU, DirectML, VitisAI, GAIA, Lemonade) is a
``warn`` when absent, because inferos runs without it.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from inferos_cli.machine import host
from inferos_cli.units import format_bytes

Status = Literal["ok", "warn", "fail"]
HTTP_TIMEOUT_S = 1.5
LOW_DISK_BYTES = 2 * 1024**3
LOW_RAM_BYTES = 2 * 1024**3


@dataclass
class Check:
    """One doctor line."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        """``{"name", "status", "detail", "fix"}``."""
        return asdict(self)


@dataclass
class DoctorReport:
    """All checks, in display order."""

    checks: list[Check] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when nothing failed (the CPU path works), else 1."""
        return 1 if any(c.status == "fail" for c in self.checks) else 0

    def get(self, name: str) -> Check | None:
        """The check called ``name``, if any."""
        return next((c for c in self.checks if c.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """``{"checks": [...]}``."""
        return {"checks": [c.to_json() for c in self.checks]}


# --------------------------------------------------------------------------------------------- host


def check_python() -> Check:
    """Interpreter version and path."""
    version = host.python_version()
    ok = host.python_ok()
    return Check(
        "python", "ok" if ok else "fail", f"Python {version} ({sys.executable})",
        "" if ok else "inferos needs Python >= 3.11: install it and recreate the venv",
    )


def check_os() -> Check:
    """Operating system and architecture."""
    return Check("os", "ok", host.os_description())


def check_cpu() -> Check:
    """CPU model and core counts."""
    physical, logical = host.cpu_cores()
    model = host.cpu_model() or "model n/a (the OS does not report it)"
    return Check("cpu", "ok", f"{model}; {physical or 'n/a'} physical / {logical or 'n/a'} logical cores")


def check_ram() -> Check:
    """Total and available memory."""
    total, available = host.memory()
    detail = f"{format_bytes(total)} total, {format_bytes(available)} available"
    if available < LOW_RAM_BYTES:
        return Check("ram", "warn", detail, "close other programs or use a smaller model / tighter KV profile")
    return Check("ram", "ok", detail)


# -------------------------------------------------------------------------------------- onnxruntime


def check_onnxruntime() -> tuple[Check, list[str]]:
    """onnxruntime version and compiled-in providers (what was built in, not what works)."""
    try:
        import onnxruntime as ort
    except Exception as exc:  # ImportError, or a DLL load failure on Windows
        return Check(
            "onnxruntime", "fail", f"cannot import onnxruntime: {str(exc).splitlines()[0]}",
            "pip install onnxruntime (Windows: onnxruntime-directml)",
        ), []
    providers = list(ort.get_available_providers())
    dists = _distributions_of_ort()
    detail = f"{ort.__version__} ({', '.join(dists) or 'package n/a'}); compiled-in providers: {', '.join(providers)}"
    if len(dists) > 1:
        # each of these packages ships the same `onnxruntime` module: the files of the last one installed win,
        # and uninstalling either later breaks the other
        keep = next((d.split()[0] for d in dists if d.split()[0] != "onnxruntime"), "onnxruntime")
        return Check("onnxruntime", "warn", f"{detail}; {len(dists)} packages provide the same module",
                     f"keep one: pip uninstall -y {' '.join(d.split()[0] for d in dists)} && "
                     f"pip install {keep}"), providers
    return Check("onnxruntime", "ok", detail), providers


def _distributions_of_ort() -> list[str]:
    """The pip packages that provide the onnxruntime module (onnxruntime, -gpu, -directml, -openvino...),
    as ``name version``."""
    from importlib import metadata

    names = []
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                 "onnxruntime-vitisai", "onnxruntime-qnn"):
        try:
            names.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return names


WINDOWS_ONLY = {
    "DmlExecutionProvider": (
        "dml", "DirectML (any DirectX 12 GPU, e.g. Radeon iGPU)",
        "on Windows 11: pip install onnxruntime-directml in place of onnxruntime (or pip install 'inferos[directml]')",
        "the DirectML provider exists only on Windows (no onnxruntime-directml build for this OS)",
    ),
    "VitisAIExecutionProvider": (
        "npu", "VitisAI (AMD Ryzen AI NPU)",
        "on Windows 11 with a Ryzen AI CPU: install the NPU driver and AMD Ryzen AI Software, then use the "
        "venv it creates (its onnxruntime has VitisAIExecutionProvider)",
        "the VitisAI provider ships with AMD Ryzen AI Software for Windows 11; this onnxruntime build lacks it",
    ),
}


def check_providers(compiled: list[str]) -> list[Check]:
    """A strict probe per provider: every compiled-in one, plus DirectML and VitisAI rows always."""
    from inferos_cli.engine.sessions import INSTALL_HINTS, probe_provider

    names = list(compiled)
    for name in ("DmlExecutionProvider", "VitisAIExecutionProvider"):
        if name not in names:
            names.append(name)
    checks: list[Check] = []
    quiet_ort_logs(True)
    try:
        for name in names:
            checks.append(_provider_check(name, compiled, probe_provider, INSTALL_HINTS))
    finally:
        quiet_ort_logs(False)
    return checks


NOT_DEVICES = {
    "AzureExecutionProvider": "a remote-endpoint provider (sends requests to Azure), not a local device",
}


def quiet_ort_logs(quiet: bool) -> None:
    """Silence onnxruntime's default logger while probing (a failed probe logs an error line on stderr,
    which doctor already reports in its own row); restore the default (warning) afterwards."""
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(4 if quiet else 2)
    except Exception:  # logging is cosmetic: never let it break doctor
        pass


def _provider_check(name: str, compiled: list[str], probe_provider: Callable[[str], Any],
                    hints: dict[str, str]) -> Check:
    """One provider row: absent (with what to install), not a device, works, or fails with the reason."""
    label = f"provider {name}"
    if name in NOT_DEVICES:
        return Check(label, "ok", f"compiled in; {NOT_DEVICES[name]}: inferos does not schedule on it (not probed)")
    if name not in compiled:
        device, what, fix, why_absent = WINDOWS_ONLY[name]
        if sys.platform == "win32":
            detail = f"absent: {what} is not compiled into this onnxruntime (device `{device}` falls back to cpu)"
        else:
            detail = f"absent: {why_absent}; device `{device}` falls back to cpu here"
        return Check(label, "warn", detail, fix)
    try:
        result = probe_provider(name)
    except Exception as exc:  # the probe itself must never crash doctor
        return Check(label, "fail" if name == "CPUExecutionProvider" else "warn",
                     f"probe crashed: {str(exc).splitlines()[0][:200]}", "run with INFEROS_DEBUG=1")
    hint = hints.get(name, "check the provider's driver and runtime")
    if result.works:
        detail = "works (strict probe: one-node model, session.disable_cpu_ep_fallback=1, result checked)"
        return Check(label, "ok", detail)
    bad: Status = "fail" if name == "CPUExecutionProvider" else "warn"
    return Check(label, bad, f"compiled in but fails: {result.reason}", hint)


# ---------------------------------------------------------------------------------------- GPU / NPU


def check_gpu() -> Check:
    """GPU presence as the OS or a vendor tool sees it; n/a with the reason when nothing can look."""
    seen: list[str] = []
    reasons: list[str] = []
    nv, how = host.nvidia_gpus()
    if nv:
        seen += [f"{n} ({how})" for n in nv]
    else:
        reasons.append(how)
    if sys.platform.startswith("linux"):
        drm, how = host.linux_drm_gpus()
        if drm:
            seen += [f"{d} ({how})" for d in drm]
        else:
            reasons.append(how if drm is None else "no GPU in /sys/class/drm")
    elif sys.platform == "win32":
        win, how = host.windows_devices(None, "Display")
        if win:
            seen += [f"{d} ({how})" for d in win]
        else:
            reasons.append(how if win is None else "no display adapter listed")
    if seen:
        return Check("gpu", "ok", "; ".join(seen))
    return Check(
        "gpu", "warn", "n/a: no GPU visible (" + "; ".join(reasons) + ")",
        "none needed for the CPU path; for dml/cuda devices install the GPU driver",
    )


def check_npu() -> Check:
    """NPU presence as the OS sees it; n/a with the reason when it cannot look."""
    if sys.platform.startswith("linux"):
        found, how = host.linux_accel_npus()
    elif sys.platform == "win32":
        found, how = host.windows_devices(r"\bNPU\b|Neural|\bIPU\b", "ComputeAccelerator")
    else:
        found, how = None, f"no NPU probe for {platform.system()}"
    if found:
        return Check("npu", "ok", "; ".join(f"{d} ({how})" for d in found))
    reason = how if found is None else f"{how} lists no device"
    return Check(
        "npu", "warn", f"n/a: no NPU visible ({reason})",
        "none needed for the CPU path; on a Ryzen AI laptop install the NPU driver (Windows 11) or amdxdna (Linux)",
    )


def check_counters() -> Check:
    """Which utilisation counters the telemetry monitors can really read here (one sample each)."""
    from inferos_cli.machine.telemetry import default_monitors, merge_readings

    readings = []
    for group in default_monitors().values():
        for monitor in group:
            try:
                readings.append(monitor.sample())
            except Exception as exc:  # one broken monitor must not hide the others
                name = getattr(monitor, "name", type(monitor).__name__)
                readings.append(_failed_reading(name, exc))
    merged = merge_readings(readings)
    reasons = merged.get("reasons", {})
    parts, readable = [], []
    for key in ("gpu", "vram_bytes", "npu", "npu_power_w"):
        if merged.get(key) is not None:
            readable.append(key)
            parts.append(f"{key}: readable")
        else:
            parts.append(f"{key}: n/a ({reasons.get(key, 'not measured')})")
    return Check(
        "utilisation counters", "ok" if readable else "warn", "; ".join(parts),
        "" if readable else "none needed; GPU/NPU utilisation reads n/a in run/bench until a counter above exists",
    )


def _failed_reading(name: str, exc: Exception) -> Any:
    from inferos_cli.machine.monitors import Reading

    reading = Reading()
    for key in ("gpu", "npu"):
        reading.none(key, f"{name} monitor failed: {str(exc)[:80]}")
    return reading


# ----------------------------------------------------------------------------------- GAIA, Lemonade


def check_gaia() -> Check:
    """``gaia`` / ``gaia-cli`` on PATH (package amd-gaia) and its version."""
    from importlib import metadata

    def version_of(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    impostor = version_of("gaia-cli")
    amd = version_of("amd-gaia")
    for exe in ("gaia", "gaia-cli"):
        path = shutil.which(exe)
        if path is None:
            continue
        code, out = host.run_program([path, "--version"])
        version = out.splitlines()[-1].strip() if out else "no version printed"
        if impostor and not amd:
            return Check(
                "gaia", "warn",
                f"{exe} at {path} ({version[:80]}) may come from PyPI's `gaia-cli` {impostor}, an unrelated package "
                "installed here (amd-gaia is not)",
                "pip uninstall gaia-cli && pip install amd-gaia",
            )
        if code != 0:
            return Check("gaia", "warn", f"{exe} at {path} but `--version` failed: {version[:160]}",
                         "reinstall with pip install amd-gaia")
        return Check("gaia", "ok", f"{exe} {version} at {path}" + (f" (amd-gaia {amd})" if amd else ""))
    note = f"; PyPI's unrelated `gaia-cli` {impostor} is installed" if impostor else ""
    return Check(
        "gaia", "warn", f"gaia / gaia-cli not on PATH{note}",
        "optional: pip install amd-gaia (not `gaia-cli`, an unrelated PyPI package); inferos runs without it",
    )


def check_lemonade() -> Check:
    """The Lemonade server's ``/health`` answer at the first URL that answers."""
    from inferos_cli.backends.lemonade import candidate_urls, probe_json

    tried = []
    for url in candidate_urls():
        status, body, err = probe_json(f"{url}/health", timeout=HTTP_TIMEOUT_S)
        if status == 200:
            shown = json.dumps(body, separators=(",", ":")) if not isinstance(body, str) else body
            return Check("lemonade", "ok", f"{url}/health answered: {shown[:200]}")
        tried.append(f"{url}/health: {err or f'HTTP {status}'}")
    return Check(
        "lemonade", "warn", "no Lemonade server (" + "; ".join(tried) + ")",
        "optional: start `lemonade-server serve` or `inferos serve`, or set LEMONADE_BASE_URL",
    )


OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    # distribution: (what inferos uses it for, how to get it)
    "onnxruntime-genai": ("the ort-genai peer of `inferos bench`", "pip install onnxruntime-genai"),
    "fastapi": ("`inferos serve`", "pip install 'inferos[serve]'"),
    "uvicorn": ("`inferos serve`", "pip install 'inferos[serve]'"),
    "prometheus-client": ("serve's Prometheus metrics", "pip install 'inferos[serve]'"),
    "pyyaml": ("YAML config files", "pip install 'inferos[yaml]'"),
    "matplotlib": ("`inferos bench --plot`", "pip install 'inferos[plot]'"),
    "nvidia-ml-py": ("NVIDIA GPU telemetry", "pip install 'inferos[telemetry]'"),
}


def check_optional_packages() -> Check:
    """Which optional packages are installed (read from package metadata; nothing is imported)."""
    from importlib import metadata

    have, missing, fixes = [], [], []
    for dist, (use, fix) in OPTIONAL_PACKAGES.items():
        try:
            have.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            missing.append(f"{dist} ({use})")
            if fix not in fixes:
                fixes.append(fix)
    detail = "installed: " + (", ".join(have) or "none")
    if not missing:
        return Check("optional packages", "ok", detail)
    return Check("optional packages", "warn", detail + "; missing: " + ", ".join(missing),
                 "optional, only for the features named: " + "; ".join(fixes))


# --------------------------------------------------------------------------------- cache, settings


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (disk usage needs an existing path)."""
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_cache() -> Check:
    """Model cache folder, its size on disk and the free space of its disk."""
    from inferos_cli import paths

    models = paths.models_dir()
    usage = shutil.disk_usage(nearest_existing(models))
    cached = 0
    count = 0
    if models.is_dir():
        for entry in models.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                count += 1
                cached += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
    state = f"{count} models, {format_bytes(cached)}" if models.is_dir() else "not created yet"
    detail = f"{models} ({state}); {format_bytes(usage.free)} free of {format_bytes(usage.total)}"
    if usage.free < LOW_DISK_BYTES:
        return Check("model cache", "warn", detail, "free disk space or set INFEROS_HOME to a larger disk")
    return Check("model cache", "ok", detail)


def check_settings() -> Check:
    """The config file (if any) and environment resolve to a valid policy."""
    from inferos_cli.errors import InferosError
    from inferos_cli.profiles import default_config_path, resolve_settings

    try:
        path = default_config_path()
        resolved = resolve_settings(None, config_path=path)
    except InferosError as exc:
        return Check("settings", "fail", exc.one_line(), exc.fix or "fix the config file or INFEROS_* variables")
    pol = resolved.policy
    where = str(path) if path else "no config file (defaults; `inferos config init` writes one)"
    changed = sorted({s for s in resolved.sources.values() if s != "default"})
    detail = (
        f"{where}; kv.mode {pol.kv.mode}, scheduler {pol.scheduler.mode} (prefill {pol.scheduler.prefill_device}, "
        f"decode {pol.scheduler.decode_device})" + (f"; set by {', '.join(changed)}" if changed else "")
    )
    fallbacks = device_fallbacks(pol.scheduler.prefill_device, pol.scheduler.decode_device)
    if fallbacks:
        return Check("settings", "warn", detail + "; " + "; ".join(fallbacks),
                     "install the missing provider (see the provider rows) or set scheduler devices to cpu")
    return Check("settings", "ok", detail)


def device_fallbacks(prefill: str, decode: str) -> list[str]:
    """``prefill dml -> cpu (reason)`` for each phase whose device's provider does not work here."""
    from inferos_cli.engine.sessions import probe_provider

    out = []
    quiet_ort_logs(True)
    try:
        for phase, device in (("prefill", prefill), ("decode", decode)):
            if device == "cpu":
                continue
            result = probe_provider(device)
            if not result.works:
                out.append(f"{phase} {device} -> cpu ({result.reason.split(' (')[0]})")
    finally:
        quiet_ort_logs(False)
    return out


def run_checks(progress: Callable[[str], None] | None = None) -> DoctorReport:
    """Run every check in display order."""
    report = DoctorReport()

    def add(check: Check | list[Check]) -> None:
        items = check if isinstance(check, list) else [check]
        report.checks.extend(items)
        if progress:
            for item in items:
                progress(item.name)

    for fn in (check_python, check_os, check_cpu, check_ram):
        add(_guarded(fn))
    ort_check, compiled = check_onnxruntime()
    add(ort_check)
    if ort_check.status != "fail":
        add(check_providers(compiled))
    for fn in (check_gpu, check_npu, check_counters, check_optional_packages, check_gaia, check_lemonade,
               check_cache, check_settings):
        add(_guarded(fn))
    return report


def _guarded(fn: Callable[[], Check]) -> Check:
    """Run one check; a crash becomes its own row (``fail`` for the settings, ``warn`` otherwise)."""
    try:
        return fn()
    except Exception as exc:  # one broken check must not hide the others
        name = fn.__name__.removeprefix("check_").replace("_", " ")
        status: Status = "fail" if name == "settings" else "warn"
        return Check(name, status, f"check crashed: {type(exc).__name__}: {str(exc)[:160]}",
                     "report it with the output of INFEROS_DEBUG=1 inferos doctor")
