"""The segmented KV cache (inferos_cli/kv/segmented.py + inferos_cli/kv/tiers.py + inferos_cli/kv/layouts.py) through the real engine path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _engines import clone_cache, load_engine

from inferos_cli.kv.segmented import SegmentedCache
from inferos_cli.kv.tiers import TierPlan, assign_tier, importance

TEXT = ("Once upon a time, there was a little girl named Lily. She liked to play outside in the park with her "
        "friends. One day, she saw a big red ball under a tree and wanted to play with it. ")


def engine(folder: Path, profile: str, **kv: Any):
    return load_engine(folder, profile, flags={"kv": kv} if kv else None)


def tokens(eng, n: int) -> list[int]:
    ids = eng.tokenizer.encode(TEXT * 4, add_bos=False)[: n - 1]
    return [eng.info.bos_token_id or 1] + ids


def feed(eng, cache, ids: list[int], prefix: int) -> list[np.ndarray]:
    """Prefill ``prefix`` tokens then one at a time; the last-position logits of every run."""
    out = [eng.forward(np.asarray([ids[:prefix]]), cache, phase="prefill")[0, -1]]
    for tok in ids[prefix:]:
        out.append(eng.forward(np.asarray([[tok]]), cache, phase="decode")[0, -1])
    return out


def test_backend_choice(stories_onnx: Path) -> None:
    from inferos_cli.kv.plain import PlainCache

    base = engine(stories_onnx, "baseline")
    assert isinstance(base.new_cache(1), PlainCache) and base.layout.onnx_path == base.info.onnx_path
    seg = engine(stories_onnx, "int4")
    assert isinstance(seg.new_cache(1), SegmentedCache)
    assert seg.layout.onnx_path != seg.info.onnx_path and "int4" in seg.layout.describe()
    assert seg.layout.config.group == 8  # head_dim 8 < group_size 32: one group per head


def test_each_token_quantized_exactly_once(stories_onnx: Path) -> None:
    eng = engine(stories_onnx, "int8", recent_window=16, sink_tokens=4)
    eng.layout.config.track = True
    cache = eng.new_cache(1)
    ids = tokens(eng, 70)
    feed(eng, cache, ids, prefix=30)
    seen = np.concatenate(cache.quantized_positions)
    # sinks (0..3) and the last 16 tokens stay fp; every other position was quantized once
    assert sorted(seen.tolist()) == list(range(4, len(ids) - 16))
    st = cache.stats()
    assert st.tokens == {"fp": 20, "int8": len(ids) - 20}
    assert int(cache.seen_tokens[0]) == len(ids) == cache.past_len
    assert st.bytes_fp16 == len(ids) * 2 * 5 * 4 * 8 * 2
    # int8 codes + fp16 scale + uint8 zero per (token, head, kind, layer) with one 8-wide group
    assert st.bytes["int8"] == (len(ids) - 20) * 2 * 5 * 4 * (8 + 2 + 1)
    assert st.bytes["fp"] == 20 * 2 * 5 * 4 * 8 * 4


@pytest.mark.parametrize("preset,max_kl", [("int8", 1e-3), ("int4", 0.1), ("int4-k8v4", 0.05)])
def test_quantized_cache_tracks_baseline(stories_onnx: Path, preset: str, max_kl: float) -> None:
    base, seg = engine(stories_onnx, "baseline"), engine(stories_onnx, preset, recent_window=16)
    ids = tokens(base, 90)
    a = feed(base, base.new_cache(1), ids, 20)
    cache = seg.new_cache(1)
    b = feed(seg, cache, ids, 20)
    kls = []
    for la, lb in zip(a, b):
        pa = np.exp(la - la.max()); pa /= pa.sum()
        pb = np.exp(lb - lb.max()); pb /= pb.sum()
        kls.append(float(np.sum(pa * (np.log(pa + 1e-30) - np.log(pb + 1e-30)))))
    assert np.mean(kls) < max_kl
    assert np.mean([la.argmax() == lb.argmax() for la, lb in zip(a, b)]) > 0.8
    st = cache.stats()
    assert st.total_bytes < st.bytes_fp16 * 2  # the fp32 baseline holds 2x fp16
    assert sum(st.tokens.values()) == len(ids)


def test_eviction_keeps_true_positions(stories_onnx: Path) -> None:
    eng = engine(stories_onnx, "int8", recent_window=16)
    eng.layout.config.l3_evict = 0.99  # almost every quantized token is a candidate
    cache = eng.new_cache(1)
    ids = tokens(eng, 60)
    feed(eng, cache, ids, 40)
    twin = clone_cache(cache)
    tier = cache.tiers[0]
    before = set(tier.pos[: tier.n, 0].tolist())
    removed = cache.evict(10)
    assert removed == 10 and cache.stats().evicted == 10
    gone = before - set(tier.pos[: tier.n, 0].tolist())
    assert len(gone) == 10 and not gone & set(range(4))  # never the sinks
    assert cache.past_len == len(ids) - 10 and int(cache.seen_tokens[0]) == len(ids)
    # reference: the same cache with those columns masked instead of removed
    t2 = twin.tiers[0]
    for col in range(t2.n):
        if int(t2.pos[col, 0]) in gone:
            t2.mask[col, 0] = 0
    fed: list[np.ndarray] = []
    session = eng.plan.decode.session

    class Spy:
        def __getattr__(self, name: str) -> Any:
            return getattr(session, name)

        def run(self, names: Any, feeds: dict[str, Any], *a: Any) -> Any:
            fed.append(np.array(feeds["position_ids"]))
            return session.run(names, feeds, *a)

        def run_with_ort_values(self, names: Any, feeds: dict[str, Any], *a: Any) -> Any:
            fed.append(feeds["position_ids"].numpy().copy())
            return session.run_with_ort_values(names, feeds, *a)

    eng.plan.decode.session = Spy()
    try:
        nxt = np.asarray([[ids[5]]])
        la = eng.forward(nxt, cache, phase="decode")[0, -1]
        lb = eng.forward(nxt, twin, phase="decode")[0, -1]
    finally:
        eng.plan.decode.session = session
    assert [int(f[0, 0]) for f in fed] == [len(ids), len(ids)]  # the true position, not past_len
    assert np.abs(la - lb).max() <= 1e-4


def test_budget_demotes_then_evicts(stories_onnx: Path) -> None:
    eng = engine(stories_onnx, "baseline", mode="dynamic", quant="tiered", recent_window=16)
    eng.layout.config.l1_int8 = 0.0  # everything leaves the window as int8 ...
    eng.layout.config.l3_evict = 0.5
    cache = eng.new_cache(1)
    ids = tokens(eng, 80)
    feed(eng, cache, ids, 40)
    assert cache.stats().tokens["int8"] == 60 and cache.stats().tokens["int4"] == 0
    full = cache.total_bytes()
    cache.cfg.budget_bytes = full - 30 * cache.tiers[0].bytes_per_column() // 2
    cache._enforce()
    st = cache.stats()
    assert st.tokens["int4"] > 0 and cache.demoted > 0  # ... and int8 -> int4 comes first
    assert cache.total_bytes() <= cache.cfg.budget_bytes
    cache.cfg.budget_bytes = cache.total_bytes() - 5 * cache.tiers[1].bytes_per_column()
    cache._enforce()
    assert cache.stats().evicted > 0 and cache.total_bytes() <= cache.cfg.budget_bytes
    # never sinks or the window
    assert cache.stats().tokens["fp"] == 20


def test_pressure_tightens(stories_onnx: Path) -> None:
    eng = engine(stories_onnx, "baseline", mode="dynamic", quant="tiered", recent_window=16)
    eng.layout.config.l1_int8 = 0.0
    level = {"p": 0.0}
    eng.layout.config.pressure = lambda: level["p"]
    cache = eng.new_cache(1)
    ids = tokens(eng, 60)
    feed(eng, cache, ids[:40], 30)
    assert cache.stats().tokens.get("int8", 0) > 0
    level["p"] = 0.6
    feed(eng, cache, ids[40:], 1)
    st = cache.stats()
    assert st.tokens["int8"] == 0 and st.tokens["int4"] > 0 and st.evicted == 0
    level["p"] = 0.9
    eng.forward(np.asarray([[ids[3]]]), cache, phase="decode")
    assert cache.stats().evicted > 0


def test_select_and_merge_rows(stories_onnx: Path) -> None:
    eng = engine(stories_onnx, "int4", recent_window=16)
    ids = tokens(eng, 70)
    a, b = eng.new_cache(1), eng.new_cache(1)
    feed(eng, a, ids[:50], 20)
    feed(eng, b, ids[10:40], 20)
    solo_a = clone_cache(a)
    solo_b = clone_cache(b)
    a.merge(b)
    assert a.batch == 2 and a.past_mask().shape == (2, a.past_len)
    assert a.past_mask()[1].sum() == 30 and a.past_mask()[0].sum() == 50
    step = np.asarray([[ids[50]], [ids[40]]])
    both = eng.forward(step, a, phase="decode")[:, -1]
    la = eng.forward(step[:1], solo_a, phase="decode")[0, -1]
    lb = eng.forward(step[1:], solo_b, phase="decode")[0, -1]
    assert np.abs(both[0] - la).max() <= 1e-4 and np.abs(both[1] - lb).max() <= 1e-4
    a.select([1])
    assert a.batch == 1 and list(a.seen_tokens) == [31]


def test_policy_scores_and_tiers() -> None:
    norms = np.array([[1.0], [3.0], [2.0], [np.nan]], dtype=np.float32)
    s = importance(norms)
    assert s[0, 0] == 1.0 and s[1, 0] == 0.0 and abs(s[2, 0] - 0.5) < 1e-6 and s[3, 0] == 1.0
    plan = TierPlan.from_quant("tiered")
    scores = np.array([0.9, 0.5, 0.1])
    assert assign_tier(plan, scores, 0.8).tolist() == [0, 1, 1]
    assert assign_tier(plan, scores, 0.8, pressure=0.6).tolist() == [1, 1, 1]
    assert TierPlan.from_quant("int4-k8v4").key_bits == {"k8v4": 8}


def test_gqa_graph_evicts_and_merges_ragged_rows(oga_exact: Path) -> None:
    """The rewrite gives GroupQueryAttention position_ids + an attention bias: tokens can be evicted and
    rows of different lengths batched, which plain GQA graphs cannot do."""
    eng = engine(oga_exact, "int4")
    assert eng.has_position_ids
    cache = eng.new_cache(1)
    ids = eng.tokenizer.encode(TEXT * 3, add_bos=False)[:100]
    feed(eng, cache, ids[:90], 80)
    assert cache.stats().tokens == {"fp": 68, "int4": 22}
    cache.cfg.l3_evict = 0.99
    assert cache.evict(5) == 5 and cache.past_len == 85 and int(cache.seen_tokens[0]) == 90
    other = eng.new_cache(1)
    feed(eng, other, ids[:40], 40)
    solo_a, solo_b = clone_cache(cache), clone_cache(other)
    cache.merge(other)
    step = np.asarray([[ids[90]], [ids[40]]])
    both = eng.forward(step, cache, phase="decode")[:, -1]
    la = eng.forward(step[:1], solo_a, phase="decode")[0, -1]
    lb = eng.forward(step[1:], solo_b, phase="decode")[0, -1]
    assert np.abs(both[0] - la).max() < 1e-3 and np.abs(both[1] - lb).max() < 1e-3


def test_incremental_norm_range_matches_full_scan(stories_onnx: Path) -> None:
    """The min/max of resident key norms (importance normaliser) is kept incrementally; after appends,
    demotion, eviction and row changes it equals a scan of every resident column."""
    eng = engine(stories_onnx, "baseline", mode="dynamic", quant="tiered", recent_window=16, sink_tokens=2)
    eng.layout.config.l3_evict = 0.5
    ids = tokens(eng, 70)

    def scanned(c: SegmentedCache) -> list[float]:
        fin = c._all_norms()
        fin = fin[np.isfinite(fin)]
        return [float(fin.min()), float(fin.max())]

    a, b = eng.new_cache(1), eng.new_cache(1)
    feed(eng, a, ids, prefix=20)
    feed(eng, b, ids[:50], prefix=12)
    assert a.tiers[0].n + a.tiers[1].n > 0  # tokens left the window
    assert a._norm_range().tolist() == pytest.approx(scanned(a))
    assert a.demote(5) > 0
    assert a._norm_range().tolist() == pytest.approx(scanned(a))
    a.evict(3)
    assert a._norm_range().tolist() == pytest.approx(scanned(a))
    a.merge(b)
    assert a._norm_range().tolist() == pytest.approx(scanned(a))
    a.select([1])
    assert a._norm_range().tolist() == pytest.approx(scanned(a))
    assert scanned(a) == pytest.approx(scanned(b))


def test_select_drops_columns_of_retired_rows(stories_onnx: Path) -> None:
    """After a long row retires, its quantized columns go (no remaining row attends to them): the cache is as
    wide as the remaining row needs and decoding it still matches the row's own cache."""
    eng = engine(stories_onnx, "int4", recent_window=16)
    ids = tokens(eng, 70)
    a, b = eng.new_cache(1), eng.new_cache(1)
    feed(eng, a, ids[:60], 20)
    feed(eng, b, ids[10:40], 20)
    solo_b = clone_cache(b)
    a.merge(b)
    wide = a.past_len
    a.select([1])
    assert a.batch == 1 and a.past_len < wide
    assert sum(t.n for t in a.tiers) == sum(t.n for t in solo_b.tiers) == 10  # 30 tokens - 4 sinks - 16 window
    assert int(a.past_mask().sum()) == 30 and a.stats().tokens == solo_b.stats().tokens
    step = np.asarray([[ids[40]]])
    got = eng.forward(step, a, phase="decode")[0, -1]
    want = eng.forward(step, solo_b, phase="decode")[0, -1]
    assert np.abs(got - want).max() <= 1e-4


