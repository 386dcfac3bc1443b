"""Decode tokens/s of the KV presets vs the baseline at a given context, interleaved A B C A B C.

For each config a cache is filled with ``--ctx`` tokens of real text (chunked prefill), then ``--steps``
decode steps (teacher-forced text tokens) are timed; rounds are interleaved across configs
so CPU contention hits all of them alike. Prints medians and ratios vs baseline (JSON with --json).

    python benchmarks/kv_decode.py --model ../shared/models/smollm2-135m-oga-int4 --ctx 512 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext2-raw-test.txt"))
    ap.add_argument("--ctx", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--configs", default="baseline,int8,int4")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from inferos_cli.profiles import profile_of
    from inferos_cli.models.resolve import resolve_model
    from inferos_cli.quality.eval import load_engines, resolve_configs

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    info = resolve_model(args.model)
    engines = load_engines(info, resolve_configs(configs, info), args.threads)
    text = Path(args.text).read_text(encoding="utf-8")
    ids = engines[0].tokenizer.encode(text, add_bos=False)
    out = {"model": info.name, "steps": args.steps, "rounds": args.rounds, "results": []}
    for ctx in args.ctx:
        times: dict[str, list[float]] = {c: [] for c in configs}
        for rnd in range(args.rounds):
            for cfg, eng in zip(configs, engines):
                cache = eng.new_cache(1, capacity=ctx + args.steps + 1)
                start = rnd * 7
                prompt = np.asarray([ids[start: start + ctx]], dtype=np.int64)
                for s in range(0, ctx, 256):  # chunked prefill, same for every config
                    eng.forward(prompt[:, s: s + 256], cache, phase="prefill")
                step = np.empty((1, 1), dtype=np.int64)
                t0 = time.perf_counter()
                for k in range(args.steps):
                    step[0, 0] = ids[start + ctx + k]
                    eng.forward(step, cache, phase="decode")
                times[cfg].append(args.steps / (time.perf_counter() - t0))
        base = statistics.median(times[configs[0]])
        for cfg, eng in zip(configs, engines):
            med = statistics.median(times[cfg])
            # per-round ratio vs the baseline of the same round (interleaved), then the median
            ratios = [a / b for a, b in zip(times[cfg], times[configs[0]])]
            out["results"].append({"ctx": ctx, "config": cfg, "profile": profile_of(cfg),
                                   "decode_tps_median": med, "decode_tps_all": times[cfg],
                                   "ratio_vs_baseline_median": statistics.median(ratios),
                                   "ratio_of_medians": med / base,
                                   "kv": eng.layout.describe()})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"model {out['model']}: decode tokens/s, {args.steps} steps x {args.rounds} interleaved rounds")
        for r in out["results"]:
            print(f"ctx {r['ctx']:5d}  {r['config']:10s}  median {r['decode_tps_median']:7.1f} tok/s  "
                  f"ratio vs baseline (median of per-round ratios) {r['ratio_vs_baseline_median']:.3f}  "
                  f"all {[round(x, 1) for x in r['decode_tps_all']]}")


if __name__ == "__main__":
    main()
