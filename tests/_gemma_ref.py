"""An independent numpy forward of Gemma 2 / Gemma 3 text decoders (HF weight names and conventions),
the reference for the converter.

Written from HF ``modeling_gemma2.py`` / ``modeling_gemma3.py``: embeddings times ``sqrt(hidden)``,
RMSNorm with ``(1 + w)`` gains, sandwich norms around attention and MLP, q/k RMSNorm per head (gemma3),
rotate-half RoPE with the local base on sliding layers (gemma3), scores scaled by
``query_pre_attn_scalar ** -0.5`` and soft-capped (gemma2), a sliding-window causal mask
(``q - k < sliding_window``), gated ``gelu_pytorch_tanh`` MLP and soft-capped logits. It shares nothing
with inferos_cli.models.builders.
"""

from __future__ import annotations

import numpy as np


def rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """Gemma RMSNorm: ``x / rms(x) * (1 + w)``."""
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1.0 + w)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def rope(t: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE of ``t`` [heads, T, d] at positions ``pos``."""
    d = t.shape[-1]
    ang = np.outer(pos, 1.0 / theta ** (np.arange(0, d, 2) / d))
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-t[..., d // 2:], t[..., : d // 2]], -1)
    return t * cos + rot * sin


def forward(w: dict[str, np.ndarray], cfg: dict, ids: list[int]) -> np.ndarray:
    """Logits [T, vocab] (float64) of one sequence at positions 0..T-1."""
    hid, heads, kvh, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, window = cfg["rms_norm_eps"], cfg.get("sliding_window")
    f = lambda n: w[n].astype(np.float64)  # noqa: E731
    T = len(ids)
    pos = np.arange(T)
    x = f("model.embed_tokens.weight")[ids] * np.sqrt(hid)
    diff = pos[:, None] - pos[None, :]  # query - key
    full = np.where(diff >= 0, 0.0, -np.inf)
    local = np.where((diff >= 0) & (diff < (window or T + 1)), 0.0, -np.inf)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sliding = cfg["layer_types"][i] == "sliding_attention"
        theta = cfg.get("rope_local_base_freq", cfg["rope_theta"]) if sliding else cfg["rope_theta"]
        h = rms(x, f(p + "input_layernorm.weight"), eps)
        q = (h @ f(p + "self_attn.q_proj.weight").T).reshape(T, heads, d).transpose(1, 0, 2)
        k = (h @ f(p + "self_attn.k_proj.weight").T).reshape(T, kvh, d).transpose(1, 0, 2)
        v = (h @ f(p + "self_attn.v_proj.weight").T).reshape(T, kvh, d).transpose(1, 0, 2)
        if p + "self_attn.q_norm.weight" in w:
            q, k = rms(q, f(p + "self_attn.q_norm.weight"), eps), rms(k, f(p + "self_attn.k_norm.weight"), eps)
        q, k = rope(q, pos, theta), rope(k, pos, theta)
        k, v = np.repeat(k, heads // kvh, axis=0), np.repeat(v, heads // kvh, axis=0)
        s = q @ k.transpose(0, 2, 1) * cfg["query_pre_attn_scalar"] ** -0.5
        cap = cfg.get("attn_logit_softcapping")
        if cap:
            s = np.tanh(s / cap) * cap
        s = s + (local if sliding else full)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(T, heads * d) @ f(p + "self_attn.o_proj.weight").T
        x = x + rms(o, f(p + "post_attention_layernorm.weight"), eps)
        h = rms(x, f(p + "pre_feedforward_layernorm.weight"), eps)
        m = (gelu_tanh(h @ f(p + "mlp.gate_proj.weight").T) * (h @ f(p + "mlp.up_proj.weight").T)) @ f(p + "mlp.down_proj.weight").T
        x = x + rms(m, f(p + "post_feedforward_layernorm.weight"), eps)
    x = rms(x, f("model.norm.weight"), eps)
    logits = x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).astype(np.float64).T
    cap = cfg.get("final_logit_softcapping")
    return np.tanh(logits / cap) * cap if cap else logits
