"""Write small, real GGUF files with the ``gguf`` package (random weights, real block formats, a real
GPT-2 style byte-level vocabulary), plus the HF-layout float weights they stand for (dequantized)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "o n", "r e", "e r", "Ġ s", "a n"]


def byte_tokens() -> list[str]:
    """The 256 GPT-2 byte-level symbols, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def vocab() -> tuple[list[str], list[int]]:
    """Tokens and token types: specials (CONTROL=3) first, then bytes, then merged pieces."""
    tokens = SPECIALS + byte_tokens() + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


def add_vocab(writer) -> list[str]:
    """Write the tiny GPT-2 style vocabulary (:func:`vocab`, BOS 0, EOS 2) into a ``GGUFWriter``; the tokens."""
    tokens, types = vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    return tokens


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (HF rotate-half -> interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, *, linear: str = "Q4_1", embed: str = "Q8_0", arch: str = "llama",
                    tied: bool = True, seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Write a 2-layer decoder GGUF; return (HF-named float64-exact dequantized weights, HF-style config)."""
    import gguf
    from gguf.quants import dequantize, quantize

    rng = np.random.default_rng(seed)
    hidden, heads, kvh, ffn, layers = 64, 4, 2, 96, 2
    d = hidden // heads
    n_vocab = len(vocab()[0])
    cfg = {"hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kvh, "head_dim": d,
           "num_hidden_layers": layers, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": n_vocab}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kvh)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    add_vocab(writer)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    hf: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf_name: str, w: np.ndarray, qtype: str, perm_heads: int | None = None) -> None:
        stored = permute(w, perm_heads) if perm_heads else w
        kind = getattr(gguf.GGMLQuantizationType, qtype)
        if qtype == "F32":
            data = stored.astype(np.float32)
            writer.add_tensor(gguf_name, data)
            back = data
        elif qtype == "F16":
            data = stored.astype(np.float16)
            writer.add_tensor(gguf_name, data)
            back = data.astype(np.float32)
        else:
            data = quantize(stored.astype(np.float32), kind)
            writer.add_tensor(gguf_name, data, raw_dtype=kind)
            back = dequantize(data, kind).reshape(stored.shape)
        if perm_heads:  # undo the permutation on the dequantized values for the HF-layout reference
            back = back.reshape(perm_heads, w.shape[0] // perm_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        hf[hf_name] = np.asarray(back, dtype=np.float32)

    put("token_embd.weight", "model.embed_tokens.weight", rng.normal(0, 0.5, (n_vocab, hidden)), embed)
    for i in range(layers):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        put(p + "attn_norm.weight", h + "input_layernorm.weight", 1 + 0.1 * rng.normal(size=hidden), "F32")
        put(p + "attn_q.weight", h + "self_attn.q_proj.weight", rng.normal(0, 0.2, (hidden, hidden)), linear,
            heads if arch == "llama" else None)
        put(p + "attn_k.weight", h + "self_attn.k_proj.weight", rng.normal(0, 0.2, (kvh * d, hidden)), linear,
            kvh if arch == "llama" else None)
        put(p + "attn_v.weight", h + "self_attn.v_proj.weight", rng.normal(0, 0.2, (kvh * d, hidden)), linear)
        if arch == "qwen2":
            for name, n in (("q", hidden), ("k", kvh * d), ("v", kvh * d)):
                put(p + f"attn_{name}.bias", h + f"self_attn.{name}_proj.bias", rng.normal(0, 0.1, n), "F32")
        put(p + "attn_output.weight", h + "self_attn.o_proj.weight", rng.normal(0, 0.2, (hidden, hidden)), linear)
        put(p + "ffn_norm.weight", h + "post_attention_layernorm.weight", 1 + 0.1 * rng.normal(size=hidden), "F32")
        put(p + "ffn_gate.weight", h + "mlp.gate_proj.weight", rng.normal(0, 0.2, (ffn, hidden)), linear)
        put(p + "ffn_up.weight", h + "mlp.up_proj.weight", rng.normal(0, 0.2, (ffn, hidden)), linear)
        put(p + "ffn_down.weight", h + "mlp.down_proj.weight", rng.normal(0, 0.2, (hidden, ffn)), linear)
    put("output_norm.weight", "model.norm.weight", 1 + 0.1 * rng.normal(size=hidden), "F32")
    if not tied:
        put("output.weight", "lm_head.weight", rng.normal(0, 0.5, (n_vocab, hidden)), linear)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf, cfg
