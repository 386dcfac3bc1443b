"""The Attention-op twin of GroupQueryAttention graphs (CUDA prefill) and the engine's hand-off into the
packed GQA cache, on real conversions and real onnxruntime sessions (CPU: the CUDA choice is forced)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _engines import load_engine
from _events import by_row

from inferos_cli.models.info import inspect_folder
from inferos_cli.engine.sampling import GenerationConfig
from inferos_cli.graphs.naming import graphs_dir
from inferos_cli.settings import Policy


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GGUF converted with GroupQueryAttention and exact fp32 compute (accuracy level 0)."""
    from _tiny_gguf import write_tiny_gguf

    from inferos_cli.models.convert import convert_gguf

    root = tmp_path_factory.mktemp("tiny_gqa")
    write_tiny_gguf(root / "tiny.gguf")
    return convert_gguf(root / "tiny.gguf", root / "model", attention="gqa", accuracy_level=0)


def session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def feeds(sess: Any, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: dict[str, np.ndarray] | None,
          kvh: int, d: int) -> dict[str, np.ndarray]:
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values"):
            out[inp.name] = past[inp.name] if past else np.zeros((ids.shape[0], kvh, 0, d), np.float32)
    return out


def test_twin_replaces_every_gqa_node_and_keeps_the_logits(tiny_gqa: Path) -> None:
    import onnx

    from inferos_cli.graphs.attention import attention_op_graph

    src = tiny_gqa / "model.onnx"
    twin = attention_op_graph(src)
    assert twin is not None and attention_op_graph(src) == twin  # cached
    # a folder the user gave: the twin lives in inferos' cache, the weights hard-linked there (not copied)
    assert graphs_dir() in twin.parents and not list(tiny_gqa.glob("*.inferos-*"))
    assert (twin.parent / "model.onnx.data").samefile(tiny_gqa / "model.onnx.data")
    model = onnx.load(str(twin), load_external_data=False)
    assert {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["GroupQueryAttention"] == 0 and ops["Attention"] == 2 and ops["RotaryEmbedding"] == 4
    assert [i.name for i in model.graph.input] == [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]

    info = inspect_folder(tiny_gqa)
    kvh, d = info.num_kv_heads, info.head_dim
    a, b = session(src), session(twin)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, info.vocab_size, (2, 9)).astype(np.int64)
    mask = np.ones((2, 9), np.int64)
    mask[1, 6:] = 0  # row 1 right-padded, as the packed GQA layout keeps rows
    pos = np.where(mask > 0, np.arange(9)[None, :], 0).astype(np.int64)
    names = [o.name for o in a.get_outputs()]
    ga = dict(zip(names, a.run(names, feeds(a, ids, mask, pos, None, kvh, d))))
    gb = dict(zip(names, b.run(names, feeds(b, ids, mask, pos, None, kvh, d))))
    assert np.abs(ga["logits"][0] - gb["logits"][0]).max() < 1e-4
    assert np.abs(ga["logits"][1, :6] - gb["logits"][1, :6]).max() < 1e-4
    # a decode step of row 0 over the cached prefill: the twin reads the same past
    past = {n.replace("present", "past_key_values"): ga[n][:1] for n in names if n.startswith("present")}
    step = np.array([[int(ga["logits"][0, -1].argmax())]], np.int64)
    mask2, pos2 = np.ones((1, 10), np.int64), np.array([[9]], np.int64)
    la = a.run(["logits"], feeds(a, step, mask2, pos2, past, kvh, d))[0]
    lb = b.run(["logits"], feeds(b, step, mask2, pos2, past, kvh, d))[0]
    assert np.abs(la - lb).max() < 1e-4


def test_no_twin_for_graphs_that_derive_positions_inside_the_op(oga_dir: Path) -> None:
    """onnxruntime-genai's GQA computes RoPE positions itself: not expressible, the graph is left alone."""
    from inferos_cli.graphs.attention import attention_op_graph

    assert attention_op_graph(oga_dir) is None


def engine(folder: Path, scheduler: dict[str, Any]) -> Any:
    return load_engine(folder, policy={"scheduler": scheduler, "kv": {"mode": "disabled"}})


