"""Hybrid prefill/decode scheduling on real models: two sessions, KV handed across on the host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _engines import load_engine
from _events import by_row

from inferos_cli.engine import sessions
from inferos_cli.engine.sampling import GenerationConfig


class CountingSession:
    """Passes everything to a real InferenceSession and counts runs."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.runs = 0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.runs += 1
        return self.inner.run(*args, **kwargs)

    def run_with_iobinding(self, *args: Any, **kwargs: Any) -> Any:
        self.runs += 1
        return self.inner.run_with_iobinding(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def engine_for(folder: Path, scheduler: dict[str, Any], threads: int = 1) -> Any:
    return load_engine(folder, policy={"scheduler": scheduler, "kv": {"mode": "disabled"}}, threads=threads)


def greedy(engine: Any, ids: list[int], n: int) -> list[int]:
    cfg = GenerationConfig(max_tokens=n, ignore_eos=True)
    return [e.token_id for e in engine.generate(ids, cfg) if e.kind == "token"]


def count_sessions(engine: Any) -> tuple[CountingSession, CountingSession]:
    pre, dec = CountingSession(engine.plan.prefill.session), CountingSession(engine.plan.decode.session)
    engine.plan.prefill.session, engine.plan.decode.session = pre, dec
    return pre, dec


def test_hybrid_handoff_equals_single_session(stories_onnx: Path) -> None:
    single = engine_for(stories_onnx, {"mode": "cpu"})
    hybrid = engine_for(stories_onnx, {"mode": "hybrid", "prefill_device": "cpu", "decode_device": "cpu",
                                       "prefill_threads": 2, "decode_threads": 1})
    assert single.plan.shared and not hybrid.plan.shared
    assert (hybrid.plan.prefill.threads, hybrid.plan.decode.threads) == (2, 1)
    pre, dec = count_sessions(hybrid)
    ids = single.tokenizer.encode("Once upon a time")
    ref = greedy(single, ids, 40)
    got = greedy(hybrid, ids, 40)
    assert got == ref
    assert pre.runs == 1 and dec.runs == 39  # prefill ran on one session, every decode step on the other
    assert "Lily" in single.tokenizer.decode(ref)  # the published stories260K continuation


def test_hybrid_batch_equals_single_session(stories_onnx: Path) -> None:
    single = engine_for(stories_onnx, {"mode": "cpu"})
    hybrid = engine_for(stories_onnx, {"mode": "hybrid", "prefill_device": "cpu", "decode_device": "cpu"})
    prompts = [single.tokenizer.encode(p) for p in ("Once upon a time", "Tom saw a big dog", "The sun")]
    cfg = GenerationConfig(max_tokens=16, ignore_eos=True)

    assert by_row(hybrid.generate_batch(prompts, cfg)) == by_row(single.generate_batch(prompts, cfg))


def test_hybrid_handoff_on_gqa_model(oga_dir: Path) -> None:
    folder = oga_dir.parent
    single = engine_for(folder, {"mode": "cpu"}, threads=2)
    hybrid = engine_for(folder, {"mode": "hybrid", "prefill_device": "cpu", "decode_device": "cpu"}, threads=2)
    ids = single.tokenizer.encode("The capital of France is")
    assert greedy(hybrid, ids, 8) == greedy(single, ids, 8)


def test_hybrid_fallback_is_visible_in_engine(stories_onnx: Path) -> None:
    if "VitisAIExecutionProvider" in sessions.available_providers():
        pytest.skip("VitisAI is installed here; the fallback path cannot be exercised")
    eng = engine_for(stories_onnx, {"mode": "hybrid", "prefill_device": "cpu", "decode_device": "npu"})
    assert eng.providers["decode"].startswith("npu -> cpu (")
    assert eng.plan.warnings() and eng.plan.warnings()[0].startswith("decode: npu -> cpu")
    ids = eng.tokenizer.encode("Once upon a time")
    events = list(eng.generate(ids, GenerationConfig(max_tokens=3, ignore_eos=True)))
    assert events[-1].provider["decode"].startswith("npu -> cpu")


def test_plan_reports_iobinding_as_it_runs(stories_onnx: Path, oga_dir: Path) -> None:
    """"IOBinding on" is printed only where a step binds the cache's shared buffers (GQA graphs with
    ``io.enable_iobinding``); with the setting off no cache shares buffers, no step binds, same tokens."""
    on = load_engine(oga_dir.parent, policy={"kv": {"mode": "disabled"}})
    off = load_engine(oga_dir.parent, policy={"kv": {"mode": "disabled"}, "io": {"enable_iobinding": False}})
    plain = engine_for(stories_onnx, {"mode": "cpu"})
    assert on.plan.iobinding and "IOBinding on" in on.plan.notes and on.plan.decode.to_json()["iobinding"]
    assert on.new_cache(1, capacity=32).shares_buffers
    for eng in (off, plain):  # setting off; a graph without GroupQueryAttention has nothing to bind
        assert not eng.plan.iobinding and "IOBinding on" not in eng.plan.notes
        assert not eng.plan.decode.iobinding and not eng.plan.prefill.iobinding
        assert not eng.new_cache(1, capacity=32).shares_buffers
    assert "shared past/present buffer" in on.layout.describe() and "shared" not in off.layout.describe()
    _, dec = count_sessions(off)
    ids = on.tokenizer.encode("The capital of France is")
    assert greedy(off, ids, 8) == greedy(on, ids, 8)
    assert dec.runs == 8 and not off.step.bindings  # every step a plain session.run, nothing bound
    assert on.step.bindings  # the default engine did bind its shared buffers