# ----- what KV numbers mean (issue 17, item 3) -------------------------------------------------------------
def _left_padded(eng, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``lengths`` real tokens, left-padded to the longest, and their mask."""
    ids = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, max(lengths) - n:] = tokens(eng, n)
        mask[row, max(lengths) - n:] = 1
    return ids, mask


def test_plain_cache_counts_bytes_that_hold_tokens(stories_onnx: Path, oga_dir: Path) -> None:
    """``bytes`` = real tokens x bytes per token; padding and preallocated capacity are ``reserved``. Both
    caches are fp32, so the ratio to fp16 is exactly 2 (the cache really holds more), whatever was
    allocated ahead (it read 12.8 for 10 tokens in a 64-column buffer, and more than 2 with padding)."""
    base = engine(stories_onnx, "baseline")
    per_token = 2 * 5 * 4 * 8 * 4  # keys + values, 5 layers, 4 kv heads, head_dim 8, fp32
    cache = base.new_cache(2)
    ids, mask = _left_padded(base, [30, 12])
    base.prefill(ids, cache, None, mask)
    st = cache.stats()
    assert st.tokens == {"fp": 42} and st.bytes == {"fp": 42 * per_token} and st.ratio_vs_fp16 == 2.0
    assert st.reserved == {"fp": 2 * 30 * per_token} and st.reserved_bytes > st.total_bytes  # padding

    oga = load_engine(oga_dir.parent, "baseline", flags={"scheduler": {"mode": "cpu"}})
    info = oga.info
    per_token = 2 * info.num_layers * info.num_kv_heads * info.head_dim * 4
    packed = oga.new_cache(1, capacity=64)
    assert packed.shares_buffers
    oga.prefill(np.asarray([oga.tokenizer.encode("Once upon a time there was")]), packed)
    st = packed.stats()
    n = st.tokens["fp"]
    assert n == int(packed.seen_tokens[0]) and st.bytes == {"fp": n * per_token} and st.ratio_vs_fp16 == 2.0
    assert st.reserved == {"fp": 64 * per_token}


def test_segmented_cache_counts_bytes_that_hold_tokens(stories_onnx: Path) -> None:
    """Per tier: real tokens x that tier's bytes per token (int8: codes + fp16 scale + uint8 zero per group),
    not the columns allocated for every row of a batch; the ring and tier capacities are ``reserved``."""
    eng = engine(stories_onnx, "int8", recent_window=16, sink_tokens=4)
    cache = eng.new_cache(2)
    ids, mask = _left_padded(eng, [60, 25])
    eng.prefill(ids, cache, None, mask)
    st = cache.stats()
    elements = 2 * 5 * 4  # keys + values, 5 layers, 4 kv heads
    assert sum(st.tokens.values()) == 85 and st.tokens["int8"] > 0
    assert st.bytes["fp"] == st.tokens["fp"] * elements * 8 * 4
    assert st.bytes["int8"] == st.tokens["int8"] * elements * (8 + 2 + 1)
    assert cache.token_bytes("int8") == elements * (8 + 2 + 1)
    assert all(st.reserved[tier] >= st.bytes[tier] for tier in st.bytes)
    assert st.bytes_fp16 == 85 * elements * 8 * 2
