"""Facts about this machine, read from the OS: CPU name and cores, memory, Python and OS versions, and the
GPUs / NPUs the OS or a vendor tool lists. ``inferos doctor`` and the bench's host record both read here.

Every function reads, none guesses: a fact the OS does not expose is None (or, for device lists,
``(None, why)``).
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

SUBPROCESS_TIMEOUT_S = 10.0


def run_program(argv: list[str], timeout: float = SUBPROCESS_TIMEOUT_S) -> tuple[int | None, str]:
    """Run a program (no shell); (exit code or None when it could not run, its output or the error)."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"`{' '.join(argv)}` did not answer within {timeout:.0f} s"
    except OSError as exc:
        return None, f"`{' '.join(argv)}` could not start: {exc.strerror or exc}"
    out = (proc.stdout or "").strip() or (proc.stderr or "").strip()
    return proc.returncode, out


# ------------------------------------------------------------------------------ CPU, memory, versions


def cpu_model() -> str | None:
    """The CPU's marketing name, read from the OS (None when it says nothing)."""
    system = platform.system()
    if system == "Linux":
        try:
            text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        for key in ("model name", "Hardware", "Processor", "cpu model"):
            match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
            if match:
                return match.group(1).strip()
    elif system == "Darwin":
        code, out = run_program(["sysctl", "-n", "machdep.cpu.brand_string"])
        if code == 0 and out:
            return out
    elif system == "Windows":
        try:  # the registry holds the marketing name; platform.processor() only has the family string
            import winreg  # type: ignore[import-not-found]

            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\CentralProcessor\0") as key:
                return str(winreg.QueryValueEx(key, "ProcessorNameString")[0]).strip()
        except OSError:
            pass
    return platform.processor() or None


def cpu_cores() -> tuple[int | None, int | None]:
    """(physical, logical) core counts; None where the OS does not say."""
    import psutil

    return psutil.cpu_count(logical=False), psutil.cpu_count(logical=True)


def memory() -> tuple[int, int]:
    """(total, available) system memory in bytes."""
    import psutil

    mem = psutil.virtual_memory()
    return int(mem.total), int(mem.available)


def python_version() -> str:
    """The interpreter's version, e.g. ``3.11.9``."""
    return platform.python_version()


def python_ok() -> bool:
    """True when the interpreter is new enough for inferos (3.11+)."""
    return sys.version_info >= (3, 11)


def os_description() -> str:
    """``Linux 6.8.0 (x86_64); Linux-6.8.0-...-with-glibc2.39``."""
    return f"{platform.system()} {platform.release()} ({platform.machine()}); {platform.platform()}"


# -------------------------------------------------------------------------------------- GPUs and NPUs


def nvidia_gpus() -> tuple[list[str] | None, str]:
    """NVIDIA GPU names via NVML (nvidia-ml-py) or ``nvidia-smi -L``; (None, why) when neither can look."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            names = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                names.append(name.decode() if isinstance(name, bytes) else str(name))
            return names, "NVML"
        finally:
            pynvml.nvmlShutdown()
    except ImportError:
        pass
    except Exception as exc:  # NVML present but no driver / no device
        return [], f"NVML: {str(exc)[:120]}"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "no NVIDIA driver tools (nvidia-smi not on PATH, nvidia-ml-py not installed)"
    code, out = run_program([smi, "-L"])
    if code != 0:
        return [], f"nvidia-smi: {out[:120] or 'failed'}"
    return [line.split(" (UUID")[0] for line in out.splitlines() if line.startswith("GPU")], "nvidia-smi"


def linux_drm_gpus(sysroot: Path = Path("/")) -> tuple[list[str] | None, str]:
    """GPUs the Linux DRM subsystem lists (vendor id, and whether a busy counter exists)."""
    root = sysroot / "sys" / "class" / "drm"
    if not root.is_dir():
        return None, f"{root} is absent (no DRM GPU driver visible, e.g. in a container or VM)"
    vendors = {"0x1002": "AMD", "0x10de": "NVIDIA", "0x8086": "Intel"}
    found = []
    for card in sorted(root.glob("card[0-9]*")):
        if "-" in card.name:
            continue
        vendor_file = card / "device" / "vendor"
        try:
            vendor = vendor_file.read_text().strip()
        except OSError:
            continue
        busy = (card / "device" / "gpu_busy_percent").is_file()
        found.append(f"{card.name}: {vendors.get(vendor, vendor)}" + (" (utilisation counter present)" if busy else ""))
    return found, str(root)


def linux_accel_npus(sysroot: Path = Path("/")) -> tuple[list[str] | None, str]:
    """NPUs under /sys/class/accel (amdxdna for Ryzen AI, intel_vpu for Intel)."""
    root = sysroot / "sys" / "class" / "accel"
    if not root.is_dir():
        return None, f"{root} is absent (no NPU driver such as amdxdna or intel_vpu loaded)"
    found = []
    for dev in sorted(root.glob("accel*")):
        driver = dev / "device" / "driver"
        name = driver.resolve().name if driver.exists() else "unknown driver"
        found.append(f"{dev.name}: {name}")
    return found, str(root)


def windows_devices(pattern: str | None, cls: str) -> tuple[list[str] | None, str]:
    """Windows PnP devices of class ``cls``, or (with ``pattern``) whose name matches it (PowerShell CIM)."""
    shell = shutil.which("powershell") or shutil.which("pwsh")
    if shell is None:
        return None, "PowerShell not found, cannot list devices"
    where = f"$_.PNPClass -eq '{cls}'" + (f" -or $_.Name -match '{pattern}'" if pattern else "")
    query = f"Get-CimInstance Win32_PnPEntity | Where-Object {{ {where} }} | ForEach-Object {{ $_.Name }}"
    code, out = run_program([shell, "-NoProfile", "-NonInteractive", "-Command", query], timeout=20)
    if code != 0:
        return None, f"PowerShell device query failed: {out[:120]}"
    return [line.strip() for line in out.splitlines() if line.strip()], "Win32_PnPEntity"
