"""Where a graph derived from a model's ONNX file lives (KV-boundary rewrite, last-position logits, fused
int8 cache, fp16 cache, exact-compute twin, ONNX-``Attention`` twin), and the key that names it.

A model folder the user points inferos at (a Hugging Face / Lemonade / GAIA folder, their own export) is
never written to: derived graphs go to ``<cache>/graphs/<source key>/``, one folder per source model,
keyed by the source's path, size and modification time and those of its external data files (a changed
source gets a new folder). onnxruntime refuses external data outside the model's folder (symbolic links
that leave it included), so that folder holds a hard link to each external data file of the source, or a
copy where a link is impossible (another file system), made once per source model.

Folders inferos owns (its converted models under :func:`inferos_cli.paths.models_dir`, and the derived
graph folders themselves) keep derived graphs beside the model, named ``<stem>.inferos-<infix>-<key>.onnx``
in both places.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferos_cli import paths

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo


def graphs_dir() -> Path:
    """The root of the derived-graph cache."""
    return paths.cache_dir() / "graphs"


def source_files(src: Path) -> list[Path]:
    """``src`` and the files beside it whose names extend its name (``model.onnx.data``,
    ``model.onnx_data``): the files a change of the source model touches."""
    src = Path(src)
    siblings = [p for p in src.parent.glob(f"{glob.escape(src.name)}?*") if p.is_file() and ".inferos-" not in p.name]
    return [src, *sorted(siblings)]


def source_key(src: Path, *parts: object) -> str:
    """12 hex digits naming ``src`` as it is now: the resolved path, size and modification time of the
    .onnx file and of its data files, plus ``parts`` (for a derived graph: the deriving code's version and
    options)."""
    stamps: list[object] = []
    for f in source_files(src):
        st = f.stat()
        stamps += [f.resolve(), st.st_size, st.st_mtime_ns]
    text = "|".join(str(p) for p in (*stamps, *parts))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def owned(folder: Path) -> bool:
    """True for folders inferos made itself (under the models or derived-graph cache), where a derived
    graph may sit beside the model; everything else belongs to the user."""
    folder = Path(folder).resolve()
    return any(root in folder.parents or root == folder
               for root in (paths.models_dir().resolve(), graphs_dir().resolve()))


def derived_path(src: Path, infix: str, *parts: object, tag: str | None = None) -> Path:
    """Where the graph derived from ``src`` lives (written or not): beside ``src`` in a folder inferos owns
    (when writable), else ``<cache>/graphs/<source key>/``. ``parts`` (the deriving code's version and
    options) go into the name's key with ``tag`` (default ``infix``)."""
    src = Path(src)
    name = f"{src.stem}.inferos-{infix}-{source_key(src, tag or infix, *parts)}.onnx"
    if owned(src.parent) and writable(src.parent):
        return src.parent / name
    return graphs_dir() / source_key(src) / name


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
    (root writes anywhere, so the mode bits keep read-only folders untouched)."""
    try:
        if not folder.stat().st_mode & 0o222:
            return False
        probe = folder / f".inferos-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def link_data(model: Any, src: Path, target: Path) -> list[str]:
    """Give ``target`` each external data file of ``model`` (derived from ``src``): a hard link to the
    source's file, or a copy where linking fails. Returns the files that had to be copied."""
    copied: list[str] = []
    for rel in sorted(external_files(model)):
        have = target / rel
        if have.exists():
            continue
        have.parent.mkdir(parents=True, exist_ok=True)
        tmp = have.with_name(f".{have.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src.parent / rel, tmp)
        except OSError:
            shutil.copyfile(src.parent / rel, tmp)
            copied.append(rel)
        os.replace(tmp, have)
    return copied


def save_derived(model: Any, src: Path, path: Path) -> list[str]:
    """Write ``model`` (derived from ``src``) to ``path`` (from :func:`derived_path`), first giving a folder
    other than ``src``'s the source's external data files. Returns the data files that had to be copied
    (empty when linking worked or the graph sits beside its source)."""
    copied = [] if path.parent == src.parent else link_data(model, src, path.parent)
    paths.atomic_write_bytes(path, model.SerializeToString())
    return copied


def copied_note(copied: list[str], folder: Path) -> str:
    """A table note when weights had to be copied (no hard link possible), else ``""``."""
    return f"weights copied to {folder} (no hard link possible across file systems)" if copied else ""


def retype_kv(graph: Any, info: "ModelInfo", elem_type: int, *, value_info: bool = False) -> tuple[set[str], set[str]]:
    """Give every past input and present output of ``graph`` the ONNX ``elem_type`` (and their
    ``value_info`` entries too when asked); returns (past names, present names)."""
    n = range(info.num_layers)
    pasts = {info.past_key_fmt % i for i in n} | {info.past_value_fmt % i for i in n}
    presents = {info.present_key_fmt % i for i in n} | {info.present_value_fmt % i for i in n}
    for vi in [*graph.input, *graph.output, *(graph.value_info if value_info else [])]:
        if vi.name in pasts or vi.name in presents:
            vi.type.tensor_type.elem_type = elem_type
    return pasts, presents
