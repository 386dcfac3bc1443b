"""The Qwen3 family (dense qwen3): the Llama decoder with per-head RMSNorm on q and k, and no q/k/v bias.

HF ``modeling_qwen3.py`` norms each head of q and k (``q_norm`` / ``k_norm``, RMSNorm over ``head_dim``)
after the projections and before RoPE; ``head_dim`` is its own config value (128) rather than
``hidden_size / heads``. Everything else is the base decoder.
"""

from __future__ import annotations

from inferos_cli.models.builders.base import DecoderBuilder
from inferos_cli.models.weights import LayerWeights


class Qwen3Builder(DecoderBuilder):
    """Builds qwen3 decoders."""

    archs = ("qwen3",)

    def qk_norm(self, i: int, q: str, k: str, layer: LayerWeights) -> tuple[str, str]:
        """Per-head RMSNorm of q and k with the layer's ``[head_dim]`` gains."""
        if layer.q_norm is None or layer.k_norm is None:
            return q, k
        return self.head_norm(q, layer.q_norm, f"layers.{i}.q_norm"), self.head_norm(k, layer.k_norm, f"layers.{i}.k_norm")