def test_engine_prefills_on_the_twin_and_decodes_on_gqa(tiny_gqa: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA taken as working for prefill (forced: no GPU here, the sessions open on the CPU), the
    hybrid plan prefills on the twin, copies the new columns into the GQA cache, and every token equals the
    single-session engine's, for one prompt, a batch of ragged prompts and a second turn into a filled cache."""
    from inferos_cli.engine import plan

    ref = engine(tiny_gqa, {"mode": "cpu"})
    monkeypatch.setattr(plan, "cuda_phases", lambda policy: (True, False))
    hyb = engine(tiny_gqa, {"mode": "hybrid", "prefill_device": "cuda", "decode_device": "cpu"})
    assert hyb.prefill_twin and ".inferos-attn-" in str(hyb.plan.prefill.session._model_path)
    assert "inferos-attn" not in str(hyb.plan.decode.session._model_path)
    assert any("Attention op" in n for n in hyb.plan.notes)
    cfg = GenerationConfig(max_tokens=12, ignore_eos=True)
    ids = [5, 40, 41, 77, 90, 12, 8]

    def tokens(eng: Any) -> list[int]:
        return [e.token_id for e in eng.generate(ids, cfg) if e.kind == "token"]

    assert tokens(hyb) == tokens(ref)

    prompts = [[5, 40, 41, 77], [9, 10, 11, 12, 13, 14, 15], [60]]

    assert by_row(hyb.generate_batch(prompts, cfg)) == by_row(ref.generate_batch(prompts, cfg))

    # prefill chunks into a cache that already holds tokens (shared buffers and a plain packed cache)
    for capacity in (64, None):
        logits = []
        for eng in (ref, hyb):
            cache = eng.new_cache(1, capacity=capacity)
            eng.forward(np.array([ids], np.int64), cache, phase="prefill")
            logits.append(eng.forward(np.array([[3, 4, 5, 6]], np.int64), cache, phase="prefill"))
            assert cache.past_len == len(ids) + 4
        assert np.abs(logits[0] - logits[1]).max() < 1e-4


def test_one_cuda_session_runs_the_twin_for_both_phases(tiny_gqa: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``gpu_only`` on CUDA (forced as working): the engine swaps the whole graph for the twin, whose cache
    is a plain concat cache, and generates the same tokens."""
    from inferos_cli.engine import plan

    ref = engine(tiny_gqa, {"mode": "cpu"})
    monkeypatch.setattr(plan, "cuda_phases", lambda policy: (True, True))
    one = engine(tiny_gqa, {"mode": "gpu_only", "prefill_device": "cuda", "decode_device": "cuda"})
    assert one.plan.shared and not one.prefill_twin and not one.uses_gqa
    assert ".inferos-attn-" in str(one.info.onnx_path)
    assert any("Attention op" in n for n in one.plan.notes)
    cfg = GenerationConfig(max_tokens=10, ignore_eos=True)
    ids = [7, 8, 9, 100, 101]
    assert ([e.token_id for e in one.generate(ids, cfg) if e.kind == "token"]
            == [e.token_id for e in ref.generate(ids, cfg) if e.kind == "token"])


def test_fused_int8_cache_takes_the_twins_prefill(tiny_gqa: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8-fused cache behind a CUDA prefill (forced): the twin of the original float graph prefills,
    the engine quantizes its presents with the fused graph's scales, and the CPU decode reads those codes.
    The codes equal the fused graph's own float-prefill branch within one step (two float attention
    kernels), for a first prompt and a second chunk; the decoded tokens are the same."""
    from inferos_cli.engine import plan
    from inferos_cli.kv.fused import FusedLayout

    def fused_engine(sched: dict[str, Any]) -> Any:
        return load_engine(tiny_gqa, policy={"scheduler": sched, "kv": {"quant": "int8-fused"}})

    ref = fused_engine({"mode": "cpu"})
    monkeypatch.setattr(plan, "cuda_phases", lambda policy: (True, False))
    hyb = fused_engine({"mode": "hybrid", "prefill_device": "cuda", "decode_device": "cpu"})
    assert isinstance(hyb.layout, FusedLayout) and hyb.prefill_twin
    assert "kvf" not in str(hyb.plan.prefill.session._model_path) and "kvf" in str(hyb.plan.decode.session._model_path)
    ids = [5, 40, 41, 77, 90, 12, 8, 3, 200]
    caches = []
    for eng in (ref, hyb):
        cache = eng.new_cache(1, capacity=64)
        eng.forward(np.array([ids], np.int64), cache, phase="prefill")
        eng.forward(np.array([[3, 4, 5]], np.int64), cache, phase="prefill")
        caches.append(cache)
    for name, codes in caches[0].feeds().items():
        other = caches[1].feeds()[name]
        assert codes.dtype == other.dtype == np.int8
        assert np.abs(codes[:, :, :12].astype(int) - other[:, :, :12].astype(int)).max() <= 1
    cfg = GenerationConfig(max_tokens=10, ignore_eos=True)
    assert ([e.token_id for e in hyb.generate(ids, cfg) if e.kind == "token"]
            == [e.token_id for e in ref.generate(ids, cfg) if e.kind == "token"])


def test_auto_keeps_the_fused_cache_behind_a_cuda_prefill(tiny_gqa: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kv.quant auto with CUDA installed: prefill on CUDA + decode on the CPU keeps int8-fused on a graph
    the twin can take; decode on CUDA does not."""
    import onnxruntime as ort

    from inferos_cli.engine.plan import auto_fused

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    info = inspect_folder(tiny_gqa)

    def policy(sched: dict[str, Any]) -> Policy:
        return Policy.model_validate({"scheduler": sched})

    assert auto_fused(info, policy({"mode": "hybrid", "prefill_device": "cuda", "decode_device": "cpu"}))
    assert not auto_fused(info, policy({"mode": "gpu_only", "prefill_device": "cuda", "decode_device": "cuda"}))
    assert not auto_fused(info, policy({"mode": "hybrid", "prefill_device": "cpu", "decode_device": "cuda"}))
