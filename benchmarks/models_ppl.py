"""Wikitext-2 perplexity of ONNX decoder folders (converted or onnxruntime-genai), teacher-forced, no cache.

Method: tokenize the whole raw test split without special tokens, cut it into non-overlapping windows of
``--ctx`` tokens, run each window in one forward (empty past), and score every next-token prediction of the
window (ctx-1 per window). PPL = exp(mean NLL). All folders see the same token windows (SmolLM2's tokenizer).
Models are evaluated window by window in turn (A B C, A B C, ...) so machine load hits them alike.

    python benchmarks/models_ppl.py FOLDER [FOLDER ...] --tokens 40960 --ctx 512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position negative log-likelihood of ``targets`` under ``logits`` [T, V] (float64)."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(-1)) + m[:, 0]
    return lse - x[np.arange(len(targets)), targets]


class Scorer:
    """One ONNX Runtime session over a decoder folder."""

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime as ort

        from inferos_cli.models.info import inspect_folder

        self.info = inspect_folder(folder)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(self.info.onnx_path), opts, providers=["CPUExecutionProvider"])
        self.nll: list[float] = []
        self.seconds = 0.0

    def window(self, ids: np.ndarray) -> None:
        info, t = self.info, len(ids)
        feeds = {"input_ids": ids[None].astype(np.int64), "attention_mask": np.ones((1, t), np.int64)}
        if info.has_position_ids:
            feeds["position_ids"] = np.arange(t, dtype=np.int64)[None]
        dt = np.float16 if info.kv_dtype == "float16" else np.float32
        for i in range(info.num_layers):
            feeds[info.past_key_fmt % i] = np.zeros((1, info.num_kv_heads, 0, info.head_dim), dt)
            feeds[info.past_value_fmt % i] = np.zeros((1, info.num_kv_heads, 0, info.head_dim), dt)
        start = time.perf_counter()
        logits = self.sess.run(["logits"], feeds)[0][0]
        self.seconds += time.perf_counter() - start
        self.nll.extend(log_softmax_nll(logits[:-1], ids[1:]).tolist())

    @property
    def ppl(self) -> float:
        return float(np.exp(np.mean(self.nll)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/wikitext2-raw-test.txt")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default: the first folder's)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=40960, help="tokens to use (whole windows)")
    parser.add_argument("--start-window", type=int, default=0, help="skip the first windows (split a long run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.tokenizer or args.folders[0] / "tokenizer.json"))
    ids = np.array(tok.encode(args.text.read_text(encoding="utf-8"), add_special_tokens=False).ids, dtype=np.int64)
    n_windows = min(len(ids) // args.ctx, max(1, args.tokens // args.ctx))
    scorers = [Scorer(f, args.threads) for f in args.folders]
    for w in range(args.start_window, n_windows):
        chunk = ids[w * args.ctx:(w + 1) * args.ctx]
        for s in scorers:
            s.window(chunk)
        line = "  ".join(f"{s.info.path.name}={s.ppl:.3f}" for s in scorers)
        print(f"window {w + 1}/{n_windows}: {line}", file=sys.stderr, flush=True)
    result = {
        "text": str(args.text), "ctx": args.ctx, "windows": [args.start_window, n_windows],
        "tokens": (n_windows - args.start_window) * args.ctx, "scored_tokens": len(scorers[0].nll),
        "text_tokens": int(len(ids)),
        "models": [{"folder": str(s.info.path), "ppl": s.ppl, "nll_sum": float(np.sum(s.nll)), "scored": len(s.nll),
                    "forward_s_total": s.seconds,
                    "prefill_tok_s": (n_windows - args.start_window) * args.ctx / s.seconds} for s in scorers],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
