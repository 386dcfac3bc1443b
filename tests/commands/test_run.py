"""`inferos run` end to end on stories260K: JSON lines, plain text + summary, the table renderer, errors,
the interactive chat with a reused cache, Ctrl-C in a real subprocess."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import STORIES_SAMPLE
from inferos_cli.cli import app
from inferos_cli.profiles import resolve_settings
from inferos_cli.engine.chat import Conversation
from inferos_cli.engine.engine import Engine
from inferos_cli.events import Event, KVStats
from inferos_cli.models.info import inspect_folder
from inferos_cli.engine.sampling import GenerationConfig
from inferos_cli.ui.run_table import RunSnapshot, run_table, summary_line
from inferos_cli.ui.run_view import consume

runner = CliRunner()


def invoke(*args: str, input: str | None = None):  # noqa: A002 - click's name
    return runner.invoke(app, ["run", *args], input=input)


def test_json_lines_parse(stories_onnx: Path) -> None:
    result = invoke("Once upon a time", "--model", str(stories_onnx), "-n", "8", "--json", "-p", "baseline")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    kinds = [d["kind"] for d in lines]
    assert kinds[0] == "prefill" and kinds[-1] == "done" and kinds.count("token") == 8
    assert lines[0]["ttft_s"] > 0 and lines[-1]["decode_tps"] > 0
    assert lines[-1]["kv"]["ratio_vs_fp16"] > 0 and lines[-1]["provider"]["decode"]


def test_plain_output_is_text_then_summary(stories_onnx: Path) -> None:
    result = invoke("--model", str(stories_onnx), "-n", "30", "-p", "baseline", "--no-chat", input="Once upon a time")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().startswith(",") or result.stdout.strip()  # the continuation text
    summary = result.stderr.strip().splitlines()[-1]
    for part in ("30 tokens", "TTFT", "ms", "decode", "tok/s", "KV", "RSS", "prefill on", "profile"):
        assert part in summary, summary


def test_bos_only_prompt_reproduces_sample(stories_onnx: Path) -> None:
    # greedy: `run` samples like Ollama by default (temperature 0.8, unseeded), and the sample is the greedy path
    result = invoke("Once upon a time,", "--model", str(stories_onnx), "-n", "12", "-p", "baseline", "--temperature", "0")
    assert result.exit_code == 0, result.output
    assert ("Once upon a time," + result.stdout.rstrip("\n")).startswith(STORIES_SAMPLE)


def test_overflow_is_a_one_line_error(stories_onnx: Path) -> None:
    result = invoke("dog " * 700, "--model", str(stories_onnx), "-n", "4", "-p", "baseline")
    assert result.exit_code == 1
    assert "does not fit the context" in result.output and "Traceback" not in result.output


def test_usage_errors(stories_onnx: Path, tmp_path: Path) -> None:
    result = invoke("x", "--interactive", "--model", str(stories_onnx))
    assert result.exit_code == 2 and "one of PROMPT" in result.output
    result = invoke("--model", str(stories_onnx), "--prompts-file", str(tmp_path / "nope.txt"))
    assert result.exit_code == 2 and "cannot read prompts file" in result.output
    result = invoke("x", "--model", str(tmp_path / "missing"))
    assert result.exit_code == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"], ids=["empty", "spaces", "newline-tab"])
def test_empty_prompt_is_a_usage_error_like_empty_stdin(stories_onnx: Path, prompt: str) -> None:
    result = invoke(prompt, "--model", str(stories_onnx), "-n", "4", "-p", "baseline")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "the prompt is empty" in lines[0] and 'inferos run "Tell me a story"' in lines[0]
    piped = invoke("--model", str(stories_onnx), "-n", "4", "-p", "baseline", input=prompt)
    assert piped.exit_code == 2 and "no prompt given" in piped.output


def test_table_renders_in_recorded_console(stories_onnx: Path) -> None:
    info = inspect_folder(stories_onnx)
    engine = Engine(info, resolve_settings("baseline", param_count=info.param_count, use_env=False), threads=1)
    snap = RunSnapshot(model=info.name, profile="baseline", kv_backend=engine.layout.describe())
    consume(engine.generate([1], GenerationConfig(max_tokens=10)), snap, "plain", out=open(os.devnull, "w"))
    snap.update_telemetry({"cpu": 42.0, "gpu": None, "npu": None, "vram_bytes": None, "reasons": {"gpu": "no GPU"}})
    console = Console(record=True, width=120)
    console.print(run_table(snap))
    text = console.export_text()
    for part in ("decode", "tok/s", "first-token latency", "ms", "KV bytes", "fp16", "RSS", "MiB", "42 %",
                 "n/a", "provider prefill", "cpu", "baseline"):
        assert part in text, part
    assert "10 tokens" in summary_line(snap)


def test_snapshot_shows_na_for_unmeasured() -> None:
    snap = RunSnapshot()
    snap.update(Event(kind="prefill", t=0.0, prompt_tokens=3, ttft_s=0.01, prefill_tps=300.0,
                      kv=KVStats(tokens={"fp": 3}, bytes={"fp": 300}, bytes_fp16=150)))
    console = Console(record=True, width=100)
    console.print(run_table(snap))
    text = console.export_text()
    assert "10.0 ms" in text and "300.0 tok/s" in text and "2.00x fp16" in text
    assert text.count("n/a") >= 5  # decode, RSS, CPU, GPU, VRAM, NPU unknown


def test_ctrl_c_in_consume_closes_the_stream() -> None:
    closed = []

    def events():
        try:
            yield Event(kind="prefill", t=0.0, prompt_tokens=1, ttft_s=0.001)
            yield Event(kind="token", t=0.0, token_id=5, text="hi")
            raise KeyboardInterrupt
        finally:
            closed.append(True)

    snap = RunSnapshot()
    texts = consume(events(), snap, "plain", out=open(os.devnull, "w"))
    assert snap.finish_reason == "interrupted" and closed and texts == {0: "hi"}
    out = io.StringIO()
    consume(events(), RunSnapshot(), "json", out=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [d["kind"] for d in lines] == ["prefill", "token", "done"]
    assert lines[-1]["finish_reason"] == "interrupted" and lines[-1]["generated"] == 1


def test_conversation_reuses_the_cache(oga_dir: Path) -> None:
    info = inspect_folder(oga_dir.parent)
    engine = Engine(info, resolve_settings("baseline", param_count=info.param_count, use_env=False,
                                           flags={"scheduler": {"mode": "cpu"}}), threads=1)
    conv = Conversation(engine)
    cfg = GenerationConfig(max_tokens=16)
    first = list(conv.turn("My name is Ada. Say hello.", cfg))
    cached = conv.cached_tokens
    assert cached == first[0].prompt_tokens + first[-1].generated - (1 if first[-1].finish_reason == "length" else 0)
    second = list(conv.turn("What is my name?", cfg))
    assert second[0].prompt_tokens < 30  # only the new turn was prefilled
    assert conv.cached_tokens > cached and conv.reprefills == 0
    assert "Ada" in second[-1].extra["output_text"]
    # the cache holds the same tokens a fresh prefill of the whole conversation would
    full = engine.tokenizer.apply_chat_template(conv.messages[:-1], add_generation_prompt=True)
    assert abs(len(engine.tokenizer.encode(full, add_bos=False)) + second[-1].generated - conv.cached_tokens) <= 3


def test_interactive_cli_two_turns(stories_onnx: Path) -> None:
    result = invoke("--interactive", "--model", str(stories_onnx), "-n", "8", "-p", "baseline",
                    input="Once upon a time\nThe dog\n/reset\nTom\n\n")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("cached") == 3 and "conversation reset" in result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery to a child needs POSIX signals here")
def test_ctrl_c_stops_cleanly_with_summary(oga_dir: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("inferos")
    env = dict(os.environ, INFEROS_HOME=str(tmp_path / "home"))
    proc = subprocess.Popen(
        [str(exe), "run", "Write a very long story about the sea.", "--model", str(oga_dir.parent), "-n", "4000",
         "--ignore-eos", "-p", "baseline", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    assert proc.stdout is not None
    first = proc.stdout.read(20)  # wait until text streams
    assert first
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"finish interrupted" in err and b"Traceback" not in err


def _lossy_config(tmp_path: Path) -> Path:
    """A settings file whose quality budget a narrow int4 window must exceed (delta-PPL > 0 measured)."""
    path = tmp_path / "tight.toml"
    path.write_text("[quality]\nmax_delta_ppl = 0.0\n[kv]\nrecent_window = 16\nsink_tokens = 0\n", encoding="utf-8")
    return path


def test_auto_tune_decisions_in_json_and_summary(stories_onnx: Path, tmp_path: Path) -> None:
    cfg = _lossy_config(tmp_path)
    result = invoke("Once upon a time", "--model", str(stories_onnx), "-n", "4", "-p", "int4", "--config", str(cfg),
                    "--auto-tune", "--json", "--threads", "1")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    tune = lines[0]
    assert tune["kind"] == "autotune" and [d["kind"] for d in lines[1:]][0] == "prefill"
    assert lines[-1]["kind"] == "done"
    assert tune["before"]["recent_window"] == 16 and tune["decisions"], tune
    first = tune["decisions"][0]
    assert "max_delta_ppl" in first["reason"] and first["details"]["measured_current"]["delta_ppl"] > 0
    assert tune["policy"]["recent_window"] > 16  # loosened, and the engine ran the tuned policy
    # plain mode: the decision (with its reason) is in the summary line
    plain = invoke("Once upon a time", "--model", str(stories_onnx), "-n", "4", "-p", "int4", "--config", str(cfg),
                   "--target-tps", "1000000", "--threads", "1")
    assert plain.exit_code == 0, plain.output
    summary = plain.stderr.strip().splitlines()[-1]
    assert "auto-tune: 1 decision(s): delta_ppl_est" in summary and "recent window 32 tokens" in summary
    assert "--target-tps 1000000.0 tok/s not evaluated" in summary


def test_auto_tune_on_baseline_and_remote_backend(stories_onnx: Path) -> None:
    result = invoke("Once upon a time", "--model", str(stories_onnx), "-n", "2", "-p", "baseline", "--auto-tune")
    assert result.exit_code == 0, result.output
    assert "auto-tune: no change (KV policy off (baseline): nothing to tune)" in result.stderr.strip().splitlines()[-1]
    result = invoke("x", "--backend", "lemonade", "--auto-tune", "--url", "http://127.0.0.1:9")
    assert result.exit_code == 2 and "--auto-tune tunes the in-process engine" in result.output


def test_stop_strings_understand_escapes(stories_onnx: Path) -> None:
    """Issue 17 item 6: a shell passes ``--stop "\\x20"`` as backslash-x-2-0; run reads it as a space, as
    llama.cpp reads its escapes, so generation stops at the first space (it ran to the limit before)."""
    base = ["Once upon a time", "--model", str(stories_onnx), "-n", "24", "--temperature", "0", "--json",
            "-p", "baseline"]
    free = [json.loads(line) for line in invoke(*base).stdout.splitlines() if line.strip()]
    text = "".join(e["text"] for e in free)
    assert free[-1]["finish_reason"] == "length" and " " in text.strip()
    stopped = [json.loads(line) for line in invoke(*base, "--stop", "\\x20").stdout.splitlines() if line.strip()]
    assert stopped[-1]["finish_reason"] == "stop"
    assert stopped[-1]["generated"] < free[-1]["generated"]
    assert " " not in "".join(e["text"] for e in stopped).strip()
