"""Device monitors on fake sysfs trees, the sampler, and memory pressure. Never a made-up number."""

from __future__ import annotations

import os
import struct
import sys
import time
from pathlib import Path

import pytest
from _pressure import StaticPressure

from inferos_cli.machine import monitors as mn
from inferos_cli.machine import telemetry as tm
from inferos_cli.machine import xdna
from inferos_cli.machine.pressure import MemoryPressure
from inferos_cli.settings import LoopsPolicy, Policy


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def amd_gpu_tree(root: Path, busy: int = 37) -> Path:
    dev = root / "sys/class/drm/card1/device"
    write(root / "sys/class/drm/card0-eDP-1/status", "connected\n")
    write(root / "sys/class/drm/card0/device/vendor", "0x8086\n")  # another GPU without the counter
    write(dev / "vendor", "0x1002\n")
    write(dev / "gpu_busy_percent", f"{busy}\n")
    write(dev / "mem_info_vram_used", "536870912\n")
    write(dev / "mem_info_gtt_used", "1048576\n")
    return dev


def xdna_tree(root: Path, status: str) -> Path:
    dev = root / "sys/class/accel/accel0/device"
    write(dev / "uevent", "DRIVER=amdxdna\nPCI_ID=1022:17F0\n")
    write(dev / "power/runtime_status", status + "\n")
    write(root / "dev/accel/accel0", "")
    return dev


def test_amd_gpu_reads_sysfs(tmp_path: Path) -> None:
    dev = amd_gpu_tree(tmp_path, busy=37)
    mon = mn.AmdGpuMonitor(tmp_path)
    r = mon.sample()
    assert r.values == {"gpu": 37.0, "vram_bytes": 536870912.0, "gtt_bytes": 1048576.0}
    assert r.details["card"] == "card1"
    write(dev / "gpu_busy_percent", "81\n")
    assert mon.sample().values["gpu"] == 81.0
    (dev / "mem_info_gtt_used").unlink()
    r = mon.sample()
    assert r.values["gtt_bytes"] is None and "cannot read" in r.reasons["gtt_bytes"]


def test_amd_gpu_absent(tmp_path: Path) -> None:
    r = mn.AmdGpuMonitor(tmp_path).sample()
    assert r.values["gpu"] is None and "no amdgpu card" in r.reasons["gpu"]


def test_xdna_absent(tmp_path: Path) -> None:
    r = xdna.XdnaNpuMonitor(tmp_path).sample()
    assert r.values == {"npu": None, "npu_power_w": None}
    assert "no amdxdna device" in r.reasons["npu_power_w"]


def test_xdna_suspended_is_not_woken(tmp_path: Path) -> None:
    xdna_tree(tmp_path, "suspended")
    calls: list[Path] = []
    mon = xdna.XdnaNpuMonitor(tmp_path, query=lambda node: calls.append(node) or [])
    r = mon.sample()
    assert calls == []  # the device node was never opened
    assert r.values["npu_power_w"] is None and "suspended" in r.reasons["npu_power_w"]
    assert "not a busy %" in r.reasons["npu"]


@pytest.mark.skipif(sys.platform != "linux", reason="the amdxdna ioctl exists only on Linux")
def test_xdna_active_reads_power_sensor(tmp_path: Path) -> None:
    xdna_tree(tmp_path, "active")
    raw = struct.pack(xdna.SENSOR_FMT, b"Total Power", 1234, 5000, 1000, 2000, b"ok", b"mW", 0, 0)
    mon = xdna.XdnaNpuMonitor(tmp_path, query=lambda node: [xdna.parse_sensor(raw)])
    r = mon.sample()
    assert r.values["npu_power_w"] == pytest.approx(1.234)
    assert r.values["npu"] is None
    assert r.details["sensor"]["label"] == "Total Power"


@pytest.mark.skipif(sys.platform != "linux", reason="the amdxdna ioctl exists only on Linux")
def test_xdna_active_real_ioctl_on_a_non_device_fails_honestly(tmp_path: Path) -> None:
    xdna_tree(tmp_path, "active")
    r = xdna.XdnaNpuMonitor(tmp_path).sample()  # a regular file: the real ioctl returns ENOTTY
    assert r.values["npu_power_w"] is None and "sensor query failed" in r.reasons["npu_power_w"]


