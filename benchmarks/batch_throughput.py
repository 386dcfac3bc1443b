"""Aggregate decode throughput of batched decoding vs the same prompts run one after another.

Usage (from the repository root)::

    python benchmarks/batch_throughput.py                     # smollm2-135m OGA int4 from ../shared
    python benchmarks/batch_throughput.py --batch-sizes 1,4,8 --prompt-tokens 128 --new-tokens 64 \
        --repeats 3 --json out.json

For each batch size B it takes B different wikitext-2 passages cut to exactly ``--prompt-tokens`` tokens
and, interleaved in the same process (sequential, static, continuous, sequential, static, ...), runs:

- ``sequential``: ``Engine.generate`` on each prompt, one after another (the baseline);
- ``static``: ``Engine.generate_batch`` (all B rows together, rows retire when done);
- ``continuous``: :class:`~inferos_cli.engine.batcher.ContinuousBatcher` with all B submitted at once.

Greedy, ``ignore_eos`` so every row makes exactly ``--new-tokens`` tokens; the outputs of the batched runs
must equal the sequential ones token for token (checked, reported). Metrics per run:

- ``decode_tps``: aggregate decode tokens/s = sum over rows of (generated - 1) / decode wall time, where
  the decode wall time is the sum of each sequential run's ``t_last - t_first``, or for a batch the time
  from the batch's first token to its last token;
- ``e2e_tps``: all generated tokens / wall time from the first prompt handed over to the last token
  (prefill included).

Medians over repeats, and ratios vs ``sequential`` of the same repeat. The machine's other load is not
controlled: the interleaving makes the ratios fair, not the absolute numbers. As a contention-robust
second view, every decode step's duration is kept (``step_ms_min`` / ``step_ms_median``); rows per step /
fastest step is the least-contended throughput estimate (``min_step_ratio_vs_sequential``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("INFEROS_SHARED", REPO.parent / "shared"))


def make_prompts(tokenizer: Any, n: int, length: int, text_path: Path) -> list[list[int]]:
    """``n`` different passages of exactly ``length`` tokens from a text file."""
    text = text_path.read_text(encoding="utf-8")
    paras = [p.strip() for p in text.split("\n") if len(p.strip()) > 400 and not p.strip().startswith("=")]
    prompts: list[list[int]] = []
    for para in paras:
        ids = tokenizer.encode(para)
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == n:
            return prompts
    raise SystemExit(f"not enough passages of {length} tokens in {text_path}")


def run_sequential(engine: Any, prompts: list[list[int]], cfg: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    outs: list[list[int]] = []
    decode_time = 0.0
    decode_tokens = 0
    t_end = t0
    steps: list[float] = []
    for ids in prompts:
        toks: list[int] = []
        first = last = None
        for ev in engine.generate(ids, cfg):
            if ev.kind == "token":
                toks.append(ev.token_id)
                if last is not None:
                    steps.append(ev.t - last)
                first = ev.t if first is None else first
                last = ev.t
        outs.append(toks)
        if first is not None and last is not None:
            decode_time += last - first
            decode_tokens += len(toks) - 1
        t_end = time.perf_counter()
    total = sum(len(o) for o in outs)
    return {"outputs": outs, "decode_tps": decode_tokens / decode_time if decode_time > 0 else None,
            "e2e_tps": total / (t_end - t0), "wall_s": t_end - t0, "step_s": steps, "rows": 1}


def _batch_metrics(outs: dict[int, list[int]], firsts: list[float], lasts: list[float], t0: float,
                   n: int, row0_times: list[float] | None = None) -> dict[str, Any]:
    rows = [outs.get(i, []) for i in range(n)]
    total = sum(len(r) for r in rows)
    decode_tokens = sum(max(0, len(r) - 1) for r in rows)
    span = (max(lasts) - min(firsts)) if firsts else 0.0
    t_end = max(lasts) if lasts else time.perf_counter()
    times = row0_times or []
    steps = [b - a for a, b in zip(times, times[1:])]
    return {"outputs": rows, "decode_tps": decode_tokens / span if span > 0 else None,
            "e2e_tps": total / (t_end - t0), "wall_s": t_end - t0, "step_s": steps, "rows": n}


def run_static(engine: Any, prompts: list[list[int]], cfg: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    outs: dict[int, list[int]] = {}
    firsts: list[float] = []
    lasts: list[float] = []
    row0: list[float] = []
    for ev in engine.generate_batch(prompts, cfg):
        if ev.kind == "token":
            outs.setdefault(ev.seq, []).append(ev.token_id)
            if len(outs[ev.seq]) == 1:
                firsts.append(ev.t)
            if ev.seq == 0:
                row0.append(ev.t)
            lasts.append(ev.t)
    return _batch_metrics(outs, firsts, lasts, t0, len(prompts), row0)


def run_continuous(engine: Any, prompts: list[list[int]], cfg: Any) -> dict[str, Any]:
    from inferos_cli.engine.batcher import ContinuousBatcher

    batcher = ContinuousBatcher(engine, max_batch=len(prompts), start=False)  # driven here: no thread hop
    t0 = time.perf_counter()
    its = [batcher.submit(p, cfg) for p in prompts]
    while batcher.step():
        pass
    outs: dict[int, list[int]] = {}
    firsts: list[float] = []
    lasts: list[float] = []
    row0: list[float] = []
    for i, it in enumerate(its):
        times = []
        for ev in it:
            if ev.kind == "token":
                outs.setdefault(i, []).append(ev.token_id)
                times.append(ev.t)
        if times:
            firsts.append(times[0])
            lasts.append(times[-1])
        if i == 0:
            row0 = times
    batcher.close()
    return _batch_metrics(outs, firsts, lasts, t0, len(prompts), row0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "smollm2-135m-oga-int4")
    ap.add_argument("--text", type=Path, default=SHARED / "data" / "wikitext2-raw-test.txt")
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", default="sequential,static,continuous")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from inferos_cli.engine.engine import Engine
    from inferos_cli.models.info import inspect_folder
    from inferos_cli.engine.sampling import GenerationConfig
    from inferos_cli.settings import Policy, Resolved

    info = inspect_folder(args.model)
    engine = Engine(info, Resolved(policy=Policy.model_validate({"kv": {"mode": "disabled"}})), threads=args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    prompts_all = make_prompts(engine.tokenizer, max(sizes), args.prompt_tokens, args.text)
    cfg = GenerationConfig(max_tokens=args.new_tokens, ignore_eos=True)
    runners = {"sequential": run_sequential, "static": run_static, "continuous": run_continuous}
    run_sequential(engine, prompts_all[:1], GenerationConfig(max_tokens=4, ignore_eos=True))  # warm-up

    results: dict[str, Any] = {
        "model": info.name, "plan": engine.plan.describe(), "kv": engine.layout.describe(),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "host": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "sizes": {},
    }
    for b in sizes:
        prompts = prompts_all[:b]
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for m in modes:  # interleaved: A B C A B C ...
                runs[m].append(runners[m](engine, prompts, cfg))
        ref = runs["sequential"][0]["outputs"] if "sequential" in runs else None
        entry: dict[str, Any] = {}
        for m in modes:
            med_dec = statistics.median(r["decode_tps"] for r in runs[m] if r["decode_tps"])
            med_e2e = statistics.median(r["e2e_tps"] for r in runs[m])
            ratios_dec = ratios_e2e = None
            if "sequential" in runs:
                ratios_dec = [r["decode_tps"] / s["decode_tps"] for r, s in zip(runs[m], runs["sequential"])]
                ratios_e2e = [r["e2e_tps"] / s["e2e_tps"] for r, s in zip(runs[m], runs["sequential"])]
            all_steps = [x for r in runs[m] for x in r["step_s"]]
            min_step = min(all_steps) if all_steps else None
            med_step = statistics.median(all_steps) if all_steps else None
            entry[m] = {
                "decode_tps_median": med_dec, "e2e_tps_median": med_e2e,
                "step_ms_min": min_step * 1e3 if min_step else None,
                "step_ms_median": med_step * 1e3 if med_step else None,
                # least-contended estimate: rows per step / fastest step
                "decode_tps_from_min_step": b / min_step if (min_step and m != "sequential") else (
                    1 / min_step if min_step else None),
                "decode_tps_runs": [r["decode_tps"] for r in runs[m]],
                "decode_ratio_vs_sequential_median": statistics.median(ratios_dec) if ratios_dec else None,
                "e2e_ratio_vs_sequential_median": statistics.median(ratios_e2e) if ratios_e2e else None,
                "outputs_identical_to_sequential": (all(r["outputs"] == ref for r in runs[m]) if ref else None),
            }
        if "sequential" in entry and entry["sequential"]["decode_tps_from_min_step"]:
            base = entry["sequential"]["decode_tps_from_min_step"]
            for m in modes:
                v = entry[m]["decode_tps_from_min_step"]
                entry[m]["min_step_ratio_vs_sequential"] = v / base if v else None
        results["sizes"][str(b)] = entry
        for m in modes:
            e = entry[m]
            print(f"batch {b:>2} {m:<11} decode {e['decode_tps_median']:8.1f} tok/s  e2e {e['e2e_tps_median']:8.1f} tok/s"
                  f"  decode x{e['decode_ratio_vs_sequential_median']:.2f}  e2e x{e['e2e_ratio_vs_sequential_median']:.2f}"
                  f"  step min/median {e['step_ms_min']:.1f}/{e['step_ms_median']:.1f} ms"
                  f"  min-step x{e.get('min_step_ratio_vs_sequential') or float('nan'):.2f}"
                  f"  identical={e['outputs_identical_to_sequential']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
