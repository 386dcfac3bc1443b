"""Qwen3 (q/k norms), Phi-3 (fused qkv / gate-up, longrope) and Llama 3 RoPE scaling (``rope_freqs.weight``)
GGUF conversions against an independent numpy forward written from the HF modeling code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _arch_gguf import session, stepped_logits, write_arch_gguf
from _decoder_ref import forward as ref_forward

IDS = [0, 45, 260, 71, 88, 19, 263, 5, 120, 77, 9, 201, 33, 150]  # 14 < phi3's original context 16


@pytest.mark.parametrize("arch", ["qwen3", "phi3", "llama"])
@pytest.mark.parametrize("attention", ["gqa", "op", "plain"])
def test_float_weights_match_reference(tmp_path: Path, arch: str, attention: str) -> None:
    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / f"{arch}.gguf"
    hf, cfg = write_arch_gguf(src, arch)
    out = convert_gguf(src, tmp_path / "out", accuracy_level=0, attention=attention)
    want = ref_forward(hf, cfg, IDS)
    assert np.abs(stepped_logits(session(out), IDS, [len(IDS)]) - want).max() <= 1e-3
    # decode with the cache: a prefill, then one token at a time
    assert np.abs(stepped_logits(session(out), IDS, [9, 1, 2, 1, 1]) - want).max() <= 1e-3


@pytest.mark.parametrize("arch", ["qwen3", "phi3", "llama"])
def test_quantized_mix_is_kept_and_exact(tmp_path: Path, arch: str) -> None:
    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / f"{arch}.gguf"
    hf, cfg = write_arch_gguf(src, arch, quant=True, tied=False)
    out = convert_gguf(src, tmp_path / "out", accuracy_level=0)
    storage = json.loads((out / "inferos.json").read_text())["storage"]
    assert not any(k in storage for k in ("fp32", "fp16")), storage
    want = ref_forward(hf, cfg, IDS)
    assert np.abs(stepped_logits(session(out), IDS, [len(IDS)]) - want).max() <= 1e-3


def test_the_twists_matter(tmp_path: Path) -> None:
    """The reference without q/k norms, with plain RoPE, or without longrope differs: each test above
    checks something."""
    for arch, drop in (("qwen3", "q_norm"), ("llama", "rope_scaling"), ("phi3", "rope_scaling")):
        hf, cfg = write_arch_gguf(tmp_path / f"{arch}.gguf", arch)
        want = ref_forward(hf, cfg, IDS)
        if drop == "q_norm":
            other = ref_forward({k: v for k, v in hf.items() if "_norm." not in k or "layernorm" in k}, cfg, IDS)
        else:
            other = ref_forward(hf, {**cfg, "rope_scaling": None}, IDS)
        assert np.abs(other - want).max() > 1e-2, arch


def test_phi3_longrope_switches_to_long_factors_past_the_original_context() -> None:
    """Positions from ``original_max_position_embeddings`` on use the long factors; all carry the
    attention factor."""
    import math

    from inferos_cli.models.builders.phi3 import longrope_tables

    short, long = [1.0, 2.0], [4.0, 8.0]
    scaling = {"original_max_position_embeddings": 8, "short_factor": short, "long_factor": long}
    cos, sin = longrope_tables(4, 100.0, 32, scaling)
    attn = math.sqrt(1 + math.log(4) / math.log(8))
    inv = 1.0 / (100.0 ** (np.arange(0, 4, 2) / 4))
    assert np.allclose(cos[5], np.cos(5 * inv / short) * attn, atol=1e-6)
    assert np.allclose(sin[20], np.sin(20 * inv / long) * attn, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen3", "phi3"])
def test_hf_folder_matches_reference(tmp_path: Path, arch: str) -> None:
    """The safetensors reader lays out the same families (phi3's fused rows split) to the same logits."""
    from _arch_gguf import write_hf_folder

    from inferos_cli.models.convert import convert_gguf, convert_hf_folder

    hf, cfg = write_arch_gguf(tmp_path / "m.gguf", arch)
    tok = convert_gguf(tmp_path / "m.gguf", tmp_path / "gguf-out")
    src = write_hf_folder(tmp_path / "hf", hf, cfg, tok)
    out = convert_hf_folder(src, tmp_path / "out", dtype="fp32")
    assert np.abs(stepped_logits(session(out), IDS, [len(IDS)]) - ref_forward(hf, cfg, IDS)).max() <= 1e-3
