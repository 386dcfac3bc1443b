"""Device monitors behind one interface: each returns a :class:`Reading` of values really read from a
counter, or None with the reason in ``reasons``. Nothing is estimated and nothing is constant.

- :class:`ProcessMonitor`: system CPU % and this process's CPU % (psutil) and RSS (:mod:`~inferos_cli.machine.rss`).
- :class:`NvidiaMonitor`: GPU utilization % and used memory (``nvidia-ml-py`` / ``pynvml`` when installed).
- :class:`AmdGpuMonitor`: Linux amdgpu sysfs ``/sys/class/drm/card*/device/gpu_busy_percent``,
  ``mem_info_vram_used``, ``mem_info_gtt_used``.
- :class:`IntelNpuMonitor`: Intel NPU (``intel_vpu``) ``npu_busy_time_us``: utilization = busy-time delta /
  wall-time delta between two samples.
- :class:`WindowsPdhMonitor`: Windows ``\\GPU Engine(*)\\Utilization Percentage`` summed per adapter and
  engine type (pywin32's ``win32pdh`` when installed). An adapter with a ``3D`` engine is a GPU; an adapter
  with only compute engines is reported as the NPU (how Task Manager shows NPUs through WDDM/MCDM).

The AMD XDNA NPU monitor lives in :mod:`~inferos_cli.machine.xdna`. Sysfs monitors take a ``root`` path
(``/`` by default), so tests drive them with a fake sysfs tree.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from inferos_cli.machine.rss import current_rss

Clock = Callable[[], float]


@dataclass
class Reading:
    """One sample of a monitor: ``values`` (None when not measurable) and ``reasons`` for the Nones."""

    values: dict[str, float | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def none(self, key: str, reason: str) -> None:
        """Record ``key`` as not measurable, with the reason."""
        self.values[key] = None
        self.reasons[key] = reason


class Monitor(Protocol):
    """A device monitor: a name, the keys it can fill, and ``sample()``."""

    name: str
    keys: tuple[str, ...]

    def sample(self) -> Reading:
        """Read the counters now."""
        ...


def read_text(path: Path) -> str | None:
    """A sysfs file's text, stripped; None when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def read_int(path: Path) -> int | None:
    """A sysfs file's first number (decimal or 0x hex); None when absent or not a number."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text.split()[0], 0)
    except (ValueError, IndexError):
        return None


def _uevent(path: Path) -> dict[str, str]:
    text = read_text(path / "uevent") or ""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def driver_name(device: Path) -> str | None:
    """The kernel driver bound to a sysfs device: the ``driver`` link's name, else ``DRIVER=`` in uevent."""
    link = device / "driver"
    try:
        if link.is_symlink():
            return Path(os.readlink(link)).name
    except OSError:
        pass
    return _uevent(device).get("DRIVER")


# ---------------------------------------------------------------------------------------------------------
# CPU and RSS


class ProcessMonitor:
    """System CPU % and this process's CPU % (of one core) from psutil; RSS from :func:`current_rss`."""

    name = "process"
    keys = ("cpu", "process_cpu", "rss_bytes")

    def __init__(self) -> None:
        self._proc: Any = None
        self._primed = False
        self._error: str | None = None
        try:
            import psutil

            self._psutil = psutil
            self._proc = psutil.Process(os.getpid())
        except Exception as exc:  # psutil missing or process gone
            self._error = f"psutil unavailable: {exc}"

    def sample(self) -> Reading:
        """CPU % since the previous sample (None on the first), RSS now."""
        r = Reading()
        rss = current_rss()
        if rss is None:
            r.none("rss_bytes", "RSS not readable on this platform")
        else:
            r.values["rss_bytes"] = float(rss)
        if self._proc is None:
            for key in ("cpu", "process_cpu"):
                r.none(key, self._error or "psutil unavailable")
            return r
        try:
            cpu = self._psutil.cpu_percent(interval=None)
            pcpu = self._proc.cpu_percent(interval=None)
        except Exception as exc:
            for key in ("cpu", "process_cpu"):
                r.none(key, f"psutil failed: {exc}")
            return r
        if not self._primed:
            self._primed = True
            r.none("cpu", "first sample (CPU % needs two readings)")
            r.none("process_cpu", "first sample (CPU % needs two readings)")
        else:
            r.values["cpu"] = float(cpu)
            r.values["process_cpu"] = float(pcpu)
        return r