def test_xdna_ioctl_number_matches_uapi() -> None:
    # DRM_IOWR(0x40 + 7, struct amdxdna_drm_get_info /* 16 bytes */) with DRM_IOCTL_BASE 'd'
    assert xdna.DRM_IOCTL_AMDXDNA_GET_INFO == 0xC0106447
    assert xdna.SENSOR_SIZE == 168


def test_intel_npu_busy_deltas(tmp_path: Path) -> None:
    path = tmp_path / "sys/class/accel/accel0/device/npu_busy_time_us"
    write(path, "1000000\n")
    now = [100.0]
    mon = mn.IntelNpuMonitor(tmp_path, clock=lambda: now[0])
    first = mon.sample()
    assert first.values["npu"] is None and "first sample" in first.reasons["npu"]
    now[0] = 102.0
    write(path, "1500000\n")  # 0.5 s busy in 2 s
    assert mon.sample().values["npu"] == pytest.approx(25.0)
    now[0] = 103.0
    write(path, "10\n")  # counter reset
    assert mon.sample().values["npu"] is None


def test_intel_npu_absent(tmp_path: Path) -> None:
    r = mn.IntelNpuMonitor(tmp_path).sample()
    assert r.values["npu"] is None and "no Intel NPU" in r.reasons["npu"]


def test_nvidia_absent_gives_reason() -> None:
    mon = mn.NvidiaMonitor()
    if mon.present:
        pytest.skip("an NVIDIA GPU with NVML is present here")
    r = mon.sample()
    assert r.values == {"gpu": None, "vram_bytes": None}
    assert r.reasons["gpu"]


def test_windows_pdh_parsing() -> None:
    counters = {
        "pid_10_luid_0x00000000_0x0000AAAA_phys_0_eng_0_engtype_3D": 30.0,
        "pid_11_luid_0x00000000_0x0000AAAA_phys_0_eng_0_engtype_3D": 12.5,
        "pid_10_luid_0x00000000_0x0000AAAA_phys_0_eng_3_engtype_Compute_0": 5.0,
        "pid_12_luid_0x00000000_0x0000BBBB_phys_0_eng_0_engtype_Compute": 64.0,
        "garbage": 99.0,
    }
    agg = mn.aggregate_gpu_engines(counters)
    assert agg["0x00000000_0x0000AAAA"]["3D"] == pytest.approx(42.5)
    gpu, npu = mn.classify_adapters(agg)
    assert gpu == pytest.approx(42.5) and npu == pytest.approx(64.0)
    if sys.platform != "win32":
        r = mn.WindowsPdhMonitor().sample()
        assert r.values["gpu"] is None and "only on Windows" in r.reasons["gpu"]


def test_process_monitor_reads_real_rss() -> None:
    mon = mn.ProcessMonitor()
    first = mon.sample()
    assert first.values["rss_bytes"] and first.values["rss_bytes"] > 1e6
    assert first.values["cpu"] is None and "first sample" in first.reasons["cpu"]
    sum(i * i for i in range(200_000))
    second = mon.sample()
    assert second.values["cpu"] is not None and 0.0 <= second.values["cpu"] <= 100.0


def test_sampler_snapshot_merges_and_keeps_reasons(tmp_path: Path) -> None:
    amd_gpu_tree(tmp_path, busy=55)
    monitors = {"fast": [mn.ProcessMonitor()], "mid": [mn.NvidiaMonitor(), mn.AmdGpuMonitor(tmp_path)],
                "slow": [xdna.XdnaNpuMonitor(tmp_path)]}
    sampler = tm.TelemetrySampler(LoopsPolicy(), monitors)
    assert sampler.snapshot()["reasons"]["gpu"] == "not sampled yet"
    sampler.sample_once()
    snap = sampler.snapshot()
    assert snap["gpu"] == 55.0 and snap["vram_bytes"] == 536870912.0
    assert snap["rss_bytes"] > 0
    assert snap["npu"] is None and "amdxdna" in snap["reasons"]["npu"]
    assert set(sampler.util()) == {"cpu", "gpu", "npu"}


def test_sampler_thread_runs_and_stops(tmp_path: Path) -> None:
    amd_gpu_tree(tmp_path)
    hits: list[int] = []
    loops = LoopsPolicy(fast_ms=1, mid_ms=1, slow_ms=1)  # clamped, never a 1 ms spin
    assert tm.clamp_periods(loops) == (0.1, 0.25, 1.0)
    sampler = tm.TelemetrySampler(loops, {"mid": [mn.AmdGpuMonitor(tmp_path)]}, on_mid=[lambda: hits.append(1)])
    with sampler:
        deadline = time.monotonic() + 10
        while not hits and time.monotonic() < deadline:
            time.sleep(0.02)
    assert hits and sampler.snapshot()["gpu"] == 37.0
    assert sampler._thread is None


