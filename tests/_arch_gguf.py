"""Tiny GGUF files of the newer architectures (gemma2, gemma3, qwen3, phi3, llama with llama3 RoPE), written
with ``gguf.GGUFWriter`` the way llama.cpp's ``convert_hf_to_gguf.py`` lays them out, plus the HF-named
float weights they stand for (dequantized, HF conventions: Gemma norms as ``w`` with the model adding 1,
Phi-3 ``qkv_proj`` / ``gate_up_proj`` fused), for the reference forwards in ``tests/_*_ref.py``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from _tiny_gguf import permute, vocab

# per architecture: hidden, heads, kv heads, head_dim, ffn, layers (head_dim != hidden/heads where the family has it)
SHAPES = {
    "gemma3": (128, 4, 1, 64, 256, 6),
    "gemma2": (128, 4, 2, 32, 256, 2),
    "qwen3": (128, 4, 2, 64, 256, 2),
    "phi3": (128, 4, 4, 32, 256, 2),
    "llama": (128, 4, 2, 32, 256, 2),
}
# a K-quant mix like llama.cpp's Q4_K_M picks for these shapes (K-quants need K % 256 == 0)
QUANT_MIX = {"embed": "Q8_0", "q": "Q5_0", "k": "Q5_0", "v": "Q8_0", "o": "Q4_K", "gate": "Q5_0", "up": "Q5_0",
             "down": "Q6_K", "qkv": "Q5_0", "head": "Q8_0"}


# gguf cannot quantize the K-quants in Python: random blocks whose fp16 super-scales (byte offsets) are set
KQ_FP16 = {"Q4_K": ((0, 4e-4), (2, 4e-4)), "Q6_K": ((208, 4e-5),)}
KQ_FORM = {"Q4_K": (256, 144), "Q6_K": (256, 210)}


def kquant_blocks(kind: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Raw ``[n, row_bytes]`` blocks of a K-quant type: random codes and sub-scales, small positive fp16 scales."""
    width, size = KQ_FORM[kind]
    blocks = rng.integers(0, 256, (n, k // width, size), dtype=np.uint8)
    for at, scale in KQ_FP16[kind]:
        blocks[..., at:at + 2] = (rng.uniform(0.5, 1.5, (n, k // width, 1)) * scale).astype(np.float16).view(np.uint8)
    return blocks.reshape(n, -1)


def llama3_factors(dim: int, theta: float, factor: float, low: float, high: float, old_ctx: int) -> np.ndarray:
    """llama.cpp's ``rope_freqs.weight`` for Llama 3 scaling (per-frequency divisors of the inverse frequency)."""
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    return np.where(wavelen < old_ctx / high, 1.0,
                    np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth))).astype(np.float32)


def write_arch_gguf(path: Path, arch: str, *, quant: bool = False, tied: bool = True, seed: int = 0,
                    window: int = 8, context: int = 64) -> tuple[dict[str, np.ndarray], dict]:
    """Write a tiny ``arch`` GGUF (float weights, or :data:`QUANT_MIX` when ``quant``); return (HF-named
    dequantized weights, HF-style config for the reference forward)."""
    import gguf
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(seed)
    hidden, heads, kvh, d, ffn, layers = SHAPES[arch]
    tokens, types = vocab()
    n_vocab = len(tokens)
    gemma = arch.startswith("gemma")
    theta = 1_000_000.0 if arch == "gemma3" else 10000.0
    cfg: dict = {"model_type": arch, "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kvh,
                 "head_dim": d, "num_hidden_layers": layers, "intermediate_size": ffn, "vocab_size": n_vocab,
                 "rms_norm_eps": 1e-6, "rope_theta": theta, "max_position_embeddings": context}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kvh)
    w.add_key_length(d)
    w.add_value_length(d)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-6)
    if gemma:
        cfg.update(sliding_window=window, query_pre_attn_scalar=d)
        w.add_sliding_window(window)
        if arch == "gemma2":
            cfg.update(attn_logit_softcapping=3.0, final_logit_softcapping=4.0,
                       layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
            w.add_attn_logit_softcapping(3.0)
            w.add_final_logit_softcapping(4.0)
        else:
            cfg.update(rope_local_base_freq=10000.0,
                       layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)])
    if arch == "phi3":  # longrope factors, as the 128k models carry them
        original = context // 4
        short = 1.0 + rng.uniform(0, 0.5, d // 2)
        long = short * rng.uniform(1.0, 4.0, d // 2)
        cfg.update(original_max_position_embeddings=original, rope_scaling={
            "type": "longrope", "short_factor": short.tolist(), "long_factor": long.tolist()})
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(context / original) / math.log(original)))
        w.add_tensor("rope_factors_long.weight", long.astype(np.float32))
        w.add_tensor("rope_factors_short.weight", short.astype(np.float32))
    if arch == "llama":  # Llama 3 scaling stored the way llama.cpp does: the rope_freqs.weight tensor
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 16}
        cfg["rope_scaling"] = scaling
        w.add_tensor("rope_freqs.weight", llama3_factors(d, theta, 8.0, 1.0, 4.0, 16))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    hf: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf_name: str, value: np.ndarray, kind: str, perm: int | None = None,
            shift: float = 0.0) -> None:
        """Store ``value + shift`` in the GGUF (llama.cpp adds 1 to Gemma norms) and ``value`` (dequantized,
        shift removed) under the HF name."""
        stored = (permute(value, perm) if perm else value) + shift
        qtype = QUANT_MIX.get(kind, "F32") if quant else "F32"
        if qtype.endswith("_K") and stored.shape[-1] % 256:
            qtype = "Q4_1"  # what llama.cpp falls back to when a row is not whole super-blocks
        if qtype == "F32":
            data = stored.astype(np.float32)
            w.add_tensor(gguf_name, data)
            back = data
        else:
            t = getattr(gguf.GGMLQuantizationType, qtype)
            if qtype in KQ_FORM:
                assert shift == 0.0 and perm is None
                data = kquant_blocks(qtype, *stored.shape, rng)
            else:
                data = quantize(stored.astype(np.float32), t)
            w.add_tensor(gguf_name, data, raw_dtype=t)
            back = dequantize(data, t).reshape(stored.shape)
        if perm:
            back = back.reshape(perm, value.shape[0] // perm // 2, 2, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)
        hf[hf_name] = np.asarray(back, dtype=np.float64) - shift

    norm_shift = 1.0 if gemma else 0.0
    gain = (lambda n: 0.1 * rng.normal(size=n)) if gemma else (lambda n: 1 + 0.1 * rng.normal(size=n))  # noqa: E731
    mat = lambda n, k, s=0.15: rng.normal(0, s, (n, k))  # noqa: E731
    put("token_embd.weight", "model.embed_tokens.weight", mat(n_vocab, hidden, 0.5 if not gemma else 0.1), "embed")
    for i in range(layers):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        put(p + "attn_norm.weight", h + "input_layernorm.weight", gain(hidden), "norm", shift=norm_shift)
        if arch == "phi3":
            put(p + "attn_qkv.weight", h + "self_attn.qkv_proj.weight", mat((heads + 2 * kvh) * d, hidden), "qkv")
        else:
            perm_q, perm_k = (heads, kvh) if arch == "llama" else (None, None)
            put(p + "attn_q.weight", h + "self_attn.q_proj.weight", mat(heads * d, hidden), "q", perm_q)
            put(p + "attn_k.weight", h + "self_attn.k_proj.weight", mat(kvh * d, hidden), "k", perm_k)
            put(p + "attn_v.weight", h + "self_attn.v_proj.weight", mat(kvh * d, hidden), "v")
        if arch in ("qwen3", "gemma3"):
            put(p + "attn_q_norm.weight", h + "self_attn.q_norm.weight", gain(d), "norm", shift=norm_shift)
            put(p + "attn_k_norm.weight", h + "self_attn.k_norm.weight", gain(d), "norm", shift=norm_shift)
        put(p + "attn_output.weight", h + "self_attn.o_proj.weight", mat(hidden, heads * d), "o")
        if gemma:
            put(p + "post_attention_norm.weight", h + "post_attention_layernorm.weight", gain(hidden), "norm",
                shift=norm_shift)
            put(p + "ffn_norm.weight", h + "pre_feedforward_layernorm.weight", gain(hidden), "norm", shift=norm_shift)
            put(p + "post_ffw_norm.weight", h + "post_feedforward_layernorm.weight", gain(hidden), "norm",
                shift=norm_shift)
        else:
            put(p + "ffn_norm.weight", h + "post_attention_layernorm.weight", gain(hidden), "norm")
        if arch == "phi3":
            put(p + "ffn_up.weight", h + "mlp.gate_up_proj.weight", mat(2 * ffn, hidden), "up")
        else:
            put(p + "ffn_gate.weight", h + "mlp.gate_proj.weight", mat(ffn, hidden), "gate")
            put(p + "ffn_up.weight", h + "mlp.up_proj.weight", mat(ffn, hidden), "up")
        put(p + "ffn_down.weight", h + "mlp.down_proj.weight", mat(hidden, ffn), "down")
    put("output_norm.weight", "model.norm.weight", gain(hidden), "norm", shift=norm_shift)
    if not tied:
        put("output.weight", "lm_head.weight", mat(n_vocab, hidden, 0.3), "head")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf, cfg


def session(folder: Path):
    """A one-thread CPU onnxruntime session of a converted folder."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])


def stepped_logits(sess, ids: list[int], steps: list[int]) -> np.ndarray:
    """Logits [T, vocab] of ``ids`` fed in chunks of ``steps`` tokens, the presents of each run fed back as
    the next run's past (prefill, then decode steps)."""
    inputs = {i.name: i for i in sess.get_inputs()}
    past = {}
    for name, info in inputs.items():
        if name.startswith("past_key_values."):
            kvh, d = info.shape[1], info.shape[3]
            past[name] = np.zeros((1, kvh, 0, d), np.float32)
    out, start = [], 0
    for n in steps:
        chunk = ids[start:start + n]
        feed = {"input_ids": np.array([chunk], np.int64), "attention_mask": np.ones((1, start + n), np.int64),
                "position_ids": np.arange(start, start + n)[None], **past}
        res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        past = {k.replace("present.", "past_key_values."): v for k, v in res.items() if k.startswith("present.")}
        out.append(res["logits"][0])
        start += n
    assert start == len(ids)
    return np.concatenate(out)


def write_hf_folder(folder: Path, hf: dict[str, np.ndarray], cfg: dict, tokenizer_from: Path) -> Path:
    """The same weights as an HF safetensors folder (F32, written by hand: no torch), with ``cfg`` as
    ``config.json`` and the tokenizer files of a converted folder."""
    import json
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    header, blobs, offset = {}, [], 0
    for name, arr in hf.items():
        data = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    (folder / "config.json").write_text(json.dumps({"tie_word_embeddings": "lm_head.weight" not in hf, **cfg}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder
