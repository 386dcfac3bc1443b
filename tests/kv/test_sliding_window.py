"""Bounded sliding-window caches (kv/plain.py, kv/fused.py; the converter's optional local_attention_mask) on a
tiny gemma3 GGUF (window 8, five of six layers local): the same greedy tokens and logits as full-length caches
and as the numpy reference, with prompts longer than the window, chunked prefills, decodes across many
compactions, ragged batches and the session-allocated (no IOBinding) path; the stats count only what is held."""

from __future__ import annotations

import os

import numpy as np
import pytest

from _arch_gguf import write_arch_gguf
from _engines import home_env, load_engine
from _gemma_ref import forward as ref_forward
from inferos_cli.kv.fused import FusedCache
from inferos_cli.kv.plain import ALIGN, PlainCache

WINDOW, CONTEXT = 8, 1200
CPU = {"scheduler": {"mode": "cpu"}}
CACHES = {"baseline": PlainCache, "int8-fused": FusedCache}
# decode steps: the int8 cache aligns its window to 512 tokens at head_dim 64 (kv.fused.window_align), so it
# compacts only every ~512 steps
DECODE = {"baseline": 100, "int8-fused": 1100}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory):
    """(HF weights, config, baseline and int8-fused engines) of one tiny gemma3 conversion, in a temp home."""
    from inferos_cli.models.convert import convert_gguf

    tmp = tmp_path_factory.mktemp("sliding")
    hf, cfg = write_arch_gguf(tmp / "g.gguf", "gemma3", window=WINDOW, context=CONTEXT)
    out = convert_gguf(tmp / "g.gguf", tmp / "out", accuracy_level=0)
    with home_env(tmp / "home"):
        yield hf, cfg, {p: load_engine(out, p, flags=CPU, use_env=False) for p in CACHES}


