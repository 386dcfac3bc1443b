"""Static batching vs one prompt at a time: aggregate decode throughput of the inferos engine.

The same N prompts (wikitext-2 slices of equal length) are generated greedily (a) one after the other and
(b) together with ``Engine.generate_batch``; runs are interleaved A B / B A and the medians of aggregate
tokens/s (all generated tokens / wall time of the whole job, prefill included) are reported with their
ratio (batched / sequential). Greedy outputs of both are compared token for token.

Example::

    python benchmarks/engine_batch.py --model ../shared/models/smollm2-135m-oga-int4 --batch 4 --reps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("INFEROS_SHARED", REPO.parent / "shared"))


def prompts(engine: Any, n: int, length: int) -> list[list[int]]:
    text = (SHARED / "data" / "wikitext2-raw-test.txt").read_text(encoding="utf-8")[:60000]
    ids = engine.tokenizer.encode(text, add_bos=False)
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def sequential(engine: Any, rows: list[list[int]], cfg: Any) -> tuple[float, dict[int, list[int]]]:
    t0 = time.perf_counter()
    out = {i: [e.token_id for e in engine.generate(r, cfg) if e.kind == "token"] for i, r in enumerate(rows)}
    return sum(len(v) for v in out.values()) / (time.perf_counter() - t0), out


def batched(engine: Any, rows: list[list[int]], cfg: Any) -> tuple[float, dict[int, list[int]]]:
    t0 = time.perf_counter()
    out: dict[int, list[int]] = {}
    for e in engine.generate_batch(rows, cfg):
        if e.kind == "token":
            out.setdefault(e.seq, []).append(e.token_id)
    return sum(len(v) for v in out.values()) / (time.perf_counter() - t0), out


def main() -> None:
    sys.path.insert(0, str(REPO))
    from inferos_cli.profiles import resolve_settings
    from inferos_cli.engine.engine import Engine
    from inferos_cli.models.info import inspect_folder
    from inferos_cli.engine.sampling import GenerationConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "smollm2-135m-oga-int4")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    info = inspect_folder(args.model)
    resolved = resolve_settings("baseline", param_count=info.param_count, use_env=False,
                                flags={"scheduler": {"mode": "cpu"}})
    engine = Engine(info, resolved, threads=args.threads)
    rows = prompts(engine, args.batch, args.prompt_tokens)
    cfg = GenerationConfig(max_tokens=args.new_tokens, ignore_eos=True)
    sequential(engine, rows[:1], GenerationConfig(max_tokens=2))  # warm-up
    batched(engine, rows[:2], GenerationConfig(max_tokens=2))
    res: dict[str, list[float]] = {"sequential": [], "batched": []}
    outs: dict[str, dict[int, list[int]]] = {}
    for rep in range(args.reps):
        order = ("sequential", "batched") if rep % 2 == 0 else ("batched", "sequential")
        for who in order:
            tps, out = (sequential if who == "sequential" else batched)(engine, rows, cfg)
            res[who].append(tps)
            outs[who] = out
    med = {k: statistics.median(v) for k, v in res.items()}
    same = outs["sequential"] == outs["batched"]
    result = {"model": str(args.model), "batch": args.batch, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "runs_tok_s": res, "median_tok_s": med,
              "ratio_batched_vs_sequential": med["batched"] / med["sequential"], "same_greedy_tokens": same,
              "plan": engine.plan.describe()}
    print(f"{info.name}: batch {args.batch} x ({args.prompt_tokens} prompt + {args.new_tokens} new tokens): "
          f"sequential {med['sequential']:.1f} tok/s, batched {med['batched']:.1f} tok/s "
          f"(ratio {result['ratio_batched_vs_sequential']:.2f}); same greedy tokens: {same}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
