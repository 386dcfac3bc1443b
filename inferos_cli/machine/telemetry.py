"""The background sampler: the monitors of this machine on the ``loops`` cadence, merged into one snapshot.

Cadence (:class:`TelemetrySampler`): ``loops.fast_ms`` drives CPU/RSS, ``loops.mid_ms`` the GPU/NPU sysfs
and NVML monitors plus the memory-pressure callback, ``loops.slow_ms`` the costlier ones (XDNA ioctl,
Windows PDH). The profile values (1/10/100 ms) are clamped to at least 100/250/1000 ms: the kernel's CPU
counters tick every 10 ms, so a 1 ms loop would only spin and read quantization noise, on the very cores
inference needs.

The monitors themselves are in :mod:`~inferos_cli.machine.monitors` and :mod:`~inferos_cli.machine.xdna`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from inferos_cli.machine.monitors import (
    AmdGpuMonitor,
    IntelNpuMonitor,
    Monitor,
    NvidiaMonitor,
    ProcessMonitor,
    Reading,
    WindowsPdhMonitor,
)
from inferos_cli.machine.pressure import MemoryPressure
from inferos_cli.machine.xdna import XdnaNpuMonitor

FAST_MIN_MS = 100
MID_MIN_MS = 250
SLOW_MIN_MS = 1000


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
    pressure: MemoryPressure

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
    pressure = MemoryPressure.from_policy(policy, kv_bytes=kv_bytes)
    pressure.update()
    sampler = TelemetrySampler(policy.loops, monitors, on_mid=[pressure.update])
    if start:
        sampler.start()
    return Monitoring(sampler, pressure)
