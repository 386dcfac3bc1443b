"""The engine's per-token host path: the shared-buffer cache's in-place mask, the all-ones attention mask
view, what the kept IOBinding holds on to, the typed token events, and huge-page backing of the weights."""

from __future__ import annotations

import numpy as np
import pytest
from _engines import clone_cache

from inferos_cli.kv.plain import PlainCache
from inferos_cli.engine import sessions
from inferos_cli.engine.engine import Engine
from inferos_cli.engine.sampling import GenerationConfig


def rule_mask(lengths: list[int]) -> np.ndarray:
    """The packed layout's mask: each row right-padded, as wide as the longest row."""
    width = max(lengths) if lengths else 0
    return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)


def test_shared_cache_mask_follows_the_packed_rule(oga: Engine) -> None:
    """Appends (with padding), select, merge and growth of a preallocated cache keep ``past_mask`` equal
    to the packed rule and ``seen_tokens`` to the real tokens, as the allocating path did."""
    info = oga.info
    cache = PlainCache(info, 2, capacity=8)
    cache.append({}, 3, np.array([[1, 1, 1], [1, 1, 0]]))
    assert cache.past_len == 3 and np.array_equal(cache.past_mask(), rule_mask([3, 2]))
    cache.append({}, 1, np.ones((2, 1), dtype=np.int64))
    assert np.array_equal(cache.past_mask(), rule_mask([4, 3])) and list(cache.seen_tokens) == [4, 3]
    cache.select([1])  # the longer row retires: the mask keeps its padding column
    cache.append({}, 1, np.ones((1, 1), dtype=np.int64))
    assert cache.past_len == 4 and np.array_equal(cache.past_mask(), rule_mask([4]))
    other = PlainCache(info, 1, capacity=8)
    other.append({}, 2, np.ones((1, 2), dtype=np.int64))
    cache.merge(other)
    cache.append({}, 1, np.array([[1], [1]]))
    assert np.array_equal(cache.past_mask(), rule_mask([5, 3])) and list(cache.seen_tokens) == [5, 3]
    cache.reserve(32)  # buffers move: the mask is rebuilt from the last one
    cache.append({}, 2, np.array([[1, 1], [1, 0]]))
    assert cache.capacity == 32 and np.array_equal(cache.past_mask(), rule_mask([7, 4]))
    twin = clone_cache(cache)
    twin.append({}, 1, np.ones((2, 1), dtype=np.int64))
    assert np.array_equal(cache.past_mask(), rule_mask([7, 4]))  # the clone writes its own mask
    assert np.array_equal(twin.past_mask(), rule_mask([8, 5])) and list(twin.seen_tokens) == [8, 5]


def test_one_row_shared_cache_appends_in_place(oga: Engine) -> None:
    cache = PlainCache(oga.info, 1, capacity=16)
    cache.append({}, 5, np.ones((1, 5), dtype=np.int64))
    first = cache.past_mask()
    for step in range(3):
        cache.append({}, 1, np.ones((1, 1), dtype=np.int64))
        assert cache.past_mask().base is first.base  # a view of one buffer, no per-step allocation
        assert cache.past_len == 6 + step and int(cache.past_mask().sum()) == 6 + step
    assert first.shape == (1, 5) and int(first.sum()) == 5  # an earlier view still reads its columns
    assert int(cache.seen_tokens[0]) == 8


def test_all_ones_mask_view_gives_the_same_logits_as_an_explicit_mask(oga: Engine) -> None:
    """The decode step's attention mask (a view of the engine's ones buffer) and an explicit new_mask
    (concatenated) run the same computation."""
    ids = oga.encode_prompt("The sea is", chat=False)
    caches = [oga.new_cache(1, capacity=len(ids) + 4) for _ in range(2)]
    for cache in caches:
        oga.forward(np.asarray([ids]), cache, logits="last")
    step = np.asarray([[ids[-1]]], dtype=np.int64)
    a = oga.forward(step, caches[0], phase="decode", logits="last").copy()
    b = oga.forward(step, caches[1], phase="decode", logits="last", new_mask=np.ones((1, 1), dtype=np.int64))
    np.testing.assert_array_equal(a, b)
    view = oga.step.ones_view(2, 3)
    assert view.shape == (2, 3) and view.flags.c_contiguous and not view.flags.writeable and int(view.sum()) == 6
    assert oga.step.ones_view(1, 10_000).shape == (1, 10_000)  # the buffer grows on demand


def test_kept_binding_does_not_hold_caller_logits(oga: Engine) -> None:
    """A non-reused logits array (e.g. a long prefill's [B, T, V]) is not kept alive by the binding."""
    ids = oga.encode_prompt("Once upon a time", chat=False)
    cache = oga.new_cache(1, capacity=len(ids) + 2)
    out = oga.forward(np.asarray([ids]), cache, logits="all")
    bound = oga.step.bindings[id(oga.plan.prefill.session)].bound
    assert all(held[0] is not out for held in bound.values())


def test_token_events_carry_the_same_fields(oga: Engine) -> None:
    ids = oga.encode_prompt("Tell me about the sea.")
    events = list(oga.generate(ids, GenerationConfig(max_tokens=6, ignore_eos=True)))
    prefill, toks, done = events[0], [e for e in events if e.kind == "token"], events[-1]
    assert len(toks) == 6 and done.kind == "done"
    for n, ev in enumerate(toks, 1):
        assert ev.generated == n and ev.prompt_tokens == len(ids) and ev.ttft_s == prefill.ttft_s
        assert ev.prefill_tps == pytest.approx(len(ids) / prefill.ttft_s)
        assert (ev.decode_tps is None) == (n == 1) and ev.kv is not None and ev.kv.tokens["fp"] == len(ids) + n - 1
        assert ev.provider == oga.providers and isinstance(ev.util, dict)
    assert toks[-1].decode_tps == pytest.approx(5 / (toks[-1].t - toks[0].t))


def test_huge_pages_switch_and_backing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFEROS_HUGEPAGES", "0")
    assert not sessions.huge_pages_wanted()
    before = sessions.anonymous_regions()
    block = np.ones(16 << 20, dtype=np.uint8)  # new anonymous memory, touched
    assert sessions.back_with_huge_pages(before) >= 0  # whatever the kernel allows; never raises
    assert int(block[::4096].sum()) == block[::4096].size  # contents unchanged