def drive(eng, cache, prompt: list[int], chunks: list[int], n_decode: int,
          forced: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """Prefill ``prompt`` in ``chunks``, then decode ``n_decode`` tokens (greedy, or ``forced``); return the
    tokens and the logits of every position."""
    toks, out, start = list(prompt), [], 0
    for n in chunks:
        out.append(eng.forward(np.asarray([prompt[start:start + n]]), cache, phase="prefill", logits="all")[0])
        start += n
    assert start == len(prompt)
    for i in range(n_decode):
        nxt = forced[len(prompt) + i] if forced else int(out[-1][-1].argmax())
        toks.append(nxt)
        out.append(eng.forward(np.asarray([[nxt]]), cache, phase="decode", logits="all")[0])
    return toks, np.concatenate(out)


@pytest.mark.parametrize("profile", list(CACHES))
@pytest.mark.parametrize("chunks", [[40], [5, 19, 9], [3]])
def test_bounded_window_matches_the_full_cache_and_the_reference(gemma, profile: str, chunks: list[int]) -> None:
    hf, cfg, engines = gemma
    eng = engines[profile]
    prompt = [int(t) for t in np.random.default_rng(sum(chunks)).integers(3, 250, sum(chunks))]
    steps = DECODE[profile]
    cap = len(prompt) + steps + 1
    bounded = eng.new_cache(1, capacity=cap)
    assert isinstance(bounded, CACHES[profile]) and bounded.local_layers == 5 and bounded.window == WINDOW
    toks, got = drive(eng, bounded, prompt, chunks, steps)
    full = CACHES[profile](eng.info, 1, capacity=cap, windowed=False)
    toks_full, want = drive(eng, full, prompt, chunks, steps)
    assert toks == toks_full
    assert np.abs(got - want).max() <= 1e-4
    # bit-identical: kept keys stay in their summation blocks (kv.plain.ALIGN, kv.fused.window_align); without
    # the alignment this test measured differences of 3e-6 (float32) and 2.7e-3 (int8) on onnxruntime 1.32
    assert np.array_equal(got, want)
    if profile == "baseline":  # the float cache is the model itself
        assert np.abs(got - ref_forward(hf, cfg, toks)).max() <= 1e-3
    # the local layers hold a window (and its alignment), the full one everything
    assert bounded.local_mask(0).shape[1] <= 2 * WINDOW + bounded.align
    held, whole = bounded.stats(), full.stats()
    assert held.tokens == whole.tokens and held.total_bytes < whole.total_bytes / 2
    assert held.reserved_bytes < whole.reserved_bytes


@pytest.mark.parametrize("profile", list(CACHES))
def test_ragged_batch_and_retired_rows(gemma, profile: str) -> None:
    """Rows of 30 and 11 tokens prefilled alone and merged (as generate_batch and the batcher do), decoded
    together past compactions, then one row retired: each row as full caches (and the float one as the
    reference)."""
    hf, cfg, engines = gemma
    eng, cls = engines[profile], CACHES[profile]
    steps = DECODE[profile]
    rng = np.random.default_rng(7)
    prompts = [[int(t) for t in rng.integers(3, 250, n)] for n in (30, 11)]

    def run(windowed: bool) -> tuple[list[list[int]], list[np.ndarray]]:
        cache, logits = None, []
        for p in prompts:
            part = cls(eng.info, 1, capacity=len(p) + steps + 1, windowed=windowed)
            logits.append([eng.forward(np.asarray([p]), part, phase="prefill", logits="all")[0]])
            cache = part if cache is None else (cache.merge(part) or cache)
        toks = [list(p) for p in prompts]
        rows = [0, 1]
        for step in range(steps):
            if step == steps * 2 // 3:  # row 0 retires; row 1 goes on alone
                cache.select([1])
                rows = [1]
            nxt = [int(logits[r][-1][-1].argmax()) for r in rows]
            out = eng.forward(np.asarray([[t] for t in nxt]), cache, phase="decode", logits="all")
            for i, r in enumerate(rows):
                toks[r].append(nxt[i])
                logits[r].append(out[i])
        return toks, [np.concatenate(part) for part in logits]

    toks, got = run(True)
    toks_full, want = run(False)
    assert toks == toks_full
    for r in range(2):
        assert np.array_equal(got[r], want[r])
        if profile == "baseline":
            assert np.abs(got[r] - ref_forward(hf, cfg, toks[r])[:len(got[r])]).max() <= 1e-3


def test_session_allocated_presents_are_bounded_too(gemma) -> None:
    """Without preallocation (io.enable_iobinding = false) the session returns the presents and the cache
    trims the window's columns itself."""
    hf, cfg, engines = gemma
    eng = engines["baseline"]
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 250, 21)]
    cache = PlainCache(eng.info, 1)
    assert not cache.shares_buffers
    toks, got = drive(eng, cache, prompt, [13, 8], 70)
    _, want = drive(eng, PlainCache(eng.info, 1, windowed=False), prompt, [13, 8], 70, forced=toks)
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - ref_forward(hf, cfg, toks)).max() <= 1e-3
    assert cache.feeds()[eng.info.past_key_fmt % 0].shape[2] <= 2 * WINDOW + ALIGN
    assert cache.feeds()[eng.info.past_key_fmt % 5].shape[2] == len(toks)  # the full layer


def test_stats_and_plan_say_what_is_held(gemma) -> None:
    """The model facts name the windowed layers, the layout's line says so, and the stats count every
    token in the full layer and each row's window in the five local ones."""
    _, _, engines = gemma
    eng = engines["baseline"]
    assert eng.info.kv_windows == [WINDOW] * 5 + [0]
    for e in engines.values():
        assert "sliding-window layers 0-4 (5 of 6) hold each row's last 7 tokens" in e.layout.describe()
    cache = eng.new_cache(1, capacity=101)
    drive(eng, cache, list(range(3, 53)), [50], 50)
    local = int(cache.local_mask(0).sum())
    assert WINDOW - 1 <= local <= 2 * WINDOW + ALIGN
    per = 2 * eng.info.num_kv_heads * eng.info.head_dim * 4  # bytes per token and layer (keys + values, fp32)
    st = cache.stats()
    assert st.tokens == {"fp": 100}
    assert st.total_bytes == (100 * 1 + local * 5) * per and st.bytes_fp16 == st.total_bytes // 2
