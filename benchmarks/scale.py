"""7B-class benchmark: inferos against llama.cpp on GGUFs with real 7B/8B shapes (issue 15, item 3).

For each model and quant: write a GGUF with the model's exact shapes and random blocks (``shapes7b.py``),
convert it with ``inferos pull FILE`` (wall time and the child's exact peak RSS), then measure, interleaved
(per repeat and cell: inferos, then llama.cpp):

- load time and RSS after load vs weight bytes;
- TTFT and prefill tok/s at a short and a long prompt (128 and 2,048 tokens);
- decode tok/s at each ``--threads`` count;
- the KV configs (inferos: ``baseline``, the default, ``int4`` and ``int4-small``, an fp16 cache when a preset offers one;
  llama.cpp: f16, q8_0, q4_0) with ``--ctx`` tokens of context: KV bytes, peak RSS, decode tok/s.

inferos is measured through ``inferos bench --format json`` only (one fresh worker per config and cell);
llama.cpp through ``llama-cpp-python`` (the ``peers`` extra) in one subprocess per config. Writes one JSON
and prints markdown tables with the ratios inferos / llama.cpp of the same run.

    python benchmarks/scale.py --models llama2-7b --quant q4_0 --llama-cpp \\
        --out benchmarks/results/scale-$(date +%F).json
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import plot_scale
import shapes7b

GGML_TYPE = {"f16": 1, "q4_0": 2, "q8_0": 8}  # ggml_type ids for type_k / type_v
KV_ELEM_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # bytes per K or V element in llama.cpp's cache
INT4_CONFIGS = ("int4", "int4-small")  # the segmented int4 presets: group 32 / window 64, group 64 / window 32
GIB = 2 ** 30
UNITS = {"_s": "s", "_ms": "ms", "_tps": "tok/s", "_bytes": "B", "_x": "ratio"}


# ---------------------------------------------------------------------------------------------- children
def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; its stdout, stderr tail, exit code, wall time and exact peak RSS (``os.wait4``'s
    ``ru_maxrss`` of that child, the kernel's high-water mark of its whole life)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    return {"rc": proc.returncode, "stdout": out.decode(errors="replace"), "stderr_tail": tail,
            "wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)}


def child_failure(res: dict, what: str) -> str:
    """A one-line reason for a failed child."""
    rc = res["rc"]
    how = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
    last = [ln for ln in res["stderr_tail"].splitlines() if ln.strip()][-3:]
    return f"{what}: {how}" + (f" ({' | '.join(last)})" if last else "")


def inferos_cmd(*args: str) -> list[str]:
    exe = shutil.which("inferos", path=str(Path(sys.executable).parent)) or shutil.which("inferos")
    return [exe, *args] if exe else [sys.executable, "-m", "inferos_cli", *args]


# ---------------------------------------------------------------------------------------------- host
def host_facts(llama_info: dict) -> dict:
    cpu = platform.processor() or ""
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), cpu)
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    import psutil

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    facts = {"cpu": cpu, "cores_physical": psutil.cpu_count(logical=False), "cores_logical": psutil.cpu_count(),
             "ram_bytes": psutil.virtual_memory().total, "os": platform.platform(), "python": platform.python_version(),
             "onnxruntime": version("onnxruntime"), "inferos": version("inferos"), "git": git_commit(),
             "cpu_avx512": " avx512f" in flags, "cpu_avx2": " avx2" in flags,
             "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
             "inferos_env": {k: v for k, v in os.environ.items() if k.startswith("INFEROS_")}}
    facts["llama_cpp"] = llama_info
    return facts


def git_commit() -> str | None:
    """The checkout's commit, with ``+dirty`` when files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return None
    return (head + ("+dirty" if dirty else "")) or None


def llama_build(system_info: str, cpu_avx512: bool) -> str:
    """native vs AVX2 build, read from ggml's system info against the CPU's own flags."""
    lib512 = "AVX512 = 1" in system_info
    if cpu_avx512:
        return "native or AVX-512 enabled" if lib512 else "AVX2 (GGML_NATIVE=OFF, no AVX-512)"
    return "AVX2 (this CPU has no AVX-512, so native and AVX2 builds look alike)"


