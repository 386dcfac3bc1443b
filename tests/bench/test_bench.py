"""`inferos bench` on the real stories260K model: a 2x2 grid in every format, interleaving, statistics,
exact-length prompts, error paths. Every run uses real worker subprocesses and real ORT sessions.

stories260K has head_dim 8, smaller than every kv.group_size the settings allow (32, 64), so the segmented
cache cannot run on it; the grid therefore compares two real KV-off configs with different device plans
(``baseline`` and ``chat+baseline``: decode asked on the NPU). baseline vs inferos (segmented cache) runs
on a small head_dim-32 Llama that the test builds and converts itself (:func:`wide_onnx`)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from inferos_cli.cli import app
from inferos_cli.bench.grid import corpus_ids, make_prompts, schedule
from inferos_cli.bench.results import SCHEMA, summarize

PAIR = "baseline,chat+baseline"
GRID = ["--batch-sizes", "1,2", "--seq-lengths", "16,32", "--gen-tokens", "4", "--repeats", "1", "--warmup", "0"]


def invoke(args: list[str], home: Path) -> Any:
    """Run the CLI with its own INFEROS_HOME (workers inherit the environment)."""
    return CliRunner().invoke(app, args, env={"INFEROS_HOME": str(home)})


@pytest.fixture(scope="module")
def grid_run(stories_onnx: Path, tinystories_text: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real 2x2 bench run (baseline vs inferos): JSON on stdout, CSV via --output, PNG via --plot."""
    out = tmp_path_factory.mktemp("bench")
    result = invoke(["bench", "--model", str(stories_onnx), "--compare", PAIR, *GRID,
                     "--text", str(tinystories_text), "--format", "json", "--output", str(out / "r.csv"),
                     "--plot", str(out / "r.png")], out / "home")
    assert result.exit_code == 0, result.output
    return {"snapshot": json.loads(result.stdout), "dir": out, "stderr": result.stderr}


def test_schedule_interleaves_configs_per_repeat_after_warmups() -> None:
    steps = schedule([(1, 16), (2, 32)], ["baseline", "inferos"], repeats=2, warmup=1)
    first = [(s.config, s.repeat, s.warmup) for s in steps if (s.batch, s.seq) == (1, 16)]
    assert first == [("baseline", 0, True), ("inferos", 0, True), ("baseline", 0, False), ("inferos", 0, False),
                     ("baseline", 1, False), ("inferos", 1, False)]
    assert [(s.batch, s.seq) for s in steps][6:] == [(2, 32)] * 6


def test_summarize_keeps_every_sample() -> None:
    stat = summarize([1.0, 2.0, None, 3.0])
    assert stat["mean"] == pytest.approx(2.0) and stat["sd"] == pytest.approx(1.0)
    assert stat["median"] == 2.0 and stat["n"] == 3 and stat["samples"] == [1.0, 2.0, None, 3.0]
    assert summarize([5.0])["sd"] == 0.0 and summarize([])["mean"] is None


def test_prompts_have_exact_token_counts_from_real_text(stories_onnx: Path, tinystories_text: Path) -> None:
    from inferos_cli.models.info import inspect_folder
    from inferos_cli.models.tokenizer import Tokenizer

    info = inspect_folder(stories_onnx)
    ids = corpus_ids(info, tinystories_text, need=3 * 100)
    prompts = make_prompts(ids, 3, 100, info.bos_token_id)
    assert [len(p) for p in prompts] == [100, 100, 100]
    assert all(p[0] == info.bos_token_id for p in prompts)
    assert len({tuple(p) for p in prompts}) == 3  # each row is a different window
    text = Tokenizer.from_model(info).decode(prompts[0])
    assert text.strip() and " " in text  # real prose, not ids


