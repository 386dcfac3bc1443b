"""The bench worker: a subprocess that holds one config's model and runs measured generations.

Started by :class:`inferos_cli.bench.grid.WorkerProcess` as ``python -m inferos_cli.bench.worker``.
Protocol: one JSON object per line on stdin, one reply per line on the (private) protocol stream:

- ``{"op": "load", "kind": "engine"|"ort-genai", "model": PATH, "profile": "a,b"|null, "threads": N|null,
  "config": PATH|null}`` -> ``{"ok": true, "providers": {...}, "kv_backend": str, "load_s", "rss_bytes"}``
- ``{"op": "run", "prompts": [[ids]...], "gen_tokens": N}`` -> ``{"ok": true, METRIC: value, ...}``
- ``{"op": "exit"}``

Anything a library prints goes to stderr (fd 1 is redirected there), never into the protocol stream.
Errors reply ``{"ok": false, "error": one line}``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import IO, Any

MiB = 2**20


# --------------------------------------------------------------------------------------------- memory
class PeakRSS:
    """Peak resident memory of this process over one run.

    Linux: reset the kernel's high-water mark (``/proc/self/clear_refs`` <- ``5``) before the run and read
    ``VmHWM`` after it: exact. Elsewhere: a 2 ms sampling thread plus a sample at every event.
    """

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.exact = self._can_reset()
        self.method = (
            "exact: Linux VmHWM reset via /proc/self/clear_refs before each run, read after it"
            if self.exact else "sampled: psutil RSS every 2 ms and at every event (may miss shorter spikes)"
        )
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _can_reset() -> bool:
        if not sys.platform.startswith("linux"):
            return False
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return _vm_hwm() is not None
        except OSError:
            return False

    def rss(self) -> int:
        """Current RSS in bytes."""
        return int(self._proc.memory_info().rss)

    def start(self) -> None:
        """Begin a measurement window."""
        self._peak = self.rss()
        if self.exact:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        """Take one sample now (called at every event in sampled mode)."""
        if not self.exact:
            self._peak = max(self._peak, self.rss())

    def stop(self) -> int:
        """End the window; the peak RSS in bytes."""
        if self.exact:
            hwm = _vm_hwm()
            return max(hwm or 0, self.rss())
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self._peak

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self.rss())


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# -------------------------------------------------------------------------------------------- engines
class EngineTarget:
    """An inferos engine config (baseline or any profile stack)."""

    def __init__(self, msg: dict[str, Any]) -> None:
        from pathlib import Path

        from inferos_cli.engine.engine import Engine

        self.engine = Engine.load(
            model=msg["model"], profile=msg.get("profile"), threads=msg.get("threads"),
            config=Path(msg["config"]) if msg.get("config") else None,
            strict_devices=bool(msg.get("strict_devices")),
        )

    def facts(self) -> dict[str, Any]:
        plan = getattr(self.engine, "plan", None)
        providers: dict[str, str] = {}
        if plan is not None:
            for phase in ("prefill", "decode"):
                ps = getattr(plan, phase, None)
                if ps is not None:
                    providers[phase] = ps.label() if hasattr(ps, "label") else str(ps)
        backend = getattr(self.engine, "kv_backend", None) or getattr(self.engine, "backend", None)
        describe = backend.describe() if backend is not None and hasattr(backend, "describe") else None
        return {"providers": providers, "kv_backend": describe}

    def run(self, prompts: list[list[int]], gen_tokens: int, rss: PeakRSS) -> dict[str, Any]:
        from inferos_cli.engine.engine import GenerationConfig

        cfg = GenerationConfig(max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
        batch = len(prompts)
        counts = [0] * batch
        t_first = t_last = None
        kv_best = None
        providers: dict[str, str] = {}
        t0 = time.perf_counter()
        events = self.engine.generate(prompts[0], cfg) if batch == 1 else self.engine.generate_batch(prompts, cfg)
        for ev in events:
            now = time.perf_counter()
            rss.sample()
            if ev.kind == "token":
                counts[ev.seq] += 1
                if t_first is None:
                    t_first = now
                t_last = now
            if ev.kv is not None and (kv_best is None or ev.kv.total_bytes >= kv_best.total_bytes):
                kv_best = ev.kv
            if ev.provider and not providers:
                providers = dict(ev.provider)
        t_end = time.perf_counter()
        return timing(t0, t_first, t_last, t_end, counts, sum(len(p) for p in prompts)) | {
            "kv_bytes": kv_best.total_bytes if kv_best is not None else None,
            "kv_ratio_vs_fp16": kv_best.ratio_vs_fp16 if kv_best is not None else None,
            "kv_tiers": dict(kv_best.bytes) if kv_best is not None else None,
            "providers": providers or self.facts()["providers"],
        }


class GenaiTarget:
    """The onnxruntime-genai peer running the same OGA folder."""

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

    def run(self, prompts: list[list[int]], gen_tokens: int, rss: PeakRSS) -> dict[str, Any]:
        import numpy as np

        og = self.og
        batch, seq = len(prompts), len(prompts[0])
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=seq + gen_tokens, min_length=seq + gen_tokens, batch_size=batch,
                                  do_sample=False)
        counts = [0] * batch
        t0 = time.perf_counter()
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray(prompts, dtype=np.int32))
        t_first = t_last = None
        while not gen.is_done():
            gen.generate_next_token()
            now = time.perf_counter()
            rss.sample()
            for row in range(batch):
                counts[row] += 1
            if t_first is None:
                t_first = now
            t_last = now
        t_end = time.perf_counter()
        del gen
        return timing(t0, t_first, t_last, t_end, counts, batch * seq) | {
            "kv_bytes": None, "kv_ratio_vs_fp16": None,
            "kv_note": "onnxruntime-genai does not expose its KV cache size",
            "providers": self.facts()["providers"],
        }


def timing(t0: float, t_first: float | None, t_last: float | None, t_end: float, counts: list[int],
           prompt_tokens: int) -> dict[str, Any]:
    """The bench's timing metrics from consumer-side timestamps (see inferos_cli/bench/grid.py)."""
    batch = len(counts)
    ttft = (t_first - t0) if t_first is not None else None
    decode_tokens = sum(counts) - batch
    span = (t_last - t_first) if (t_first is not None and t_last is not None) else 0.0
    return {
        "ttft_ms": ttft * 1e3 if ttft is not None else None,
        "prefill_tps": prompt_tokens / ttft if ttft else None,
        "decode_tps": decode_tokens / span if span > 0 and decode_tokens > 0 else None,
        "e2e_ms": (t_end - t0) * 1e3,
        "generated_per_row": counts,
    }


# ----------------------------------------------------------------------------------------------- main
def serve(inp: IO[str], out: IO[str]) -> None:
    """The request loop."""
    target: Any = None
    rss: PeakRSS | None = None

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
                rss = PeakRSS()
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
