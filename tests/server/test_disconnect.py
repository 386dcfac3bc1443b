"""Clients that go away cancel their requests (issue 17 item 8), and the ``/v1/metrics`` numbers mean what
they say (issue 17 item 3): KV bytes that hold tokens apart from reserved bytes, an aggregate token rate
that is null when nothing was generated. Real uvicorn on 127.0.0.1, real httpx clients, stories260K."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _server import Served, make_service  # noqa: E402

PROMPT = "Once upon a time"
CLIENTS = 10
MAX_TOKENS = 400


def wait_idle(served: Served, expect_ended: int, timeout: float = 60.0) -> dict[str, Any]:
    """The metrics once no request is active and ``expect_ended`` requests ended in all."""
    deadline = time.monotonic() + timeout
    while True:
        m = served.client.get("/v1/metrics").json()
        r = m["requests"]
        if r["active"] == 0 and r["completed"] + r["failed"] + r["cancelled"] >= expect_ended:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"requests still running: {r}")
        time.sleep(0.05)


def cut_stream(url: str, chunks: int = 3) -> None:
    """Stream a long completion and hang up after the first ``chunks`` SSE lines."""
    with httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/api/v1/completions",
                           json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen >= chunks:
                    break  # leaving the block closes the connection


@pytest.mark.parametrize("use_batcher", [True, False], ids=["batcher", "queue"])
def test_streams_cut_by_their_clients_stop_and_count_as_cancelled(stories_onnx: Path, use_batcher: bool) -> None:
    served = Served(stories_onnx, use_batcher=use_batcher)
    try:
        threads = [threading.Thread(target=cut_stream, args=(served.url,)) for _ in range(CLIENTS)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        m = wait_idle(served, CLIENTS)
        assert m["requests"] == {"completed": 0, "failed": 0, "cancelled": CLIENTS, "active": 0, "queued": 0}
        # each client read 3 chunks; a request runs on for at most a few tokens after its client left
        assert m["tokens"]["generated"] < MAX_TOKENS * CLIENTS // 4, m["tokens"]
        records = served.service.recorder.records()
        assert [r.finish_reason for r in records] == ["cancelled"] * CLIENTS
        assert all(r.generated < MAX_TOKENS for r in records)
        prom = served.client.get("/v1/metrics/prometheus").text
        assert f'inferos_requests_total{{outcome="cancelled"}} {float(CLIENTS)}' in prom
        # a client that stays gets its whole answer and counts as completed
        r = served.client.post("/api/v1/completions", json={"prompt": PROMPT, "max_tokens": 8}).json()
        assert r["usage"]["completion_tokens"] == 8
        assert wait_idle(served, CLIENTS + 1)["requests"]["completed"] == 1
    finally:
        served.close()


def test_non_streaming_clients_that_time_out_are_cancelled(stories_onnx: Path) -> None:
    """One request at a time (queue worker): four clients give up after 0.3 s; the running request stops
    and the queued ones never start."""
    served = Served(stories_onnx, use_batcher=False)
    try:
        def impatient() -> None:
            with httpx.Client(base_url=served.url, timeout=0.3) as client:
                with pytest.raises(httpx.TimeoutException):
                    client.post("/api/v1/completions", json={"prompt": PROMPT, "max_tokens": 480})

        threads = [threading.Thread(target=impatient) for _ in range(4)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        m = wait_idle(served, 4)
        assert m["requests"]["cancelled"] == 4 and m["requests"]["completed"] == 0
        assert m["tokens"]["generated"] < 480 * 2
    finally:
        served.close()


# ----- what the numbers mean ------------------------------------------------------------------------------
def test_kv_memory_separates_held_from_reserved_bytes() -> None:
    from inferos_cli.events import KVStats
    from inferos_cli.server.metrics import KVMemory

    per_token_fp16 = 2 * 30 * 3 * 64 * 2  # keys + values, 30 layers, 3 KV heads, head_dim 64, fp16
    elements = per_token_fp16 // 2
    # a FusedCache today: int8 codes in a buffer preallocated for 2,048 columns, 100 tokens held
    fused = KVStats(tokens={"int8": 100}, bytes={"int8": 2048 * elements}, bytes_fp16=100 * per_token_fp16)
    assert fused.ratio_vs_fp16 > 7  # what /v1/metrics showed before: the allocation over the tokens' fp16 size
    mem = KVMemory.of(fused, fp_bytes=4)
    assert mem.held == {"int8": 100 * elements} and mem.reserved_bytes == 2048 * elements
    assert mem.ratio_vs_fp16 == pytest.approx(0.5)
    # a plain fp32 cache holds twice the fp16 size: the ratio says so (2.0), it is not a compressed cache
    plain = KVStats(tokens={"fp": 10}, bytes={"fp": 64 * elements * 4}, bytes_fp16=10 * per_token_fp16)
    assert KVMemory.of(plain, fp_bytes=4).ratio_vs_fp16 == pytest.approx(2.0)
    assert KVMemory.of(plain, fp_bytes=2).ratio_vs_fp16 == pytest.approx(1.0)
    # the segmented cache reports the bytes of its used columns (scales included): taken as they are
    seg = KVStats(tokens={"fp": 4, "int8": 60}, bytes={"fp": 4 * per_token_fp16, "int8": 60 * elements + 960},
                  bytes_fp16=64 * per_token_fp16)
    assert KVMemory.of(seg).held_bytes == seg.total_bytes
    # stats that say what was reserved have ``bytes`` = held bytes (the contract asked of the caches)
    told = SimpleNamespace(tokens={"int8": 100}, bytes={"int8": 100 * elements}, bytes_fp16=100 * per_token_fp16,
                           evicted=0, reserved={"int8": 2048 * elements})
    mem = KVMemory.of(told)  # type: ignore[arg-type]
    assert mem.held_bytes == 100 * elements and mem.reserved_bytes == 2048 * elements


def test_aggregate_rate_is_null_without_tokens_in_the_window() -> None:
    from inferos_cli.events import Event
    from inferos_cli.server.metrics import MetricsRecorder, RequestRecord

    rec = MetricsRecorder()
    assert rec.aggregate_tps() is None
    request = RequestRecord(id=1)
    rec.started -= 60.0  # serving for a minute
    for _ in range(50):
        rec.observe(request, Event("token", time.perf_counter()))
    now = time.time()
    assert rec.aggregate_tps(window_s=10.0, now=now) == pytest.approx(50 / 10.0)
    assert rec.aggregate_tps(window_s=10.0, now=now + 11.0) is None  # nothing in the window: null, not 0.0
    fresh = MetricsRecorder()  # up for ~0 s: the rate is over the time served, not a full window
    fresh.started = now - 2.0
    for _ in range(10):
        fresh.observe(request, Event("token", time.perf_counter()))
    assert fresh.aggregate_tps(window_s=10.0, now=now) == pytest.approx(10 / 2.0, rel=0.05)


def test_metrics_of_a_compressed_cache_say_held_bytes(oga_dir: Path) -> None:
    """The int8-fused cache preallocates its buffer for the prompt and ``max_tokens``: while the request
    runs, ``kv_mb`` counts the bytes holding tokens and the allocation is ``kv_reserved_mb``; the ratio
    stays under 1 and the memory saved is positive (the allocation over the tokens' fp16 size was > 7x)."""
    from inferos_cli.engine.sampling import GenerationConfig

    svc = make_service(oga_dir.parent, "int8-fused", threads=2)
    try:
        stream = svc.submit(svc.encode_text("The capital of France is"), GenerationConfig(max_tokens=200))
        tokens = 0
        for ev in stream:
            tokens += ev.kind == "token"
            if tokens == 3:
                m = svc.metrics()
                stream.cancel()
        assert 0 < m["mem"]["kv_ratio_vs_fp16"] <= 1.0, m["mem"]
        assert m["kv"]["memory_saved_mb"] > 0 and m["kv"]["compression_ratio"] >= 1.0
        assert m["mem"]["kv_reserved_mb"] > 5 * m["mem"]["kv_mb"] > 0  # room for 200 tokens, a few held
        assert m["tps_aggregate"] is not None and m["tps_aggregate"] > 0
        last = svc.metrics()["last_request"]
        assert last["finish_reason"] == "cancelled" and last["kv"]["ratio_vs_fp16"] <= 1.0
        assert last["kv"]["reserved_bytes"] >= last["kv"]["total_bytes"]
    finally:
        svc.close()
