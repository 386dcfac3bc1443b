"""Continuous batching on real models: concurrent submits, admission mid-decode, retirement, isolation."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from _engines import load_engine

from inferos_cli.errors import ContextOverflowError, UsageError
from inferos_cli.engine.batcher import ContinuousBatcher
from inferos_cli.engine.sampling import GenerationConfig

STORY_PROMPTS = ["Once upon a time", "The cat sat on", "Lily went to the park and", "One day", "Tom had a big red ball. He"]


@pytest.fixture(scope="module")
def stories_engine(stories_onnx: Path) -> Any:
    return load_engine(stories_onnx, policy={"kv": {"mode": "disabled"}})


@pytest.fixture(scope="module")
def oga_engine(oga_dir: Path) -> Any:
    return load_engine(oga_dir.parent, policy={"kv": {"mode": "disabled"}}, threads=2)


def alone(engine: Any, ids: list[int], cfg: GenerationConfig) -> list[int]:
    return [e.token_id for e in engine.generate(ids, cfg) if e.kind == "token"]


def collect(events: Any) -> tuple[list[int], list[Any]]:
    evs = list(events)
    return [e.token_id for e in evs if e.kind == "token"], evs


def test_concurrent_submits_equal_running_alone(stories_engine: Any) -> None:
    eng = stories_engine
    ids = [eng.tokenizer.encode(p) for p in STORY_PROMPTS]
    cfgs = [GenerationConfig(max_tokens=8 + 5 * i, ignore_eos=True) for i in range(len(ids))]
    ref = [alone(eng, p, c) for p, c in zip(ids, cfgs)]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    with ContinuousBatcher(eng, max_batch=4) as batcher:
        def worker(i: int) -> None:
            try:
                results[i] = collect(batcher.submit(ids[i], cfgs[i]))[0]
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(ids))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        stats = batcher.stats()
    assert not errors
    assert [results[i] for i in range(len(ids))] == ref
    assert stats["admitted"] == len(ids) and stats["generated"] == sum(len(r) for r in ref)
    assert stats["peak_batch"] <= 4


def test_admission_mid_decode_and_retirement(stories_engine: Any) -> None:
    eng = stories_engine
    a_ids, b_ids, c_ids = (eng.tokenizer.encode(p) for p in STORY_PROMPTS[:3])
    a_cfg = GenerationConfig(max_tokens=30, ignore_eos=True)
    b_cfg = GenerationConfig(max_tokens=6, ignore_eos=True)
    c_cfg = GenerationConfig(max_tokens=12, ignore_eos=True)
    batcher = ContinuousBatcher(eng, max_batch=8, start=False)
    a = batcher.submit(a_ids, a_cfg)
    for _ in range(5):
        assert batcher.step()
    assert batcher.stats()["active"] == 1
    b = batcher.submit(b_ids, b_cfg)
    c = batcher.submit(c_ids, c_cfg)
    batcher.step()
    assert batcher.stats()["active"] == 3  # both newcomers joined the running row
    rows_seen = [batcher.stats()["active"]]
    while batcher.step():
        rows_seen.append(batcher.stats()["active"])
    # b retired first, then c, while a went on
    assert rows_seen[0] == 3 and 2 in rows_seen and 1 in rows_seen and rows_seen[-1] == 0
    a_toks, a_evs = collect(a)
    b_toks, b_evs = collect(b)
    c_toks, _ = collect(c)
    assert a_toks == alone(eng, a_ids, a_cfg)
    assert b_toks == alone(eng, b_ids, b_cfg)
    assert c_toks == alone(eng, c_ids, c_cfg)
    b_prefill = b_evs[0]
    assert b_prefill.kind == "prefill" and b_prefill.extra["batcher"]["admitted_at_step"] == 5
    assert b_prefill.extra["batcher"]["batch"] == 2
    assert a_evs[-1].kind == "done" and a_evs[-1].finish_reason == "length"
    batcher.close()


def test_gqa_model_batches_with_right_padding(oga_engine: Any) -> None:
    eng = oga_engine
    prompts = ["The capital of France is", "Water boils at", "A short poem about the sea:"]
    ids = [eng.tokenizer.encode(p) for p in prompts]
    cfg = GenerationConfig(max_tokens=6, ignore_eos=True)
    ref = [alone(eng, p, cfg) for p in ids]
    batcher = ContinuousBatcher(eng, max_batch=4, start=False)
    first = batcher.submit(ids[0], cfg)
    batcher.step()
    batcher.step()
    rest = [batcher.submit(p, cfg) for p in ids[1:]]
    while batcher.step():
        pass
    got = [collect(first)[0]] + [collect(r)[0] for r in rest]
    assert got == ref
    assert batcher.stats()["peak_batch"] == 3
    batcher.close()


def test_abandoned_request_retires(stories_engine: Any) -> None:
    eng = stories_engine
    ids = eng.tokenizer.encode("Once upon a time")
    cfg = GenerationConfig(max_tokens=50, ignore_eos=True)
    batcher = ContinuousBatcher(eng, max_batch=2, start=False)
    keep = batcher.submit(ids, GenerationConfig(max_tokens=10, ignore_eos=True))
    drop = batcher.submit(ids, cfg)
    batcher.step()
    batcher.step()
    first = next(drop)
    assert first.kind == "prefill"
    drop.close()  # the caller walks away
    batcher.step()
    assert batcher.stats()["active"] == 1
    while batcher.step():
        pass
    assert collect(keep)[0] == alone(eng, ids, GenerationConfig(max_tokens=10, ignore_eos=True))
    batcher.close()


def test_queues_when_cache_cannot_merge(stories_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from inferos_cli.kv.plain import PlainCache

    class NoMerge(PlainCache):
        def merge(self, other: Any) -> None:
            raise NotImplementedError("segments cannot be merged")

    eng = stories_engine
    monkeypatch.setattr(eng, "new_cache", lambda batch=1, capacity=None: NoMerge(eng.info, batch))
    ids = [eng.tokenizer.encode(p) for p in STORY_PROMPTS[:3]]
    cfg = GenerationConfig(max_tokens=5, ignore_eos=True)
    ref = [alone(eng, p, cfg) for p in ids]
    batcher = ContinuousBatcher(eng, max_batch=4, start=False)
    its = [batcher.submit(p, cfg) for p in ids]
    while batcher.step():
        pass
    outs = [collect(it) for it in its]
    assert [o[0] for o in outs] == ref
    stats = batcher.stats()
    assert stats["can_merge"] is False and stats["peak_batch"] == 1
    assert "cannot merge" in outs[-1][1][-1].extra["batcher"]["queued"]
    batcher.close()


def test_errors_and_close(stories_engine: Any) -> None:
    eng = stories_engine
    batcher = ContinuousBatcher(eng, max_batch=2)
    with pytest.raises(UsageError):
        batcher.submit([], GenerationConfig())
    with pytest.raises(ContextOverflowError):
        batcher.submit([1] * (eng.info.context_length + 1), GenerationConfig())
    batcher.close()
    with pytest.raises(UsageError):
        batcher.submit([1, 2], GenerationConfig())


def test_seeded_sampling_matches_running_alone(stories_engine: Any) -> None:
    eng = stories_engine
    ids = [eng.tokenizer.encode(p) for p in STORY_PROMPTS[:3]]
    cfgs = [GenerationConfig(max_tokens=12, temperature=0.9, top_k=40, seed=7 + i, ignore_eos=True)
            for i in range(3)]
    ref = [alone(eng, p, c) for p, c in zip(ids, cfgs)]
    batcher = ContinuousBatcher(eng, max_batch=3, start=False)
    its = [batcher.submit(p, c) for p, c in zip(ids, cfgs)]
    while batcher.step():
        pass
    assert [collect(it)[0] for it in its] == ref
    batcher.close()


def test_failed_prefill_fails_only_its_request(stories_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    eng = stories_engine
    good, bad = eng.tokenizer.encode("Once upon a time"), eng.tokenizer.encode("The cat sat on")
    real = eng.prefill

    def flaky(ids: Any, cache: Any, chunk: Any = None, new_mask: Any = None) -> Any:
        if list(ids[0]) == bad:
            raise RuntimeError("boom")
        return real(ids, cache, chunk, new_mask)

    monkeypatch.setattr(eng, "prefill", flaky)
    cfg = GenerationConfig(max_tokens=6, ignore_eos=True)
    batcher = ContinuousBatcher(eng, max_batch=2, start=False)
    ok_it, bad_it = batcher.submit(good, cfg), batcher.submit(bad, cfg)
    while batcher.step():
        pass
    monkeypatch.undo()
    assert collect(ok_it)[0] == alone(eng, good, cfg)
    with pytest.raises(RuntimeError, match="prefill failed"):
        list(bad_it)
    batcher.close()


def _drain_with_timeout(its: list[Any], timeout: float = 120.0) -> list[tuple[list[Any], BaseException | None]]:
    """Consume each iterator in its own thread; a hang fails the test instead of blocking it."""
    out: list[Any] = [None] * len(its)

    def consume(i: int) -> None:
        evs: list[Any] = []
        try:
            for ev in its[i]:
                evs.append(ev)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            out[i] = (evs, exc)
            return
        out[i] = (evs, None)

    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(len(its))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert all(o is not None for o in out), "a request never got a terminal event (hang)"
    return out


def test_merge_raising_inferos_error_queues_instead_of_killing_the_worker(
        stories_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from inferos_cli.errors import InferosError
    from inferos_cli.kv.plain import PlainCache

    class Refuses(PlainCache):
        """Like the segmented cache on a GQA graph: merging rows raises an InferosError."""

        def merge(self, other: Any) -> None:
            raise InferosError("the segmented KV cache cannot batch rows of different lengths", "use batch 1")

    eng = stories_engine
    monkeypatch.setattr(eng, "new_cache", lambda batch=1, capacity=None: Refuses(eng.info, batch))
    ids = [eng.tokenizer.encode(p) for p in STORY_PROMPTS[:3]]
    cfg = GenerationConfig(max_tokens=5, ignore_eos=True)
    ref = [alone(eng, p, cfg) for p in ids]
    with ContinuousBatcher(eng, max_batch=4) as batcher:  # the real worker thread
        outs = _drain_with_timeout([batcher.submit(p, cfg) for p in ids])
        stats = batcher.stats()
    assert [err for _, err in outs] == [None, None, None]
    assert [[e.token_id for e in evs if e.kind == "token"] for evs, _ in outs] == ref
    assert stats["can_merge"] is False and stats["peak_batch"] == 1 and stats["admitted"] == 3
    assert "cannot batch rows of different lengths" in stats["merge_reason"]


def test_worker_failure_reaches_every_request(stories_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    eng = stories_engine
    real_event = eng.prefill_event
    gate = threading.Event()
    seen: list[int] = []

    def failing_event(state: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(1)
        if len(seen) == 2:  # the second admission fails outside the per-request prefill guard
            gate.wait(timeout=60)
            raise ValueError("admission exploded")
        return real_event(state, *args, **kwargs)

    monkeypatch.setattr(eng, "prefill_event", failing_event)
    ids = [eng.tokenizer.encode(p) for p in STORY_PROMPTS[:4]]
    cfg = GenerationConfig(max_tokens=200, ignore_eos=True)
    batcher = ContinuousBatcher(eng, max_batch=2)
    first = batcher.submit(ids[0], cfg)
    assert next(first).kind == "prefill"  # row 1 is active
    others = [batcher.submit(p, cfg) for p in ids[1:]]  # one being admitted, two waiting (max_batch 2)
    gate.set()
    outs = _drain_with_timeout([first, *others])
    for _, err in outs:
        assert isinstance(err, RuntimeError) and "batcher worker failed" in str(err)
    with pytest.raises(UsageError, match="closed"):
        batcher.submit(ids[0], cfg)
    batcher.close()


def test_submits_racing_a_worker_failure_never_hang(stories_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    eng = stories_engine
    ids = eng.tokenizer.encode("Once upon a time")
    cfg = GenerationConfig(max_tokens=3, ignore_eos=True)

    real_forward = eng.forward

    def broken_forward(ids: Any, cache: Any, *, phase: str, **kwargs: Any) -> Any:
        if phase == "decode":  # the worker's own step fails (prefill failures stay per-request)
            raise ValueError("decode exploded")
        return real_forward(ids, cache, phase=phase, **kwargs)

    monkeypatch.setattr(eng, "forward", broken_forward)
    batcher = ContinuousBatcher(eng, max_batch=2)
    its: list[Any] = []
    refused: list[BaseException] = []
    lock = threading.Lock()

    def submitter() -> None:
        import time

        deadline = time.monotonic() + 60  # keep submitting until the failed worker closes the batcher
        while time.monotonic() < deadline:
            try:
                it = batcher.submit(ids, cfg)
            except UsageError as exc:
                with lock:
                    refused.append(exc)
                return
            with lock:
                its.append(it)

    threads = [threading.Thread(target=submitter) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    outs = _drain_with_timeout(its)  # every accepted request terminates: an error or its events
    assert refused, "submits after the worker failed must be refused"
    assert its and all(isinstance(err, RuntimeError) and "decode exploded" in str(err) for _, err in outs)
    batcher.close()


def test_stats_count_a_request_being_admitted(stories_engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    eng = stories_engine
    real = eng.prefill
    entered, release = threading.Event(), threading.Event()

    def slow_prefill(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(timeout=60)
        return real(*args, **kwargs)

    monkeypatch.setattr(eng, "prefill", slow_prefill)
    cfg = GenerationConfig(max_tokens=3, ignore_eos=True)
    with ContinuousBatcher(eng, max_batch=2) as batcher:
        it = batcher.submit(eng.tokenizer.encode("One day"), cfg)
        assert entered.wait(timeout=60)
        mid = batcher.stats()
        release.set()
        outs = _drain_with_timeout([it])
        end = batcher.stats()
    assert mid["waiting"] == 1 and mid["admitting"] == 1 and mid["active"] == 0
    assert outs[0][1] is None and end["waiting"] == 0 and end["admitting"] == 0 and end["admitted"] == 1


def test_long_running_batch_cache_stays_as_long_as_its_longest_row(stories_engine: Any) -> None:
    """A batch that never empties: retired rows' columns are dropped by PlainCache.select (the one mechanism),
    so the shared past is always exactly as wide as its longest live row, not the whole history."""
    eng = stories_engine
    prompts = [eng.tokenizer.encode(p) for p in STORY_PROMPTS]
    batcher = ContinuousBatcher(eng, max_batch=2, start=False)
    its = [batcher.submit(prompts[0], GenerationConfig(max_tokens=7, ignore_eos=True))]
    widths: list[int] = []
    total = 14
    step = 0
    while batcher.step():
        step += 1
        if len(its) < total and step % 3 == 0:  # a newcomer every 3 steps: the batch never drains
            i = len(its)
            its.append(batcher.submit(prompts[i % len(prompts)], GenerationConfig(max_tokens=5 + i % 4, ignore_eos=True)))
        cache = batcher.cache
        if cache is not None and cache.batch:
            mask = cache.past_mask()
            assert cache.past_len == int(mask.sum(axis=1).max()), "padding columns no live row uses were kept"
            widths.append(cache.past_len)
    assert all(collect(it)[1][-1].kind == "done" for it in its)
    history = sum(len(prompts[i % len(prompts)]) + 5 + i % 4 for i in range(total))
    longest = max(len(p) for p in prompts) + 9
    assert max(widths) <= longest < history  # bounded by one row, not by everything the batch ever held
    assert batcher.stats()["admitted"] == total
    batcher.close()


def test_submit_paused_across_a_worker_failure_is_refused(stories_engine: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic form of the submit/close race: a submit that started before the worker failed and
    queues after it must be refused (or answered), never left waiting on a dead worker."""
    eng = stories_engine
    ids = eng.tokenizer.encode("Once upon a time")
    cfg = GenerationConfig(max_tokens=3, ignore_eos=True)
    real_forward, real_check = eng.forward, eng.check_context
    gate = threading.Event()

    def broken_forward(x: Any, cache: Any, *, phase: str, **kwargs: Any) -> Any:
        if phase == "decode":
            raise ValueError("decode exploded")
        return real_forward(x, cache, phase=phase, **kwargs)

    def paused_check(n: int) -> Any:
        if threading.current_thread().name == "late-submitter":
            gate.wait(timeout=60)  # the worker fails while this submit is in flight
        return real_check(n)

    monkeypatch.setattr(eng, "forward", broken_forward)
    monkeypatch.setattr(eng, "check_context", paused_check)
    batcher = ContinuousBatcher(eng, max_batch=2)
    late: dict[str, Any] = {}

    def submit_late() -> None:
        try:
            late["it"] = batcher.submit(ids, cfg)
        except UsageError as exc:
            late["refused"] = exc

    thread = threading.Thread(target=submit_late, name="late-submitter")
    thread.start()
    first = batcher.submit(ids, cfg)
    (_, err), = _drain_with_timeout([first])
    assert isinstance(err, RuntimeError)  # the worker is dead now
    gate.set()
    thread.join(timeout=60)
    if "it" in late:
        (_, late_err), = _drain_with_timeout([late["it"]], timeout=30)
        assert late_err is not None
    else:
        assert "closed" in str(late["refused"])
    batcher.close()


