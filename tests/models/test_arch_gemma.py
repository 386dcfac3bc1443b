"""Gemma 2 / Gemma 3 GGUF conversions against an independent numpy forward (HF modeling code): sliding
windows shorter than the prompt, local RoPE base, q/k norms, sandwich norms, soft-caps, a K-quant mix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _arch_gguf import session, stepped_logits, write_arch_gguf
from _gemma_ref import forward as ref_forward

IDS = [0, 45, 260, 71, 88, 19, 263, 5, 120, 77, 9, 201, 33, 150, 64, 170, 12, 99, 180, 41, 7, 230]  # 22 > window 8


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
@pytest.mark.parametrize("attention", ["gqa", "op", "plain"])
def test_float_gemma_matches_reference_beyond_the_window(tmp_path: Path, arch: str, attention: str) -> None:
    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / f"{arch}.gguf"
    hf, cfg = write_arch_gguf(src, arch)
    out = convert_gguf(src, tmp_path / "out", accuracy_level=0, attention=attention)
    want = ref_forward(hf, cfg, IDS)
    got = stepped_logits(session(out), IDS, [len(IDS)])
    assert np.abs(got - want).max() <= 1e-3
    # the window matters: the same model without it differs on the late tokens
    unwindowed = ref_forward(hf, {**cfg, "sliding_window": None}, IDS)
    assert np.abs(unwindowed[-1] - want[-1]).max() > 1e-2


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_gemma_decode_with_past_matches_reference(tmp_path: Path, arch: str) -> None:
    """Prefill past the window, then one token at a time through the GroupQueryAttention cache."""
    import onnx

    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / f"{arch}.gguf"
    hf, cfg = write_arch_gguf(src, arch)
    out = convert_gguf(src, tmp_path / "out", accuracy_level=0)
    nodes = [n for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "GroupQueryAttention"]
    windows = [next(a.i for a in n.attribute if a.name == "local_window_size") for n in nodes]
    assert windows == [8 if t == "sliding_attention" else -1 for t in cfg["layer_types"]]
    got = stepped_logits(session(out), IDS, [12, 1, 3, 1, 1, 1, 1, 1, 1])
    assert np.abs(got - ref_forward(hf, cfg, IDS)).max() <= 1e-3


def test_gemma3_k_quant_mix_stays_low_bit_and_exact(tmp_path: Path) -> None:
    """Q5_0 / Q4_K / Q6_K / Q8_0 tensors go into MatMulNBits as they are: logits equal the reference over
    the file's own dequantized weights; nothing is widened to floats."""
    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / "q.gguf"
    hf, cfg = write_arch_gguf(src, "gemma3", quant=True)
    out = convert_gguf(src, tmp_path / "out", accuracy_level=0)
    storage = json.loads((out / "inferos.json").read_text())["storage"]
    assert set(storage) == {"Q8_0->8bit", "Q5_0->8bit", "Q4_K->4bit", "Q6_K->8bit"}, storage
    want = ref_forward(hf, cfg, IDS)
    assert np.abs(stepped_logits(session(out), IDS, [len(IDS)]) - want).max() <= 1e-3
    fast = convert_gguf(src, tmp_path / "fast")  # int8 activations: close, not exact
    got = stepped_logits(session(fast), IDS, [len(IDS)])
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75


def test_gemma_spec_from_gguf_keys(tmp_path: Path) -> None:
    """llama.cpp's Gemma rules: gemma3 global every sixth layer with local RoPE base 10000, gemma2
    alternating with its soft-caps; end-of-turn tokens stop like EOS."""
    import gguf

    from inferos_cli.models.gguf import gguf_spec

    for arch in ("gemma3", "gemma2"):
        src = tmp_path / f"{arch}.gguf"
        write_arch_gguf(src, arch)
        reader = gguf.GGUFReader(str(src))
        spec = gguf_spec(reader, {t.name: t for t in reader.tensors})
        assert spec.arch == arch and spec.sliding_window == 8 and spec.tie_embeddings
        if arch == "gemma3":
            assert [spec.is_local(i) for i in range(6)] == [True] * 5 + [False]
            assert spec.rope_local_theta == 10000.0 and spec.rope_theta == 1e6
            assert spec.attn_softcap is None and spec.final_softcap is None and spec.head_dim == 64
        else:
            assert [spec.is_local(i) for i in range(2)] == [True, False]
            assert (spec.attn_softcap, spec.final_softcap) == (3.0, 4.0)


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_hf_folder_matches_reference(tmp_path: Path, arch: str) -> None:
    """The safetensors reader adds Gemma's 1 to the norm gains and reads the layer pattern from the config."""
    from _arch_gguf import write_hf_folder

    from inferos_cli.models.convert import convert_gguf, convert_hf_folder

    hf, cfg = write_arch_gguf(tmp_path / "m.gguf", arch)
    tok = convert_gguf(tmp_path / "m.gguf", tmp_path / "gguf-out")
    hf_cfg = {**cfg, "model_type": "gemma3_text" if arch == "gemma3" else arch}
    src = write_hf_folder(tmp_path / "hf", hf, hf_cfg, tok)
    out = convert_hf_folder(src, tmp_path / "out", dtype="fp32")
    assert np.abs(stepped_logits(session(out), IDS, [len(IDS)]) - ref_forward(hf, cfg, IDS)).max() <= 1e-3
