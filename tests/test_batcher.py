"""Continuous batching on real models: concurrent submits, admission mid-decode, retirement, isolation."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from inferos_cli.errors import ContextOverflowError, UsageError
from inferos_cli.runtime.batcher import ContinuousBatcher
from inferos_cli.runtime.modelinfo import inspect_folder
from inferos_cli.runtime.sampling import GenerationConfig
from inferos_cli.settings import Policy, Resolved

STORY_PROMPTS = ["Once upon a time", "The cat sat on", "Lily went to the park and", "One day", "Tom had a big red ball. He"]


@pytest.fixture(scope="module")
def stories_engine(stories_onnx: Path) -> Any:
    from inferos_cli.runtime.engine import Engine

    pol = Policy.model_validate({"kv": {"mode": "disabled"}})
    return Engine(inspect_folder(stories_onnx), Resolved(policy=pol), threads=1)


@pytest.fixture(scope="module")
def oga_engine(oga_dir: Path) -> Any:
    from inferos_cli.runtime.engine import Engine

    pol = Policy.model_validate({"kv": {"mode": "disabled"}})
    return Engine(inspect_folder(oga_dir.parent), Resolved(policy=pol), threads=2)


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
    real = eng._prefill

    def flaky(ids: Any, cache: Any, chunk: Any, new_mask: Any = None) -> Any:
        if list(ids[0]) == bad:
            raise RuntimeError("boom")
        return real(ids, cache, chunk, new_mask)

    monkeypatch.setattr(eng, "_prefill", flaky)
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
