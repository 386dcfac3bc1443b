"""One copy of the weights: phases that land on one device share one session; a fallback from a profile's
preferred device is reported in the plan but not warned, a user's request (flag, env) still warns; devices
set to cpu never turn into a GPU request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _engines import load_engine

from inferos_cli.engine import sessions
from inferos_cli.engine.sampling import GenerationConfig
from inferos_cli.errors import ProviderError

MISSING = ("DmlExecutionProvider", "VitisAIExecutionProvider", "OpenVINOExecutionProvider", "CUDAExecutionProvider")


@pytest.fixture(autouse=True)
def cpu_only_host() -> None:
    present = [p for p in MISSING if p in sessions.available_providers()]
    if present:
        pytest.skip(f"{present[0]} is installed here; the CPU-only fallbacks cannot be exercised")


@pytest.fixture
def model_sessions(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every onnxruntime InferenceSession opened on a model file from here on (the provider probes open
    theirs from bytes and are not counted)."""
    import onnxruntime as ort

    opened: list[Any] = []
    real = ort.InferenceSession

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, path_or_bytes: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(path_or_bytes, *args, **kwargs)
            if isinstance(path_or_bytes, (str, Path)):
                opened.append(self)

    monkeypatch.setattr(ort, "InferenceSession", Counting)
    return opened


def tokens(engine: Any, n: int = 6) -> list[int]:
    ids = engine.tokenizer.encode("Once upon a time")
    return [e.token_id for e in engine.generate(ids, GenerationConfig(max_tokens=n, ignore_eos=True))
            if e.kind == "token"]


def test_hybrid_profile_on_a_cpu_only_host_opens_one_session(stories_onnx: Path, model_sessions: list[Any]) -> None:
    """The 7b profile asks for prefill on DirectML and decode on the NPU; here both fall back to the CPU,
    so the plan runs both phases on ONE InferenceSession (the weights held once), says so, and does not warn."""
    eng = load_engine(stories_onnx, "7b")
    plan = eng.plan
    assert plan.mode == "hybrid" and plan.shared and plan.to_json()["sessions"] == 1
    assert plan.prefill.session is plan.decode.session and len(model_sessions) == 1
    assert plan.extra_weight_bytes == 0 and "weights held twice" not in " ".join(plan.notes)
    assert plan.prefill.label().startswith("dml -> cpu (") and plan.decode.label().startswith("npu -> cpu (")
    assert plan.warnings() == []  # a profile's preference: reported, not warned
    text = plan.describe()
    assert "prefill dml -> cpu" in text and "decode npu -> cpu" in text and "1 session" in text
    assert any(n.startswith("prefill: dml preferred by profile:7b") for n in plan.notes)
    assert plan.decode.preferred and plan.decode.asked_by == "profile:7b"
    assert tokens(eng) == tokens(load_engine(stories_onnx, policy={"scheduler": {"mode": "cpu"}}))


def test_size_class_preference_is_not_warned_but_a_request_is(stories_onnx: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The size class (3b: gpu_only on DirectML) is a preference: no warning line; the same device named in
    the environment or by a flag is the user's request: warned, and an error with --strict-devices."""
    default = load_engine(stories_onnx)
    assert default.plan.prefill.label().startswith("dml -> cpu (") and default.plan.warnings() == []
    assert default.plan.prefill.asked_by == "profile:3b (size class)"
    assert "dml -> cpu" in default.plan.describe()

    flagged = load_engine(stories_onnx, flags={"scheduler": {"mode": "hybrid", "decode_device": "npu"}})
    assert flagged.plan.shared  # prefill (3b's dml, a preference) and decode (npu, asked) both on the CPU
    assert [w.split(" (")[0] for w in flagged.plan.warnings()] == ["decode: npu -> cpu"]

    monkeypatch.setenv("INFEROS_SCHEDULER__PREFILL_DEVICE", "dml")
    monkeypatch.setenv("INFEROS_SCHEDULER__MODE", "hybrid")
    env = load_engine(stories_onnx)
    assert [w.split(" (")[0] for w in env.plan.warnings()] == ["prefill: dml -> cpu"]
    with pytest.raises(ProviderError):
        load_engine(stories_onnx, strict_devices=True)


def test_devices_set_to_cpu_never_ask_for_a_gpu(stories_onnx: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both devices set to cpu over the size class's gpu_only: the plan runs on the CPU with nothing to
    fall back from (before: ``cuda -> cpu (CUDAExecutionProvider not available)``)."""
    monkeypatch.setenv("INFEROS_SCHEDULER__PREFILL_DEVICE", "cpu")
    monkeypatch.setenv("INFEROS_SCHEDULER__DECODE_DEVICE", "cpu")
    eng = load_engine(stories_onnx)
    plan = eng.plan
    assert plan.mode == "cpu" and plan.shared and plan.warnings() == []
    assert plan.providers() == {"prefill": "cpu", "decode": "cpu"}
    assert "cuda" not in plan.describe() and not any("cuda" in n.lower() for n in plan.notes)


def test_two_pools_on_one_device_state_the_second_copy(stories_onnx: Path, model_sessions: list[Any]) -> None:
    """Hybrid cpu/cpu with different thread counts is two sessions, as asked: the plan states that the
    weights are held twice and how many bytes that adds."""
    from inferos_cli.engine.scheduler import weight_bytes

    eng = load_engine(stories_onnx, policy={"scheduler": {"mode": "hybrid", "prefill_device": "cpu",
                                                          "decode_device": "cpu", "prefill_threads": 2,
                                                          "decode_threads": 1}})
    plan = eng.plan
    assert not plan.shared and len(model_sessions) == 2
    assert plan.extra_weight_bytes == weight_bytes(plan.onnx_path) > 0
    assert plan.to_json()["sessions"] == 2 and plan.to_json()["extra_weight_bytes"] == plan.extra_weight_bytes
    assert any(n.startswith("two CPU sessions") and "weights held twice, +" in n for n in plan.notes)
    assert "2 sessions: weights held twice" in plan.describe()