# ---------------------------------------------------------------------------------------------- llama.cpp worker
def llama_worker(spec: dict) -> dict:
    """In a subprocess: load the GGUF in llama.cpp, time prompts of exact token counts (greedy) and report."""
    import llama_cpp

    from inferos_cli.machine.rss import PeakWindow, current_rss

    if spec.get("info"):
        return {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode(),
                "python": sys.executable}
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(spec["gguf"], n_ctx=spec["n_ctx"], n_batch=512, n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], type_k=GGML_TYPE[spec["kv"]],
                          type_v=GGML_TYPE[spec["kv"]], flash_attn=True, verbose=False)
    out = {"load_s": time.perf_counter() - t0, "rss_after_load_bytes": current_rss(), "runs": {}}
    text = Path(spec["text"]).read_text(encoding="utf-8", errors="replace")
    need = max(spec["seqs"])
    ids: list[int] = []
    for start in range(0, len(text), 200_000):
        ids += llm.tokenize(text[start:start + 200_000].encode(), add_bos=False, special=False)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"{spec['text']} has only {len(ids)} tokens, {need} needed")
    for seq in spec["seqs"]:
        for i in range(spec["warmup"] + 1):
            llm.reset()
            window = PeakWindow()
            window.start()
            t = time.perf_counter()
            llm.eval(ids[:seq])
            tok = llm.sample(temp=0.0)
            times = [time.perf_counter()]
            for _ in range(spec["gen"] - 1):
                llm.eval([tok])
                tok = llm.sample(temp=0.0)
                times.append(time.perf_counter())
            peak = window.stop()
        ttft = times[0] - t
        out["runs"][str(seq)] = {"ttft_ms": ttft * 1e3, "prefill_tps": seq / ttft,
                                 "decode_tps": (len(times) - 1) / (times[-1] - times[0]),
                                 "e2e_ms": (times[-1] - t) * 1e3, "peak_rss_bytes": peak,
                                 "rss_method": window.method}
    return out


def llama_child(python: str, spec: str) -> dict:
    """Run the llama.cpp worker under ``python`` (another venv can hold another llama.cpp build); the worker
    needs only this checkout's ``inferos_cli.machine.rss`` (stdlib-only), put on its path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    return run_child([python, str(Path(__file__).resolve()), "--llama-worker", spec], env=env)


def run_llama(gguf: Path, kv: str, seqs: list[int], args, threads: int, text: str, shape) -> dict:
    """One llama.cpp config in its own subprocess; a result per prompt length, or a reason."""
    spec = {"gguf": str(gguf), "n_ctx": args.ctx, "threads": threads, "kv": kv, "seqs": seqs, "gen": args.gen_tokens,
            "text": text, "warmup": args.warmup}
    res = llama_child(args.llama_python, json.dumps(spec))
    if res["rc"] != 0:
        return {"reason": child_failure(res, f"llama.cpp kv {kv}")}
    body = json.loads(res["stdout"].strip().splitlines()[-1])
    d = shape.hidden // shape.heads
    body["kv_bytes"] = int(args.ctx * shape.layers * shape.kv_heads * d * 2 * KV_ELEM_BYTES[kv])
    body["process_peak_rss_bytes"] = res["peak_rss_bytes"]
    return body


# ---------------------------------------------------------------------------------------------- inferos
def run_bench(model_dir: str, configs: list[str], seqs: list[int], threads: int, args, env: dict,
              out: Path) -> dict:
    """One ``inferos bench`` call; {(config, seq): row} or {"reason": ...}."""
    cmd = inferos_cmd("bench", "--model", model_dir, "--compare", ",".join(configs), "--batch-sizes", "1",
                      "--seq-lengths", ",".join(map(str, seqs)), "--gen-tokens", str(args.gen_tokens),
                      "--repeats", "1", "--warmup", str(args.warmup), "--threads", str(threads),
                      "--format", "json", "--output", str(out))
    if args.text:
        cmd += ["--text", args.text]
    res = run_child(cmd, env=env)
    if res["rc"] != 0 or not out.is_file():
        return {"reason": child_failure(res, "inferos bench")}
    data = json.loads(out.read_text())
    rows = {}
    for row in data["rows"]:
        m = {k: (v or {}).get("mean") for k, v in row["metrics"].items()}
        rows[(row["config"], row["seq"])] = {
            "status": row["status"], "reason": row["reason"], "ttft_ms": m.get("ttft_ms"),
            "prefill_tps": m.get("prefill_tps"), "decode_tps": m.get("decode_tps"), "e2e_ms": m.get("e2e_ms"),
            "peak_rss_bytes": m["peak_rss_mb"] * 2 ** 20 if m.get("peak_rss_mb") is not None else None,
            "kv_bytes": m.get("kv_bytes"), "kv_ratio_vs_fp16_x": m.get("kv_ratio_vs_fp16"),
            "load_s": row.get("load_s"),
            "rss_after_load_bytes": row["rss_after_load_mb"] * 2 ** 20 if row.get("rss_after_load_mb") else None,
            "kv_backend": row.get("kv_backend"), "providers": row.get("providers")}
    return {"rows": rows, "text": data.get("text"), "rss_method": data.get("rss_method"),
            "skipped": data.get("skipped")}


def fp16_preset(env: dict) -> str | None:
    """The name of a KV fp16 preset in ``inferos profiles list``, or None."""
    res = run_child(inferos_cmd("profiles", "list"), env=env)
    for line in res["stdout"].splitlines():
        name = line.split("\t", 1)[0].strip()
        if re.search(r"(^|-)f(p)?16($|-)", name):
            return name
    return None


# ---------------------------------------------------------------------------------------------- aggregation
def mean_of(samples: list[dict]) -> dict:
    """Mean of every numeric key over repeats (non-numeric keys from the first); reasons kept."""
    ok = [s for s in samples if "reason" not in s or s.get("status") == "ok"]
    if not ok:
        return {"reason": samples[0].get("reason") if samples else "not measured"}
    out = dict(ok[0])
    for key, val in ok[0].items():
        vals = [s.get(key) for s in ok if isinstance(s.get(key), (int, float)) and not isinstance(s.get(key), bool)]
        if isinstance(val, (int, float)) and not isinstance(val, bool) and vals:
            out[key] = sum(vals) / len(vals)
    out["repeats"] = len(ok)
    return out


def ratio(a, b) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def pick(entry: dict, keys: list[str]) -> dict:
    """Selected metrics of one engine's entry; None for each plus the reason when it was not measured."""
    if "reason" in entry and entry.get("status") != "ok":
        return {**{k: None for k in keys}, "reason": entry["reason"]}
    return {k: entry.get(k) for k in keys}


