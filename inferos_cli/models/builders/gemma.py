"""The Gemma family: gemma2 and gemma3 (text decoders).

Where they differ from the base decoder (HF ``modeling_gemma2.py`` / ``modeling_gemma3.py``):

* the token embeddings are scaled by ``sqrt(hidden_size)`` (the tied head reads the unscaled table);
* RMSNorm gains are ``1 + w`` in HF checkpoints; llama.cpp's GGUF files store ``1 + w`` already, and
  :mod:`inferos_cli.models.hf` adds the 1 when reading HF weights, so the graph uses plain gains;
* each block norms the attention output and the MLP output again (``post_attention_layernorm``,
  ``post_feedforward_layernorm``) before adding them to the residual stream;
* the MLP is gated GELU (tanh approximation): ``down(gelu_tanh(gate) * up)``;
* gemma3 norms q and k per head (RMSNorm over ``head_dim``) before RoPE; gemma2 soft-caps attention
  scores (``attn_softcap``) and both soft-cap the logits when ``final_softcap`` is set;
* sliding-window layers (gemma2: every other layer, gemma3: five of every six) with, for gemma3, their own
  RoPE base; the attention scale is ``query_pre_attn_scalar ** -0.5``. Those are spec fields the base
  builder reads (:class:`~inferos_cli.models.weights.DecoderSpec`).
"""

from __future__ import annotations

import math

import numpy as np

from inferos_cli.models.builders.base import DecoderBuilder
from inferos_cli.models.weights import DecoderWeights, LayerWeights, Weight


class GemmaBuilder(DecoderBuilder):
    """Builds gemma2 and gemma3 decoders."""

    archs = ("gemma2", "gemma3")

    def embedding(self, embed: Weight) -> str:
        """The base embedding times ``sqrt(hidden_size)``."""
        x = super().embedding(embed)
        return self.w.op("Mul", x, self.w.const(math.sqrt(self.spec.hidden_size), np.float32))

    def layer(self, i: int, layer: LayerWeights, pending: str | None, residual: str) -> tuple[str, str]:
        """Pre-norm block with post-attention and post-MLP norms (sandwich norms)."""
        assert layer.post_attn_norm is not None and layer.post_ffn_norm is not None
        x, residual = self.norm(pending, residual, layer.attn_norm, f"layers.{i}.attn_norm", first=(i == 0))
        attn = self.linear(self.self_attention(i, x, layer), layer.o, f"layers.{i}.o_proj")
        attn = self.rms_norm(attn, layer.post_attn_norm, f"layers.{i}.post_attn_norm")
        x, residual = self.norm(attn, residual, layer.ffn_norm, f"layers.{i}.ffn_norm")
        out = self.rms_norm(self.mlp(i, x, layer), layer.post_ffn_norm, f"layers.{i}.post_ffn_norm")
        return out, residual

    def qk_norm(self, i: int, q: str, k: str, layer: LayerWeights) -> tuple[str, str]:
        """gemma3: per-head RMSNorm of q and k; gemma2 has none."""
        if layer.q_norm is None or layer.k_norm is None:
            return q, k
        return self.head_norm(q, layer.q_norm, f"layers.{i}.q_norm"), self.head_norm(k, layer.k_norm, f"layers.{i}.k_norm")

    def activation(self, gate: str, up: str) -> str:
        """GELU with the tanh approximation (``gelu_pytorch_tanh``) on the gate, times up."""
        return self.w.op("Mul", self.w.op("FastGelu", gate, domain="com.microsoft"), up)

    def lm_head(self, x: str, weights: DecoderWeights) -> str:
        """The base head, soft-capped (``cap * tanh(logits / cap)``) when ``final_softcap`` is set."""
        logits = super().lm_head(x, weights)
        cap = self.spec.final_softcap
        if not cap:
            return logits
        w = self.w
        return w.op("Mul", w.op("Tanh", w.op("Mul", logits, w.const(1.0 / cap, np.float32))), w.const(cap, np.float32))
