"""Where inferos keeps config and caches. ``INFEROS_HOME`` moves all of it (tests use a tmp dir)."""

from __future__ import annotations

import os
import tempfile
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


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` by rename, else is removed."""
    import shutil

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