# ---------------------------------------------------------------------------------------------------------
# NVIDIA


class NvidiaMonitor:
    """GPU 0 utilization % and used memory through NVML (package ``nvidia-ml-py``), when installed."""

    name = "nvidia"
    keys = ("gpu", "vram_bytes")

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self._nvml: Any = None
        self._handle: Any = None
        self._error: str | None = None
        try:
            import pynvml  # type: ignore[import-not-found]
        except ImportError:
            self._error = "nvidia-ml-py not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception as exc:  # NVMLError: no driver / no device
            self._error = f"NVML unavailable: {exc}"

    @property
    def present(self) -> bool:
        """True when NVML opened a device."""
        return self._handle is not None

    def sample(self) -> Reading:
        """Utilization of the last sample period (NVML's own window) and memory used."""
        r = Reading()
        if self._handle is None:
            for key in self.keys:
                r.none(key, self._error or "no NVIDIA device")
            return r
        try:
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            r.values["gpu"] = float(util.gpu)
            r.values["vram_bytes"] = float(mem.used)
        except Exception as exc:
            for key in self.keys:
                r.none(key, f"NVML query failed: {exc}")
        return r


# ---------------------------------------------------------------------------------------------------------
# AMD GPU (Linux sysfs)


class AmdGpuMonitor:
    """amdgpu sysfs counters of the first card that exposes ``gpu_busy_percent``."""

    name = "amdgpu"
    keys = ("gpu", "vram_bytes", "gtt_bytes")

    def __init__(self, root: Path | str = "/") -> None:
        self.root = Path(root)
        self.device = self._find()

    def _find(self) -> Path | None:
        drm = self.root / "sys" / "class" / "drm"
        if not drm.is_dir():
            return None
        for card in sorted(drm.glob("card*")):
            if "-" in card.name:  # connectors such as card0-eDP-1
                continue
            dev = card / "device"
            if (dev / "gpu_busy_percent").exists():
                return dev
        return None

    def sample(self) -> Reading:
        """Busy %, VRAM and GTT bytes used, read now."""
        r = Reading()
        if self.device is None:
            for key in self.keys:
                r.none(key, f"no amdgpu card with gpu_busy_percent under {self.root / 'sys/class/drm'}")
            return r
        r.details["card"] = self.device.parent.name
        for key, fname in (("gpu", "gpu_busy_percent"), ("vram_bytes", "mem_info_vram_used"),
                           ("gtt_bytes", "mem_info_gtt_used")):
            value = read_int(self.device / fname)
            if value is None:
                r.none(key, f"cannot read {self.device / fname}")
            else:
                r.values[key] = float(value)
        return r


# ---------------------------------------------------------------------------------------------------------
# Intel NPU


class IntelNpuMonitor:
    """Intel NPU utilization from ``npu_busy_time_us`` deltas (intel_vpu driver)."""

    name = "intel_npu"
    keys = ("npu",)

    def __init__(self, root: Path | str = "/", clock: Clock = time.monotonic) -> None:
        self.root = Path(root)
        self.clock = clock
        self.path = self._find()
        self._last: tuple[float, int] | None = None

    def _find(self) -> Path | None:
        accel = self.root / "sys" / "class" / "accel"
        if not accel.is_dir():
            return None
        for node in sorted(accel.glob("accel*")):
            path = node / "device" / "npu_busy_time_us"
            if path.exists():
                return path
        return None

    def sample(self) -> Reading:
        """Busy % between this sample and the previous one (None on the first)."""
        r = Reading()
        if self.path is None:
            r.none("npu", f"no Intel NPU (npu_busy_time_us) under {self.root / 'sys/class/accel'}")
            return r
        now, busy = self.clock(), read_int(self.path)
        if busy is None:
            r.none("npu", f"cannot read {self.path}")
            return r
        last, self._last = self._last, (now, busy)
        if last is None:
            r.none("npu", "first sample (busy % needs two readings)")
            return r
        wall_us = (now - last[0]) * 1e6
        if wall_us <= 0 or busy < last[1]:
            r.none("npu", "counter reset or no time elapsed between samples")
            return r
        r.values["npu"] = max(0.0, min(100.0, 100.0 * (busy - last[1]) / wall_us))
        return r


