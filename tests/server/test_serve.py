"""`inferos serve` end to end: real uvicorn on 127.0.0.1, real stories260K ONNX sessions, real HTTP.

Covers the Lemonade/OpenAI routes (streaming and not), the control API (policy, baseline, metrics,
Prometheus, history), bad inputs, the agent token, request isolation under concurrency, the systemd
unit, and the real GAIA CLI talking to the server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _server import Served, make_service as _service  # noqa: E402
from conftest import STORIES_SAMPLE, free_port, stop_process, wait_for_http  # noqa: E402

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def served(stories_onnx: Path) -> Iterator[Served]:
    s = Served(stories_onnx)
    yield s
    s.close()


def sse(text: str) -> list[Any]:
    """Parsed ``data:`` payloads of an SSE body (``[DONE]`` kept as the string)."""
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def complete(client: Any, prompt: str = PROMPT, n: int = 16, prefix: str = "/api/v1") -> dict[str, Any]:
    r = client.post(f"{prefix}/completions", json={"prompt": prompt, "max_tokens": n})
    assert r.status_code == 200, r.text
    return r.json()


# ----- Lemonade / OpenAI routes ---------------------------------------------------------------------------
def test_completion_continues_the_published_story(served: Served) -> None:
    body = complete(served.client, PROMPT, 24)
    text = body["choices"][0]["text"]
    assert (PROMPT + text).startswith(STORIES_SAMPLE)
    assert body["usage"]["completion_tokens"] == 24
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["model"] == served.service.info.name
    # the same route under /v1 answers the same (greedy) text
    assert complete(served.client, PROMPT, 24, prefix="/v1")["choices"][0]["text"] == text


def test_chat_stream_has_finish_reason_usage_and_done(served: Served) -> None:
    req = {"model": served.service.info.name, "messages": [{"role": "user", "content": PROMPT}],
           "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True}}
    r = served.client.post("/api/v1/chat/completions", json=req)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    items = sse(r.text)
    assert items[-1] == "[DONE]"
    chunks = items[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    final = chunks[-2]["choices"][0]
    assert final["finish_reason"] == "length" and final["delta"] == {}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2])
    plain = served.client.post("/api/v1/chat/completions", json={**req, "stream": False}).json()
    assert plain["choices"][0]["message"]["content"] == streamed and streamed
    assert plain["usage"]["prompt_tokens"] == usage["usage"]["prompt_tokens"]
    # without include_usage there is no usage chunk, but still a finish_reason and [DONE]
    items = sse(served.client.post("/api/v1/chat/completions", json={**req, "stream_options": None}).text)
    assert items[-1] == "[DONE]" and items[-2]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in items[:-1])


def test_stats_describe_the_last_request(served: Served) -> None:
    complete(served.client, "The dog", 10)
    stats = served.client.get("/api/v1/stats").json()
    assert stats["output_tokens"] == 10
    assert stats["input_tokens"] == len(served.service.encode_text("The dog"))
    assert stats["time_to_first_token"] > 0 and stats["tokens_per_second"] > 0
    assert len(stats["decode_token_times"]) == 9 and all(t > 0 for t in stats["decode_token_times"])
    sys_stats = served.client.get("/api/v1/system-stats").json()
    assert set(sys_stats) == {"cpu_percent", "memory_gb", "gpu_percent", "vram_gb", "npu_percent"}
    assert sys_stats["memory_gb"] > 0


def test_models_health_and_load(served: Served) -> None:
    name = served.service.info.name
    models = served.client.get("/api/v1/models").json()
    assert [m["id"] for m in models["data"]] == [name]
    assert name in [m["id"] for m in served.client.get("/api/v1/models", params={"show_all": "true"}).json()["data"]]
    r = served.client.post("/api/v1/load", json={"model_name": name, "ctx_size": 256})
    assert r.status_code == 200 and r.json()["ctx_size"] == 256
    health = served.client.get("/api/v1/health").json()
    assert health["model_loaded"] == name
    assert health["all_models_loaded"][0]["recipe_options"]["ctx_size"] == 256
    served.client.post("/api/v1/load", json={"model_name": name, "ctx_size": 100_000})  # clamped to the model
    assert served.client.get("/api/v1/health").json()["context_size"] == served.service.info.context_length
    control = served.client.get("/v1/health").json()
    assert {"status", "baseline_mode", "model", "profile", "version", "uptime_s"} <= set(control)
    assert control["model"] == name and control["uptime_s"] > 0


# ----- control API ----------------------------------------------------------------------------------------
def test_metrics_are_measured_or_null(served: Served) -> None:
    complete(served.client, PROMPT, 8)
    m = served.client.get("/v1/metrics").json()
    assert m["tps"] > 0 and m["ftl_ms"] > 0 and m["p95_ms"] >= m["ftl_ms"]
    assert m["mem"]["rss_gb"] > 0 and m["mem"]["kv_mb"] > 0
    last = m["last_request"]
    assert m["mem"]["kv_mb"] == pytest.approx(last["kv"]["total_bytes"] / 1e6)
    assert sum(v for v in m["kv"]["levels"].values() if v) >= last["prompt_tokens"]
    assert set(m["util"]) == {"cpu", "gpu", "npu"}
    assert m["mem"]["vram_gb"] is None or m["mem"]["vram_gb"] >= 0
    assert m["quality"]["max_delta_ppl"] == served.service.policy.quality.max_delta_ppl
    assert m["quality"]["delta_ppl_est"] is None  # no auto-tuner: no estimate, not a made-up number
    assert m["tokens"]["generated"] >= 8 and m["requests"]["completed"] >= 1


def test_prometheus_text_parses(served: Served) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    before = {f.name: f for f in text_string_to_metric_families(served.client.get("/v1/metrics/prometheus").text)}
    gen_before = next(s.value for s in before["inferos_generation_tokens"].samples if s.name.endswith("_total"))
    complete(served.client, PROMPT, 7)
    text = served.client.get("/v1/metrics/prometheus").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("inferos_time_to_first_token_seconds", "inferos_time_per_output_token_seconds",
                 "inferos_prompt_tokens", "inferos_generation_tokens", "inferos_kv_cache_bytes",
                 "inferos_device_utilization_ratio"):
        assert name in families, name
    assert families["inferos_time_to_first_token_seconds"].type == "histogram"
    gen = next(s.value for s in families["inferos_generation_tokens"].samples if s.name.endswith("_total"))
    assert gen - gen_before == 7
    tiers = {s.labels["tier"]: s.value for s in families["inferos_kv_cache_bytes"].samples}
    assert tiers and all(v >= 0 for v in tiers.values())
    count = next(s.value for s in families["inferos_time_per_output_token_seconds"].samples
                 if s.name.endswith("_count"))
    assert count >= 6


def test_policy_change_reaches_the_next_request(served: Served, stories_onnx: Path) -> None:
    from inferos_cli.engine.engine import Engine, GenerationConfig
    from inferos_cli.settings import Resolved

    old = served.client.get("/v1/policy").json()
    r = served.client.post("/v1/policy", json={"kv": {"quant": "int8", "recent_window": 32}})
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["version"] == old["version"] + 1
    assert new["policy"]["kv"]["recent_window"] == 32 and new["policy"]["kv"]["quant"] == "int8"
    ids = served.service.encode_text(PROMPT)
    complete(served.client, PROMPT, 40)
    last = served.client.get("/v1/metrics").json()["last_request"]
    assert last["policy_version"] == new["version"]
    # the request's KV stats are exactly those of an engine built for the new policy
    engine = Engine(served.service.info, Resolved(policy=served.service.policy))
    done = [e for e in engine.generate(ids, GenerationConfig(max_tokens=40)) if e.kind == "done"][-1]
    assert last["kv"]["bytes"] == dict(done.kv.bytes) and last["kv"]["tokens"] == dict(done.kv.tokens)
    history = served.client.get("/v1/history", params={"limit": 10000}).json()["items"]
    assert any(i["type"] == "decision" and i["kind"] == "policy" for i in history)


def test_baseline_toggle(served: Served) -> None:
    r = served.client.post("/v1/baseline", json={"enable": True})
    assert r.status_code == 200 and r.json()["baseline_mode"] is True
    assert served.client.get("/v1/health").json()["baseline_mode"] is True
    assert served.client.get("/v1/policy").json()["effective"]["kv"]["mode"] == "disabled"
    complete(served.client, PROMPT, 8)
    last = served.client.get("/v1/metrics").json()["last_request"]
    assert last["baseline"] is True
    assert served.client.post("/v1/baseline", params={"enable": "false"}).json()["baseline_mode"] is False
    assert served.client.get("/v1/policy").json()["effective"]["kv"]["mode"] != "disabled"
    assert served.client.post("/v1/baseline", json={"enable": "maybe"}).status_code == 422
    assert served.client.post("/v1/baseline", content=b"{nope", headers={"content-type": "application/json"}).status_code == 400


def test_history_grows(served: Served) -> None:
    first = served.client.get("/v1/history", params={"limit": 100000}).json()["count"]
    time.sleep(0.7)
    later = served.client.get("/v1/history", params={"limit": 100000}).json()
    assert later["count"] > first
    snap = [i for i in later["items"] if i["type"] == "metrics"][-1]
    assert {"tps", "ftl_ms", "rss_gb", "kv_mb", "requests"} <= set(snap)
    assert served.client.get("/v1/history", params={"limit": 2}).json()["count"] == 2


# ----- bad inputs -----------------------------------------------------------------------------------------
def test_bad_inputs_get_4xx_and_the_server_keeps_serving(served: Served) -> None:
    c = served.client
    before = c.get("/v1/policy").json()
    r = c.post("/api/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    # thresholds out of order: 422 naming the field, and nothing of the partial policy applied
    r = c.post("/v1/policy", json={"kv": {"recent_window": 64, "level_thresholds": {"L1_int8": 0.2, "L2_int4": 0.5}}})
    assert r.status_code == 422
    assert "level_thresholds" in json.dumps(r.json()["error"]["fields"])
    assert c.get("/v1/policy").json() == before
    r = c.post("/v1/policy", json={"kv": {"recent_window": 1}})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["loc"][-1] == "recent_window"
    r = c.post("/v1/policy", json={"nope": {"x": 1}})
    assert r.status_code == 422
    assert c.get("/v1/policy").json() == before
    r = c.post("/api/v1/chat/completions", json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found"
    r = c.post("/api/v1/load", json={"model_name": str(Path("/nonexistent/model-folder"))})
    assert 400 <= r.status_code < 500
    assert c.post("/api/v1/completions", json={"prompt": "x", "max_tokens": -1}).status_code == 422
    assert c.post("/api/v1/completions", json={"prompt": "x", "temperature": "hot"}).status_code == 422
    assert c.post("/api/v1/chat/completions", json={"messages": []}).status_code == 422
    assert c.post("/api/v1/completions", json={"prompt": "x" * 70_000}).status_code == 413
    long_prompt = "Once upon a time " * 400  # far beyond the 512-token context
    r = c.post("/api/v1/completions", json={"prompt": long_prompt, "max_tokens": 4})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    for r in (c.get("/v1/history", params={"limit": 0}), c.get("/v1/nope")):
        assert 400 <= r.status_code < 500 and "Traceback" not in r.text
    assert complete(c, PROMPT, 4)["usage"]["completion_tokens"] == 4  # still serving


def test_concurrent_requests_never_share_a_cache(served: Served) -> None:
    prompts = ["Once upon a time", "The little dog", "Tom and Sue went", "One day, a bird"]
    expected = {p: complete(served.client, p, 20)["choices"][0]["text"] for p in prompts}
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def worker(p: str) -> None:
        try:
            with httpx.Client(base_url=served.url, timeout=60) as c:
                r = c.post("/api/v1/completions", json={"prompt": p, "max_tokens": 20, "stream": True})
                results[p] = "".join(i["choices"][0]["text"] for i in sse(r.text)[:-1])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert results == expected


def test_client_disconnect_stops_generation(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=60) as c:
        with c.stream("POST", "/api/v1/completions",
                      json={"prompt": "Once upon a time", "max_tokens": 480, "stream": True}) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen >= 3:
                    break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = served.client.get("/v1/metrics").json()
        last = m["last_request"]
        if m["requests"]["active"] == 0 and last and last["finish_reason"] == "cancelled":
            break
        time.sleep(0.05)
    assert last["finish_reason"] == "cancelled" and last["generated"] < 480


def test_queue_worker_isolates_requests_too(stories_onnx: Path) -> None:
    s = Served(stories_onnx, use_batcher=False)
    try:
        a = complete(s.client, "Once upon a time", 15)["choices"][0]["text"]
        b = complete(s.client, "The little dog", 15)["choices"][0]["text"]
        out: dict[str, str] = {}

        def go(p: str) -> None:
            with httpx.Client(base_url=s.url, timeout=60) as c:
                out[p] = complete(c, p, 15)["choices"][0]["text"]

        ts = [threading.Thread(target=go, args=(p,)) for p in ("Once upon a time", "The little dog")]
        [t.start() for t in ts]
        [t.join(60) for t in ts]
        assert out == {"Once upon a time": a, "The little dog": b}
    finally:
        s.close()


# ----- security -------------------------------------------------------------------------------------------
def test_token_required_when_configured(stories_onnx: Path) -> None:
    s = Served(stories_onnx, token="s3cret-token")
    try:
        assert s.client.get("/v1/health").status_code == 401
        assert s.client.get("/v1/health", headers={"X-Inferos-Token": "wrong"}).status_code == 401
        assert s.client.get("/v1/health", headers={"X-Inferos-Token": "s3cret-token"}).status_code == 200
        assert s.client.get("/api/v1/models", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
        r = s.client.post("/api/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
    finally:
        s.close()


def test_cli_refuses_a_public_bind_without_token() -> None:
    from typer.testing import CliRunner

    from inferos_cli.cli import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--model", "unused"])
    assert result.exit_code == 2
    assert "INFEROS_AGENT_TOKEN" in result.output and "Traceback" not in result.output


def test_cli_public_bind_enforces_the_token(stories_onnx: Path, inferos_home: Path) -> None:
    port = free_port()
    env = {**os.environ, "INFEROS_AGENT_TOKEN": "tok-123", "INFEROS_HOME": str(inferos_home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferos_cli", "serve", "--model", str(stories_onnx), "--host", "0.0.0.0",
         "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(url + "/live", proc)
        assert httpx.get(url + "/v1/health").status_code == 401
        ok = httpx.get(url + "/v1/health", headers={"X-Inferos-Token": "tok-123"})
        assert ok.status_code == 200 and ok.json()["status"] == "ok"
        r = httpx.post(url + "/api/v1/completions", json={"prompt": PROMPT, "max_tokens": 5},
                       headers={"Authorization": "Bearer tok-123"}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        stop_process(proc)


# ----- service install ------------------------------------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the systemd unit is the Linux path")
def test_install_service_writes_a_systemd_user_unit(tmp_path: Path, stories_onnx: Path) -> None:
    from typer.testing import CliRunner

    from inferos_cli.cli import app

    unit_dir = tmp_path / "units"
    result = CliRunner().invoke(app, ["serve", "--install-service", "--unit-dir", str(unit_dir),
                                      "--model", str(stories_onnx), "--profile", "chat", "--port", "7099"])
    assert result.exit_code == 0, result.output
    unit = (unit_dir / "inferos.service").read_text()
    exec_line = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert f"{sys.executable} -m inferos_cli serve" in exec_line
    assert f"--model {stories_onnx}" in exec_line and "--profile chat" in exec_line and "--port 7099" in exec_line
    assert "--install-service" not in exec_line
    assert "[Install]" in unit and "WantedBy=default.target" in unit and "Restart=on-failure" in unit
    assert "systemctl --user enable --now inferos.service" in result.output
    assert not list(unit_dir.glob("*.tmp"))


# ----- the real GAIA CLI ----------------------------------------------------------------------------------
#: read at import: the autouse fixture clears INFEROS_* variables before each test
GAIA_EXE = os.environ.get("INFEROS_GAIA_EXE") or shutil.which("gaia") or shutil.which("gaia-cli")


def gaia_exe() -> str:
    """The `gaia` executable (INFEROS_GAIA_EXE or PATH); skip with the install command when absent."""
    exe = GAIA_EXE
    if not exe or not Path(exe).exists():
        pytest.skip("GAIA CLI not installed: python -m venv /tmp/venv-gaia && /tmp/venv-gaia/bin/pip install "
                    "amd-gaia, then INFEROS_GAIA_EXE=/tmp/venv-gaia/bin/gaia")
    return exe


def test_real_gaia_cli_runs_on_inferos_serve(served: Served, tmp_path: Path) -> None:
    exe = gaia_exe()
    name = served.service.info.name
    expected = served.client.post("/api/v1/chat/completions", json={
        "model": name, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16}).json()
    text = expected["choices"][0]["message"]["content"].strip()
    env = {**os.environ, "HOME": str(tmp_path), "USERPROFILE": str(tmp_path), "GAIA_CTX_SIZE": "512"}
    env.pop("LEMONADE_BASE_URL", None)
    proc = subprocess.run(
        [exe, "llm", PROMPT, "--model", name, "--base-url", f"{served.url}/api/v1", "--stats", "--max-tokens", "16"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert text and text in proc.stdout
    stats = served.client.get("/api/v1/stats").json()
    assert stats["output_tokens"] == 16


def test_kv_levels_map_cache_tiers_to_guide_levels() -> None:
    from inferos_cli.events import KVStats
    from inferos_cli.server.metrics import kv_levels, percentile

    stats = KVStats(tokens={"fp": 132, "int8": 40, "int4": 300}, bytes={"fp": 1, "int8": 1, "int4": 1}, evicted=7)
    assert kv_levels(stats) == {"L0": 132, "L1": 40, "L2": 300, "L3": 7}
    assert kv_levels(KVStats(tokens={"fp": 4, "k8v4": 10}))["L2"] == 10
    assert kv_levels(None) == {"L0": None, "L1": None, "L2": None, "L3": None}
    assert percentile([], 95) is None
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0 and percentile([1.0, 2.0], 95) == 2.0


def test_batchers_are_recycled_and_drained(stories_onnx: Path) -> None:
    from inferos_cli.engine.sampling import GenerationConfig

    svc = _service(stories_onnx, "int8", max_batch=2)
    try:
        assert svc.policy.kv.enabled and svc.recycle_after is None  # off by default: the caches compact on retire
        svc.recycle_after = 3  # opt-in: hand new requests to a fresh batcher while the old one drains
        expected = "".join(e.text for e in svc.submit(svc.encode_text(PROMPT), GenerationConfig(max_tokens=12))
                           if e.kind == "token")
        outs: list[str] = []

        def go() -> None:
            events = svc.submit(svc.encode_text(PROMPT), GenerationConfig(max_tokens=12))
            outs.append("".join(e.text for e in events if e.kind == "token"))

        for _ in range(3):
            threads = [threading.Thread(target=go) for _ in range(4)]
            [t.start() for t in threads]
            [t.join(60) for t in threads]
        assert outs == [expected] * 12
        assert svc.batchers_recycled >= 3
        deadline = time.monotonic() + 10
        while svc._draining and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not svc._draining
    finally:
        svc.close()


def test_plain_cache_drops_padding_of_retired_rows(stories_onnx: Path) -> None:
    """Continuous batching keeps one shared cache alive; retiring a long row must shrink it to the longest
    live row (else it grows without bound under load), and the survivor decodes exactly as alone."""
    import numpy as np

    from inferos_cli.profiles import resolve_settings
    from inferos_cli.engine.engine import Engine
    from inferos_cli.models.info import inspect_folder

    info = inspect_folder(stories_onnx)
    engine = Engine(info, resolve_settings("baseline", param_count=info.param_count, use_env=False))
    long_ids = engine.tokenizer.encode("Once upon a time, there was a little girl named Lily. She loved")
    short_ids = engine.tokenizer.encode("The dog")
    shared = engine.new_cache(1)
    engine.forward(np.asarray([long_ids]), shared, phase="prefill")
    alone = engine.new_cache(1)
    last_alone = engine.forward(np.asarray([short_ids]), alone, phase="prefill")[0, -1]
    part = engine.new_cache(1)
    last = engine.forward(np.asarray([short_ids]), part, phase="prefill")[0, -1]
    shared.merge(part)
    assert shared.past_len == len(long_ids)
    shared.select([1])  # the long row retires
    assert shared.past_len == len(short_ids)
    np.testing.assert_allclose(last, last_alone, rtol=1e-5, atol=1e-5)
    tok = int(np.argmax(last))
    a = engine.forward(np.asarray([[tok]]), shared, phase="decode")[0, -1]
    b = engine.forward(np.asarray([[tok]]), alone, phase="decode")[0, -1]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_gqa_model_with_kv_profile_is_served_by_the_batcher(oga_dir: Path) -> None:
    """The OGA GroupQueryAttention graph with a KV profile goes through the continuous batcher (no special
    case in the service): when the segmented cache refuses to merge rows (an InferosError) the batcher
    queues instead of failing, so every request is served. Exact equality with running alone is not
    asserted past the first token: at MatMulNBits accuracy_level 4 batched shapes flip near-ties (see
    test_integration::test_gqa_batch_with_kv_profile_equals_single_rows)."""
    from inferos_cli.engine.sampling import GenerationConfig

    svc = _service(oga_dir.parent, "int8", max_batch=2, threads=2)
    try:
        ids = [svc.encode_text(p) for p in ("The capital of France is", "Water boils at")]
        cfg = GenerationConfig(max_tokens=4, ignore_eos=True)
        alone = [[e.token_id for e in svc.engine().generate(p, cfg) if e.kind == "token"] for p in ids]
        outs: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def go(i: int) -> None:
            try:
                outs[i] = [e.token_id for e in svc.submit(ids[i], cfg) if e.kind == "token"]
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        [t.start() for t in threads]
        [t.join(300) for t in threads]
        assert not errors and svc.recorder.requests_failed == 0
        assert [len(outs[0]), len(outs[1])] == [4, 4]
        assert [outs[0][0], outs[1][0]] == [alone[0][0], alone[1][0]]  # prefilled alone: same first token
        batcher = svc._batcher(svc.policy)
        assert batcher is not None  # still the batcher: a refused merge queues, it does not kill it
        stats = batcher.stats()
        assert stats["admitted"] >= 2
        if not stats["can_merge"]:
            assert "cannot" in stats["merge_reason"]
    finally:
        svc.close()
