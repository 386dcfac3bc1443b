"""Peer worker for benchmarks/engine_vs_ortgenai.py: runs onnxruntime-genai (a peer, not a dependency of
inferos) in its own interpreter. Protocol: one JSON request per stdin line, one JSON answer per stdout line.

Request: {"ids": [...], "new_tokens": N}. Answer: {"ttft_s", "ttft_cpu_s", "decode_tps", "decode_cpu_ms_per_token",
"generated", "tokens"}, timed
with the same definitions as inferos (TTFT: prompt handed over -> first token available; decode tok/s =
(generated - 1) / (t_last - t_first)).
"""

from __future__ import annotations

import json
import sys
import time

import onnxruntime_genai as og


def main(folder: str) -> None:
    model = og.Model(folder)
    print(json.dumps({"ready": True, "version": getattr(og, "__version__", "?")}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        ids, n = req["ids"], int(req["new_tokens"])
        params = og.GeneratorParams(model)
        total = len(ids) + n
        # min_length keeps EOS away so both engines generate exactly n tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=1)
        t0 = time.perf_counter()
        c0 = time.process_time()
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()
        first = int(gen.get_next_tokens()[0])
        t_first = time.perf_counter()
        c_first = time.process_time()
        tokens = [first]
        t_last = t_first
        while len(tokens) < n and not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            t_last = time.perf_counter()
        c_last = time.process_time()
        dec = (len(tokens) - 1) / (t_last - t_first) if len(tokens) > 1 and t_last > t_first else None
        cpu_ms = 1000 * (c_last - c_first) / (len(tokens) - 1) if len(tokens) > 1 else None
        print(json.dumps({"ttft_s": t_first - t0, "ttft_cpu_s": c_first - c0, "decode_tps": dec, "decode_cpu_ms_per_token": cpu_ms,
                          "generated": len(tokens), "tokens": tokens}), flush=True)
        del gen


if __name__ == "__main__":
    main(sys.argv[1])
