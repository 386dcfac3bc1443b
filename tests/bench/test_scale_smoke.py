"""benchmarks/scale.py end to end on the ``tiny`` shape (--quick): every section has numbers or null + a reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCALE = REPO / "benchmarks" / "scale.py"


def smollm2_gguf(home: Path) -> Path:
    """SmolLM2's GGUF (the tokenizer the shapes reuse), fetched by ``inferos pull``; skip when unreachable."""
    env = {**os.environ, "INFEROS_HOME": str(home)}
    res = subprocess.run([sys.executable, "-m", "inferos_cli", "pull", "smollm2-135m", "--format", "json"],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    found = sorted((home / "cache" / "downloads" / "smollm2-135m").glob("*.gguf"))
    if res.returncode != 0 or not found:
        pytest.skip(f"the SmolLM2 GGUF cannot be fetched here: {res.stderr.strip()[-300:]}")
    return found[0]


def assert_measured(entry: dict, keys: list[str], where: str) -> None:
    """Each key is a number, or every key is None and the entry says why."""
    values = [entry.get(k) for k in keys]
    if all(isinstance(v, (int, float)) for v in values):
        return
    assert all(v is None for v in values) and entry.get("reason"), f"{where}: {entry}"


def test_scale_quick_tiny(tmp_path: Path, inferos_home: Path) -> None:
    home = Path(os.environ.get("INFEROS_TEST_CACHE") or inferos_home)
    tokenizer = smollm2_gguf(home)
    out = tmp_path / "scale.json"
    res = subprocess.run([sys.executable, str(SCALE), "--models", "tiny", "--quant", "q4_0", "--quick", "--llama-cpp",
                          "--work", str(tmp_path / "work"), "--out", str(out), "--tokenizer-gguf", str(tokenizer),
                          "--plot", str(tmp_path / "scale.png")],
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| decode @1 thr | tok/s |" in res.stdout
    data = json.loads(out.read_text())
    assert data["schema"] == "inferos.scale/1" and data["units"]["_tps"] == "tok/s"
    host = data["host"]
    assert host["cpu"] and host["cores_logical"] >= 1 and host["ram_bytes"] > 0 and host["onnxruntime"]
    if data["llama_cpp_skipped"] is None:
        assert host["llama_cpp"]["version"] and host["llama_cpp"]["build"]
    (m,) = data["models"]
    assert m["gguf"]["tensor_bytes"] > 0 and m["gguf"]["largest_tensor_bytes"] > 0
    conv = m["convert"]
    assert conv["wall_s"] > 0 and conv["peak_rss_bytes"] > 0 and conv["within_bound"] is True
    for engine in ("inferos", "llama.cpp"):
        assert_measured(m["load"][engine], ["load_s", "rss_after_load_bytes"], f"load {engine}")
    assert [p["seq"] for p in m["prefill"]] == [32, 64]
    for p in m["prefill"]:
        for engine in ("inferos", "llama.cpp"):
            assert_measured(p[engine], ["ttft_ms", "prefill_tps"], f"prefill {p['seq']} {engine}")
    assert [d["threads"] for d in m["decode"]] == [1]
    assert_measured(m["decode"][0]["inferos"], ["decode_tps"], "decode inferos")
    assert isinstance(m["decode"][0]["inferos"]["decode_tps"], float)
    kv = m["kv"]
    assert kv["ctx"] == 256 and kv["prompt_tokens"] == 252
    configs = {(c["engine"], c["config"]) for c in kv["configs"]}
    assert {("inferos", "baseline"), ("inferos", "inferos"), ("inferos", "int4"), ("inferos", "int4-small"),
            ("llama.cpp", "f16"), ("llama.cpp", "q8_0"), ("llama.cpp", "q4_0")} <= configs
    named = ("baseline", "inferos", "int4", "int4-small")
    fp16 = [c for c in kv["configs"] if c["engine"] == "inferos" and c["config"] not in named]
    assert fp16 or [s for s in kv["skipped"] if s["config"] == "fp16" and s["reason"]]
    for c in kv["configs"]:
        assert_measured(c, ["kv_bytes", "peak_rss_bytes", "decode_tps"], f"kv {c['engine']} {c['config']}")
    default = next(c for c in kv["configs"] if c["config"] == "inferos")
    assert default["kv_bytes"] > 0 and default["peak_rss_bytes"] > 0
    assert len(m["goals"]) == 12 and all(g["holds"] in (True, False, None) for g in m["goals"])
    assert not (tmp_path / "work" / "tiny-q4_0.gguf").exists()  # big files are removed unless --keep
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