# ---------------------------------------------------------------------------------------------------------
# Windows PDH


def parse_gpu_engine_instance(name: str) -> tuple[str, str] | None:
    """``pid_1234_luid_0x00000000_0x0000D1A2_phys_0_eng_0_engtype_3D`` -> (``0x00000000_0x0000D1A2``, ``3D``)."""
    if "_luid_" not in name or "_engtype_" not in name:
        return None
    luid = name.split("_luid_", 1)[1].split("_phys_", 1)[0]
    engtype = name.split("_engtype_", 1)[1]
    return luid, engtype


def aggregate_gpu_engines(counters: dict[str, float]) -> dict[str, dict[str, float]]:
    """Sum ``GPU Engine`` utilization over processes, per adapter LUID and engine type."""
    out: dict[str, dict[str, float]] = {}
    for inst, value in counters.items():
        parsed = parse_gpu_engine_instance(inst)
        if parsed is None:
            continue
        luid, engtype = parsed
        per = out.setdefault(luid, {})
        per[engtype] = per.get(engtype, 0.0) + float(value)
    return out


def classify_adapters(agg: dict[str, dict[str, float]]) -> tuple[float | None, float | None]:
    """(gpu %, npu %): the busiest engine of adapters with a 3D engine, and of adapters with none."""
    gpu: float | None = None
    npu: float | None = None
    for engines in agg.values():
        busiest = min(100.0, max(engines.values(), default=0.0))
        if any(e.lower().startswith("3d") for e in engines):
            gpu = busiest if gpu is None else max(gpu, busiest)
        else:
            npu = busiest if npu is None else max(npu, busiest)
    return gpu, npu


class WindowsPdhMonitor:
    """``\\GPU Engine(*)\\Utilization Percentage`` by adapter and engine type, via pywin32's win32pdh."""

    name = "windows_pdh"
    keys = ("gpu", "npu")
    COUNTER = r"\GPU Engine(*)\Utilization Percentage"

    def __init__(self) -> None:
        self._pdh: Any = None
        self._query: Any = None
        self._counter: Any = None
        self._primed = False
        self._error: str | None = None
        if sys.platform != "win32":
            self._error = "Windows PDH counters exist only on Windows"
            return
        try:
            import win32pdh  # type: ignore[import-not-found]
        except ImportError:
            self._error = "pywin32 not installed (pip install pywin32)"
            return
        try:
            self._query = win32pdh.OpenQuery()
            self._counter = win32pdh.AddEnglishCounter(self._query, self.COUNTER)
            self._pdh = win32pdh
        except Exception as exc:
            self._error = f"PDH query failed: {exc}"

    def sample(self) -> Reading:
        """Utilization since the previous collection (None on the first)."""
        r = Reading()
        if self._pdh is None:
            for key in self.keys:
                r.none(key, self._error or "PDH unavailable")
            return r
        try:
            self._pdh.CollectQueryData(self._query)
            if not self._primed:
                self._primed = True
                for key in self.keys:
                    r.none(key, "first sample (PDH rates need two collections)")
                return r
            counters = self._pdh.GetFormattedCounterArray(self._counter, self._pdh.PDH_FMT_DOUBLE)
        except Exception as exc:
            for key in self.keys:
                r.none(key, f"PDH collection failed: {exc}")
            return r
        agg = aggregate_gpu_engines(dict(counters))
        gpu, npu = classify_adapters(agg)
        r.details["adapters"] = agg
        for key, value in (("gpu", gpu), ("npu", npu)):
            if value is None:
                r.none(key, f"no adapter of that kind in {self.COUNTER}")
            else:
                r.values[key] = value
        return r
