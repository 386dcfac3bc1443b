"""`inferos eval` on stories260K with the TinyStories sample (real sessions, real caches)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from inferos_cli.cli import app
from inferos_cli.bench.configs import parse_compare
from inferos_cli.quality.eval import BASELINE, make_windows
from inferos_cli.ui.eval_table import eval_lines, eval_table

KEYS = {"config", "ppl", "delta_ppl", "kl_mean", "top1_agreement", "kv_bytes", "kv_ratio_vs_fp16", "peak_rss_mb"}


@pytest.fixture(scope="module")
def report(stories_onnx: Path, tinystories_text: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    import os

    home = tmp_path_factory.mktemp("eval-home")
    os.environ["INFEROS_HOME"] = str(home)
    result = CliRunner().invoke(app, [
        "eval", "--model", str(stories_onnx), "--text", str(tinystories_text), "--ctx", "96", "--prefix", "16",
        "--max-tokens", "240", "--compare", "baseline,int8,int4,int4-k8v4", "--format", "json",
        "--output", str(home / "eval.json"),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert json.loads((home / "eval.json").read_text()) == data  # --output holds the same JSON
    return data


def test_eval_json_shape(report: dict, tinystories_text: Path) -> None:
    assert {"model", "text", "ctx", "tokens_scored", "results"} <= set(report)
    assert report["ctx"] == 96 and report["text"] == str(tinystories_text)
    assert report["tokens_scored"] == 240
    assert [r["config"] for r in report["results"]] == ["baseline", "int8", "int4", "int4-k8v4"]
    for r in report["results"]:
        assert KEYS <= set(r)
        assert r["tokens_scored"] == 240


def test_eval_numbers_are_real(report: dict) -> None:
    res = {r["config"]: r for r in report["results"]}
    base = res["baseline"]
    assert 1.5 < base["ppl"] < 30  # stories260K on TinyStories: ~5-10 at short context
    assert base["delta_ppl"] == 0 and base["kl_mean"] == 0 and base["top1_agreement"] == 1
    assert abs(base["kv_ratio_vs_fp16"] - 2.0) < 1e-9  # fp32 plain cache
    assert abs(res["int8"]["delta_ppl"]) < 0.05 and res["int8"]["kl_mean"] < 1e-3
    assert res["int4"]["kl_mean"] > res["int8"]["kl_mean"]
    # at ctx 96 the fp32 window (int8: 32 + 4 sinks, int4: 64 + 4) is most of the cache, but both save
    for name in ("int8", "int4", "int4-k8v4"):
        assert res[name]["kv_ratio_vs_fp16"] < base["kv_ratio_vs_fp16"]
        assert res[name]["kv_bytes"] < base["kv_bytes"]
    for r in res.values():
        assert r["peak_rss_mb"] is not None and r["peak_rss_mb"] > 10


def test_eval_renderers(report: dict) -> None:
    console = Console(record=True, width=200)
    console.print(eval_table(report))
    text = console.export_text()
    assert "int4-k8v4" in text and "MiB" in text and "ΔPPL" in text
    lines = eval_lines(report)
    assert lines[1].startswith("config=baseline ppl=")


def test_windows_and_compare() -> None:
    wins = make_windows(list(range(1000)), 100, 10, 250, bos=1)
    assert [len(w) for w in wins] == [100, 100, 80] and all(w[0] == 1 for w in wins)
    assert sum(len(w) - 10 for w in wins) == 250
    assert parse_compare("int4,baseline,chat+int8", reference=BASELINE) == ["baseline", "int4", "chat+int8"]


def test_eval_usage_errors(stories_onnx: Path, tinystories_text: Path) -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["eval", "--model", str(stories_onnx), "--text", str(tinystories_text),
                              "--ctx", "64", "--prefix", "64", "--no-rss"])
    assert bad.exit_code == 2 and "prefix" in bad.output
    unknown = runner.invoke(app, ["eval", "--model", str(stories_onnx), "--text", str(tinystories_text),
                                  "--ctx", "64", "--compare", "baseline,nope", "--no-rss"])
    assert unknown.exit_code == 1 and "nope" in unknown.output and "Traceback" not in unknown.output