def test_grid_json_has_every_cell_metric_and_host(grid_run: dict[str, Any]) -> None:
    snap = grid_run["snapshot"]
    assert snap["schema"] == SCHEMA
    rows = snap["rows"]
    assert {(r["batch"], r["seq"], r["config"]) for r in rows} == {
        (b, s, c) for b in (1, 2) for s in (16, 32) for c in ("baseline", "chat+baseline")}
    for r in rows:
        assert r["status"] == "ok", r
        m = r["metrics"]
        assert m["ttft_ms"]["mean"] > 0 and m["e2e_ms"]["mean"] >= m["ttft_ms"]["mean"]
        assert m["decode_tps"]["mean"] > 0 and m["prefill_tps"]["mean"] > 0
        assert m["peak_rss_mb"]["mean"] > 10 and m["kv_bytes"]["mean"] > 0
        assert len(m["decode_tps"]["samples"]) == 1 and r["generated_per_row"] == [4] * r["batch"]
        assert r["providers"].get("prefill") and r["providers"].get("decode")
        if r["config"] == "chat+baseline":  # the device plan asked for the NPU: a visible fallback, or the NPU
            assert r["providers"]["decode"].startswith("npu")
    # prefill tok/s is derived from the same run's TTFT and the exact prompt size
    r = rows[0]
    assert r["metrics"]["prefill_tps"]["mean"] == pytest.approx(
        r["batch"] * r["seq"] / (r["metrics"]["ttft_ms"]["mean"] / 1e3), rel=1e-6)
    # KV bytes of the plain fp32 cache grow with batch and sequence
    kv = {(r["batch"], r["seq"]): r["metrics"]["kv_bytes"]["mean"] for r in rows if r["config"] == "baseline"}
    assert kv[(2, 32)] > kv[(1, 32)] > kv[(1, 16)]
    host = snap["host"]
    for key in ("cpu", "cores_logical", "ram_bytes", "os", "onnxruntime", "inferos"):
        assert host[key], key
    assert host["model"]["name"] == "stories260K" and host["model"]["num_layers"] == 5
    assert "rss" in snap["method"] and snap["reference"] == "baseline"


def test_ratio_column_is_mean_over_baseline_mean(grid_run: dict[str, Any]) -> None:
    rows = grid_run["snapshot"]["rows"]
    for r in rows:
        if r["config"] != "chat+baseline":
            assert r["ratios"] is None
            continue
        base = next(b for b in rows if (b["batch"], b["seq"], b["config"]) == (r["batch"], r["seq"], "baseline"))
        assert r["ratio_vs"] == "baseline"
        for metric in ("decode_tps", "ttft_ms", "kv_bytes"):
            assert r["ratios"][metric] == pytest.approx(
                r["metrics"][metric]["mean"] / base["metrics"][metric]["mean"])


def test_order_records_the_interleaving(grid_run: dict[str, Any]) -> None:
    order = grid_run["snapshot"]["order"]
    assert [(o["batch"], o["seq"], o["config"]) for o in order] == [
        (b, s, c) for b in (1, 2) for s in (16, 32) for c in ("baseline", "chat+baseline")]
    assert [o["index"] for o in order] == list(range(len(order)))
    assert all(a["t_s"] <= b["t_s"] for a, b in zip(order, order[1:]))


def test_csv_output_parses(grid_run: dict[str, Any]) -> None:
    rows = list(csv.DictReader(io.StringIO((grid_run["dir"] / "r.csv").read_text(encoding="utf-8"))))
    assert len(rows) == 8
    assert float(rows[0]["decode_tps_mean"]) > 0 and rows[0]["prefill_provider"]
    samples = json.loads(rows[0]["samples_json"])
    assert len(samples["ttft_ms"]) == 1


def test_jsonl_md_and_plain_renderings_hold_every_row(grid_run: dict[str, Any]) -> None:
    from inferos_cli.ui.bench_table import render_text

    snap = grid_run["snapshot"]
    lines = [json.loads(line) for line in render_text(snap, "jsonl").splitlines()]
    assert lines[0]["type"] == "run" and lines[0]["host"]["model"]["name"] == "stories260K"
    assert [ln["type"] for ln in lines[1:]] == ["row"] * 8
    assert lines[1]["metrics"]["decode_tps"]["mean"] == snap["rows"][0]["metrics"]["decode_tps"]["mean"]
    md = render_text(snap, "md").splitlines()
    table = [ln for ln in md if ln.startswith("|")]
    assert len(table) == 2 + 8
    assert all(ln.count("|") == table[0].count("|") for ln in table)
    assert "decode tok/s" in table[0] and "peak RSS MiB" in table[0]
    plain = render_text(snap, "table").splitlines()
    assert sum(1 for ln in plain if ln.startswith("batch ")) == 8


def test_rich_table_renders_units_and_ratios(grid_run: dict[str, Any]) -> None:
    from rich.console import Console

    from inferos_cli.ui.bench_table import bench_table

    console = Console(record=True, width=250)
    console.print(bench_table(grid_run["snapshot"]))
    text = console.export_text()
    assert "TTFT ms" in text and "decode tok/s" in text and "KV MiB" in text
    assert "(x" in text and "chat+baseline" in text