# ---------------------------------------------------------------------------------------------- one model
def measure_model(name: str, quant: str, args, tok_gguf: Path, env: dict, llama_reason: str | None) -> dict:
    shape = shapes7b.SHAPES[name]
    work = Path(args.work)
    gguf = work / f"{name}-{quant}.gguf"
    result: dict = {"model": name, "quant": quant, "shape": shape.__dict__}
    t0 = time.perf_counter()
    facts = shapes7b.write(name, gguf, quant=quant, tokenizer_gguf=tok_gguf, progress=not args.quick)
    facts["write_s"] = time.perf_counter() - t0
    result["gguf"] = facts
    weight_bytes = facts["tensor_bytes"]
    bound = GIB + facts["largest_tensor_bytes"]
    conv = run_child(inferos_cmd("pull", str(gguf), "--format", "json", "--force"), env=env)
    result["convert"] = {"wall_s": conv["wall_s"], "peak_rss_bytes": conv["peak_rss_bytes"],
                         "bound_bytes": bound, "within_bound": conv["peak_rss_bytes"] <= bound,
                         "rss_method": "exact: os.wait4 ru_maxrss of the `inferos pull` child"}
    if conv["rc"] != 0:
        result["convert"] = {"wall_s": None, "peak_rss_bytes": None, "reason": child_failure(conv, "inferos pull")}
        if not args.keep:
            gguf.unlink(missing_ok=True)
        return result
    pulled = json.loads(conv["stdout"])
    result["convert"]["size_bytes"] = pulled.get("size_bytes")
    model_dir = pulled["path"]

    t_hi = max(args.threads)
    short, long_ = args.seqs
    kv_seq = args.ctx - args.gen_tokens
    kv_configs = ["baseline", "inferos", *INT4_CONFIGS]
    kv_skipped = []
    fp16 = fp16_preset(env)
    if fp16:
        kv_configs.append(fp16)
    else:
        kv_skipped.append({"config": "fp16", "reason": "no fp16 KV preset in `inferos profiles list`"})
    # cells: (label, inferos configs, llama kv types, prompt lengths, threads)
    cells = [("prompt", ["inferos"], ["f16"], [short, long_], t_hi)]
    cells += [(f"decode-t{t}", ["inferos"], ["f16"], [short], t) for t in args.threads if t != t_hi]
    cells.append(("kv", kv_configs, ["f16", "q8_0", "q4_0"], [kv_seq], t_hi))
    cells = [c for c in cells if c[0].split("-")[0] in args.cells]
    samples: dict = {}
    text = args.text
    for rep in range(args.repeats):
        for label, configs, kvs, seqs, threads in cells:
            out = work / f"bench-{name}-{quant}-{label}-r{rep}.json"
            print(f"scale: {name} {quant} repeat {rep} {label}: inferos {','.join(configs)}; llama.cpp "
                  f"{','.join(kvs)}; prompts {seqs}, {threads} threads", file=sys.stderr, flush=True)
            bench = run_bench(model_dir, configs, seqs, threads, args, env, out)
            text = text or bench.get("text")
            for cfg in configs:
                for seq in seqs:
                    row = bench.get("rows", {}).get((cfg, seq)) or {"reason": bench.get("reason", "no row")}
                    samples.setdefault(("inferos", cfg, seq, threads), []).append(row)
            for kv in kvs:
                if llama_reason or not text:
                    body = {"reason": llama_reason or "no prompt text (pass --text)"}
                else:
                    body = run_llama(gguf, kv, seqs, args, threads, text, shape)
                for seq in seqs:
                    run = body.get("runs", {}).get(str(seq))
                    row = {**run, "load_s": body["load_s"], "rss_after_load_bytes": body["rss_after_load_bytes"],
                           "kv_bytes": body["kv_bytes"], "process_peak_rss_bytes": body["process_peak_rss_bytes"],
                           "status": "ok"} if run else {"reason": body.get("reason", "no run")}
                    samples.setdefault(("llama.cpp", kv, seq, threads), []).append(row)
    agg = {key: mean_of(vals) for key, vals in samples.items()}

    def get(engine, cfg, seq, threads):
        return agg.get((engine, cfg, seq, threads), {"reason": "not measured"})

    ino, lla = get("inferos", "inferos", short, t_hi), get("llama.cpp", "f16", short, t_hi)
    load = {}
    for eng, e in (("inferos", ino), ("llama.cpp", lla)):
        load[eng] = pick(e, ["load_s", "rss_after_load_bytes"])
        load[eng]["rss_after_load_per_weight_x"] = ratio(load[eng]["rss_after_load_bytes"], weight_bytes)
    load["weight_bytes"] = weight_bytes
    result["load"] = load
    keys_p = ["ttft_ms", "prefill_tps", "peak_rss_bytes"]
    result["prefill"] = []
    for seq in (short, long_):
        a, b = pick(get("inferos", "inferos", seq, t_hi), keys_p), pick(get("llama.cpp", "f16", seq, t_hi), keys_p)
        result["prefill"].append({"seq": seq, "threads": t_hi, "inferos": a, "llama.cpp": b,
                                  "ratio_x": {k: ratio(a[k], b[k]) for k in keys_p}})
    result["decode"] = []
    for t in args.threads:
        a = pick(get("inferos", "inferos", short, t), ["decode_tps"])
        b = pick(get("llama.cpp", "f16", short, t), ["decode_tps"])
        result["decode"].append({"seq": short, "threads": t, "inferos": a, "llama.cpp": b,
                                 "ratio_x": {"decode_tps": ratio(a["decode_tps"], b["decode_tps"])}})
    keys_kv = ["kv_bytes", "peak_rss_bytes", "decode_tps"]
    rows = [{"engine": "inferos", "config": c, **pick(get("inferos", c, kv_seq, t_hi), keys_kv + ["kv_backend"])}
            for c in kv_configs]
    rows += [{"engine": "llama.cpp", "config": kv,
              **pick(get("llama.cpp", kv, kv_seq, t_hi), keys_kv + ["process_peak_rss_bytes"])}
             for kv in ("f16", "q8_0", "q4_0")]
    f16 = rows[len(kv_configs)]
    for r in rows:
        r["vs_llama_f16_x"] = {k: ratio(r[k], f16[k]) for k in keys_kv}
    result["kv"] = {"ctx": args.ctx, "prompt_tokens": kv_seq, "threads": t_hi, "configs": rows, "skipped": kv_skipped}
    result["goals"] = goals(result, weight_bytes)
    if not args.keep:
        gguf.unlink(missing_ok=True)
        shutil.rmtree(model_dir, ignore_errors=True)
    return result


