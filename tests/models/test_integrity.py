"""Cache integrity (issue 17 item 9): a damaged converted model is rebuilt or refused, never used; the check on
every use is size + mtime with a sha256 only when an mtime moved; `models --verify` hashes everything; what
killed runs leave in the cache is removed on the next pull, never what a live process is still writing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _tiny_gguf import write_tiny_gguf


@pytest.fixture()
def tiny_gguf(tmp_path: Path) -> Path:
    src = tmp_path / "src" / "tiny.gguf"
    src.parent.mkdir()
    write_tiny_gguf(src)
    return src


def flip_byte(path: Path, *, keep_mtime: bool) -> None:
    """Flip one byte in the middle of ``path`` (size unchanged), as a write would; ``keep_mtime`` puts the old
    mtime back afterwards (what a careful tamperer or a bit flip on disk looks like)."""
    before = path.stat()
    time.sleep(0.05)  # past the file system's timestamp tick, so the write moves the mtime
    with open(path, "r+b") as handle:
        handle.seek(before.st_size // 2)
        byte = handle.read(1)
        handle.seek(before.st_size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        assert path.stat().st_mtime_ns != before.st_mtime_ns
    assert path.stat().st_size == before.st_size


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_records_size_and_mtime(tiny_gguf: Path) -> None:
    from inferos_cli.models.resolve import pull

    folder = pull(str(tiny_gguf), progress=False).folder
    files = json.loads((folder / "inferos.json").read_text())["files"]
    assert files and all(entry["mtime_ns"] == (folder / rel).stat().st_mtime_ns and
                         entry["size"] == (folder / rel).stat().st_size for rel, entry in files.items())


def test_flipped_byte_is_rebuilt_not_used(tiny_gguf: Path) -> None:
    """The realistic case: a write flips a byte (mtime moves): the entry is hashed, found damaged and rebuilt
    from its source, by path and by cached name."""
    from inferos_cli.models.resolve import pull

    first = pull(str(tiny_gguf), progress=False)
    data = first.folder / "model.onnx.data"
    good = digest(data)
    flip_byte(data, keep_mtime=False)
    again = pull(str(tiny_gguf), progress=False)
    assert again.action == "rebuilt" and digest(data) == good
    flip_byte(data, keep_mtime=False)
    by_name = pull(first.name, progress=False)
    assert by_name.action == "rebuilt" and digest(data) == good
    assert pull(first.name, progress=False).action == "cached"


def test_damaged_entry_without_its_source_is_refused_in_one_line(tiny_gguf: Path) -> None:
    from inferos_cli.cli import app
    from inferos_cli.models.resolve import pull

    first = pull(str(tiny_gguf), progress=False)
    flip_byte(first.folder / "model.onnx.data", keep_mtime=False)
    tiny_gguf.unlink()
    result = CliRunner().invoke(app, ["pull", first.name])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "model.onnx.data does not match its sha256" in result.output and "source is gone" in result.output
    assert f"delete {first.folder}" in " ".join(result.output.split())


def test_damaged_folder_outside_the_cache_is_refused_and_left_alone(tiny_gguf: Path, tmp_path: Path) -> None:
    from inferos_cli.errors import ModelError
    from inferos_cli.models.resolve import pull

    mine = tmp_path / "my-model"
    shutil.copytree(pull(str(tiny_gguf), progress=False).folder, mine)  # copy2 keeps the mtimes
    assert pull(str(mine), progress=False).action == "in place"
    flip_byte(mine / "model.onnx.data", keep_mtime=False)
    meta = (mine / "inferos.json").read_bytes()
    with pytest.raises(ModelError, match="is damaged: model.onnx.data does not match its sha256"):
        pull(str(mine), progress=False)
    assert (mine / "inferos.json").read_bytes() == meta


def test_restored_mtime_is_the_known_limit_caught_by_verify(tiny_gguf: Path) -> None:
    """A byte flipped with the old mtime put back matches size + mtime: the per-use check cannot see it without
    hashing every file at every start (documented); `inferos models --verify` hashes and reports it."""
    from inferos_cli.cli import app
    from inferos_cli.models.resolve import pull

    first = pull(str(tiny_gguf), progress=False)
    flip_byte(first.folder / "model.onnx.data", keep_mtime=True)
    assert pull(str(tiny_gguf), progress=False).action == "cached"  # the known limit
    verified = CliRunner().invoke(app, ["models", "--verify", "--format", "json"])
    row = next(m for m in json.loads(verified.stdout)["models"] if m["name"] == first.name)
    assert row["status"] == "model.onnx.data does not match its sha256"


def test_older_manifest_is_hashed_once_then_given_mtimes(tiny_gguf: Path) -> None:
    """A manifest without mtimes (older inferos): the first use hashes, so even a byte flipped with the mtime
    put back is caught; a sound folder gets its mtimes recorded (atomically) and is cheap from then on."""
    from inferos_cli.models.resolve import pull

    folder = pull(str(tiny_gguf), progress=False).folder
    meta_path = folder / "inferos.json"

    def strip_mtimes() -> None:
        meta = json.loads(meta_path.read_text())
        for entry in meta["files"].values():
            entry.pop("mtime_ns")
        meta_path.write_text(json.dumps(meta))

    strip_mtimes()
    assert pull(str(tiny_gguf), progress=False).action == "cached"
    files = json.loads(meta_path.read_text())["files"]
    assert all(entry["mtime_ns"] == (folder / rel).stat().st_mtime_ns for rel, entry in files.items())
    assert not list(folder.glob(".inferos.json.*"))  # no temp file left
    strip_mtimes()
    flip_byte(folder / "model.onnx.data", keep_mtime=True)
    assert pull(str(tiny_gguf), progress=False).action == "rebuilt"


def test_a_moved_mtime_with_sound_content_is_hashed_once(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from inferos_cli.models import manifest
    from inferos_cli.models.resolve import pull

    folder = pull(str(tiny_gguf), progress=False).folder
    os.utime(folder / "model.onnx.data")  # touched: content unchanged
    hashed: list[str] = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda path, *a: hashed.append(path.name) or real(path, *a))
    assert pull(str(tiny_gguf), progress=False).action == "cached" and hashed == ["model.onnx.data"]
    assert pull(str(tiny_gguf), progress=False).action == "cached" and hashed == ["model.onnx.data"]


# ------------------------------------------------------------------------------------------------ leftovers
KILLED_PULL = """
import sys, time
from inferos_cli.models import convert
from inferos_cli.models.resolve import pull