def test_narrow_terminal_gets_the_compact_table(grid_run: dict[str, Any]) -> None:
    from rich.console import Console

    from inferos_cli.ui.bench_table import bench_table

    console = Console(record=True, width=80)
    console.print(bench_table(grid_run["snapshot"], width=80))
    lines = console.export_text().splitlines()
    assert max(len(ln.rstrip()) for ln in lines) <= 80
    text = "\n".join(lines)
    assert "1x16" in text and "2x32" in text and "decode" in text and "providers baseline:" in text


def test_md_format_on_stdout_interleaves_repeats(stories_onnx: Path, tinystories_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    result = invoke(["bench", "--model", str(stories_onnx), "--compare", PAIR,
                     "--batch-sizes", "1", "--seq-lengths", "16", "--gen-tokens", "4", "--repeats", "2",
                     "--warmup", "1", "--text", str(tinystories_text), "--format", "md", "--output", str(out)],
                    tmp_path / "home")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n| 1 | 16 |") == 2
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    order = [(o["config"], o["repeat"], o["warmup"]) for o in records[0]["order"]]
    b, c = "baseline", "chat+baseline"
    assert order == [(b, 0, True), (c, 0, True), (b, 0, False), (c, 0, False), (b, 1, False), (c, 1, False)]
    row = records[1]
    assert row["metrics"]["ttft_ms"]["n"] == 2 and len(row["metrics"]["ttft_ms"]["samples"]) == 2


def test_cells_beyond_the_context_are_skipped_with_a_reason(stories_onnx: Path, tinystories_text: Path,
                                                             tmp_path: Path) -> None:
    result = invoke(["bench", "--model", str(stories_onnx), "--compare", "baseline", "--batch-sizes", "1",
                     "--seq-lengths", "16,600", "--gen-tokens", "4", "--repeats", "1", "--warmup", "0",
                     "--text", str(tinystories_text), "--format", "json"], tmp_path / "home")
    assert result.exit_code == 0, result.output
    rows = {r["seq"]: r for r in json.loads(result.stdout)["rows"]}
    assert rows[16]["status"] == "ok"
    assert rows[600]["status"] == "skipped" and "context of 512" in rows[600]["reason"]


def test_unknown_profile_fails_in_one_line_before_measuring(stories_onnx: Path, tinystories_text: Path,
                                                            tmp_path: Path) -> None:
    result = invoke(["bench", "--model", str(stories_onnx), "--compare", "baseline,nosuchprofile", *GRID,
                     "--text", str(tinystories_text)], tmp_path / "home")
    assert result.exit_code == 1
    assert "unknown profile 'nosuchprofile'" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("args, needle", [
    (["--batch-sizes", "1,x"], "--batch-sizes must be a comma list"),
    (["--seq-lengths", "0"], "positive integers"),
    (["--plot", "out.gif"], "unknown image type"),
])
def test_usage_errors_exit_2(args: list[str], needle: str, stories_onnx: Path, tinystories_text: Path,
                             tmp_path: Path) -> None:
    result = invoke(["bench", "--model", str(stories_onnx), "--text", str(tinystories_text), *args], tmp_path / "h")
    assert result.exit_code == 2, result.output
    assert needle in result.stderr


def test_a_failing_config_is_reported_per_row(stories_onnx: Path, tinystories_text: Path, tmp_path: Path) -> None:
    """--strict-devices with the 3b profile (DirectML) fails in the workers where DirectML is absent: every
    row says why, and the command exits 1 because nothing could be measured."""
    import onnxruntime as ort

    if "DmlExecutionProvider" in ort.get_available_providers():
        pytest.skip("DirectML is present here, so the strict 3b profile does not fail")
    result = invoke(["bench", "--model", str(stories_onnx), "--compare", "baseline", "--strict-devices",
                     "--batch-sizes", "1", "--seq-lengths", "16", "--gen-tokens", "4", "--repeats", "1",
                     "--warmup", "0", "--text", str(tinystories_text), "--format", "json"], tmp_path / "home")
    assert result.exit_code == 1
    row = json.loads(result.stdout)["rows"][0]
    assert row["status"] == "error" and "Dml" in row["reason"]
    assert "no cell could be measured" in result.stderr


def test_quality_scores_come_from_the_eval_machinery(stories_onnx: Path, tinystories_text: Path, tmp_path: Path) -> None:
    result = invoke(["bench", "--model", str(stories_onnx), "--compare", "baseline,ort-genai", "--batch-sizes", "1",
                     "--seq-lengths", "16", "--gen-tokens", "4", "--repeats", "1", "--warmup", "0", "--quality",
                     "--quality-tokens", "64", "--text", str(tinystories_text), "--format", "json"], tmp_path / "home")
    assert result.exit_code == 0, result.output
    quality = json.loads(result.stdout)["quality"]
    base = quality["baseline"]
    assert 1.0 < base["ppl"] < 100.0  # stories260K on TinyStories text: a real, low perplexity
    assert base["delta_ppl"] == 0.0 and base["top1_agreement"] == 1.0 and base["tokens_scored"] == 64
    assert base["graph"] == "exact-compute twin"  # the eval's default graph, named in the result
    assert quality["ort-genai"].get("ppl") is None and quality["ort-genai"]["reason"]  # a peer: no logits here


def test_without_text_the_prompts_come_from_the_text_inferos_ships(stories_onnx: Path, tmp_path: Path) -> None:
    """No --text: WikiText-2 from inferos' own data, unpacked into the cache (never ../shared)."""
    home = tmp_path / "home"
    result = invoke(["bench", "--model", str(stories_onnx), "--compare", "baseline", "--batch-sizes", "1",
                     "--seq-lengths", "16", "--gen-tokens", "4", "--repeats", "1", "--warmup", "0", "--format", "json"],
                    home)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text"] == str(home / "cache" / "texts" / "wikitext2-raw-test.txt")
    help_text = " ".join(CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "default: the WikiText-2 raw test split that ships with inferos" in help_text


@pytest.fixture(scope="module")
def wide_onnx(stories_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with head_dim 32 (random weights, seed 0) and the stories260K tokenizer, written as
    a Hugging Face folder and converted by inferos: small enough for CI, wide enough for kv.group_size 32."""
    import numpy as np
    from safetensors.numpy import save_file

    from inferos_cli.models.convert import convert_hf_folder

    src = tmp_path_factory.mktemp("wide-hf")
    hidden, heads, kv_heads, hd, inter, vocab, layers = 64, 2, 1, 32, 128, 512, 2
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hd,
           "intermediate_size": inter, "num_hidden_layers": layers, "vocab_size": vocab,
           "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    (src / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": w(heads * hd, hidden),
                    p + "self_attn.k_proj.weight": w(kv_heads * hd, hidden),
                    p + "self_attn.v_proj.weight": w(kv_heads * hd, hidden),
                    p + "self_attn.o_proj.weight": w(hidden, heads * hd),
                    p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                    p + "mlp.down_proj.weight": w(hidden, inter),
                    p + "input_layernorm.weight": np.ones(hidden, np.float32),
                    p + "post_attention_layernorm.weight": np.ones(hidden, np.float32)}
    save_file(tensors, str(src / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (stories_src / name).is_file():
            shutil.copyfile(stories_src / name, src / name)
    out = tmp_path_factory.mktemp("wide-onnx") / "model"
    convert_hf_folder(src, out, dtype="fp32", name="wide-llama-test")
    return out


def test_baseline_vs_inferos_segmented_cache(wide_onnx: Path, tinystories_text: Path, tmp_path: Path) -> None:
    """The real comparison: plain cache vs the segmented cache (window 32 -> most of a 256-token prompt is
    quantized), interleaved in one run; KV bytes come from each engine's own KVStats."""
    result = invoke(["bench", "--model", str(wide_onnx), "--compare", "baseline,inferos,aggressive",
                     "--batch-sizes", "2", "--seq-lengths", "256", "--gen-tokens", "4", "--repeats", "1",
                     "--warmup", "0", "--text", str(tinystories_text), "--format", "json"], tmp_path / "home")
    assert result.exit_code == 0, result.output
    snap = json.loads(result.stdout)
    rows = {r["config"]: r for r in snap["rows"]}
    for name in ("baseline", "inferos", "aggressive"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["generated_per_row"] == [4, 4]
    assert rows["baseline"]["kv_backend"].startswith("plain")
    assert "segmented" in rows["aggressive"]["kv_backend"]
    base_kv = rows["baseline"]["metrics"]["kv_bytes"]["mean"]
    aggr_kv = rows["aggressive"]["metrics"]["kv_bytes"]["mean"]
    assert aggr_kv < base_kv  # quantized tiers hold most of the 260 tokens
    assert rows["aggressive"]["ratios"]["kv_bytes"] == pytest.approx(aggr_kv / base_kv)
    assert rows["aggressive"]["metrics"]["kv_ratio_vs_fp16"]["mean"] < 1.0
    tiers = rows["aggressive"]["extra"]["kv_tiers"]
    assert sum(v for k, v in tiers.items() if k != "fp") > 0
    assert {c["name"]: c["kv"]["recent_window"] for c in snap["configs"]}["aggressive"] == 32