def goals(r: dict, weight_bytes: int) -> list[dict]:
    """Issue 15's goals, each with its values and whether it holds (None when a value is missing)."""
    kv = {(c["engine"], c["config"]): c for c in r["kv"]["configs"]}
    d, base = kv.get(("inferos", "inferos"), {}), kv.get(("inferos", "baseline"), {})
    l16, l8 = kv.get(("llama.cpp", "f16"), {}), kv.get(("llama.cpp", "q8_0"), {})
    dec = next((x for x in r["decode"] if x["threads"] == 2), r["decode"][-1])
    pre = r["prefill"]

    def check(f, *vals):
        return None if any(v is None for v in vals) else bool(f(*vals))

    fp16_kv = l16.get("kv_bytes")
    out = [
        ("run peak RSS <= 1.15 x weights + KV + 0.4 GB", check(lambda p, k: p <= 1.15 * weight_bytes + k + 0.4e9,
                                                               d.get("peak_rss_bytes"), d.get("kv_bytes"))),
        ("run peak RSS below llama.cpp f16 (same file, context)",
         check(lambda a, b: a < b, d.get("peak_rss_bytes"), l16.get("peak_rss_bytes"))),
        ("pull peak RSS <= 1 GiB + largest tensor", r["convert"].get("within_bound")),
        (f"decode >= 1.2 x llama.cpp f16 at {dec['threads']} threads",
         check(lambda x: x >= 1.2, dec["ratio_x"]["decode_tps"])),
        ("prefill >= 1.5 x llama.cpp at the short and long prompt",
         check(lambda a, b: a >= 1.5 and b >= 1.5, pre[0]["ratio_x"]["prefill_tps"], pre[1]["ratio_x"]["prefill_tps"])),
        ("TTFT <= llama.cpp at the short and long prompt",
         check(lambda a, b: a <= 1 and b <= 1, pre[0]["ratio_x"]["ttft_ms"], pre[1]["ratio_x"]["ttft_ms"])),
        ("default KV <= 0.5 x fp16", check(lambda a, b: a <= 0.5 * b, d.get("kv_bytes"), fp16_kv)),
        ("default peak RSS below llama.cpp q8_0", check(lambda a, b: a < b, d.get("peak_rss_bytes"), l8.get("peak_rss_bytes"))),
    ]
    for name in INT4_CONFIGS:
        i4 = kv.get(("inferos", name), {})
        out += [(f"{name} KV <= 0.3 x fp16", check(lambda a, b: a <= 0.3 * b, i4.get("kv_bytes"), fp16_kv)),
                (f"{name} peak RSS saving >= 0.7 x its KV saving vs baseline",
                 check(lambda bp, ip, bk, ik: bp - ip >= 0.7 * (bk - ik), base.get("peak_rss_bytes"),
                       i4.get("peak_rss_bytes"), base.get("kv_bytes"), i4.get("kv_bytes")))]
    return [{"goal": g, "holds": h} for g, h in out]