def test_long_running_batch_with_kv_policy_stays_bounded(stories_onnx: Path) -> None:
    """The same never-draining batch on the segmented (quantized) cache: SegmentedCache.select drops the
    quantized columns of retired rows, so every resident column belongs to a live row and the width stays
    bounded by one row (+ the fixed fp ring), not by the batch's history."""
    from inferos_cli.kv.segmented import SegmentedCache

    eng = load_engine(stories_onnx, "int4", flags={"kv": {"recent_window": 16}})
    prompts = [eng.tokenizer.encode(p) for p in STORY_PROMPTS]
    batcher = ContinuousBatcher(eng, max_batch=2, start=False)
    its = [batcher.submit(prompts[0], GenerationConfig(max_tokens=30, ignore_eos=True))]
    widths: list[int] = []
    quantized: list[int] = []
    total = 14
    step = 0
    while batcher.step():
        step += 1
        if len(its) < total and step % 3 == 0:
            i = len(its)
            its.append(batcher.submit(prompts[i % len(prompts)], GenerationConfig(max_tokens=24 + i % 4, ignore_eos=True)))
        cache = batcher.cache
        if cache is not None and cache.batch:
            assert isinstance(cache, SegmentedCache)
            for tier in cache.tiers:
                assert tier.mask[: tier.n].any(axis=1).all(), "a quantized column no live row uses was kept"
            widths.append(cache.past_len)
            quantized.append(sum(t.n for t in cache.tiers))
    assert all(collect(it)[1][-1].kind == "done" for it in its)
    history = sum(len(prompts[i % len(prompts)]) + 24 + i % 4 for i in range(total))
    longest = max(len(p) for p in prompts) + 30
    assert max(quantized) > 0  # rows outgrew the fp ring (sinks + window), so the tiers were exercised
    cap_fp = 4 + 16  # sinks + recent window: the fixed fp ring
    assert max(widths) <= cap_fp + 2 * longest < history
    batcher.close()
