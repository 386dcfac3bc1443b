"""Resolve ``--model`` to a ready ONNX folder, converting and caching on first use.

``--model`` accepts, in this order:

1. nothing: the registry's default alias (``smollm2-135m``);
2. a path: a ``.gguf`` file (converted into the cache), a Hugging Face folder (``config.json`` +
   ``*.safetensors``, converted), an ONNX folder (onnxruntime-genai / Lemonade ``genai_config.json``, optimum,
   or inferos-converted) used in place, or a ``.onnx`` file inside such a folder;
3. a cached name (a folder under ``paths.models_dir()``);
4. an alias of the registry (fetched, converted, cached).

Every converted folder carries a manifest (``inferos.json``) checked on every use (sizes and mtimes, a sha256
of any file whose mtime moved: :func:`~inferos_cli.models.manifest.check_manifest`); a partial or corrupted
cache entry is rebuilt from its source, or refused when the source is gone (never used). Each pull first
removes what killed runs left in the cache (:func:`~inferos_cli.paths.clean_stale_partials`). :func:`param_count_for` gives a
model's parameter count (what picks its size class), read without loading weights where it can.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from inferos_cli import paths
from inferos_cli.errors import ModelError, ModelNotFoundError
from inferos_cli.models.convert import CONVERTER_VERSION, check_dtype
from inferos_cli.models.reading import ProgressFn
from inferos_cli.models.info import ModelInfo, find_onnx, inspect_folder
from inferos_cli.models.manifest import META_FILE, check_manifest
from inferos_cli.models.params import gguf_param_count, safetensors_param_count


@dataclass
class PullResult:
    """What ``pull`` did."""

    name: str
    folder: Path
    action: str  # "cached" | "converted" | "rebuilt" | "in place"
    info: ModelInfo
    problems: list[str]


# ------------------------------------------------------------------------------------------------ progress
PLAIN_PROGRESS_S = 5.0  # seconds between plain progress lines of one stage


@contextmanager
def progress_reporter(enabled: bool, label: str) -> Iterator[ProgressFn | None]:
    """A ``(stage, done, total)`` callback: a rich bar with byte counts on a terminal; otherwise a plain line
    when a stage starts and, for long stages counted in bytes, one every few seconds (``convert 512 / 3617 MiB``)."""
    if not enabled:
        yield None
        return
    if not sys.stderr.isatty():
        last: dict[str, float] = {}

        def plain(stage: str, done: int, total: int) -> None:
            key = stage.split(" ")[0]
            now = time.monotonic()
            if key not in last:
                last[key] = now
                print(f"{label}: {stage}...", file=sys.stderr, flush=True)
            elif total > 1 and now - last[key] >= PLAIN_PROGRESS_S and done < total:
                last[key] = now
                print(f"{label}: {stage} {done / 2**20:.0f} / {total / 2**20:.0f} MiB", file=sys.stderr, flush=True)

        yield plain
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    tasks: dict[str, Any] = {}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.fields[size]}"), TimeElapsedColumn(), console=Console(stderr=True),
                  transient=False) as bar:

        def rich_cb(stage: str, done: int, total: int) -> None:
            size = f"{done / 2**20:.0f}/{total / 2**20:.0f} MiB" if total > 1 else ""
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{label}: {stage}", total=max(total, 1), size=size)
            bar.update(tasks[stage], completed=done, total=max(total, 1), size=size)

        yield rich_cb


# ------------------------------------------------------------------------------------------------ helpers
def _source_key(path: Path) -> str:
    """Short stable id of a local source (path, size, mtime): a changed file converts anew."""
    stat = path.stat()
    raw = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:8]


def _is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and find_onnx(folder) is None


def _is_onnx_folder(folder: Path) -> bool:
    return find_onnx(folder) is not None and ((folder / "genai_config.json").is_file() or (folder / "config.json").is_file())


def _meta(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def cache_problems(folder: Path) -> list[str]:
    """Why a cached folder cannot be used ([] when it matches its manifest and this converter version)."""
    if not folder.is_dir():
        return ["missing"]
    problems = check_manifest(folder, record=True)
    version = _meta(folder).get("converter_version")
    if not problems and version != CONVERTER_VERSION:
        problems.append(f"converted by converter version {version}, this inferos writes {CONVERTER_VERSION}")
    return problems


def _in_cache(folder: Path) -> bool:
    """True for a folder of inferos' model cache (inferos may update its manifest; never a user's folder)."""
    return paths.models_dir().resolve() in folder.resolve().parents


def clean_leftovers() -> list[Path]:
    """Remove the partial folders and downloads that killed conversions and pulls left in the cache."""
    from inferos_cli.models.registry import downloads_dir

    removed = paths.clean_stale_partials(paths.models_dir())
    downloads = downloads_dir()
    for folder in sorted(downloads.iterdir()) if downloads.is_dir() else []:
        if folder.is_dir() and not folder.name.startswith("."):
            removed += paths.clean_stale_partials(folder)
    return removed


def _usable(folder: Path) -> bool:
    return folder.is_dir() and not cache_problems(folder)


# ------------------------------------------------------------------------------------------------ conversion
def _convert_gguf_into(src: Path, folder: Path, dtype: str | None, name: str, progress: ProgressFn | None,
                       sha256: str | None = None, alias: str | None = None) -> None:
    from inferos_cli.models.convert import convert_gguf

    request = {"kind": "alias" if alias else "gguf", "alias": alias, "dtype": dtype}
    convert_gguf(src, folder, dtype=dtype, name=name, source_sha256=sha256, progress=progress,
                 extra_meta={"request": request})


def _convert_hf_into(src: Path, folder: Path, dtype: str | None, name: str, progress: ProgressFn | None) -> None:
    from inferos_cli.models.convert import convert_hf_folder

    convert_hf_folder(src, folder, dtype=dtype or "fp32", name=name, progress=progress,
                      extra_meta={"request": {"kind": "hf", "alias": None, "dtype": dtype}})


def _local_cache_folder(src: Path, dtype: str | None, kind: str) -> tuple[str, Path]:
    stem = src.stem if kind == "gguf" else src.name
    name = f"{stem}-{_source_key(src if kind == 'gguf' else src / 'config.json')}" + (f"-{dtype}" if dtype else "")
    return name, paths.models_dir() / name


def _ensure_converted(folder: Path, build: Any, *, force: bool) -> str:
    """Build ``folder`` unless it is already sound; returns the action taken."""
    if not force and _usable(folder):
        return "cached"
    action = "rebuilt" if folder.exists() else "converted"
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    build()
    problems = cache_problems(folder)
    if problems:
        raise ModelError(f"the converted model in {folder} failed its own check: {problems[0]}")
    return action


# ------------------------------------------------------------------------------------------------ public API
def pull(name: str | None, *, dtype: str | None = None, force: bool = False, progress: bool = True) -> PullResult:
    """Fetch and/or convert ``name`` (alias, .gguf, HF folder, ONNX folder, cached name) into the cache."""
    from inferos_cli.models.registry import fetch, load_registry, unknown

    check_dtype(dtype, allow_none=True)
    clean_leftovers()
    registry = load_registry()
    spec = name or registry.default
    path = Path(spec).expanduser()
    if path.exists():
        return _pull_path(path, dtype, force, progress)
    cached = paths.models_dir() / spec
    alias = registry.get(spec)
    if alias is None and cached.is_dir() and (cached / META_FILE).is_file():
        problems = cache_problems(cached)
        if not problems:
            return PullResult(spec, cached, "cached", inspect_folder(cached, name=spec), [])
        meta = _meta(cached)
        request = meta.get("request") or {}
        source = Path(meta.get("source", ""))
        if request.get("alias") and registry.get(request["alias"]):
            return pull(request["alias"], dtype=request.get("dtype"), force=True, progress=progress)
        if meta.get("source") and source.exists() and request:
            return _pull_path(source, request.get("dtype"), True, progress)
        raise ModelError(f"cached model {spec} is damaged ({problems[0]}) and its source is gone",
                         f"delete {cached} and pull it again")
    if alias is None:
        if any(sep in spec for sep in ("/", "\\")) or spec.endswith((".gguf", ".onnx")):
            raise ModelNotFoundError(f"{spec} does not exist", "check the path")
        raise unknown(spec, registry)
    folder = paths.models_dir() / alias.cache_name(dtype)
    with progress_reporter(progress, alias.name) as cb:

        def build() -> None:
            gguf = fetch(alias, progress=cb)
            _convert_gguf_into(gguf, folder, dtype or alias.dtype, alias.cache_name(dtype), cb, alias.sha256, alias.name)

        action = _ensure_converted(folder, build, force=force)
    return PullResult(folder.name, folder, action, inspect_folder(folder, name=folder.name), [])


def _pull_path(path: Path, dtype: str | None, force: bool, progress: bool) -> PullResult:
    if path.is_file() and path.suffix.lower() == ".gguf":
        name, folder = _local_cache_folder(path, dtype, "gguf")
        with progress_reporter(progress, path.name) as cb:
            action = _ensure_converted(folder, lambda: _convert_gguf_into(path, folder, dtype, name, cb), force=force)
        return PullResult(name, folder, action, inspect_folder(folder, name=name), [])
    if path.is_file() and path.suffix.lower() == ".onnx":
        info = _inspect_onnx_file(path)
        return PullResult(info.name, path.parent, "in place", info, [])
    if path.is_dir():
        if _is_hf_folder(path):
            name, folder = _local_cache_folder(path, dtype, "hf")
            with progress_reporter(progress, path.name) as cb:
                action = _ensure_converted(folder, lambda: _convert_hf_into(path, folder, dtype, name, cb), force=force)
            return PullResult(name, folder, action, inspect_folder(folder, name=name), [])
        if _is_onnx_folder(path):
            problems = check_manifest(path, record=_in_cache(path)) if (path / META_FILE).is_file() else []
            if problems:
                raise ModelError(f"{path} is damaged: {problems[0]}", "convert it again (inferos pull SOURCE --force)")
            return PullResult(path.name, path, "in place", inspect_folder(path), [])
        raise ModelError(f"{path} is not a model folder",
                         "pass a folder with model.onnx + genai_config.json/config.json, or config.json + *.safetensors")
    raise ModelError(f"{path} is neither a .gguf file, a .onnx file nor a model folder",
                     "pass a .gguf file, a .onnx file or a model folder")


def _inspect_onnx_file(path: Path) -> ModelInfo:
    info = inspect_folder(path.parent)
    if info.onnx_path.resolve() != path.resolve():
        from dataclasses import replace

        import onnx

        graph = onnx.load(str(path), load_external_data=False)
        info = replace(info, onnx_path=path, input_names=[i.name for i in graph.graph.input],
                       output_names=[o.name for o in graph.graph.output])
    return info


def resolve_model(spec: str | None, *, dtype: str | None = None, progress: bool = True) -> ModelInfo:
    """``--model`` -> :class:`ModelInfo` of a ready ONNX folder (fetching/converting/caching as needed)."""
    return pull(spec, dtype=dtype, force=False, progress=progress).info


def param_count_for(model: str) -> int | None:
    """``model``'s parameter count (it picks the size class), read without loading weights from an ONNX folder
    or .onnx file, a .gguf tensor table or safetensors headers; aliases and cached names are resolved (fetched
    and converted when needed) by :func:`resolve_model`."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_param_count(path)
    if path.is_file() and path.suffix.lower() == ".onnx":
        path = path.parent
    if path.is_dir():
        if find_onnx(path) is not None:
            return inspect_folder(path).param_count
        if sorted(path.glob("*.safetensors")):
            return safetensors_param_count(path)
    return resolve_model(model, progress=False).param_count


@dataclass
class CachedModel:
    """One folder of the model cache, for ``inferos models``."""

    name: str
    path: Path
    size_bytes: int
    dtype: str | None
    param_count: int | None
    architecture: str | None
    source: str | None
    status: str  # "ok" or the first problem

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--format json``."""
        return {"name": self.name, "path": str(self.path), "size_bytes": self.size_bytes, "dtype": self.dtype,
                "param_count": self.param_count, "architecture": self.architecture, "source": self.source,
                "status": self.status}


def list_cached() -> list[CachedModel]:
    """Every folder under ``models_dir()`` (temp folders of interrupted conversions excluded)."""
    root = paths.models_dir()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        meta = _meta(folder)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        problems = cache_problems(folder)
        out.append(CachedModel(
            name=folder.name, path=folder, size_bytes=size, dtype=meta.get("dtype"), param_count=meta.get("param_count"),
            architecture=meta.get("architecture"), source=meta.get("source"),
            status="ok" if not problems else problems[0],
        ))
    return out
