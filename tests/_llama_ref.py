"""An independent numpy forward of a Llama-family decoder (HF weight layout), the reference for the converter.

Written straight from the HF modeling code (rotate_half RoPE, repeat_kv GQA, RMSNorm, SwiGLU); it shares
nothing with inferos_cli.models.builders.
"""

from __future__ import annotations

import numpy as np


def rms(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * g).astype(np.float64)


def forward(w: dict[str, np.ndarray], cfg: dict, ids: list[int]) -> np.ndarray:
    """Logits [T, vocab] (float64) of one sequence, full causal attention, positions 0..T-1."""
    hid, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kvh = cfg.get("num_key_value_heads", heads)
    d = cfg.get("head_dim") or hid // heads
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    T = len(ids)
    f = lambda n: w[n].astype(np.float64)  # noqa: E731
    x = f("model.embed_tokens.weight")[ids]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.outer(np.arange(T), inv)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(t: np.ndarray) -> np.ndarray:  # [h, T, d]
        rot = np.concatenate([-t[..., d // 2:], t[..., : d // 2]], -1)
        return t * cos + rot * sin

    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, f(p + "input_layernorm.weight"), eps)
        def proj(name: str) -> np.ndarray:
            y = h @ f(p + f"self_attn.{name}.weight").T
            return y + f(p + f"self_attn.{name}.bias") if p + f"self_attn.{name}.bias" in w else y
        q = rope(proj("q_proj").reshape(T, heads, d).transpose(1, 0, 2))
        k = rope(proj("k_proj").reshape(T, kvh, d).transpose(1, 0, 2))
        v = proj("v_proj").reshape(T, kvh, d).transpose(1, 0, 2)
        k = np.repeat(k, heads // kvh, axis=0)
        v = np.repeat(v, heads // kvh, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(d) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(T, heads * d)
        x = x + o @ f(p + "self_attn.o_proj.weight").T
        h = rms(x, f(p + "post_attention_layernorm.weight"), eps)
        g = h @ f(p + "mlp.gate_proj.weight").T
        u = h @ f(p + "mlp.up_proj.weight").T
        x = x + ((g / (1 + np.exp(-g))) * u) @ f(p + "mlp.down_proj.weight").T
    x = rms(x, f("model.norm.weight"), eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"]).astype(np.float64)
    return x @ head.T
