"""The bench worker: a subprocess that holds one config's model and runs measured generations.

Started by :class:`inferos_cli.bench.runner.WorkerProcess` as ``python -m inferos_cli.bench.worker``.
Protocol: one JSON object per line on stdin, one reply per line on the (private) protocol stream:

- ``{"op": "load", "kind": "engine"|"ort-genai", "model": FOLDER, "settings": {"policy", "profiles"}|null,
  "threads": N|null, "strict_devices": bool}`` -> ``{"ok": true, "providers": {...}, "kv_backend": str,
  "load_s", "rss_bytes"}``; ``settings`` are the parent's resolved settings (never resolved here)
- ``{"op": "run", "prompts": [[ids]...], "gen_tokens": N}`` -> ``{"ok": true, METRIC: value, ...}``
- ``{"op": "exit"}``

Metrics are one fold of the run's events (:class:`inferos_cli.events.RunStats`) on this process's clock;
peak RSS is :class:`inferos_cli.machine.rss.PeakWindow` over the run. Anything a library prints goes to
stderr (fd 1 is redirected there), never into the protocol stream. Errors reply ``{"ok": false, "error":
one line}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any

from inferos_cli.events import Event, RunStats
from inferos_cli.machine.rss import PeakWindow

MiB = 2**20


def metrics(stats: RunStats, t_end: float, batch: int) -> dict[str, Any]:
    """The bench's timing metrics from a run's fold, all on the consumer's clock: TTFT, prefill tok/s
    (prompt tokens of every row / TTFT), decode tok/s aggregated over the rows, e2e = call -> iterator
    exhausted."""
    ttft = stats.measured_ttft_s
    return {
        "ttft_ms": ttft * 1e3 if ttft is not None else None,
        "prefill_tps": stats.measured_prefill_tps,
        "decode_tps": stats.aggregate_decode_tps,
        "e2e_ms": (t_end - stats.t0) * 1e3,
        "generated_per_row": [stats.generated_by_row.get(row, 0) for row in range(batch)],
    }


# -------------------------------------------------------------------------------------------- engines
class EngineTarget:
    """An inferos engine config (baseline or any profile stack), built from the parent's settings."""

    def __init__(self, msg: dict[str, Any]) -> None:
        from pathlib import Path

        from inferos_cli.settings import resolved_from_json
        from inferos_cli.engine.engine import Engine
        from inferos_cli.models.info import inspect_folder

        info = inspect_folder(Path(msg["model"]))
        self.engine = Engine(info, resolved_from_json(msg["settings"]), threads=msg.get("threads"),
                             strict_devices=bool(msg.get("strict_devices")))

    def facts(self) -> dict[str, Any]:
        return {"providers": self.engine.plan.providers(), "kv_backend": self.engine.layout.describe()}

    def run(self, prompts: list[list[int]], gen_tokens: int, rss: PeakWindow) -> dict[str, Any]:
        from inferos_cli.engine.sampling import GenerationConfig

        cfg = GenerationConfig(max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
        batch = len(prompts)
        stats = RunStats(t0=time.perf_counter())
        events = self.engine.generate(prompts[0], cfg) if batch == 1 else self.engine.generate_batch(prompts, cfg)
        for ev in events:
            now = time.perf_counter()
            rss.sample()
            stats.add(ev, now)
        kv = stats.kv_peak
        return metrics(stats, time.perf_counter(), batch) | {
            "kv_bytes": kv.total_bytes if kv is not None else None,
            "kv_ratio_vs_fp16": kv.ratio_vs_fp16 if kv is not None else None,
            "kv_tiers": dict(kv.bytes) if kv is not None else None,
            "providers": stats.providers or self.facts()["providers"],
        }


class GenaiTarget:
    """The onnxruntime-genai peer running the same OGA folder; its steps are folded as token events."""

    def __init__(self, msg: dict[str, Any]) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(msg["model"])
        if msg.get("threads"):
            overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": int(msg["threads"])}}}}
            config.overlay(json.dumps(overlay))
        self.model = og.Model(config)

    def facts(self) -> dict[str, Any]:
        device = getattr(self.model, "device_type", None) or "cpu"
        label = f"{str(device).lower()} (onnxruntime-genai)"
        return {"providers": {"prefill": label, "decode": label},
                "kv_backend": "onnxruntime-genai's own cache (past_present_share_buffer)"}

    def run(self, prompts: list[list[int]], gen_tokens: int, rss: PeakWindow) -> dict[str, Any]:
        import numpy as np

        og = self.og
        batch, seq = len(prompts), len(prompts[0])
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=seq + gen_tokens, min_length=seq + gen_tokens, batch_size=batch,
                                  do_sample=False)
        stats = RunStats(t0=time.perf_counter())
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray(prompts, dtype=np.int32))
        for row, prompt in enumerate(prompts):
            stats.add(Event("prefill", t=stats.t0, seq=row, prompt_tokens=len(prompt)))
        while not gen.is_done():
            gen.generate_next_token()
            now = time.perf_counter()
            rss.sample()
            for row in range(batch):
                stats.add(Event("token", t=now, seq=row), now)
        t_end = time.perf_counter()
        del gen
        return metrics(stats, t_end, batch) | {
            "kv_bytes": None, "kv_ratio_vs_fp16": None,
            "kv_note": "onnxruntime-genai does not expose its KV cache size",
            "providers": self.facts()["providers"],
        }


# ----------------------------------------------------------------------------------------------- main
def serve(inp: IO[str], out: IO[str]) -> None:
    """The request loop."""
    target: Any = None
    rss: PeakWindow | None = None

    def reply(data: dict[str, Any]) -> None:
        out.write(json.dumps(data) + "\n")
        out.flush()

    for line in inp:
        if not line.strip():
            continue
        msg = json.loads(line)
        op = msg.get("op")
        if op == "exit":
            break
        try:
            if op == "load":
                t0 = time.perf_counter()
                target = GenaiTarget(msg) if msg.get("kind") == "ort-genai" else EngineTarget(msg)
                rss = PeakWindow()
                reply({"ok": True, "load_s": round(time.perf_counter() - t0, 3), "rss_bytes": rss.rss(),
                       "rss_method": rss.method, **target.facts()})
            elif op == "run":
                if target is None or rss is None:
                    raise RuntimeError("run before load")
                rss.start()
                try:
                    data = target.run(msg["prompts"], int(msg["gen_tokens"]), rss)
                finally:
                    peak = rss.stop()
                data["peak_rss_mb"] = peak / MiB
                data["rss_method"] = rss.method
                reply({"ok": True, **data})
            else:
                raise RuntimeError(f"unknown op {op!r}")
        except Exception as exc:  # every failure becomes one line for the parent
            from inferos_cli.errors import InferosError, device_memory_error

            exc = device_memory_error(exc) or exc
            text = exc.one_line() if isinstance(exc, InferosError) else f"{type(exc).__name__}: {exc}"
            if os.environ.get("INFEROS_DEBUG"):
                import traceback

                traceback.print_exc()
            reply({"ok": False, "error": " ".join(text.split())[:500]})


def main() -> None:
    """Keep a private copy of stdout for the protocol and send everything else printed to stderr."""
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", newline="\n")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    serve(sys.stdin, proto)


if __name__ == "__main__":
    main()
