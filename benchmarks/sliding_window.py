"""Bounded vs full-length sliding-window caches, same code, each run in a fresh process.

For each KV config (``--configs``, default ``baseline,int8-fused``) and each form of the sliding-window
layers' cache (``bounded``: the engine's default, ``full``: the same cache class with ``windowed=False``, i.e.
what every layer held before bounded windows), a subprocess loads the model, prefills ``--ctx`` tokens of
real text (the engine's automatic chunking: 2048-token chunks) and decodes ``--steps`` tokens greedily. It
reports the peak RSS of that run (Linux VmHWM reset before it; the weights are included), RSS after loading,
TTFT, decode tok/s, the largest and the final held KV bytes (``KVStats``) and the allocated KV bytes, and
whether the greedy tokens of both forms agree.

    python benchmarks/sliding_window.py --model gemma3-270m --ctx 4096,16384 --steps 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    import functools

    import numpy as np

    from inferos_cli.kv.fused import FusedCache
    from inferos_cli.kv.plain import PlainCache
    from inferos_cli.machine.rss import PeakWindow
    from inferos_cli.models.resolve import resolve_model
    from inferos_cli.quality.eval import load_engines, resolve_configs

    if args.form == "full":  # every cache class of this run keeps the whole context in its window layers
        for cls in (PlainCache, FusedCache):
            cls.__init__ = functools.partialmethod(cls.__init__, windowed=False)  # type: ignore[method-assign]
    info = resolve_model(args.model, progress=False)
    eng = load_engines(info, resolve_configs([args.config], info), args.threads)[0]
    text = Path(args.text).read_text(encoding="utf-8")
    ids = eng.tokenizer.encode(text[: args.ctx * 12])[: args.ctx]
    window = PeakWindow()
    loaded = window.rss()
    cache = eng.new_cache(1, capacity=args.ctx + args.steps + 1)
    held_max = 0
    window.start()
    t0 = time.perf_counter()
    last = eng.prefill(np.asarray([ids], dtype=np.int64), cache, None)
    ttft = time.perf_counter() - t0
    held_max = max(held_max, cache.stats().total_bytes)
    tokens, step = [], np.empty((1, 1), dtype=np.int64)
    t1 = time.perf_counter()
    for _ in range(args.steps):
        step[0, 0] = int(last[0].argmax())
        tokens.append(int(step[0, 0]))
        last = eng.forward(step, cache, phase="decode", logits="last")[:, -1]
        held_max = max(held_max, cache.stats().total_bytes)
    decode_s = time.perf_counter() - t1
    peak = window.stop()
    st = cache.stats()
    print(json.dumps({"config": args.config, "form": args.form, "ctx": args.ctx, "steps": args.steps,
                      "kv": eng.layout.describe(), "rss_after_load": loaded, "peak_rss": peak,
                      "rss_method": window.method, "ttft_s": ttft, "decode_tps": args.steps / decode_s,
                      "kv_held_max": held_max, "kv_held_end": st.total_bytes, "kv_reserved_end": st.reserved_bytes,
                      "kv_tokens": st.tokens, "tokens": tokens}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", default=str(Path.home() / ".cache/inferos/texts/wikitext2-raw-test.txt"))
    ap.add_argument("--ctx", default="4096")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--configs", default="baseline,int8-fused")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--form", default="bounded", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.config:
        args.ctx = int(args.ctx)
        child(args)
        return
    rows = []
    for ctx in [int(c) for c in args.ctx.split(",")]:
        for cfg in [c.strip() for c in args.configs.split(",") if c.strip()]:
            for form in ("full", "bounded"):
                cmd = [sys.executable, __file__, "--model", args.model, "--text", args.text, "--ctx", str(ctx),
                       "--steps", str(args.steps), "--config", cfg, "--form", form]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r, mib = rows[-1], 2**20
                print(f"ctx {ctx:6d} {cfg:10s} {form:8s} peak RSS {r['peak_rss'] / mib:7.1f} MiB (after load "
                      f"{r['rss_after_load'] / mib:6.1f})  KV held max {r['kv_held_max'] / mib:6.1f} MiB, end "
                      f"{r['kv_held_end'] / mib:6.1f}, allocated {r['kv_reserved_end'] / mib:6.1f}  TTFT "
                      f"{r['ttft_s']:6.1f} s  decode {r['decode_tps']:5.1f} tok/s", flush=True)
            full, bounded = rows[-2], rows[-1]
            bounded["same_tokens_as_full"] = bounded["tokens"] == full["tokens"]
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "steps": args.steps, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
