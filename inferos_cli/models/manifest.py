"""The integrity record of a converted folder: ``inferos.json``'s manifest of every file's size, mtime and sha256.

:mod:`inferos_cli.models.convert` writes it (:func:`build_manifest`). :func:`check_manifest` is the check on
every use without re-hashing gigabytes: a file whose size and mtime (ns) still match the record is taken as
written; one whose mtime changed is hashed, and a changed hash marks the folder damaged. A file rewritten with
its old mtime put back cannot be told apart without hashing: ``inferos models --verify`` (``deep=True``)
hashes every file. Manifests written before mtimes were recorded are hashed once and given them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from inferos_cli.paths import atomic_write_text

META_FILE = "inferos.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks (large files never sit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: Path) -> str:
    """sha256 over the sorted (name, sha256) pairs of a source folder's files."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode("utf-8"))
        digest.update(sha256_file(path).encode("ascii"))
    return digest.hexdigest()


def build_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative name: {size, mtime_ns, sha256}}`` for every file of ``folder`` except ``inferos.json``."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == META_FILE:
            continue
        stat = path.stat()
        files[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}
    return files


def check_manifest(folder: Path, *, deep: bool = False, record: bool = False) -> list[str]:
    """Problems of a converted folder against its manifest; [] when sound.

    Sizes are always checked; a file is hashed when its mtime differs from the record (or none is recorded)
    or when ``deep``. With ``record``, a sound folder whose mtimes moved (a copy, a touch, an older manifest)
    gets the current mtimes written back (atomically), so the next check is cheap again."""
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files = meta["files"]
        entries = list(files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f"{meta_path.name} is missing or unreadable"]
    problems = []
    moved: dict[str, int] = {}
    for rel, entry in entries:
        path = folder / rel
        try:
            stat = path.stat()
        except OSError:
            stat = None
        if stat is None or not path.is_file():
            problems.append(f"{rel} is missing")
        elif stat.st_size != entry.get("size"):
            problems.append(f"{rel} has {stat.st_size} bytes, the manifest says {entry.get('size')}")
        elif deep or stat.st_mtime_ns != entry.get("mtime_ns"):
            if sha256_file(path) != entry.get("sha256"):
                problems.append(f"{rel} does not match its sha256")
            elif stat.st_mtime_ns != entry.get("mtime_ns"):
                moved[rel] = stat.st_mtime_ns
    if record and moved and not problems:
        for rel, mtime_ns in moved.items():
            files[rel]["mtime_ns"] = mtime_ns
        _rewrite(meta_path, meta)
    return problems


def _rewrite(meta_path: Path, meta: dict[str, Any]) -> None:
    """Replace ``inferos.json`` atomically (temp file + rename); a read-only folder keeps the old one."""
    try:
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
    except OSError:
        pass  # the next use hashes again; nothing is used unchecked
