"""The Llama family: llama (Llama 2/3, SmolLM/SmolLM2, TinyLlama), mistral without a sliding window, qwen2.

All three are the base decoder as it stands: pre-norm RMSNorm blocks, rotate-half RoPE (llama3 / linear
scaling in :func:`~inferos_cli.models.builders.base.rope_tables`), grouped-query attention and a SwiGLU MLP.
Qwen2's q/k/v biases arrive as weights (:class:`~inferos_cli.models.weights.LayerWeights`), so no hook
differs. Another architecture is one module like this one, overriding the hooks where it differs.
"""

from __future__ import annotations

from inferos_cli.models.builders.base import DecoderBuilder


class LlamaBuilder(DecoderBuilder):
    """Builds llama, mistral and qwen2 decoders with the base hooks unchanged."""

    archs = ("llama", "mistral", "qwen2")
