"""The one place inferos reads resident memory (RSS) of its own process.

- :func:`current_rss`: now, cheap enough for every event (Linux: one ``pread`` of an open
  ``/proc/self/statm``; elsewhere psutil's ``memory_info``).
- :func:`process_peak_rss`: the process's lifetime peak (``VmHWM`` on Linux, ``ru_maxrss`` on other POSIX
  systems, ``peak_wset`` on Windows).
- :class:`PeakWindow`: the peak over one measured window (Linux: the kernel high-water mark reset through
  ``/proc/self/clear_refs`` and read after the window, exact; elsewhere sampled every 2 ms and on demand).
- :func:`mapped_file_rss`: the resident bytes of this process's mappings of given files (Linux
  ``/proc/self/smaps``), e.g. how much of a model's weight file stays resident after its session is built.

Every value is bytes, or None when the platform does not expose it: never a guess.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterable


class _StatmReader:
    """RSS now: one ``pread`` of an open ``/proc/self/statm`` on Linux, else psutil."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._page = 4096
        self._proc: Any = None
        self._pid = os.getpid()
        self._open()

    def _open(self) -> None:
        self._fd = None
        if sys.platform.startswith("linux") and hasattr(os, "pread"):
            try:
                self._fd = os.open("/proc/self/statm", os.O_RDONLY)
                self._page = os.sysconf("SC_PAGE_SIZE")
            except OSError:
                self._fd = None

    def __call__(self) -> int | None:
        if os.getpid() != self._pid:  # forked child: /proc/self of the parent is not ours
            self._pid, self._proc = os.getpid(), None
            self._open()
        if self._fd is not None:
            try:
                return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
            except (OSError, IndexError, ValueError):
                self._fd = None
        try:
            if self._proc is None:
                import psutil

                self._proc = psutil.Process()
            return int(self._proc.memory_info().rss)
        except Exception:  # noqa: BLE001 - psutil missing or process info denied: unknown, not zero
            return None


current_rss = _StatmReader()
"""Resident bytes of this process now, or None."""


def _vm_hwm() -> int | None:
    """Linux ``VmHWM`` (peak RSS since start or since the last ``clear_refs`` reset), in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def process_peak_rss() -> int | None:
    """Peak resident bytes of this process over its life (or since the last :class:`PeakWindow` reset on
    Linux), or None where the platform has no counter."""
    if sys.platform.startswith("linux"):
        hwm = _vm_hwm()
        if hwm is not None:
            return hwm
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024
    except ImportError:  # Windows
        try:
            import psutil

            return int(getattr(psutil.Process().memory_info(), "peak_wset", 0)) or None
        except Exception:  # noqa: BLE001
            return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakWindow:
    """Peak RSS of this process over one window: :meth:`start`, :meth:`sample` (optional), :meth:`stop`.

    Exact on Linux (kernel high-water mark reset before the window, read after it); elsewhere a 2 ms
    sampling thread plus every :meth:`sample` call, which can miss shorter spikes. :attr:`method` says
    which, for the results' ``method`` notes."""

    def __init__(self) -> None:
        self.exact = sys.platform.startswith("linux") and _reset_hwm() and _vm_hwm() is not None
        self.method = (
            "exact: Linux VmHWM reset via /proc/self/clear_refs before each run, read after it"
            if self.exact else "sampled: RSS every 2 ms and at every event (may miss shorter spikes)"
        )
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        """Current RSS in bytes (0 when unreadable)."""
        return current_rss() or 0

    def start(self) -> None:
        """Begin a window."""
        self._peak = self.rss()
        if self.exact:
            _reset_hwm()
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        """Take one sample now (useful at every event when sampling)."""
        if not self.exact:
            self._peak = max(self._peak, self.rss())

    def stop(self) -> int:
        """End the window; its peak RSS in bytes."""
        if self.exact:
            return max(_vm_hwm() or 0, self.rss())
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self._peak

    def _sample_loop(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self.rss())


def mapped_file_rss(files: Iterable[Path | str]) -> int | None:
    """Resident bytes of this process's mappings of ``files`` (matched by device and inode, so a hard link
    counts as its file), summed over ``/proc/self/smaps``; None where that file does not exist (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    keys = set()
    for f in files:
        st = os.stat(f)
        keys.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    total, counting = 0, False
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as handle:
            for line in handle:
                parts = line.split()
                if not parts:
                    continue
                if "-" in parts[0] and not parts[0].endswith(":") and len(parts) >= 5:  # a mapping's header
                    major, _, minor = parts[3].partition(":")
                    try:
                        counting = (int(major, 16), int(minor, 16), int(parts[4])) in keys
                    except ValueError:
                        counting = False
                elif counting and parts[0] == "Rss:":
                    total += int(parts[1]) * 1024
    except OSError:
        return None
    return total