def test_default_monitors_report_na_here_with_reasons() -> None:
    sampler = tm.TelemetrySampler(LoopsPolicy(), tm.default_monitors())
    sampler.sample_once()
    snap = sampler.snapshot()
    for key in ("gpu", "npu", "vram_bytes"):
        assert snap[key] is not None or snap["reasons"][key]


# ----- memory pressure ---------------------------------------------------------------------------


def test_pressure_from_host_memory() -> None:
    avail = [8 * 1024**3]
    p = MemoryPressure(4 * 1024**3, available=lambda: avail[0])
    assert p.update() == 0.0 and p.known
    avail[0] = 1 * 1024**3
    assert p.update() == pytest.approx(0.75)
    assert "host 0.75" in p.reason()
    avail[0] = 0
    assert p.update() == 1.0


def test_pressure_from_kv_budget_takes_the_larger() -> None:
    used = [0]
    pol = Policy.model_validate({"kv": {"budget_bytes": "100MiB"}, "io": {"host_pool_bytes": "1GiB"}})
    p = MemoryPressure.from_policy(pol, kv_bytes=lambda: used[0], available=lambda: 2 * 1024**3)
    assert p.update() == 0.0
    used[0] = 60 * 1024**2
    assert p.update() == pytest.approx(0.6)
    assert p.snapshot()["kv"] == pytest.approx(0.6) and "kv 0.60" in p.reason()


def test_pressure_unknown_is_not_invented() -> None:
    p = MemoryPressure(1024, available=lambda: None)
    assert p.update() == 0.0
    assert p.known is False and p.snapshot()["level"] is None and "unknown" in p.reason()


def test_pressure_real_psutil_and_static() -> None:
    p = MemoryPressure.from_policy(Policy())
    level = p.update()
    assert 0.0 <= level <= 1.0 and p.known and p.snapshot()["available_bytes"] > 0
    assert StaticPressure(2.0).level() == 1.0


def test_pressure_is_fed_by_the_mid_loop() -> None:
    p = MemoryPressure(4 * 1024**3, available=lambda: 1 * 1024**3)
    sampler = tm.TelemetrySampler(LoopsPolicy(), {"mid": []}, on_mid=[p.update])
    sampler.sample_once(["fast"])
    assert p.reason() == "not sampled yet"
    sampler.sample_once(["mid"])
    assert p.level() == pytest.approx(0.75)


def test_no_posix_only_import_at_module_level() -> None:
    for mod in (tm, mn, xdna):
        src = Path(mod.__file__).read_text(encoding="utf-8")
        header = src.split("def ", 1)[0]
        assert "import fcntl" not in header and "import win32pdh" not in header
    assert os.name in ("posix", "nt")


def test_monitoring_feeds_engine_pressure_and_run_table(stories_onnx: Path) -> None:
    from rich.console import Console

    from inferos_cli.engine.engine import Engine
    from inferos_cli.models.info import inspect_folder
    from inferos_cli.settings import Resolved
    from inferos_cli.ui.run_table import RunSnapshot, run_table, summary_line

    pol = Policy.model_validate({"kv": {"mode": "disabled"}, "io": {"host_pool_bytes": "4GiB"}})
    eng = Engine(inspect_folder(stories_onnx), Resolved(policy=pol), threads=1)
    assert eng.pressure_level() == 0.0
    mon = tm.start_monitoring(pol, monitors={"fast": [mn.ProcessMonitor()]}, start=False)
    mon.pressure.available = lambda: 1 * 1024**3  # 1 GiB free of a 4 GiB pool
    mon.sampler.sample_once()
    eng.pressure = mon.pressure
    assert eng.pressure_level() == pytest.approx(0.75)
    snap = RunSnapshot(model="stories")
    snap.update_telemetry(mon.snapshot())
    assert snap.pressure == pytest.approx(0.75) and "1024 MiB available" in snap.pressure_reason
    console = Console(record=True, width=120)
    console.print(run_table(snap))
    text = console.export_text()
    assert "memory pressure" in text and "0.75 (0-1)" in text
    assert "memory pressure 0.75 (0-1)" in summary_line(snap)
    mon.stop()
