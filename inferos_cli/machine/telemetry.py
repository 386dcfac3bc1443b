"""Device monitors behind one interface, and a background sampler on the ``loops`` cadence.

Every monitor returns a :class:`Reading`: values that were really read from a counter, or None with the
reason in ``reasons``. Nothing is estimated and nothing is constant.

Monitors (each takes a ``root`` path, ``/`` by default, so tests drive it with a fake sysfs tree):

- :class:`ProcessMonitor`: system CPU % and this process's CPU % and RSS (psutil).
- :class:`NvidiaMonitor`: GPU utilization % and used memory (``nvidia-ml-py`` / ``pynvml`` when installed).
- :class:`AmdGpuMonitor`: Linux amdgpu sysfs ``/sys/class/drm/card*/device/gpu_busy_percent``,
  ``mem_info_vram_used``, ``mem_info_gtt_used``.
- :class:`XdnaNpuMonitor`: AMD XDNA NPU on Linux (``amdxdna`` accel device). The driver's uapi
  (``include/uapi/drm/amdxdna_accel.h``) offers ``DRM_IOCTL_AMDXDNA_GET_INFO`` with
  ``DRM_AMDXDNA_QUERY_SENSORS``, which returns a power sensor (``struct amdxdna_drm_query_sensor``:
  ``input`` scaled by ``10**unitm`` in ``units``), not a busy percentage; so this monitor reports
  ``npu_power_w`` and leaves ``npu`` (utilization) None with that reason. It only opens the device when
  its ``power/runtime_status`` is already ``active``, so sampling never wakes a suspended NPU.
- :class:`IntelNpuMonitor`: Intel NPU (``intel_vpu``) ``npu_busy_time_us``: utilization = busy-time delta /
  wall-time delta between two samples.
- :class:`WindowsPdhMonitor`: Windows ``\\GPU Engine(*)\\Utilization Percentage`` summed per adapter and
  engine type (pywin32's ``win32pdh`` when installed). An adapter with a ``3D`` engine is a GPU; an adapter
  with only compute engines is reported as the NPU (how Task Manager shows NPUs through WDDM/MCDM).

Cadence (:class:`TelemetrySampler`): ``loops.fast_ms`` drives CPU/RSS, ``loops.mid_ms`` the GPU/NPU sysfs
and NVML monitors plus the memory-pressure callback, ``loops.slow_ms`` the costlier ones (XDNA ioctl,
Windows PDH). The profile values (1/10/100 ms) are clamped to at least 100/250/1000 ms: the kernel's CPU
counters tick every 10 ms, so a 1 ms loop would only spin and read quantization noise, on the very cores
inference needs.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

Clock = Callable[[], float]

FAST_MIN_MS = 100
MID_MIN_MS = 250
SLOW_MIN_MS = 1000


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


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.split()[0], 0)
    except (ValueError, IndexError):
        return None


def _uevent(path: Path) -> dict[str, str]:
    text = _read_text(path / "uevent") or ""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def _driver_name(device: Path) -> str | None:
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
    """System CPU %, this process's CPU % (of one core) and RSS, from psutil."""

    name = "process"
    keys = ("cpu", "process_cpu", "rss_bytes")

    def __init__(self, pid: int | None = None) -> None:
        self._proc: Any = None
        self._primed = False
        self._error: str | None = None
        try:
            import psutil

            self._psutil = psutil
            self._proc = psutil.Process(pid or os.getpid())
        except Exception as exc:  # psutil missing or process gone
            self._error = f"psutil unavailable: {exc}"

    def sample(self) -> Reading:
        """CPU % since the previous sample (None on the first), RSS now."""
        r = Reading()
        if self._proc is None:
            for key in self.keys:
                r.none(key, self._error or "psutil unavailable")
            return r
        try:
            cpu = self._psutil.cpu_percent(interval=None)
            pcpu = self._proc.cpu_percent(interval=None)
            r.values["rss_bytes"] = float(self._proc.memory_info().rss)
        except Exception as exc:
            for key in self.keys:
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
            value = _read_int(self.device / fname)
            if value is None:
                r.none(key, f"cannot read {self.device / fname}")
            else:
                r.values[key] = float(value)
        return r


