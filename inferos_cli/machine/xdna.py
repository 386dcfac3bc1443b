"""The AMD XDNA NPU (Ryzen AI) monitor on Linux, through the ``amdxdna`` accel device.

The driver's uapi (``include/uapi/drm/amdxdna_accel.h``) offers ``DRM_IOCTL_AMDXDNA_GET_INFO`` with
``DRM_AMDXDNA_QUERY_SENSORS``, which returns a power sensor (``struct amdxdna_drm_query_sensor``: ``input``
scaled by ``10**unitm`` in ``units``), not a busy percentage; so :class:`XdnaNpuMonitor` reports
``npu_power_w`` and leaves ``npu`` (utilization) None with that reason. It only opens the device when its
``power/runtime_status`` is already ``active``, so sampling never wakes a suspended NPU.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path
from typing import Any, Callable

from inferos_cli.machine.monitors import Reading, driver_name, read_text

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
            if driver_name(dev) == "amdxdna":
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
        status = read_text(self.device / "power" / "runtime_status")
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
