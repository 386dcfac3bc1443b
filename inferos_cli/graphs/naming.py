"""Saving a graph derived from a model's ONNX file (KV-boundary rewrite, last-position logits, fused int8
cache, exact-compute twin), and the key that names it.

A derived graph keeps pointing at the source's external weight files. It is written beside the source
when that folder is writable; otherwise into a cache folder, with the weight files hard-linked there
(copied when a link is impossible), because onnxruntime refuses external-data paths that leave the
model's folder. Shared read-only model folders are never written to.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from inferos_cli import paths


def source_key(src: Path, *parts: object) -> str:
    """12 hex digits naming a graph derived from ``src``: its resolved path, size and modification time (a
    changed source gets a new derived graph) plus ``parts`` (the deriving code's version and options)."""
    src = Path(src).resolve()
    st = src.stat()
    text = "|".join(str(p) for p in (src, st.st_size, st.st_mtime_ns, *parts))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def derived_paths(src: Path, infix: str, *parts: object, tag: str | None = None) -> tuple[Path, Path, Path | None]:
    """Where a graph derived from ``src`` lives: ``<stem>.inferos-<infix>-<key>.onnx`` beside ``src``, or the
    same name under ``<cache>/graphs/<key>/`` (read-only model folders), and the one already written, if
    any. ``parts`` (the deriving code's version and options) go into the key with ``tag`` (default
    ``infix``)."""
    digest = source_key(src, tag or infix, *parts)
    name = f"{src.stem}.inferos-{infix}-{digest}.onnx"
    beside, cached = src.parent / name, paths.cache_dir() / "graphs" / digest / name
    return beside, cached, next((c for c in (beside, cached) if c.is_file()), None)


def external_files(model: Any) -> set[str]:
    """Relative paths of the external data files an ONNX model (loaded without its data) refers to."""
    found: set[str] = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                found.add(entry.value)
    return found


def writable(folder: Path) -> bool:
    """True when we may add a file to ``folder``: a write bit is set *and* a probe file can be written
    (root writes anywhere, so the mode bits keep read-only shared model folders untouched)."""
    try:
        if not folder.stat().st_mode & 0o222:
            return False
        probe = folder / f".inferos-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def save_derived(model: Any, src: Path, beside: Path, elsewhere: Path) -> tuple[Path, list[str]]:
    """Write ``model`` (derived from ``src``) to ``beside`` when ``src``'s folder is writable, else to
    ``elsewhere`` with ``src``'s weight files linked beside it. Returns the path written and the weight
    files that had to be copied (empty when linking worked)."""
    data = model.SerializeToString()
    if writable(src.parent):
        paths.atomic_write_bytes(beside, data)
        return beside, []
    target = elsewhere.parent
    target.mkdir(parents=True, exist_ok=True)
    copied: list[str] = []
    for rel in sorted(external_files(model)):
        have = target / rel
        if have.exists():
            continue
        have.parent.mkdir(parents=True, exist_ok=True)
        tmp = have.with_name(f".{have.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src.parent / rel, tmp)
        except OSError:
            shutil.copyfile(src.parent / rel, tmp)
            copied.append(rel)
        os.replace(tmp, have)
    paths.atomic_write_bytes(elsewhere, data)
    return elsewhere, copied