# ---------------------------------------------------------------------------------------------------------
# AMD XDNA NPU (Linux amdxdna)

# From include/uapi/drm/amdxdna_accel.h: enum amdxdna_drm_ioctl_id (DRM_AMDXDNA_GET_INFO = 7),
# enum amdxdna_drm_get_param (DRM_AMDXDNA_QUERY_SENSORS = 4), struct amdxdna_drm_get_info
# {__u32 param; __u32 buffer_size; __u64 buffer;} and struct amdxdna_drm_query_sensor
# {__u8 label[64]; __u32 input, max, average, highest; __u8 status[64]; __u8 units[16]; __s8 unitm;
#  __u8 type; __u8 pad[6];}. DRM_IOWR(DRM_COMMAND_BASE + 7, struct amdxdna_drm_get_info).
DRM_IOCTL_BASE = ord("d")
DRM_COMMAND_BASE = 0x40
DRM_AMDXDNA_GET_INFO = 7
DRM_AMDXDNA_QUERY_SENSORS = 4
GET_INFO_FMT = "=IIQ"
SENSOR_FMT = "=64sIIII64s16sbB6x"
SENSOR_SIZE = struct.calcsize(SENSOR_FMT)  # 168


def _iowr(nr: int, size: int) -> int:
    """Linux ``_IOWR(DRM_IOCTL_BASE, nr, size)`` (asm-generic ioctl encoding)."""
    ioc_read, ioc_write = 2, 1
    return ((ioc_read | ioc_write) << 30) | (size << 16) | (DRM_IOCTL_BASE << 8) | nr


DRM_IOCTL_AMDXDNA_GET_INFO = _iowr(DRM_COMMAND_BASE + DRM_AMDXDNA_GET_INFO, struct.calcsize(GET_INFO_FMT))


def parse_sensor(raw: bytes) -> dict[str, Any]:
    """Decode one ``struct amdxdna_drm_query_sensor``; ``value`` = input * 10**unitm in ``units``."""
    label, inp, mx, avg, hi, status, units, unitm, typ = struct.unpack(SENSOR_FMT, raw[:SENSOR_SIZE])
    scale = 10.0 ** unitm
    return {
        "label": label.split(b"\0", 1)[0].decode(errors="replace"),
        "value": inp * scale, "max": mx * scale, "average": avg * scale, "highest": hi * scale,
        "status": status.split(b"\0", 1)[0].decode(errors="replace"),
        "units": units.split(b"\0", 1)[0].decode(errors="replace"),
        "type": typ,
    }