# ---------------------------------------------------------------------------------------------- report
def fmt(v, unit: str = "") -> str:
    if v is None:
        return "—"
    if unit == "GiB":
        return f"{v / GIB:.2f}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(res: dict) -> str:
    lines = []
    for m in res["models"]:
        lines += [f"\n### {m['model']} {m['quant']} (weights {fmt(m['gguf']['tensor_bytes'], 'GiB')} GiB)\n",
                  "| what | unit | inferos | llama.cpp | inferos / llama.cpp |", "|---|---|---:|---:|---:|"]
        c = m["convert"]
        lines.append(f"| convert wall / peak RSS | s / GiB | {fmt(c.get('wall_s'))} / {fmt(c.get('peak_rss_bytes'), 'GiB')}"
                     f" | (none) | |")
        if "load" not in m:
            lines.append(f"| (not measured) | | {c.get('reason', '')} | | |")
            continue
        a, b = m["load"]["inferos"], m["load"]["llama.cpp"]
        lines.append(f"| load | s | {fmt(a['load_s'])} | {fmt(b['load_s'])} | {fmt(ratio(a['load_s'], b['load_s']))} |")
        lines.append(f"| RSS after load | GiB | {fmt(a['rss_after_load_bytes'], 'GiB')} | "
                     f"{fmt(b['rss_after_load_bytes'], 'GiB')} | "
                     f"{fmt(ratio(a['rss_after_load_bytes'], b['rss_after_load_bytes']))} |")
        for p in m["prefill"]:
            for k, unit in (("ttft_ms", "ms"), ("prefill_tps", "tok/s")):
                lines.append(f"| {k.split('_')[0]} @{p['seq']} tok, {p['threads']} thr | {unit} | "
                             f"{fmt(p['inferos'][k])} | {fmt(p['llama.cpp'][k])} | {fmt(p['ratio_x'][k])} |")
        for d in m["decode"]:
            lines.append(f"| decode @{d['threads']} thr | tok/s | {fmt(d['inferos']['decode_tps'])} | "
                         f"{fmt(d['llama.cpp']['decode_tps'])} | {fmt(d['ratio_x']['decode_tps'])} |")
        kv = m["kv"]
        lines += [f"\nKV at {kv['ctx']} tokens of context ({kv['threads']} threads); x = ratio to llama.cpp f16\n",
                  "| engine | config | KV MiB | x | peak RSS GiB | x | decode tok/s | x |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in kv["configs"]:
            x = r["vs_llama_f16_x"]
            lines.append(f"| {r['engine']} | {r['config']} | {fmt(r['kv_bytes'] and r['kv_bytes'] / 2 ** 20)} | "
                         f"{fmt(x['kv_bytes'])} | {fmt(r['peak_rss_bytes'], 'GiB')} | {fmt(x['peak_rss_bytes'])} | "
                         f"{fmt(r['decode_tps'])} | {fmt(x['decode_tps'])} |")
        lines += [f"| (skipped) | {s['config']} | {s['reason']} | | | | | |" for s in kv["skipped"]]
        lines += ["\n| goal | holds |", "|---|---|"] + [f"| {g['goal']} | {g['holds']} |" for g in m["goals"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def tokenizer_gguf() -> Path:
    """SmolLM2's GGUF (its vocabulary is reused): ``inferos pull smollm2-135m``, then the downloads folder."""
    res = run_child(inferos_cmd("pull", "smollm2-135m", "--format", "json"))
    from inferos_cli.models.registry import downloads_dir

    found = sorted((downloads_dir() / "smollm2-135m").glob("*.gguf"))
    if not found:
        raise SystemExit(child_failure(res, "cannot fetch the SmolLM2 GGUF (inferos pull smollm2-135m)"))
    return found[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama2-7b", help=f"comma list of {', '.join(shapes7b.SHAPES)}")
    ap.add_argument("--quant", default="q4_0", help="comma list of q4_0, q4_k_m")
    ap.add_argument("--work", help="folder for the GGUFs, converted models and raw bench JSONs (default: a temp folder)")
    ap.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results/scale-<date>.json)")
    ap.add_argument("--llama-cpp", action="store_true", help="also measure llama.cpp (llama-cpp-python, the peers extra)")
    ap.add_argument("--llama-python", default=sys.executable,
                    help="Python whose llama_cpp to measure (e.g. a venv holding an AVX2 build; default: this one)")
    ap.add_argument("--ctx", type=int, default=4096, help="context of the KV configs, and llama.cpp's n_ctx")
    ap.add_argument("--threads", default="1,2", help="comma list of thread counts for decode")
    ap.add_argument("--seq-lengths", default="128,2048", help="short and long prompt for TTFT / prefill")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats (inferos, llama.cpp, ...)")
    ap.add_argument("--warmup", type=int, default=0, help="discarded runs per config and cell, both engines")
    ap.add_argument("--text", help="prompt text (default: inferos bench's, wikitext-2)")
    ap.add_argument("--tokenizer-gguf", type=Path, help="GGUF whose vocabulary to reuse (default: SmolLM2's, pulled)")
    ap.add_argument("--keep", action="store_true", help="keep the GGUFs and converted models")
    ap.add_argument("--quick", action="store_true", help="smoke run: 32/64-token prompts, 256 context, 4 tokens, 1 thread")
    ap.add_argument("--plot", type=Path, help="also write a PNG: ratios to llama.cpp, and KV bytes and peak RSS per config (plot_scale.py)")
    ap.add_argument("--cells", default="prompt,decode,kv",
                    help="comma list of what to measure: prompt (TTFT, prefill, load), decode (other thread counts), "
                         "kv (the KV configs at --ctx); cells left out are reported as not measured")
    args = ap.parse_args(argv)
    args.models = args.models.split(",")
    args.quant = args.quant.split(",")
    args.threads = [int(t) for t in args.threads.split(",")]
    args.seqs = [int(s) for s in args.seq_lengths.split(",")]
    args.cells = args.cells.split(",")
    if args.quick:
        args.seqs, args.ctx, args.gen_tokens, args.threads = [32, 64], min(args.ctx, 256), 4, [min(args.threads)]
    if len(args.seqs) != 2 or args.ctx <= args.gen_tokens or max(args.seqs) + args.gen_tokens > args.ctx:
        ap.error("--seq-lengths takes a short and a long prompt, both + --gen-tokens within --ctx")
    bad = [c for c in args.cells if c not in ("prompt", "decode", "kv")]
    bad += [m for m in args.models if m not in shapes7b.SHAPES] + [q for q in args.quant if q not in ("q4_0", "q4_k_m")]
    if bad:
        ap.error(f"unknown: {', '.join(bad)}")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--llama-worker":
        print(json.dumps(llama_worker(json.loads(sys.argv[2]))))
        return 0
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    out = args.out or HERE / "results" / f"scale-{started.date().isoformat()}.json"
    tok = args.tokenizer_gguf or tokenizer_gguf()
    tmp = None if args.work else tempfile.mkdtemp(prefix="inferos-scale-")
    args.work = args.work or tmp
    Path(args.work).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "INFEROS_HOME": str(Path(args.work).resolve() / "inferos-home")}
    llama_reason, llama_info = None, {"version": None, "system_info": None, "build": None}
    if not args.llama_cpp:
        llama_reason = "not requested (--llama-cpp)"
    else:
        info = llama_child(args.llama_python, '{"info": true}')
        if info["rc"] != 0:
            llama_reason = child_failure(info, "llama_cpp is not importable (pip install -e '.[peers]')")
        else:
            llama_info = json.loads(info["stdout"].strip().splitlines()[-1])
    host = host_facts(llama_info)
    if llama_info.get("system_info"):
        llama_info["build"] = llama_build(llama_info["system_info"], host["cpu_avx512"])
    result = {"schema": "inferos.scale/1", "started": started.isoformat(timespec="seconds"), "command": sys.argv,
              "host": host, "llama_cpp_skipped": llama_reason,
              "settings": {k: getattr(args, k) for k in ("models", "quant", "ctx", "threads", "seqs", "gen_tokens",
                                                          "repeats", "warmup", "quick")},
              "units": UNITS,
              "method": {
                  "inferos": "`inferos bench --format json`, batch 1, one fresh worker per config and cell; peak RSS "
                             "= the bench's per-run VmHWM window; load = its load_s",
                  "llama.cpp": "llama-cpp-python, one subprocess per KV type: Llama(n_ctx=--ctx, n_batch=512, flash_attn=True, "
                               "type_k=type_v), eval(prompt) + greedy sample = TTFT, then eval/sample per token; "
                               "peak RSS = the same VmHWM window (inferos_cli.machine.rss.PeakWindow) around each run; "
                               "KV bytes = n_ctx x layers x 2 x kv_heads x head_dim x bytes per element (allocated)",
                  "convert": "`inferos pull FILE --format json --force` in a child; peak RSS exact from os.wait4",
                  "interleave": "per repeat and cell: inferos bench, then each llama.cpp config",
                  "kv_cell": "prompt of ctx - gen_tokens tokens, then gen_tokens generated: ctx tokens in the cache",
                  "rss_note": "both engines' RSS counts file-backed pages (llama.cpp mmaps the GGUF)"},
              "models": []}
    try:
        for name in args.models:
            for quant in args.quant:
                print(f"scale: {name} {quant}", file=sys.stderr, flush=True)
                result["models"].append(measure_model(name, quant, args, tok, env, llama_reason))
    finally:
        result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        result["wall_s"] = (dt.datetime.now(dt.UTC) - started).total_seconds()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(markdown(result))
    print(f"\nwrote {out}", file=sys.stderr)
    if args.plot:
        plot_scale.plot([result], args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
