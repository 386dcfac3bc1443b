"""An independent numpy forward of the Llama-shaped decoders with their own twists: qwen3 (per-head q/k
RMSNorm, ``head_dim`` of its own), phi3 (fused ``qkv_proj`` / ``gate_up_proj``, longrope) and llama with
Llama 3 RoPE scaling: the reference for the converter.

Written from HF ``modeling_qwen3.py``, ``modeling_phi3.py``, ``modeling_llama.py`` and the RoPE
initializers of ``modeling_rope_utils.py`` (``_compute_llama3_parameters``,
``_compute_longrope_parameters``). It shares nothing with inferos_cli.models.builders.
"""

from __future__ import annotations

import math

import numpy as np


def rms(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def inv_freq_and_scale(cfg: dict, T: int) -> tuple[np.ndarray, float]:
    """HF's RoPE initializers: default, llama3, longrope (factors chosen by the sequence length)."""
    d, base = cfg["head_dim"], cfg["rope_theta"]
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type") or rs.get("type")
    if kind == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return np.where(medium, smoothed, out), 1.0
    if kind == "longrope":
        original = cfg["original_max_position_embeddings"]
        factor = cfg["max_position_embeddings"] / original
        scale = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        ext = np.asarray(rs["long_factor"] if T > original else rs["short_factor"])
        return 1.0 / (ext * base ** (np.arange(0, d, 2) / d)), scale
    return inv, 1.0


def forward(w: dict[str, np.ndarray], cfg: dict, ids: list[int]) -> np.ndarray:
    """Logits [T, vocab] (float64) of one sequence, full causal attention, positions 0..T-1."""
    heads, kvh, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, T = cfg["rms_norm_eps"], len(ids)
    f = lambda n: w[n].astype(np.float64)  # noqa: E731
    inv, scale = inv_freq_and_scale(cfg, T)
    ang = np.outer(np.arange(T), inv)
    cos = np.cos(np.concatenate([ang, ang], -1)) * scale
    sin = np.sin(np.concatenate([ang, ang], -1)) * scale

    def rope(t: np.ndarray) -> np.ndarray:
        rot = np.concatenate([-t[..., d // 2:], t[..., : d // 2]], -1)
        return t * cos + rot * sin

    causal = np.triu(np.full((T, T), -np.inf), 1)
    x = f("model.embed_tokens.weight")[ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, f(p + "input_layernorm.weight"), eps)
        if p + "self_attn.qkv_proj.weight" in w:  # phi3
            qkv = h @ f(p + "self_attn.qkv_proj.weight").T
            q, k, v = np.split(qkv, [heads * d, heads * d + kvh * d], axis=-1)
        else:
            q, k, v = (h @ f(p + f"self_attn.{n}_proj.weight").T for n in "qkv")
        q = q.reshape(T, heads, d).transpose(1, 0, 2)
        k = k.reshape(T, kvh, d).transpose(1, 0, 2)
        v = v.reshape(T, kvh, d).transpose(1, 0, 2)
        if p + "self_attn.q_norm.weight" in w:  # qwen3: per-head norm before RoPE
            q, k = rms(q, f(p + "self_attn.q_norm.weight"), eps), rms(k, f(p + "self_attn.k_norm.weight"), eps)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, heads // kvh, axis=0), np.repeat(v, heads // kvh, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + (s @ v).transpose(1, 0, 2).reshape(T, heads * d) @ f(p + "self_attn.o_proj.weight").T
        h = rms(x, f(p + "post_attention_layernorm.weight"), eps)
        if p + "mlp.gate_up_proj.weight" in w:  # phi3: gate first
            g, u = np.split(h @ f(p + "mlp.gate_up_proj.weight").T, 2, axis=-1)
        else:
            g, u = h @ f(p + "mlp.gate_proj.weight").T, h @ f(p + "mlp.up_proj.weight").T
        x = x + ((g / (1 + np.exp(-g))) * u) @ f(p + "mlp.down_proj.weight").T
    x = rms(x, f("model.norm.weight"), eps)
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).astype(np.float64).T
