"""inferos engine vs onnxruntime-genai on the same ONNX model: decode tokens/s and TTFT at batch 1.

Both engines get the same prompt token ids (the first N tokens of wikitext-2), generate the same number of
tokens greedily, and are timed with the same definitions (TTFT: prompt handed over -> first token
available; decode tok/s = (generated - 1) / (t_last - t_first)). Runs are interleaved A B / B A in the
same session of the machine, and medians plus ratios are reported (inferos / ort-genai: >= 1 is better
for decode tok/s, <= 1 is better for TTFT).

onnxruntime-genai is a peer, not a dependency: it runs in its own interpreter (``--peer-python``, e.g.
``python3 -m venv /tmp/venv-oga && /tmp/venv-oga/bin/pip install onnxruntime-genai numpy``) through
``benchmarks/ortgenai_worker.py``, loaded once and fed one request per line. Folders converted by inferos
get a ``genai_config.json`` written into a linked copy so onnxruntime-genai can load the very same graph.

The inferos engine backs its CPU session's weights with transparent huge pages on Linux
(:func:`inferos_cli.engine.sessions.back_with_huge_pages`; ``INFEROS_HUGEPAGES=0`` turns that off).
onnxruntime-genai does not do this by itself; ``--peer-env GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` gives
the peer glibc's huge-page heap for a like-for-like reference. ``--threads`` sets inferos' intra-op
threads; the peer uses its own default (half the hardware threads, i.e. 1 on a 2-core machine).

Example::

    python benchmarks/engine_vs_ortgenai.py --model ../shared/models/smollm2-135m-oga-int4 \
        --prompts 128,512 --new-tokens 64 --reps 5 --json /tmp/engine_vs_ortgenai.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("INFEROS_SHARED", REPO.parent / "shared"))


def peer_folder(folder: Path, tmp: Path) -> Path:
    """``folder`` itself when it has a genai_config.json, else a linked copy with one written for it."""
    if (folder / "genai_config.json").is_file():
        return folder
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    out = tmp / f"peer-{folder.name}"
    out.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        link = out / item.name
        if not link.exists():
            link.symlink_to(item.resolve())
    heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id", 2)
    genai = {
        "model": {
            "bos_token_id": cfg.get("bos_token_id", 1),
            "context_length": cfg.get("max_position_embeddings", 2048),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": cfg.get("head_dim") or cfg["hidden_size"] // heads,
                "hidden_size": cfg["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": cfg["num_hidden_layers"],
                "num_key_value_heads": cfg.get("num_key_value_heads", heads),
            },
            "eos_token_id": eos,
            "pad_token_id": cfg.get("pad_token_id") if cfg.get("pad_token_id") is not None else (
                eos[0] if isinstance(eos, list) else eos),
            "type": cfg.get("model_type", "llama"),
            "vocab_size": cfg["vocab_size"],
        },
        "search": {"do_sample": False, "max_length": cfg.get("max_position_embeddings", 2048),
                   "past_present_share_buffer": False, "num_beams": 1},
    }
    (out / "genai_config.json").unlink(missing_ok=True)
    (out / "genai_config.json").write_text(json.dumps(genai, indent=2), encoding="utf-8")
    return out


class Peer:
    """The onnxruntime-genai worker process."""

    def __init__(self, python: str, folder: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [python, str(HERE / "ortgenai_worker.py"), str(folder)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, **env} if env else None,
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("onnxruntime-genai worker exited (see its stderr above)")
        return json.loads(line)

    def run(self, ids: list[int], n: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"ids": ids, "new_tokens": n}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def inferos_run(engine: Any, ids: list[int], n: int) -> dict[str, Any]:
    from inferos_cli.engine.sampling import GenerationConfig

    ttft = dec = None
    tokens: list[int] = []
    c_first = c_last = 0.0
    c0 = time.process_time()
    for ev in engine.generate(ids, GenerationConfig(max_tokens=n, ignore_eos=True)):
        if ev.kind == "prefill":
            ttft = ev.ttft_s
        elif ev.kind == "token":
            tokens.append(int(ev.token_id))
            if len(tokens) == 1:  # process_time is a syscall: read it twice per run only, like the peer
                c_first = time.process_time()
        else:
            c_last = time.process_time()
            dec = ev.decode_tps
    cpu_ms = 1000 * (c_last - c_first) / (len(tokens) - 1) if len(tokens) > 1 else None
    return {"ttft_s": ttft, "ttft_cpu_s": c_first - c0, "decode_tps": dec, "decode_cpu_ms_per_token": cpu_ms,
            "generated": len(tokens),
            "tokens": tokens}


def prompt_ids(engine: Any, n: int) -> list[int]:
    text = (SHARED / "data" / "wikitext2-raw-test.txt").read_text(encoding="utf-8")[:40000]
    ids = engine.tokenizer.encode(text, add_bos=False)
    if len(ids) < n:
        raise SystemExit(f"wikitext sample too short for {n} tokens")
    return ids[:n]


def bench_model(folder: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from inferos_cli.profiles import resolve_settings
    from inferos_cli.engine.engine import Engine
    from inferos_cli.models.info import inspect_folder
    from inferos_cli.engine.sessions import huge_pages_wanted

    info = inspect_folder(folder)
    resolved = resolve_settings("baseline", param_count=info.param_count, use_env=False,
                                flags={"scheduler": {"mode": "cpu"}})
    engine = Engine(info, resolved, threads=args.threads)
    peer_env = dict(item.split("=", 1) for item in args.peer_env)
    peer = Peer(args.peer_python, peer_folder(folder, tmp), peer_env)
    result: dict[str, Any] = {"model": str(folder), "name": info.name, "kv": engine.layout.describe(),
                              "plan": engine.plan.describe(), "peer": peer.info, "peer_env": peer_env,
                              "inferos_huge_pages": huge_pages_wanted(),
                              "prompts": {}}
    try:
        for plen in args.prompts:
            ids = prompt_ids(engine, plen)
            inferos_run(engine, ids, 4)  # warm-up both
            peer.run(ids, 4)
            runs: dict[str, list[dict[str, Any]]] = {"inferos": [], "ortgenai": []}
            for rep in range(args.reps):
                order = ("inferos", "ortgenai") if rep % 2 == 0 else ("ortgenai", "inferos")
                for who in order:
                    res = inferos_run(engine, ids, args.new_tokens) if who == "inferos" else peer.run(ids, args.new_tokens)
                    runs[who].append(res)
            med = {who: {"ttft_ms": 1000 * statistics.median(r["ttft_s"] for r in rs),
                         "decode_tps": statistics.median(r["decode_tps"] for r in rs),
                         "ttft_cpu_ms": 1000 * statistics.median(r["ttft_cpu_s"] for r in rs),
                         "decode_cpu_ms_per_token": statistics.median(r["decode_cpu_ms_per_token"] for r in rs)}
                   for who, rs in runs.items()}
            # paired ratios: each rep's inferos run against the peer run next to it (robust to load drift)
            pairs = list(zip(runs["inferos"], runs["ortgenai"]))
            paired = {
                "decode_tps": statistics.median(a["decode_tps"] / b["decode_tps"] for a, b in pairs),
                "ttft": statistics.median(a["ttft_s"] / b["ttft_s"] for a, b in pairs),
                "decode_cpu": statistics.median(a["decode_cpu_ms_per_token"] / b["decode_cpu_ms_per_token"]
                                                for a, b in pairs),
                "ttft_cpu": statistics.median(a["ttft_cpu_s"] / b["ttft_cpu_s"] for a, b in pairs),
            }
            same = sum(a == b for a, b in zip(runs["inferos"][0]["tokens"], runs["ortgenai"][0]["tokens"]))
            result["prompts"][plen] = {
                "median": med,
                "ratio_decode_tps": med["inferos"]["decode_tps"] / med["ortgenai"]["decode_tps"],
                "ratio_ttft": med["inferos"]["ttft_ms"] / med["ortgenai"]["ttft_ms"],
                "paired_ratio_median": paired,
                "all": {who: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for who, rs in runs.items()},
                "same_greedy_tokens": f"{same}/{args.new_tokens}",
            }
            p = result["prompts"][plen]
            print(f"{info.name} prompt {plen} tok: decode inferos {med['inferos']['decode_tps']:.1f} tok/s vs "
                  f"ort-genai {med['ortgenai']['decode_tps']:.1f} tok/s (ratio {p['ratio_decode_tps']:.3f}); "
                  f"TTFT inferos {med['inferos']['ttft_ms']:.1f} ms vs ort-genai {med['ortgenai']['ttft_ms']:.1f} ms "
                  f"(ratio {p['ratio_ttft']:.3f}); TTFT CPU ms inferos {med['inferos']['ttft_cpu_ms']:.0f} vs ort-genai "
                  f"{med['ortgenai']['ttft_cpu_ms']:.0f}; decode CPU ms/token inferos {med['inferos']['decode_cpu_ms_per_token']:.2f} vs "
                  f"ort-genai {med['ortgenai']['decode_cpu_ms_per_token']:.2f}; "
                  f"paired ratios: decode {paired['decode_tps']:.3f}, TTFT {paired['ttft']:.3f}, decode CPU "
                  f"{paired['decode_cpu']:.3f}, TTFT CPU {paired['ttft_cpu']:.3f}; "
                  f"same greedy tokens {p['same_greedy_tokens']}", flush=True)
    finally:
        peer.close()
    return result


def _round_args(argv: list[str]) -> list[str]:
    """``argv`` without ``--rounds`` and ``--json`` (and their values): the arguments of one round."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in ("--rounds", "--json"):
            skip = True
            continue
        if item.startswith(("--rounds=", "--json=")):
            continue
        out.append(item)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", type=Path, help="ONNX folder (repeatable)")
    parser.add_argument("--prompts", default="128,512", help="prompt lengths in tokens, comma list")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole comparison, each round in a fresh process (engine and peer)")
    parser.add_argument("--peer-python", default="/tmp/venv-oga/bin/python",
                        help="interpreter with onnxruntime-genai installed (default: /tmp/venv-oga/bin/python)")
    parser.add_argument("--peer-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the peer process (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="write all runs here")
    args = parser.parse_args()
    args.prompts = [int(x) for x in args.prompts.split(",") if x.strip()]
    models = args.model or [SHARED / "models" / "smollm2-135m-oga-int4"]
    results: list[dict[str, Any]] = []
    if args.rounds > 1:
        # every round in a fresh process, as `inferos run` would be: a second engine loaded into the same
        # process measured differently (heap reuse), which is not what a user gets
        with tempfile.TemporaryDirectory() as tmp:
            for rnd in range(1, args.rounds + 1):
                print(f"round {rnd}/{args.rounds}", flush=True)
                out = Path(tmp) / f"round{rnd}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), *_round_args(sys.argv[1:]), "--json", str(out)]
                subprocess.run(cmd, check=True)
                results.extend({"round": rnd, **r} for r in json.loads(out.read_text(encoding="utf-8")))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = [bench_model(m, args, Path(tmp)) for m in models]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
