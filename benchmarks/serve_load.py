"""Load test of `inferos serve`: N concurrent streaming clients for D seconds (loopback only).

Starts `inferos serve` as a subprocess on 127.0.0.1 (so clients and server do not share a GIL), runs
``--clients`` threads that each loop ``POST /api/v1/chat/completions`` (stream, usage chunk) until the
deadline, and reports: requests completed, errors, p50/p95 TTFT (client-side: request sent -> first
content chunk), aggregate tokens/s (completion tokens from the usage chunks / wall time), and the server
process RSS before the load, peak during it and after it.

    python benchmarks/serve_load.py --model ../shared/models/smollm2-135m-oga-int4 --clients 8 --duration 60
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "Once upon a time", "The little dog", "Tom and Sue went to the park", "One day, a bird",
    "Lily had a red ball", "The sun was hot and", "A boy named Ben", "In a small town",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[k]


def client_loop(url: str, model: str, prompt: str, max_tokens: int, deadline: float, out: list[dict[str, Any]]) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=120) as c:
        while time.monotonic() < deadline:
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first = None
            tokens = 0
            finish = None
            try:
                with c.stream("POST", "/api/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        out.append({"error": f"HTTP {r.status_code}"})
                        continue
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        payload = line[6:]
                        if payload == "[DONE]":
                            break
                        data = json.loads(payload)
                        if "error" in data:
                            raise RuntimeError(data["error"]["message"])
                        if data.get("usage"):
                            tokens = data["usage"]["completion_tokens"]
                        for ch in data.get("choices", []):
                            if ch.get("delta", {}).get("content") and first is None:
                                first = time.perf_counter()
                            finish = ch.get("finish_reason") or finish
                t1 = time.perf_counter()
                if finish is None:
                    out.append({"error": "stream ended without finish_reason"})
                    continue
                out.append({"ttft_s": (first - t0) if first else None, "tokens": tokens, "t0": t0, "t1": t1})
            except Exception as exc:  # noqa: BLE001 - counted, the loop goes on
                out.append({"error": f"{type(exc).__name__}: {exc}"})


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import psutil

    port = free_port()
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "inferos_cli", "serve", "--model", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(args.max_batch)]
    if args.profile:
        cmd += ["--profile", args.profile]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                health = httpx.get(url + "/v1/health", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit("server did not start") from None
                time.sleep(0.5)
        model = health["model"]
        ps = psutil.Process(proc.pid)
        # one warm-up request so lazy allocations are in the "before" figure
        httpx.post(url + "/api/v1/chat/completions", json={"model": model, "max_tokens": 8,
                   "messages": [{"role": "user", "content": "Hello"}]}, timeout=120)
        rss_before = ps.memory_info().rss
        peak = [rss_before]
        stop = threading.Event()

        half: list[int] = []
        t_sample0 = time.monotonic()
        half_at = t_sample0 + args.duration / 2
        series: list[tuple[float, float]] = []  # (seconds into the load, RSS MiB), every duration/6

        def sample() -> None:
            next_series = t_sample0
            while not stop.wait(0.5):
                try:
                    peak.append(ps.memory_info().rss)
                    now = time.monotonic()
                    if not half and now >= half_at:
                        half.append(peak[-1])
                    if now >= next_series:
                        series.append((round(now - t_sample0, 1), round(peak[-1] / 2**20, 1)))
                        next_series += args.duration / 6
                except psutil.Error:
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        results: list[list[dict[str, Any]]] = [[] for _ in range(args.clients)]
        t_start = time.perf_counter()
        end = time.monotonic() + args.duration
        threads = [threading.Thread(target=client_loop, args=(url, model, PROMPTS[i % len(PROMPTS)], args.max_tokens,
                                                               end, results[i])) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        stop.set()
        sampler.join()
        rss_after = ps.memory_info().rss
        metrics = httpx.get(url + "/v1/metrics", timeout=10).json()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    flat = [r for rs in results for r in rs]
    ok = [r for r in flat if "error" not in r]
    errors = [r["error"] for r in flat if "error" in r]
    ttfts = [r["ttft_s"] * 1000 for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "model": model, "profile": args.profile, "clients": args.clients, "duration_s": args.duration,
        "max_tokens": args.max_tokens, "max_batch": args.max_batch, "wall_s": wall,
        "requests_completed": len(ok), "errors": len(errors), "error_samples": sorted(set(errors))[:5],
        "ttft_ms_p50": statistics.median(ttfts) if ttfts else None, "ttft_ms_p95": percentile(ttfts, 95),
        "completion_tokens": tokens, "aggregate_tok_s": tokens / wall if wall > 0 else None,
        "rss_mb_before": rss_before / 2**20, "rss_mb_peak": max(peak) / 2**20,
        "rss_mb_at_half": half[0] / 2**20 if half else None, "rss_mb_after": rss_after / 2**20,
        "rss_mb_series": series,
        "server_kv_mb_last": metrics["mem"]["kv_mb"], "server_kv_backend": metrics.get("provider"),
        "server_requests": metrics["requests"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