def stuck(spec, weights, folder, **kw):  # the "write" stage, stopped half-way
    (folder / "model.onnx.data").write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(600)

convert.build_decoder = stuck
pull(sys.argv[1], progress=False)
"""


def test_pull_killed_during_write_leaves_nothing_after_the_next_pull(tiny_gguf: Path, inferos_home: Path) -> None:
    """A real `pull` subprocess killed with SIGKILL during "write": its partial folder survives the kill, is kept
    while the writer lives and while it is recent, and the next pull removes it once it is old."""
    from inferos_cli.models.resolve import pull
    from inferos_cli.paths import clean_stale_partials, models_dir

    env = {**os.environ, "INFEROS_HOME": str(inferos_home)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PULL, str(tiny_gguf)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing", proc.stderr
        partials = list(models_dir().glob(".*.partial"))
        assert len(partials) == 1 and f".{proc.pid}." in partials[0].name
        assert clean_stale_partials(models_dir(), min_age_s=0) == []  # its writer is alive
    finally:
        proc.kill()
        proc.wait()
    assert partials[0].is_dir()  # what a killed run leaves
    assert clean_stale_partials(models_dir()) == []  # too recent to be sure (another machine may share the cache)
    old = time.time() - 3600
    for path in [partials[0], *partials[0].rglob("*")]:
        os.utime(path, (old, old))
    result = pull(str(tiny_gguf), progress=False)
    assert result.action == "converted" and not partials[0].exists()
    assert not list(models_dir().glob(".*.partial"))


def test_partials_of_reused_pids_and_older_inferos(inferos_home: Path) -> None:
    import psutil

    from inferos_cli.paths import clean_stale_partials, models_dir

    root = models_dir()
    root.mkdir(parents=True)
    started = psutil.Process().create_time()
    reused = root / f".m.{os.getpid()}.abcd1234.partial"  # this PID, but a folder older than this process
    live = root / f".m.{os.getpid()}.efgh5678.partial"  # this PID and made after it started: kept
    legacy_old = root / ".m.ijkl9012.partial"
    legacy_new = root / ".m.mnop3456.partial"
    bystander = root / ".hidden-folder"
    for path in (reused, live, legacy_old, legacy_new, bystander):
        path.mkdir()
    os.utime(reused, (started - 700, started - 700))
    os.utime(legacy_old, (time.time() - 2 * 86400,) * 2)
    os.utime(legacy_new, (time.time() - 3600,) * 2)
    os.utime(bystander, (time.time() - 2 * 86400,) * 2)
    removed = clean_stale_partials(root, min_age_s=0)
    assert sorted(p.name for p in removed) == sorted([reused.name, legacy_old.name])
    assert live.exists() and legacy_new.exists() and bystander.exists()
