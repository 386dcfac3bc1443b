"""Execution-provider probe, fallback labels, strict devices, session options, and the session plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _engines import session_run

from inferos_cli.errors import ProviderError
from inferos_cli.engine import sessions
from inferos_cli.engine.plan import Plan
from inferos_cli.engine.scheduler import phase_devices
from inferos_cli.settings import Policy


def policy(**scheduler: object) -> Policy:
    return Policy.model_validate({"scheduler": scheduler})


def tiny_model(tmp_path: Path) -> Path:
    """A two-input MatMul+Add model written to disk (real ORT session, real graph)."""
    import onnx
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"]), helper.make_node("Add", ["a", "a"], ["z"])],
        "tiny", [a], [y, z], initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10
    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def test_provider_names() -> None:
    assert sessions.provider_name("dml") == "DmlExecutionProvider"
    assert sessions.provider_name("npu") == "VitisAIExecutionProvider"
    assert sessions.provider_name("cuda") == "CUDAExecutionProvider"
    assert sessions.provider_name("cpu") == "CPUExecutionProvider"
    assert sessions.provider_name("FooExecutionProvider") == "FooExecutionProvider"
    assert sessions.device_of("OpenVINOExecutionProvider") == "npu"
    with pytest.raises(ProviderError):
        sessions.provider_name("tpu")


def test_probe_cpu_works_and_missing_provider_is_reported() -> None:
    cpu = sessions.probe_provider("cpu")
    assert cpu.available and cpu.works and cpu.name == "CPUExecutionProvider"
    for dev in ("dml", "cuda"):
        res = sessions.probe_provider(dev)
        name = sessions.provider_name(dev)
        if name in sessions.available_providers():
            pytest.skip(f"{name} is installed here; the absent-provider path cannot be exercised")
        assert not res.available and not res.works
        assert res.reason.startswith(f"{name} not available")


def test_probe_model_is_ir10_one_node() -> None:
    import onnx

    model = onnx.load_from_string(sessions._probe_model_bytes())
    assert model.ir_version == 10 and len(model.graph.node) == 1


def test_fallback_label_and_strict(tmp_path: Path) -> None:
    if "VitisAIExecutionProvider" in sessions.available_providers():
        pytest.skip("VitisAI is installed here; the fallback path cannot be exercised")
    path = tiny_model(tmp_path)
    pol = policy(mode="hybrid", prefill_device="cpu", decode_device="npu")
    plan = Plan.open(path, pol, threads=1)
    # decode falls back onto the prefill's device: one session (one copy of the weights), two labels
    assert plan.shared and plan.prefill is not plan.decode
    assert plan.prefill.label() == "cpu" and plan.prefill.fallback_reason is None
    npu_name = sessions.npu_provider()
    assert plan.decode.label() == f"npu -> cpu ({npu_name} not available)"
    assert plan.decode.provider == "CPUExecutionProvider"
    assert plan.warnings() == [f"decode: npu -> cpu ({npu_name} not available)"]
    assert plan.providers()["decode"].startswith("npu -> cpu")
    with pytest.raises(ProviderError) as err:
        Plan.open(path, pol, threads=1, strict=True)
    assert "decode on npu" in err.value.one_line() and "--strict-devices" in err.value.one_line()


def test_modes_map_to_devices() -> None:
    assert phase_devices(policy(mode="cpu", prefill_device="dml")) == ("cpu", "cpu", True)
    assert phase_devices(policy(mode="npu_only")) == ("npu", "npu", True)
    assert phase_devices(policy(mode="gpu_only", decode_device="cuda")) == ("cuda", "cuda", True)
    assert phase_devices(policy(mode="hybrid", prefill_device="npu", decode_device="dml")) == ("npu", "dml", False)


def test_cpu_plan_is_one_session_and_runs(tmp_path: Path) -> None:
    path = tiny_model(tmp_path)
    plan = Plan.open(path, Policy(), threads=1)
    assert plan.shared and plan.mode == "cpu" and plan.prefill.threads == 1
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    y, z = session_run(plan.decode.session, ["y", "z"], {"a": a})
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_allclose(y, a @ w)
    np.testing.assert_allclose(z, a + a)
    data = plan.to_json()
    assert data["shared"] is True and data["prefill"]["label"] == "cpu"


def test_hybrid_cpu_has_two_sessions_with_own_threads(tmp_path: Path) -> None:
    path = tiny_model(tmp_path)
    pol = policy(mode="hybrid", prefill_device="cpu", decode_device="cpu", prefill_threads=2, decode_threads=1)
    plan = Plan.open(path, pol)
    assert plan.prefill.session is not plan.decode.session
    assert (plan.prefill.threads, plan.decode.threads) == (2, 1)
    assert any("two CPU sessions" in n for n in plan.notes)


def test_iobinding_paths_agree_and_write_into_buffers(tmp_path: Path) -> None:
    path = tiny_model(tmp_path)
    plan = Plan.open(path, Policy.model_validate({"io": {"enable_iobinding": True}}), threads=1)
    sess = plan.decode.session
    a = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    bound = session_run(sess, ["y", "z"], {"a": a}, bind=True)
    plain = session_run(sess, ["y", "z"], {"a": a})
    for x, y in zip(bound, plain):
        np.testing.assert_array_equal(x, y)
    buf = np.zeros((3, 4), dtype=np.float32)
    _, z = session_run(sess, ["y", "z"], {"a": a}, out_buffers={"z": buf})
    assert z is buf
    np.testing.assert_array_equal(buf, a + a)


def test_session_options_follow_policy() -> None:
    import onnxruntime as ort

    pol = Policy()
    opts = sessions.session_options(pol, "decode", 3, provider="DmlExecutionProvider", allow_spinning=False)
    assert opts.intra_op_num_threads == 3
    assert opts.enable_mem_pattern is False
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_provider_specs_apply_pool_limits() -> None:
    pol = Policy.model_validate({"io": {"dml_pool_bytes": "1GiB"}})
    cuda = sessions.provider_spec("CUDAExecutionProvider", pol)
    assert cuda.options["gpu_mem_limit"] == str(1024**3)
    dml = sessions.provider_spec("DmlExecutionProvider", pol)
    assert "gpu_mem_limit" not in dml.options
    assert any("DirectML has no memory-limit option" in n for n in dml.notes)
    vitis = sessions.provider_spec("VitisAIExecutionProvider", pol, model_key="m")
    assert vitis.options["cache_key"] == "m" and "cache_dir" in vitis.options


def test_host_pool_is_not_claimed_as_an_ort_cap(tmp_path: Path) -> None:
    plan = Plan.open(tiny_model(tmp_path), Policy(), threads=1)
    assert any("memory-pressure reference, not an onnxruntime cap" in n for n in plan.notes)
    opts = plan.decode.session.get_session_options()
    with pytest.raises(RuntimeError):  # no env allocator: nothing pretends to cap the CPU arena
        opts.get_session_config_entry("session.use_env_allocators")


def test_default_session_options_do_not_spin_and_use_half_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    opts = sessions.session_options(Policy(), "decode", None)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == sessions.default_threads()
    for physical, expected in ((1, 1), (2, 1), (4, 2), (8, 4), (64, 8)):
        monkeypatch.setattr(psutil, "cpu_count", lambda logical=True, n=physical: n if not logical else 2 * n)
        assert sessions.default_threads() == expected
        assert sessions.default_threads(batched=True) == physical  # batched decode: every physical core


def test_probe_reports_the_cause_from_onnxruntimes_ep_error_banner() -> None:
    """The banner onnxruntime-gpu 1.31.1 printed on an H100 machine without TensorRT's libraries: the probe
    keeps the cause, not the later "Conflicting session configuration" of the wrapper's retry."""
    from inferos_cli.engine.sessions import _ep_error

    banner = ("*************** EP Error ***************\n"
              "EP Error /onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:729 void "
              "onnxruntime::python::RegisterTensorRTPluginsAsCustomOps(PySessionOptions&, const "
              "onnxruntime::ProviderOptions&) Please install TensorRT libraries as mentioned in the GPU "
              "requirements page, make sure they're in the PATH or LD_LIBRARY_PATH, and that your GPU is supported.\n"
              " when using [('TensorrtExecutionProvider', {})]\nFalling back to ['CPUExecutionProvider'] and retrying.\n")
    assert _ep_error(banner).startswith("Please install TensorRT libraries")
    assert _ep_error("nothing printed") == ""
