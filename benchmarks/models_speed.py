"""Batch-1 decode tokens/s and TTFT of ONNX decoder folders, interleaved in one process.

Each round runs every folder once, in a rotating order (A B C, B C A, C A B, then reversed): greedy
generation of ``--tokens`` tokens after a short prompt, feeding the ``present`` outputs back as the next
``past`` (what any host loop does). Definitions as in ARCHITECTURE.md: TTFT = prompt handed over -> first
token chosen; decode tok/s = (n-1)/(t_last - t_first).
Reports medians over rounds and each folder's ratio to the first (the baseline). On a loaded machine wall
time mostly measures the scheduler, so the CPU time the process spent per decode step is reported too
(``time.process_time``; with ``--threads 1`` it is the single-core cost of a step).

    python benchmarks/models_speed.py BASELINE_FOLDER OTHER_FOLDER ... --rounds 5 --tokens 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

PROMPT = "Once upon a time, in a small village by the sea, there"


class Runner:
    """A session and a greedy host loop for one decoder folder."""

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime as ort

        from inferos_cli.models.info import inspect_folder

        self.info = inspect_folder(folder)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(self.info.onnx_path), opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def generate(self, ids: list[int], n: int) -> tuple[float, float, float, list[int]]:
        info = self.info
        past = {}
        for i in range(info.num_layers):
            for fmt in (info.past_key_fmt, info.past_value_fmt):
                past[fmt % i] = np.zeros((1, info.num_kv_heads, 0, info.head_dim), np.float32)
        cur, total, out, stamps, cpu = list(ids), 0, [], [], []
        start = time.perf_counter()
        for _ in range(n):
            feeds = {"input_ids": np.array([cur], np.int64), "attention_mask": np.ones((1, total + len(cur)), np.int64)}
            if info.has_position_ids:
                feeds["position_ids"] = np.arange(total, total + len(cur), dtype=np.int64)[None]
            res = dict(zip(self.outputs, self.sess.run(None, {**feeds, **past})))
            total += len(cur)
            for i in range(info.num_layers):
                past[info.past_key_fmt % i] = res[info.present_key_fmt % i]
                past[info.past_value_fmt % i] = res[info.present_value_fmt % i]
            cur = [int(res["logits"][0, -1].argmax())]
            out.append(cur[0])
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
        ttft = stamps[0] - start
        decode = (n - 1) / (stamps[-1] - stamps[0])
        cpu_ms = (cpu[-1] - cpu[0]) / (n - 1) * 1e3
        return ttft, decode, cpu_ms, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.folders[0] / "tokenizer.json"))
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    runners = [Runner(f, args.threads) for f in args.folders]
    for r in runners:  # warm-up (session arenas, prepacking)
        r.generate(ids, 4)
    stats: dict[int, dict[str, list[float]]] = {i: {"ttft": [], "decode": [], "cpu": []} for i in range(len(runners))}
    texts = {}
    for rnd in range(args.rounds):
        # rotate (and every other cycle reverse) the order: a fixed A B C order measured the first folder of
        # each round up to 6 % slower than the same graph placed later (position bias, not the graph)
        order = list(range(len(runners)))
        order = order[rnd % len(order):] + order[:rnd % len(order)]
        if (rnd // len(order)) % 2:
            order.reverse()
        for i in order:
            r = runners[i]
            ttft, decode, cpu_ms, out = r.generate(ids, args.tokens)
            stats[i]["ttft"].append(ttft)
            stats[i]["decode"].append(decode)
            stats[i]["cpu"].append(cpu_ms)
            texts[i] = tok.decode(out)
    base_ttft = statistics.median(stats[0]["ttft"])
    base_dec = statistics.median(stats[0]["decode"])
    base_cpu = statistics.median(stats[0]["cpu"])
    rows = []
    for i, r in enumerate(runners):
        ttft, dec = statistics.median(stats[i]["ttft"]), statistics.median(stats[i]["decode"])
        cpu_ms = statistics.median(stats[i]["cpu"])
        rows.append({"folder": str(r.info.path), "prompt_tokens": len(ids), "generated_tokens": args.tokens,
                     "ttft_ms_median": ttft * 1e3, "decode_tok_s_median": dec,
                     "decode_ratio_vs_first": dec / base_dec, "ttft_ratio_vs_first": ttft / base_ttft,
                     "decode_cpu_ms_per_token_median": cpu_ms, "cpu_ratio_vs_first": cpu_ms / base_cpu,
                     "decode_tok_s_all": stats[i]["decode"], "ttft_ms_all": [t * 1e3 for t in stats[i]["ttft"]],
                     "text": texts[i][:120]})
        print(f"{r.info.path.name:32s} TTFT {ttft * 1e3:7.1f} ms  decode {dec:6.1f} tok/s (x{dec / base_dec:.2f})  "
              f"CPU {cpu_ms:6.2f} ms/token (x{cpu_ms / base_cpu:.2f})  {texts[i][:40]!r}")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "threads": args.threads, "models": rows}, indent=2))


if __name__ == "__main__":
    main()
