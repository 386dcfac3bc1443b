"""Bench peers: one-line skips for missing peers, the onnxruntime-genai peer on the real OGA folder, and the
Lemonade/OpenAI peer against a real `inferos serve` process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import free_port, stop_process, wait_for_http
from typer.testing import CliRunner

from inferos_cli.cli import app

ONE_CELL = ["--batch-sizes", "1", "--seq-lengths", "16", "--gen-tokens", "4", "--repeats", "1", "--warmup", "0"]


def invoke(args: list[str], home: Path) -> Any:
    return CliRunner().invoke(app, args, env={"INFEROS_HOME": str(home)})


def hide_genai(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make onnxruntime_genai look absent to the parent process (the skip decision is made there)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "onnxruntime_genai" else real(name, *a, **k))


def test_missing_peers_are_skipped_with_one_line_each(stories_onnx: Path, tinystories_text: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    hide_genai(monkeypatch)
    url = f"http://127.0.0.1:{free_port()}/api/v1"  # nothing listens there
    result = invoke(["bench", "--model", str(stories_onnx), "--compare", "baseline,ort-genai", "--backend", "lemonade",
                     "--url", url, *ONE_CELL, "--text", str(tinystories_text), "--format", "json"], tmp_path / "home")
    assert result.exit_code == 0, result.output
    skips = [ln for ln in result.stderr.splitlines() if ln.startswith("skipped ")]
    assert skips == [
        "skipped ort-genai: onnxruntime_genai is not installed (pip install onnxruntime-genai)",
        skips[1],
    ]
    assert skips[1].startswith("skipped lemonade: no Lemonade/OpenAI-compatible server at " + url)
    snap = json.loads(result.stdout)
    assert [s["config"] for s in snap["skipped"]] == ["ort-genai", "lemonade"]
    assert {r["config"] for r in snap["rows"]} == {"baseline"}


def test_ort_genai_runs_an_inferos_folder_through_a_generated_config(stories_onnx: Path, tinystories_text: Path,
                                                                     tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (optional peer)")
    result = invoke(["bench", "--model", str(stories_onnx), "--compare", "baseline,ort-genai", *ONE_CELL,
                     "--text", str(tinystories_text), "--format", "json"], tmp_path / "home")
    assert result.exit_code == 0, result.output
    snap = json.loads(result.stdout)
    peer_cfg = next(c for c in snap["configs"] if c["name"] == "ort-genai")
    folder = Path(peer_cfg["model_path"])
    assert folder != stories_onnx and (folder / "genai_config.json").is_file()
    assert (folder / "model.onnx").read_bytes() == (stories_onnx / "model.onnx").read_bytes()  # the same graph
    peer = next(r for r in snap["rows"] if r["config"] == "ort-genai")
    assert peer["status"] == "ok", peer
    assert peer["generated_per_row"] == [4] and peer["metrics"]["decode_tps"]["mean"] > 0


def test_all_configs_skipped_is_a_usage_error(stories_onnx: Path, tinystories_text: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    hide_genai(monkeypatch)
    result = invoke(["bench", "--model", str(stories_onnx), "--compare", "ort-genai", *ONE_CELL,
                     "--text", str(tinystories_text)], tmp_path / "home")
    assert result.exit_code == 2
    assert "nothing to compare" in result.stderr and "Traceback" not in result.output


def test_ort_genai_peer_runs_the_oga_folder(oga_dir: Path, wikitext: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (optional peer)")
    result = invoke(["bench", "--model", str(oga_dir.parent), "--compare", "baseline,ort-genai", *ONE_CELL,
                     "--text", str(wikitext), "--format", "json"], tmp_path / "home")
    assert result.exit_code == 0, result.output
    rows = {r["config"]: r for r in json.loads(result.stdout)["rows"]}
    peer = rows["ort-genai"]
    assert peer["status"] == "ok", peer
    assert peer["generated_per_row"] == [4]
    assert peer["metrics"]["decode_tps"]["mean"] > 0 and peer["metrics"]["peak_rss_mb"]["mean"] > 50
    assert peer["metrics"]["kv_bytes"]["mean"] is None  # not exposed by onnxruntime-genai: n/a, not a guess
    assert "onnxruntime-genai" in peer["providers"]["decode"]
    assert rows["baseline"]["status"] == "ok" and peer["ratios"]["decode_tps"] is not None


@pytest.fixture()
def inferos_server(stories_onnx: Path, tmp_path: Path) -> Iterator[str]:
    """A real `inferos serve` on 127.0.0.1 (fastapi/uvicorn from the serve extra)."""
    pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
    pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
    port = free_port()
    env = {**os.environ, "INFEROS_HOME": str(tmp_path / "serve-home")}
    proc = subprocess.Popen([sys.executable, "-m", "inferos_cli", "serve", "--model", str(stories_onnx),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}/api/v1"
    try:
        wait_for_http(url + "/models", proc, need_ok=True)
        yield url
    finally:
        stop_process(proc)


def test_lemonade_peer_measures_a_real_server_from_the_stream(stories_onnx: Path, tinystories_text: Path,
                                                              tmp_path: Path, inferos_server: str) -> None:
    result = invoke(["bench", "--model", str(stories_onnx), "--compare", "baseline", "--backend", "lemonade",
                     "--url", inferos_server, "--batch-sizes", "1,2", "--seq-lengths", "16", "--gen-tokens", "4",
                     "--repeats", "1", "--warmup", "0", "--text", str(tinystories_text), "--format", "json"],
                    tmp_path / "home")
    assert result.exit_code == 0, result.output
    snap = json.loads(result.stdout)
    assert snap["skipped"] == []
    peer = [r for r in snap["rows"] if r["config"] == "lemonade"]
    assert [r["batch"] for r in peer] == [1, 2]
    for r in peer:
        assert r["status"] == "ok", r
        assert r["metrics"]["ttft_ms"]["mean"] > 0 and r["metrics"]["decode_tps"]["mean"] > 0
        assert r["generated_per_row"] == [4] * r["batch"]  # from the server's usage chunk
        assert r["metrics"]["peak_rss_mb"]["mean"] is None  # another process: n/a
        assert r["extra"]["endpoint"] == "/completions"
        assert "time_to_first_token" in r["extra"]["server_stats"]  # the server's own /stats
        assert inferos_server in r["providers"]["decode"]
