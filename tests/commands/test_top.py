"""`inferos top` against a real `inferos serve` app (uvicorn on 127.0.0.1, stories260K ONNX sessions):
one reading (`--once`, table and JSON), the live view in a pseudo-terminal, the change against the baseline,
the agent token and the one-line error when nothing listens."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _server import serve  # noqa: E402
from conftest import free_port  # noqa: E402

TOKEN = "top-test-token"
INFEROS = [sys.executable, "-m", "inferos_cli"]


@pytest.fixture(scope="module")
def served(stories_onnx: Path) -> Iterator[tuple[str, Any]]:
    with serve(stories_onnx) as pair:
        yield pair


def complete(client: Any, n: int = 12) -> None:
    r = client.post("/api/v1/completions", json={"prompt": "Once upon a time", "max_tokens": n})
    assert r.status_code == 200, r.text


def run_top(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INFEROS, "top", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_once_json_is_the_servers_numbers(served: tuple[str, Any]) -> None:
    url, client = served
    complete(client)
    result = run_top("--url", url, "--once", "--format", "json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    m = client.get("/v1/metrics").json()  # idle: the same numbers
    assert doc["metrics"]["tps"] == m["tps"] and doc["metrics"]["ftl_ms"] == m["ftl_ms"]
    cards = {k["name"]: k for k in doc["kpis"]}
    assert cards["decode tok/s"]["value"] == f"{m['tps']:.1f} tok/s"
    assert cards["TTFT p50 / p95"]["value"] == f"{m['ftl_ms']:.1f} ms / {m['p95_ms']:.1f} ms"
    assert cards["in flight / queued"]["value"] == "0 / 0"
    assert cards["quality delta-PPL"]["value"] == "n/a"  # no auto-tuner: no estimate
    # one reading has seen no request in baseline mode: it says so instead of comparing with a constant
    assert cards["decode tok/s"]["vs_baseline"].startswith("no baseline measured")
    assert cards["decode tok/s"]["vs_baseline_pct"] is None
    for dev in ("GPU", "NPU"):
        card = cards[f"{dev} use"]
        if m["util"][dev.lower()] is None:
            assert card["value"] == "n/a" and card["detail"]  # n/a with its reason
    assert doc["policy"]["version"] == client.get("/v1/policy").json()["version"]


def test_once_table_for_pipes(served: tuple[str, Any]) -> None:
    url, client = served
    complete(client)
    result = run_top("--url", url.removeprefix("http://") + "/", "--once")  # host:port is enough
    assert result.returncode == 0, result.stderr
    m = client.get("/v1/metrics").json()
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"inferos top {url}")
    assert f"decode tok/s: {m['tps']:.1f} tok/s" in result.stdout
    assert any(line.startswith("KV held: ") for line in lines)
    assert any(line.startswith("policy version: ") for line in lines)


def test_the_change_against_the_baseline_measured_on_the_server(served: tuple[str, Any]) -> None:
    from rich.console import Console

    from inferos_cli.commands.top import read_frame
    from inferos_cli.ui.top_view import BaselineTracker, kpis, render

    url, client = served
    tracker = BaselineTracker()
    client.post("/v1/baseline", json={"enable": True})
    complete(client, 24)
    tracker.observe(read_frame(url).metrics)
    card = {k.name: k for k in kpis(read_frame(url), tracker)}["decode tok/s"]
    assert card.change.startswith("baseline mode on: measuring the baseline (1 requests")
    client.post("/v1/baseline", json={"enable": False})
    complete(client, 24)
    frame = read_frame(url)
    tracker.observe(frame.metrics)
    cards = {k.name: k for k in kpis(frame, tracker)}
    base, cur = [r for r in tracker.requests.values() if r["baseline"]], [r for r in tracker.requests.values() if not r["baseline"]]
    expected = (cur[-1]["tps"] - base[-1]["tps"]) / base[-1]["tps"] * 100
    assert cards["decode tok/s"].delta_pct == pytest.approx(expected)
    assert cards["decode tok/s"].change.startswith(f"{expected:+.1f} % vs baseline (")
    assert cards["KV held"].delta_pct is not None
    # the rich view, through a recorded console
    console = Console(record=True, width=160, force_terminal=True)
    console.print(render(frame, tracker))
    shown = console.export_text()
    assert "decode tok/s" in shown and f"{expected:+.1f} % vs baseline" in shown
    assert "active policy" in shown and "baseline" in shown  # the toggles are among the decisions


def test_live_view_in_a_terminal_until_ctrl_c(served: tuple[str, Any]) -> None:
    url, client = served
    pid, fd = pty.fork()
    if pid == 0:  # the child: `inferos top` on a terminal
        os.environ.update({"COLUMNS": "140", "LINES": "50", "TERM": "xterm"})
        os.execv(sys.executable, [*INFEROS, "top", "--url", url, "--interval", "0.3"])
    out = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and out.count(b"inferos top ") < 4:
            complete(client, 8)
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    break
        os.kill(pid, signal.SIGINT)
        stop_by = time.monotonic() + 30  # a child that ignores Ctrl-C fails the test instead of hanging it
        while time.monotonic() < stop_by:
            if not select.select([fd], [], [], 0.5)[0]:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode("utf-8", "replace")
    assert text.count("inferos top ") >= 4, text[-2000:]  # redrawn in place, reading after reading
    assert "\x1b[" in text  # a live terminal view (cursor movement), not lines
    assert "decode tok/s" in text and "in flight / queued" in text and "active policy" in text
    assert os.waitstatus_to_exitcode(status) == 0  # Ctrl-C ends it quietly


def test_nothing_listening_is_one_line_and_exit_1() -> None:
    port = free_port()
    result = run_top("--url", f"http://127.0.0.1:{port}", "--once")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: nothing answers at http://127.0.0.1:{port}"), result.stderr
    assert "inferos serve" in lines[0] and result.stdout == ""


def test_the_agent_token(stories_onnx: Path) -> None:
    with serve(stories_onnx, token=TOKEN) as (url, client):
        result = run_top("--url", url, "--once")
        assert result.returncode == 1
        assert result.stderr.strip() == f"error: {url} needs the agent token (set INFEROS_AGENT_TOKEN to the server's token)"
        result = run_top("--url", url, "--once", "--format", "json", env={"INFEROS_AGENT_TOKEN": TOKEN})
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["health"]["model"] == client.get("/v1/health").json()["model"]
