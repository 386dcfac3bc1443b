"""Where a CUDA session really runs a graph, and what a prefill costs there versus on the CPU.

For each model (an ONNX folder or ``.onnx`` file with the standard decoder I/O) this opens one session on
``CUDAExecutionProvider`` (CPU fallback allowed, as inferos's hybrid plan does) and one on the CPU, then:

- placement: one profiled prefill on the CUDA session; every node's kernel event names the provider that
  ran it, so the op types onnxruntime left on the CPU are listed with their counts;
- prefill: batch 1, prompts of the given lengths from the shared wikitext text, ``--reps`` timed runs per
  session after one warm-up, median milliseconds and the CUDA/CPU ratio (outputs fetched to the host,
  which is what the hybrid engine needs for the hand-off to the CPU decode session);
- logits agreement: max |CUDA - CPU| over the last position's logits of each prompt.

Needs onnxruntime-gpu. Writes JSON (``--output``) and prints a table.

    python benchmarks/gpu_placement.py --model /tmp/m/gqa --model /tmp/m/plain --prompts 128,512,1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def onnx_file(path: Path) -> Path:
    """The ``model.onnx`` of a folder, or the file itself."""
    return path / "model.onnx" if path.is_dir() else path


def feeds_for(sess: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Prefill feeds for the standard decoder I/O with an empty past."""
    b, s = ids.shape
    feeds: dict[str, np.ndarray] = {}
    for inp in sess.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = ids.astype(np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((b, s), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        elif inp.name.startswith("past_key_values"):
            heads, dim = inp.shape[1], inp.shape[3]
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = np.zeros((b, int(heads), 0, int(dim)), dtype=dtype)
    return feeds


def placement(model: Path, ids: np.ndarray, provider: str, cuda_opts: dict[str, str]) -> dict[str, Any]:
    """Profile one prefill on a CUDA session: nodes per provider and the op types left on the CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "placement")
        sess = ort.InferenceSession(str(model), so, providers=[(provider, cuda_opts), "CPUExecutionProvider"])
        sess.run(["logits"], feeds_for(sess, ids))
        prof = Path(sess.end_profiling())
        events = json.loads(prof.read_text())
    per_provider: Counter[str] = Counter()
    cpu_ops: Counter[str] = Counter()
    seen: set[str] = set()
    for ev in events:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        node = ev["name"][: -len("_kernel_time")]
        if node in seen:
            continue
        seen.add(node)
        args = ev.get("args", {})
        prov = args.get("provider", "?")
        per_provider[prov] += 1
        if prov == "CPUExecutionProvider":
            cpu_ops[args.get("op_name", "?")] += 1
    return {"nodes_per_provider": dict(per_provider), "cpu_op_types": dict(cpu_ops.most_common())}


def time_prefill(sess: Any, ids: np.ndarray, reps: int) -> tuple[float, np.ndarray]:
    """Median ms of ``reps`` prefills after one warm-up, and the last position's logits."""
    feeds = feeds_for(sess, ids)
    out = sess.run(["logits"], feeds)[0]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = sess.run(["logits"], feeds)[0]
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), out[0, -1].astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, type=Path, help="ONNX folder or file (repeatable)")
    ap.add_argument("--prompts", default="128,512,1024", help="prompt lengths in tokens")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="CPU session threads (default: physical cores)")
    ap.add_argument("--text", type=Path, default=None, help="text the prompts are cut from (default: shared wikitext)")
    ap.add_argument("--provider", default="CUDAExecutionProvider", help="the accelerator's provider")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()

    import onnxruntime as ort
    import psutil

    from inferos_cli.bench.grid import corpus_ids
    from inferos_cli.quality.texts import default_text
    from inferos_cli.bench.results import host_record
    from inferos_cli.models.resolve import resolve_model

    if args.provider not in ort.get_available_providers():
        sys.exit(f"{args.provider} is not in this onnxruntime (for CUDA: install onnxruntime-gpu)")
    lengths = [int(x) for x in args.prompts.split(",")]
    threads = args.threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    cuda_opts = {"device_id": "0"} if args.provider == "CUDAExecutionProvider" else {}
    record: dict[str, Any] = {"host": host_record(), "onnxruntime": ort.__version__, "threads_cpu": threads,
                              "reps": args.reps, "models": []}
    for model_dir in args.model:
        info = resolve_model(str(model_dir))
        ids_all = np.array(corpus_ids(info, args.text or default_text(), max(lengths)), dtype=np.int64)
        path = onnx_file(model_dir)
        row: dict[str, Any] = {"model": str(model_dir), "placement": placement(path, ids_all[None, :128], args.provider, cuda_opts),
                               "prefill": []}
        so = ort.SessionOptions()
        so.log_severity_level = 3
        cuda = ort.InferenceSession(str(path), so, providers=[(args.provider, cuda_opts), "CPUExecutionProvider"])
        so_cpu = ort.SessionOptions()
        so_cpu.log_severity_level = 3
        so_cpu.intra_op_num_threads = threads
        cpu = ort.InferenceSession(str(path), so_cpu, providers=["CPUExecutionProvider"])
        for n in lengths:
            ids = ids_all[None, :n]
            t_gpu, l_gpu = time_prefill(cuda, ids, args.reps)
            t_cpu, l_cpu = time_prefill(cpu, ids, args.reps)
            row["prefill"].append({
                "prompt_tokens": n, "cuda_ms": round(t_gpu, 2), "cpu_ms": round(t_cpu, 2),
                "cuda_vs_cpu_time": round(t_gpu / t_cpu, 3),
                "max_abs_logit_diff": float(np.max(np.abs(l_gpu - l_cpu))),
                "same_top1": bool(int(np.argmax(l_gpu)) == int(np.argmax(l_cpu))),
            })
        record["models"].append(row)
        print(f"{model_dir}: nodes {row['placement']['nodes_per_provider']}; on CPU: {row['placement']['cpu_op_types']}")
        for p in row["prefill"]:
            print(f"  prefill {p['prompt_tokens']:>5} tok: cuda {p['cuda_ms']:.1f} ms, cpu ({threads} threads) "
                  f"{p['cpu_ms']:.1f} ms, ratio {p['cuda_vs_cpu_time']:.3f}, max|dlogit| {p['max_abs_logit_diff']:.2e}, "
                  f"same top-1 {p['same_top1']}", flush=True)
    if args.output:
        args.output.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