def query_xdna_sensors(dev_node: Path) -> list[dict[str, Any]]:
    """Run ``DRM_IOCTL_AMDXDNA_GET_INFO(DRM_AMDXDNA_QUERY_SENSORS)`` on ``dev_node`` (Linux only)."""
    import ctypes
    import fcntl  # POSIX only: guarded by the caller's platform check

    buf = ctypes.create_string_buffer(SENSOR_SIZE)
    arg = bytearray(struct.pack(GET_INFO_FMT, DRM_AMDXDNA_QUERY_SENSORS, SENSOR_SIZE, ctypes.addressof(buf)))
    fd = os.open(dev_node, os.O_RDWR)
    try:
        fcntl.ioctl(fd, DRM_IOCTL_AMDXDNA_GET_INFO, arg, True)
    finally:
        os.close(fd)
    _, size, _ = struct.unpack(GET_INFO_FMT, bytes(arg))
    n = max(1, min(size, SENSOR_SIZE) // SENSOR_SIZE)
    return [parse_sensor(buf.raw[i * SENSOR_SIZE:(i + 1) * SENSOR_SIZE]) for i in range(n)]


class XdnaNpuMonitor:
    """AMD XDNA NPU power through the amdxdna sensor query, only while the device is already powered."""

    name = "amdxdna"
    keys = ("npu", "npu_power_w")

    def __init__(self, root: Path | str = "/",
                 query: Callable[[Path], list[dict[str, Any]]] | None = None) -> None:
        self.root = Path(root)
        self.query = query or query_xdna_sensors
        self.device, self.dev_node = self._find()

    def _find(self) -> tuple[Path | None, Path | None]:
        accel = self.root / "sys" / "class" / "accel"
        if not accel.is_dir():
            return None, None
        for node in sorted(accel.glob("accel*")):
            dev = node / "device"
            if _driver_name(dev) == "amdxdna":
                return dev, self.root / "dev" / "accel" / node.name
        return None, None

    def sample(self) -> Reading:
        """Power in watts when the NPU is active; utilization is not exposed by the driver."""
        r = Reading()
        if self.device is None:
            r.none("npu", f"no amdxdna device under {self.root / 'sys/class/accel'}")
            r.none("npu_power_w", r.reasons["npu"])
            return r
        r.none("npu", "the amdxdna driver exposes power and per-context command counts, not a busy %")
        status = _read_text(self.device / "power" / "runtime_status")
        r.details["runtime_status"] = status
        if status != "active":
            r.none("npu_power_w", f"NPU is {status or 'in an unknown power state'}; not woken to read it")
            return r
        if sys.platform != "linux":
            r.none("npu_power_w", "the amdxdna ioctl exists only on Linux")
            return r
        try:
            sensors = self.query(self.dev_node)
        except Exception as exc:
            r.none("npu_power_w", f"amdxdna sensor query failed on {self.dev_node}: {exc}")
            return r
        power = next((s for s in sensors if s.get("type") == 0), None)
        if power is None:
            r.none("npu_power_w", "amdxdna returned no power sensor")
            return r
        unit = power.get("units", "").lower()
        value = float(power["value"])
        if unit in ("mw", "milliwatt", "milliwatts"):
            value /= 1000.0
        r.values["npu_power_w"] = value
        r.details["sensor"] = power
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
        now, busy = self.clock(), _read_int(self.path)
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


# ---------------------------------------------------------------------------------------------------------
# discovery and sampling


def default_monitors(root: Path | str = "/") -> dict[str, list[Monitor]]:
    """The monitors for this machine, grouped by loop: ``fast``, ``mid``, ``slow``."""
    mid: list[Monitor] = [NvidiaMonitor(), AmdGpuMonitor(root), IntelNpuMonitor(root)]
    slow: list[Monitor] = [XdnaNpuMonitor(root), WindowsPdhMonitor()]
    return {"fast": [ProcessMonitor()], "mid": mid, "slow": slow}


SNAPSHOT_KEYS = ("cpu", "process_cpu", "rss_bytes", "gpu", "vram_bytes", "npu", "npu_power_w")


def merge_readings(readings: Iterable[Reading]) -> dict[str, Any]:
    """Combine readings: the first real value of each key wins; a key with none keeps every reason."""
    values: dict[str, float | None] = {k: None for k in SNAPSHOT_KEYS}
    reasons: dict[str, list[str]] = {}
    for reading in readings:
        for key, value in reading.values.items():
            if value is not None and values.get(key) is None:
                values[key] = value
            elif value is None:
                reason = reading.reasons.get(key, "not measured")
                reasons.setdefault(key, [])
                if reason not in reasons[key]:
                    reasons[key].append(reason)
    out: dict[str, Any] = dict(values)
    out["reasons"] = {k: "; ".join(v) for k, v in reasons.items() if values.get(k) is None}
    for key in SNAPSHOT_KEYS:
        if values.get(key) is None and key not in out["reasons"]:
            out["reasons"][key] = "no monitor for it on this machine"
    return out


def clamp_periods(loops: Any) -> tuple[float, float, float]:
    """(fast, mid, slow) periods in seconds from ``policy.loops``, clamped to 100/250/1000 ms minimums."""
    fast = max(FAST_MIN_MS, int(getattr(loops, "fast_ms", FAST_MIN_MS))) / 1000
    mid = max(MID_MIN_MS, int(getattr(loops, "mid_ms", MID_MIN_MS))) / 1000
    slow = max(SLOW_MIN_MS, int(getattr(loops, "slow_ms", SLOW_MIN_MS))) / 1000
    return fast, mid, slow


class TelemetrySampler:
    """Samples monitors in a daemon thread on the fast/mid/slow cadence; :meth:`snapshot` is thread-safe.

    ``on_mid`` callbacks run on the mid loop (the memory-pressure feedback uses it)."""

    def __init__(self, loops: Any, monitors: dict[str, list[Monitor]] | None = None,
                 on_mid: Iterable[Callable[[], None]] = ()) -> None:
        self.periods = dict(zip(("fast", "mid", "slow"), clamp_periods(loops)))
        self.monitors = monitors if monitors is not None else default_monitors()
        self.on_mid = list(on_mid)
        self._latest: dict[str, Reading] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0

    def sample_once(self, loops: Iterable[str] = ("fast", "mid", "slow")) -> None:
        """Sample the monitors of ``loops`` now (also used by tests and one-shot callers)."""
        for loop in loops:
            for mon in self.monitors.get(loop, []):
                try:
                    reading = mon.sample()
                except Exception as exc:  # a broken monitor must never stop generation
                    reading = Reading()
                    for key in getattr(mon, "keys", ()):
                        reading.none(key, f"{mon.name} failed: {exc}")
                with self._lock:
                    self._latest[mon.name] = reading
            if loop == "mid":
                for callback in self.on_mid:
                    try:
                        callback()
                    except Exception:  # pragma: no cover - feedback must not kill sampling
                        pass
        with self._lock:
            self.samples += 1

    def _run(self) -> None:
        due = {loop: 0.0 for loop in self.periods}
        step = min(self.periods.values())
        while not self._stop.is_set():
            now = time.monotonic()
            ready = [loop for loop, t in due.items() if now >= t]
            if ready:
                self.sample_once(ready)
                for loop in ready:
                    due[loop] = now + self.periods[loop]
            self._stop.wait(max(0.01, min(due.values()) - time.monotonic()) if due else step)

    def start(self) -> "TelemetrySampler":
        """Start the background thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="inferos-telemetry", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "TelemetrySampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> dict[str, Any]:
        """Latest ``cpu``, ``process_cpu``, ``rss_bytes``, ``gpu``, ``vram_bytes``, ``npu``, ``npu_power_w``
        (each a value or None) and ``reasons`` for the Nones."""
        with self._lock:
            readings = list(self._latest.values())
        if not readings:
            out = {k: None for k in SNAPSHOT_KEYS}
            out["reasons"] = {k: "not sampled yet" for k in SNAPSHOT_KEYS}
            return out
        return merge_readings(readings)

    def util(self) -> dict[str, float | None]:
        """``{cpu, gpu, npu}`` for ``Event.util``."""
        snap = self.snapshot()
        return {"cpu": snap["cpu"], "gpu": snap["gpu"], "npu": snap["npu"]}


@dataclass
class Monitoring:
    """A running sampler plus the memory-pressure source it feeds on the mid loop.

    Wiring (run / bench / serve)::

        mon = start_monitoring(policy)
        engine = Engine(info, resolved, telemetry=mon.util, pressure=mon.pressure)
        ...  # table snapshot: mon.snapshot()["pressure"]
        mon.stop()
    """

    sampler: TelemetrySampler
    pressure: Any

    def util(self) -> dict[str, float | None]:
        """``{cpu, gpu, npu}`` for ``Event.util``."""
        return self.sampler.util()

    def snapshot(self) -> dict[str, Any]:
        """The sampler snapshot with ``pressure`` (level, host, kv, available_bytes, reason) added."""
        snap = self.sampler.snapshot()
        snap["pressure"] = self.pressure.snapshot()
        return snap

    def stop(self) -> None:
        """Stop the sampler thread."""
        self.sampler.stop()

    def __enter__(self) -> "Monitoring":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_monitoring(
    policy: Any,
    *,
    kv_bytes: Callable[[], int | None] | None = None,
    monitors: dict[str, list[Monitor]] | None = None,
    start: bool = True,
) -> Monitoring:
    """Create the default monitors, a :class:`~inferos_cli.machine.pressure.MemoryPressure` from the
    policy (updated on the mid loop) and start sampling in the background (unless ``start=False``)."""
    from inferos_cli.machine.pressure import MemoryPressure

    pressure = MemoryPressure.from_policy(policy, kv_bytes=kv_bytes)
    pressure.update()
    sampler = TelemetrySampler(policy.loops, monitors, on_mid=[pressure.update])
    if start:
        sampler.start()
    return Monitoring(sampler, pressure)
