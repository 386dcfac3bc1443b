"""Peak RSS at batch 1 and a long context, per KV config, each in a fresh process.

Each config runs alone in a subprocess: load the model, fill the cache with ``--ctx`` tokens of real text
(chunked prefill, ``--prefill-chunk`` tokens per chunk, the same for every config; 0: each engine's own
chunking, what ``run`` and ``bench`` do), then decode ``--steps`` tokens. It reports RSS after loading, the
highest RSS sampled after every forward, the exact peak of the prefill + decode window (Linux VmHWM reset
after loading; sampled elsewhere), the process peak (which includes loading) and the resident KV bytes. The
claim checked: the window's peak falls by most of the resident KV saving vs the baseline.

    python benchmarks/kv_rss.py --model ../shared/models/smollm2-135m-oga-int4 --ctx 4096 --prefill-chunk 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import psutil

    from inferos_cli.machine.rss import PeakWindow
    from inferos_cli.machine.rss import process_peak_rss as peak_rss_bytes
    from inferos_cli.models.resolve import resolve_model
    from inferos_cli.quality.eval import load_engines, resolve_configs

    proc = psutil.Process()
    if args.no_mem_pattern:  # experiment: ORT's memory-pattern planner off for every session of this run
        from inferos_cli.engine import sessions

        plain = sessions.session_options

        def no_pattern(*a, **k):  # type: ignore[no-untyped-def]
            opts = plain(*a, **k)
            opts.enable_mem_pattern = False
            return opts

        sessions.session_options = no_pattern
    info = resolve_model(args.model)
    engines = load_engines(info, resolve_configs([args.config], info), args.threads)
    eng = engines[0]
    ids = eng.tokenizer.encode(Path(args.text).read_text(encoding="utf-8")[: args.ctx * 12], add_bos=False)
    ids = ids[: args.ctx + args.steps]
    loaded = proc.memory_info().rss
    window = PeakWindow()
    window.start()
    cache = eng.new_cache(1, capacity=args.ctx + args.steps + 1)
    peak = loaded
    prompt = np.asarray([ids[: args.ctx]], dtype=np.int64)
    if args.prefill_chunk <= 0:
        eng.prefill(prompt, cache)
        peak = max(peak, proc.memory_info().rss)
    for s in range(0, args.ctx if args.prefill_chunk > 0 else 0, max(1, args.prefill_chunk)):
        eng.forward(prompt[:, s: s + args.prefill_chunk], cache, phase="prefill")
        peak = max(peak, proc.memory_info().rss)
    step = np.empty((1, 1), dtype=np.int64)
    for k in range(args.steps):
        step[0, 0] = ids[args.ctx + k]
        eng.forward(step, cache, phase="decode")
        peak = max(peak, proc.memory_info().rss)
    st = cache.stats()
    print(json.dumps({"config": args.config, "rss_after_load": loaded, "peak_rss_sampled": peak,
                      "peak_rss_window": window.stop(), "window_exact": window.exact,
                      "process_peak_rss": peak_rss_bytes(), "kv_bytes": st.total_bytes,
                      "kv_bytes_fp16": st.bytes_fp16, "kv_tokens": st.tokens, "kv": eng.layout.describe()}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext2-raw-test.txt"))
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--configs", default="baseline,int8,int4")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prefill-chunk", type=int, default=256, help="tokens per prefill chunk; 0: the engine's own")
    ap.add_argument("--no-mem-pattern", action="store_true", help="sessions with enable_mem_pattern=False")
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.config:
        child(args)
        return
    rows = []
    for cfg in [c.strip() for c in args.configs.split(",") if c.strip()]:
        cmd = [sys.executable, __file__, "--model", args.model, "--text", args.text, "--ctx", str(args.ctx),
               "--steps", str(args.steps), "--prefill-chunk", str(args.prefill_chunk), "--config", cfg]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.no_mem_pattern:
            cmd.append("--no-mem-pattern")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    mib = 2**20
    for r in rows:
        r["kv_saving_vs_baseline"] = base["kv_bytes"] - r["kv_bytes"]
        r["peak_drop_vs_baseline"] = base["peak_rss_window"] - r["peak_rss_window"]
        r["drop_over_saving"] = (r["peak_drop_vs_baseline"] / r["kv_saving_vs_baseline"]
                                 if r["kv_saving_vs_baseline"] else None)
    if args.json:
        print(json.dumps({"ctx": args.ctx, "results": rows}, indent=2))
        return
    print(f"ctx {args.ctx} tokens, batch 1, prefill chunk {args.prefill_chunk or 'engine default'}, "
          f"{args.steps} decode steps; MiB; peak = prefill + decode window")
    for r in rows:
        ratio = "n/a" if r["drop_over_saving"] is None else f"{r['drop_over_saving']:.2f}"
        print(f"{r['config']:10s} after load {r['rss_after_load'] / mib:7.1f}  peak (sampled) "
              f"{r['peak_rss_sampled'] / mib:7.1f}  peak {r['peak_rss_window'] / mib:7.1f}  "
              f"process peak {r['process_peak_rss'] / mib:7.1f}  "
              f"KV {r['kv_bytes'] / mib:6.1f}  KV saving {r['kv_saving_vs_baseline'] / mib:6.1f}  "
              f"peak drop {r['peak_drop_vs_baseline'] / mib:6.1f}  drop/saving {ratio}")


if __name__ == "__main__":
    main()
