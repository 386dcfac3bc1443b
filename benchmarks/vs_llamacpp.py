"""inferos vs llama.cpp on the same GGUF: perplexity on the same token windows, and prefill / decode speed.

    python benchmarks/vs_llamacpp.py --gguf gemma-3-270m-q4_k_m.gguf --model gemma3-270m \\
        --ctx 512 --windows 8 --threads 1,2 --out benchmarks/results/gemma3-vs-llamacpp-DATE.json

- **Perplexity**: the text (default: the wikitext-2 test set inferos ships) is tokenized once with the converted
  model's tokenizer and cut into windows exactly as ``inferos eval`` does (BOS first when the model wants it); both
  runtimes score the same token ids at the same positions (``--prefix`` context tokens, then one next-token
  log-likelihood per position). inferos runs through the engine's teacher-forced loop
  (``quality/perplexity.py``) with each ``--kv`` config; llama.cpp through ``llama_cpp.Llama.eval`` with
  ``logits_all`` and its KV cache types f16 / q8_0 / q4_0 (flash attention on for quantized V).
- **Speed**: a ``--prompt-tokens`` prompt cut from the same text, then ``--gen-tokens`` greedy tokens; TTFT,
  prefill tok/s = prompt tokens / TTFT, decode tok/s = (tokens - 1) / (last - first token), peak RSS of the
  process. Every measurement runs in its own fresh subprocess, inferos and llama.cpp interleaved per repeat.

llama.cpp comes from ``llama-cpp-python`` (``pip install 'inferos[peers]'``), a benchmark-only peer. Figures are
only comparable within one run on one host: the JSON records the host and the llama.cpp build.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

LLAMA_KV = {"f16": 1, "q8_0": 8, "q4_0": 2}


# --------------------------------------------------------------------------------------------- children
def _windows(model: str, text: Path | None, ctx: int, prefix: int, windows: int) -> tuple[Any, list[list[int]]]:
    from inferos_cli.models.resolve import resolve_model
    from inferos_cli.models.tokenizer import Tokenizer
    from inferos_cli.quality.eval import make_windows
    from inferos_cli.quality.texts import default_text

    info = resolve_model(model, progress=False)
    tok = Tokenizer.from_model(info)
    raw = Path(text or default_text()).read_text(encoding="utf-8")
    ids = tok.encode(raw, add_bos=False)
    bos = info.bos_token_id if info.add_bos else None
    wins = make_windows(ids, ctx, prefix, None, bos)[:windows]
    return info, wins


def _peak_rss() -> int | None:
    from inferos_cli.machine.rss import process_peak_rss

    return process_peak_rss()


def child_ppl_inferos(a: dict) -> dict:
    from inferos_cli.engine.engine import Engine
    from inferos_cli.profiles import resolve_settings
    from inferos_cli.quality.perplexity import log_softmax, teacher_forced

    info, wins = _windows(a["model"], a.get("text"), a["ctx"], a["prefix"], a["windows"])
    profile = None if a["kv"] == "inferos" else a["kv"]  # "inferos": the model's default profile
    resolved = resolve_settings(profile, param_count=info.param_count, use_config=False)
    engine = Engine(info, resolved, threads=a["threads"])
    nll, n, t0 = 0.0, 0, time.perf_counter()
    for win in wins:
        for st in teacher_forced([engine], win, a["prefix"]):
            nll -= float(log_softmax(st.logits[0])[st.target])
            n += 1
    return {"ppl": float(np.exp(nll / n)), "tokens_scored": n, "seconds": time.perf_counter() - t0,
            "kv": engine.layout.describe(), "peak_rss_bytes": _peak_rss()}


def _llama(a: dict, kv: str, logits_all: bool) -> Any:
    import llama_cpp

    quant = kv != "f16"
    return llama_cpp.Llama(model_path=a["gguf"], n_ctx=a["ctx"], n_batch=min(a["ctx"], 512), logits_all=logits_all,
                           n_threads=a["threads"], n_threads_batch=a["threads"], type_k=LLAMA_KV[kv],
                           type_v=LLAMA_KV[kv], flash_attn=quant, verbose=False, seed=0)


def child_ppl_llamacpp(a: dict) -> dict:
    _, wins = _windows(a["model"], a.get("text"), a["ctx"], a["prefix"], a["windows"])
    llm = _llama(a, a["kv"], logits_all=True)
    nll, n, t0 = 0.0, 0, time.perf_counter()
    for win in wins:
        llm.reset()
        llm.eval(win)
        scores = np.asarray(llm.scores[: len(win)], dtype=np.float64)
        for i in range(a["prefix"], len(win)):
            row = scores[i - 1]
            m = row.max()
            nll -= float(row[win[i]] - m - np.log(np.exp(row - m).sum()))
            n += 1
    return {"ppl": float(np.exp(nll / n)), "tokens_scored": n, "seconds": time.perf_counter() - t0,
            "kv": f"llama.cpp {a['kv']}", "peak_rss_bytes": _peak_rss()}


def child_speed_inferos(a: dict) -> dict:
    from inferos_cli.engine.engine import Engine
    from inferos_cli.engine.sampling import GenerationConfig
    from inferos_cli.events import RunStats
    from inferos_cli.profiles import resolve_settings

    info, wins = _windows(a["model"], a.get("text"), a["prompt_tokens"] + 1, 1, 1)
    prompt = wins[0][: a["prompt_tokens"]]
    profile = None if a["kv"] == "inferos" else a["kv"]
    resolved = resolve_settings(profile, param_count=info.param_count, use_config=False)
    t_load = time.perf_counter()
    engine = Engine(info, resolved, threads=a["threads"])
    load_s = time.perf_counter() - t_load
    cfg = GenerationConfig(max_tokens=a["gen_tokens"], temperature=0.0, ignore_eos=True)
    list(engine.generate(prompt[:16], GenerationConfig(max_tokens=2, temperature=0.0, ignore_eos=True)))  # warm-up
    stats = RunStats(t0=time.perf_counter())
    for ev in engine.generate(prompt, cfg):
        stats.add(ev, time.perf_counter())
    return {"load_s": load_s, "ttft_s": stats.measured_ttft_s, "prefill_tps": stats.measured_prefill_tps,
            "decode_tps": stats.aggregate_decode_tps, "generated": stats.generated, "kv": engine.layout.describe(),
            "peak_rss_bytes": _peak_rss()}


def child_speed_llamacpp(a: dict) -> dict:
    _, wins = _windows(a["model"], a.get("text"), a["prompt_tokens"] + 1, 1, 1)
    prompt = wins[0][: a["prompt_tokens"]]
    a = dict(a, ctx=a["prompt_tokens"] + a["gen_tokens"] + 8)
    t_load = time.perf_counter()
    llm = _llama(a, a["kv"], logits_all=False)
    load_s = time.perf_counter() - t_load
    llm.eval(prompt[:16])  # warm-up, as for inferos
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    times, tok = [], None
    for _ in range(a["gen_tokens"]):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        times.append(time.perf_counter())
        llm.eval([tok])
    ttft = times[0] - t0
    span = times[-1] - times[0]
    return {"load_s": load_s, "ttft_s": ttft, "prefill_tps": len(prompt) / ttft,
            "decode_tps": (len(times) - 1) / span if span > 0 else None, "generated": len(times),
            "kv": f"llama.cpp {a['kv']}", "peak_rss_bytes": _peak_rss()}


CHILDREN = {"ppl-inferos": child_ppl_inferos, "ppl-llamacpp": child_ppl_llamacpp,
            "speed-inferos": child_speed_inferos, "speed-llamacpp": child_speed_llamacpp}


# ------------------------------------------------------------------------------------------------ parent
def run_child(kind: str, args: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind], input=json.dumps(args), text=True,
                          capture_output=True, timeout=7200)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def host() -> dict:
    import onnxruntime

    from inferos_cli.machine.host import cpu_model

    facts = {"cpu": cpu_model(), "python": platform.python_version(), "platform": platform.platform(),
             "onnxruntime": onnxruntime.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import llama_cpp

        facts["llama_cpp_python"] = llama_cpp.__version__
        facts["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        facts["llama_cpp_python"] = f"unavailable: {exc}"
    return facts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--model", help="the inferos model (alias, converted folder, or the GGUF itself)")
    ap.add_argument("--text", type=Path)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--prefix", type=int, default=64)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--kv", default="baseline,int8-fused,int8,int4", help="inferos KV configs for perplexity")
    ap.add_argument("--llama-kv", default="f16,q8_0,q4_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list: ppl, speed")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](json.loads(sys.stdin.read()))))
        return 0
    base = {"gguf": str(a.gguf), "model": a.model or str(a.gguf), "text": str(a.text) if a.text else None,
            "ctx": a.ctx, "prefix": a.prefix, "windows": a.windows}
    threads = [int(t) for t in a.threads.split(",")]
    out: dict[str, Any] = {"host": host(), "args": vars(a) | {"gguf": str(a.gguf), "text": base["text"],
                                                               "out": str(a.out)}}
    skip = set(a.skip.split(","))
    if "ppl" not in skip:
        ppl: dict[str, Any] = {}
        for kv in a.kv.split(","):
            ppl[f"inferos {kv}"] = run_child("ppl-inferos", base | {"kv": kv, "threads": max(threads)})
            print("ppl", kv, ppl[f"inferos {kv}"], file=sys.stderr)
        for kv in a.llama_kv.split(","):
            ppl[f"llama.cpp {kv}"] = run_child("ppl-llamacpp", base | {"kv": kv, "threads": max(threads)})
            print("ppl", kv, ppl[f"llama.cpp {kv}"], file=sys.stderr)
        ref = ppl.get("llama.cpp f16", {}).get("ppl")
        for rec in ppl.values():
            if ref and rec.get("ppl"):
                rec["vs_llamacpp_f16"] = rec["ppl"] / ref - 1.0
        out["perplexity"] = ppl
    if "speed" not in skip:
        speed: dict[str, list[dict]] = {}
        sargs = base | {"prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens}
        for t in threads:
            for _ in range(a.repeats):  # interleaved: inferos, llama.cpp, inferos, llama.cpp ...
                for name, kind, kv in (("inferos", "speed-inferos", None), ("llama.cpp f16", "speed-llamacpp", "f16")):
                    rec = run_child(kind, sargs | {"threads": t, "kv": kv or "inferos"})
                    speed.setdefault(f"{name} t{t}", []).append(rec)
                    print("speed", name, t, rec, file=sys.stderr)
        summary = {}
        for key, recs in speed.items():
            ok = [r for r in recs if "error" not in r]
            summary[key] = {m: statistics.median([r[m] for r in ok if r.get(m) is not None]) if ok else None
                            for m in ("ttft_s", "prefill_tps", "decode_tps", "load_s", "peak_rss_bytes")}
            summary[key]["runs"] = recs
        for t in threads:
            me, peer = summary.get(f"inferos t{t}"), summary.get(f"llama.cpp f16 t{t}")
            if me and peer:
                for m in ("prefill_tps", "decode_tps"):
                    if me.get(m) and peer.get(m):
                        me[f"{m}_vs_llamacpp"] = me[m] / peer[m]
                if me.get("ttft_s") and peer.get("ttft_s"):
                    me["ttft_vs_llamacpp"] = me["ttft_s"] / peer["ttft_s"]
        out["speed"] = summary
    text = json.dumps(out, indent=2)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
