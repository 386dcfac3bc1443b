"""The Phi-3 family (phi3: Phi-3 / Phi-3.5 mini and medium, Phi-4 mini with full rotary).

The decoder is the Llama one once the readers split Phi-3's fused ``qkv_proj`` and ``gate_up_proj``
(gate first) into q/k/v and gate/up rows (lossless: whole rows move). What differs is RoPE with
``longrope`` scaling (HF ``_compute_longrope_parameters``): the inverse frequencies are divided by
per-frequency factors (``short_factor`` within the original context, ``long_factor`` beyond it) and cos/sin
are multiplied by ``attention_factor`` (``sqrt(1 + ln(factor) / ln(original_max_positions))``).

HF switches the whole sequence to the long factors once it grows past the original context; with a KV
cache, keys already cached keep the short-factor rotation, so the tables here use the short factors for
positions below ``original_max_position_embeddings`` and the long ones from there on.
"""

from __future__ import annotations

import math

import numpy as np

from inferos_cli.models.builders.base import DecoderBuilder


class Phi3Builder(DecoderBuilder):
    """Builds phi3 decoders (longrope scaling in :meth:`rope_caches`)."""

    archs = ("phi3",)

    def rope_caches(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """One cos/sin pair for every layer, longrope-scaled when the spec says so."""
        spec, w = self.spec, self.w
        scaling = spec.rope_scaling or {}
        if scaling.get("rope_type") not in ("longrope", "su"):
            return super().rope_caches()
        cos, sin = longrope_tables(spec.head_dim, spec.rope_theta, spec.context_length, scaling)
        rope = (w.init("rope.cos", cos), w.init("rope.sin", sin))
        return rope, rope


def longrope_tables(dim: int, theta: float, max_positions: int, scaling: dict) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin ``[max_positions, dim/2]`` with longrope factors and attention factor (module docstring)."""
    original = int(scaling["original_max_position_embeddings"])
    factor = max_positions / original
    attn = scaling.get("attention_factor")
    if attn is None:
        attn = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    base = theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    pos = np.arange(max_positions, dtype=np.float64)
    short = np.outer(pos, 1.0 / (np.asarray(scaling["short_factor"], np.float64) * base))
    long = np.outer(pos, 1.0 / (np.asarray(scaling["long_factor"], np.float64) * base))
    angles = np.where((pos < original)[:, None], short, long)
    return (np.cos(angles) * attn).astype(np.float32), (np.sin(angles) * attn).astype(np.float32)
