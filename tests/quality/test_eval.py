"""`inferos eval` on stories260K with the TinyStories sample (real sessions, real caches)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from inferos_cli.cli import app
from inferos_cli.options import parse_compare
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


# ----------------------------------------------------------------------------- issue 17 item 4
def test_eval_without_text_scores_the_text_inferos_ships(stories_onnx: Path, inferos_home: Path) -> None:
    """No --text: the WikiText-2 test split from inferos' own data (not ../shared), unpacked into the cache;
    the default graph is the exact-compute one (for this float graph: the graph itself), and the report says so."""
    result = CliRunner().invoke(app, ["eval", "--model", str(stories_onnx), "--ctx", "64", "--prefix", "16",
                                      "--max-tokens", "48", "--compare", "baseline,int8", "--no-rss",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["text"] == str(inferos_home / "cache" / "texts" / "wikitext2-raw-test.txt")
    assert data["tokens_scored"] == 48 and data["results"][0]["ppl"] > 1
    assert data["graph"] == "exact-compute twin" and data["exact_matmul"] is False  # nothing to lower here
    assert "the graph already computes in float" in eval_table(data).caption
    assert "graph=exact-compute-twin" in eval_lines(data)[0]


def test_eval_help_names_the_defaults() -> None:
    text = " ".join(CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "default: the WikiText-2 raw test split that ships with inferos" in text
    assert "--exact (the default) scores an exact-compute twin" in text and "--as-shipped" in text


def test_eval_in_a_pipe_prints_plain_progress_on_stderr(stories_onnx: Path, tinystories_text: Path,
                                                        inferos_home: Path) -> None:
    """A real `inferos eval` whose stdout and stderr are pipes: JSON alone on stdout, plain progress lines
    (tokens scored / total, tok/s) on stderr, no terminal control codes."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "inferos_cli", "eval", "--model", str(stories_onnx), "--text", str(tinystories_text),
         "--ctx", "96", "--prefix", "16", "--max-tokens", "160", "--compare", "baseline,int8", "--format", "json"],
        check=False, capture_output=True, text=True, timeout=600, env=os.environ | {"INFEROS_HOME": str(inferos_home)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokens_scored"] == 160
    lines = [line for line in proc.stderr.splitlines() if line.startswith("eval: ")]
    assert any(line.startswith("eval: 160/160 tokens scored (100%), ") and " tok/s, done in " in line
               for line in lines), proc.stderr
    assert "eval: peak RSS of configuration 1/2 (a fresh process, one window)" in lines
    assert "eval: peak RSS of configuration 2/2 (a fresh process, one window)" in lines
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr


def test_progress_lines_come_every_few_seconds_with_rate_and_time_left() -> None:
    from inferos_cli.ui.eval_table import ProgressLines

    now = [100.0]
    out: list[str] = []
    progress = ProgressLines(out.append, interval=5.0, clock=lambda: now[0])
    for done in range(1, 601):  # 600 tokens at 10 tok/s: one line per 5 s, then the last one
        now[0] = 100.0 + done / 10
        progress("score", done, 600)
    assert len(out) == 12
    assert out[0] == "eval: 50/600 tokens scored (8%), 10.0 tok/s, about 55 s left"
    assert out[-1] == "eval: 600/600 tokens scored (100%), 10.0 tok/s, done in 60 s"
    progress("rss", 0, 3)
    progress("rss", 3, 3)
    assert out[-1] == "eval: peak RSS of configuration 1/3 (a fresh process, one window)" and len(out) == 13


def test_exact_is_the_default_and_the_report_names_the_graph(oga_dir: Path, wikitext: Path) -> None:
    """On an int4 graph (MatMulNBits): the default scores the exact-compute twin; --as-shipped the graph."""
    runner = CliRunner()
    base = ["eval", "--model", str(oga_dir.parent), "--text", str(wikitext), "--ctx", "24", "--prefix", "16",
            "--max-tokens", "4", "--compare", "baseline", "--no-rss", "--format", "json"]
    shipped = runner.invoke(app, [*base, "--as-shipped"])
    assert shipped.exit_code == 0, shipped.output
    exact = runner.invoke(app, base)
    assert exact.exit_code == 0, exact.output
    s, e = json.loads(shipped.stdout), json.loads(exact.stdout)
    assert (s["graph"], s["exact_matmul"]) == ("as shipped", False)
    assert (e["graph"], e["exact_matmul"]) == ("exact-compute twin", True)
    assert s["results"][0]["ppl"] != e["results"][0]["ppl"]  # int8 activations vs float: different numbers
    assert "--exact scores" in eval_table(s).caption and "float activations in every MatMulNBits" in eval_table(e).caption
