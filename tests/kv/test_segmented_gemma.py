"""The segmented KV cache (int8 / int4 presets) on a tiny gemma3 GGUF (window 8, five of six layers local)
against the numpy reference, teacher-forced over random tokens so that no greedy loop hides a wrong window.

The segments are fed ``[int8 tier | int4 tier | sinks + recent ring]``, not in token order, so the sliding
layers must be windowed by position (graphs/kv_gqa.py), not by GroupQueryAttention's column window: before
that, every step after the ring first wrapped (token 37 for int8: 4 sinks + 32, token 69 for int4: 4 + 64)
attended to the wrong tokens, 5.8 (int8) and 4.6 (int4) max abs from the reference logits.

Tolerances: what quantizing the past costs on this model, measured with these tokens on onnxruntime 1.32
CPU: int8 (one group of 64 per head, step = range / 255) 0.004-0.006, 0.022 with the window covering
quantized tokens (window 48 > 4 sinks + 32); int4 (step = range / 15, ~17x the int8 step) 0.033 (0.06-0.07
over 150+ tokens). The bounds leave 3x or more over those; int8 must also stay under half of int4's error.
"""

from __future__ import annotations

import numpy as np
import pytest
from _arch_gguf import write_arch_gguf
from _engines import home_env, load_engine
from _gemma_ref import forward as ref_forward

CPU = {"scheduler": {"mode": "cpu"}}
BOUND = {"int8": 0.02, "int4": 0.25}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory):
    """(HF weights, config, {window: converted folder}) of tiny gemma3 conversions, in a temp home."""
    from inferos_cli.models.convert import convert_gguf

    tmp = tmp_path_factory.mktemp("seg_gemma")
    models = {}
    for window in (8, 48):
        hf, cfg = write_arch_gguf(tmp / f"g{window}.gguf", "gemma3", window=window, context=256)
        models[window] = (hf, cfg, convert_gguf(tmp / f"g{window}.gguf", tmp / f"out{window}", accuracy_level=0))
    with home_env(tmp / "home"):
        yield models


def forced(eng, cache, toks: list[int], prompt: int) -> np.ndarray:
    """Logits of every position: ``toks[:prompt]`` prefilled at once, then the rest one token at a time."""
    out = [eng.forward(np.asarray([toks[:prompt]]), cache, phase="prefill", logits="all")[0]]
    for t in toks[prompt:]:
        out.append(eng.forward(np.asarray([[t]]), cache, phase="decode", logits="all")[0])
    return np.concatenate(out)


def tokens(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 250, n)]


@pytest.mark.parametrize("prompt", [5, 20])  # shorter and longer than the window
def test_int8_and_int4_follow_the_reference_past_the_ring(gemma, prompt: int) -> None:
    hf, cfg, out = gemma[8]
    toks = tokens(prompt, prompt + 75)  # 80 / 95 tokens: both rings wrap (after 36 and 68 tokens)
    want = ref_forward(hf, cfg, toks)
    err = {}
    for preset in BOUND:
        eng = load_engine(out, preset, flags=CPU, use_env=False)
        cache = eng.new_cache(1)
        got = forced(eng, cache, toks, prompt)
        err[preset] = float(np.abs(got - want).max())
        assert sum(cache.stats().tokens.values()) == len(toks) and cache.stats().tokens[preset] > 0
    assert err["int8"] <= BOUND["int8"] and err["int4"] <= BOUND["int4"], err
    assert err["int8"] < err["int4"] / 2, err
    # the window matters on these tokens: the unwindowed model is far away
    assert np.abs(ref_forward(hf, {**cfg, "sliding_window": None}, toks) - want).max() > 1.0


def test_window_wider_than_the_fp_ring_reads_the_quantized_tiers(gemma) -> None:
    """Window 48 > 4 sinks + 32 recent (int8 preset): the local layers attend to int8-tier tokens too."""
    hf, cfg, out = gemma[48]
    toks = tokens(3, 130)
    eng = load_engine(out, "int8", flags=CPU, use_env=False)
    got = forced(eng, eng.new_cache(1), toks, 70)
    assert np.abs(got - ref_forward(hf, cfg, toks)).max() <= 0.1


def test_ragged_batch_keeps_each_rows_window(gemma) -> None:
    """Rows of 30 and 11 tokens prefilled alone and merged (padding columns in every segment), then decoded
    together: each row against the reference of its own tokens."""
    hf, cfg, out = gemma[8]
    eng = load_engine(out, "int8", flags=CPU, use_env=False)
    rows = [tokens(30, 90), tokens(11, 71)]
    prompts = (30, 11)
    cache, logits = None, []
    for toks, n in zip(rows, prompts):
        part = eng.new_cache(1)
        logits.append([eng.forward(np.asarray([toks[:n]]), part, phase="prefill", logits="all")[0]])
        cache = part if cache is None else (cache.merge(part) or cache)
    for step in range(60):
        step_ids = np.asarray([[toks[n + step]] for toks, n in zip(rows, prompts)])
        res = eng.forward(step_ids, cache, phase="decode", logits="all")
        for r in range(2):
            logits[r].append(res[r])
    for toks, n, got in zip(rows, prompts, logits):
        want = ref_forward(hf, cfg, toks[:n + 60])
        assert np.abs(np.concatenate(got) - want).max() <= BOUND["int8"]


def test_rewrite_windows_by_position(gemma) -> None:
    """The rewritten graph takes the past's positions and switches GroupQueryAttention's column window off."""
    import onnx

    from inferos_cli.graphs.kv_gqa import KEY_POSITIONS

    _, _, out = gemma[8]
    eng = load_engine(out, "int8", flags=CPU, use_env=False)
    assert eng.layout.rewrite.key_positions and eng.layout.config.key_positions
    model = onnx.load(str(eng.layout.onnx_path), load_external_data=False)
    assert KEY_POSITIONS in {i.name for i in model.graph.input}
    sizes = [next(a.i for a in n.attribute if a.name == "local_window_size")
             for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert sizes == [-1] * 6
    cache = eng.new_cache(1)
    forced(eng, cache, tokens(1, 50), 20)
    pos = cache.feeds()[KEY_POSITIONS]
    assert pos.shape == (1, 50) and sorted(pos[0].tolist()) == list(range(50))
    assert pos[0].tolist() != list(range(50))  # the feed order is not token order (the ring wrapped)
