"""Where inferos keeps config and caches. ``INFEROS_HOME`` moves all of it (tests use a tmp dir).

Also the atomic writers: a file or folder is written under a temp name beside its final place and renamed
into it. Temp folders are named ``.NAME.PID.XXXXXXXX.partial`` (:func:`partial_name`) so that
:func:`clean_stale_partials` can remove what a killed run left behind without touching one that a live
process is still writing.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def home() -> Path | None:
    """``INFEROS_HOME`` as a path, or None when unset."""
    value = os.environ.get("INFEROS_HOME")
    return Path(value).expanduser() if value else None


def config_dir() -> Path:
    """Folder of ``config.toml`` and user ``profiles/``."""
    root = home()
    if root is not None:
        return root
    import platformdirs

    return Path(platformdirs.user_config_dir("inferos", appauthor=False))


def cache_dir() -> Path:
    """Folder of downloaded and converted models and other caches."""
    root = home()
    if root is not None:
        return root / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir("inferos", appauthor=False))


def models_dir() -> Path:
    """Folder holding one sub-folder per cached model."""
    return cache_dir() / "models"


def config_file() -> Path:
    """The default config file path."""
    return config_dir() / "config.toml"


def user_profiles_dir() -> Path:
    """Folder where users drop their own ``NAME.toml`` profiles."""
    return config_dir() / "profiles"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask (read by setting and restoring it; mkstemp files are 0600 otherwise)."""
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: Path, text: str) -> None:
    """Text variant of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


PARTIAL_SUFFIX = ".partial"
STALE_PARTIAL_S = 600.0  # untouched this long and its writer gone: a leftover of a killed run
STALE_LEGACY_PARTIAL_S = 86400.0  # partials named before the PID was recorded: only the age tells
_PARTIAL = re.compile(r"^\..+\.(?P<pid>\d+)\.[a-z0-9_]{8}\.partial$")
_LEGACY_PARTIAL = re.compile(r"^\..+\.[a-z0-9_]{8}\.partial$")


def partial_name(name: str) -> tuple[str, str]:
    """``(prefix, suffix)`` for ``tempfile.mkdtemp``/``mkstemp``: ``.NAME.PID.`` and ``.partial``."""
    return f".{name}.{os.getpid()}.", PARTIAL_SUFFIX


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` by rename, else is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = partial_name(final.name)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_partials(folder: Path, *, min_age_s: float = STALE_PARTIAL_S) -> list[Path]:
    """Remove the ``.NAME.PID.*.partial`` files and folders in ``folder`` that killed runs left; returns them.

    One is removed only when nothing in it changed for ``min_age_s`` and its PID is not a live process that
    started before it (a PID reused by a newer process does not keep it). The age also guards writers this
    process cannot see (another container or machine sharing the cache). Partials named without a PID (older
    inferos) are removed after :data:`STALE_LEGACY_PARTIAL_S`."""
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _PARTIAL.match(entry.name)
        if match is None and not _LEGACY_PARTIAL.match(entry.name):
            continue
        try:
            idle = now - _last_change(entry)
            if match is None:
                stale = idle >= max(min_age_s, STALE_LEGACY_PARTIAL_S)
            else:
                stale = idle >= min_age_s and not _writer_alive(int(match.group("pid")), entry.stat().st_mtime)
        except OSError:
            continue  # vanished meanwhile: its writer finished or cleaned it
        if stale:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _last_change(entry: Path) -> float:
    """The newest mtime of ``entry`` and everything below it."""
    newest = entry.stat().st_mtime
    if entry.is_dir() and not entry.is_symlink():
        for sub in entry.rglob("*"):
            try:
                newest = max(newest, sub.stat().st_mtime)
            except OSError:
                continue
    return newest


def _writer_alive(pid: int, made_by: float) -> bool:
    """True when ``pid`` is a running (not zombie) process that started before ``made_by`` (an epoch time no
    earlier than the partial's creation): the process that wrote it may still be writing."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return proc.create_time() <= made_by + 1.0  # create_time has a clock-tick resolution
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot tell (access denied): keep it
