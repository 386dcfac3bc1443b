"""The fused int8 cache (kv/fused.py, graphs/fused.py): onnxruntime's GroupQueryAttention on int8 codes, on the OGA folder
and on an inferos GQA conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _engines import home_env, clone_cache, load_engine
from conftest import check_graph
from inferos_cli.engine.plan import auto_fused, choose_layout
from inferos_cli.graphs.fused import calibrate
from inferos_cli.kv import fused
from inferos_cli.kv.layouts import SegmentedLayout
from inferos_cli.profiles import resolve_settings
from inferos_cli.models.info import inspect_folder
from inferos_cli.engine.sampling import GenerationConfig

PROMPT = "The old lighthouse keeper climbed the stairs every evening, counting the steps as he went, and"


def _policy(profile: str):
    return resolve_settings(profile, param_count=135_000_000, flags={"scheduler": {"mode": "cpu"}},
                            use_env=False).policy


@pytest.fixture(scope="module")
def engines(oga_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Baseline and int8-fused engines on the OGA folder (the fused graph built once, in a temp home)."""
    home = tmp_path_factory.mktemp("fused-home")
    with home_env(home):
        yield {name: load_engine(oga_dir.parent, name, flags={"scheduler": {"mode": "cpu"}}, use_env=False)
               for name in ("baseline", "int8-fused")}


def test_fused_backend_is_chosen_for_gqa_graphs(engines) -> None:
    eng = engines["int8-fused"]
    assert isinstance(eng.layout, fused.FusedLayout)
    assert "int8-fused" in eng.layout.describe()
    import onnx

    model = onnx.load(str(eng.layout.onnx_path), load_external_data=False)
    check_graph(eng.layout.onnx_path, eng.layout.onnx_path.parent, full=False)  # OGA graphs fail full shape checks as shipped
    assert not [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == eng.info.num_layers  # prefill in float, decode steps on int8 codes
    branches = {a.name: a.g for a in ifs[0].attribute}
    (quant,) = [n for n in branches["else_branch"].node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in quant.attribute}
    assert attrs["kv_cache_bit_width"] == 8 and attrs["k_quant_type"] == b"PER_CHANNEL"
    (flt,) = [n for n in branches["then_branch"].node if n.op_type == "GroupQueryAttention"]
    assert not any(a.name == "kv_cache_bit_width" for a in flt.attribute)
    past = [i for i in model.graph.input if i.name.startswith("past_key_values")]
    assert past and all(i.type.tensor_type.elem_type == onnx.TensorProto.INT8 for i in past)


def test_fused_cache_holds_int8_codes_of_the_real_keys(engines) -> None:
    """After a prefill, layer 0's codes are round(key / scale) of the baseline's keys (layer 0 sees the same
    input in both graphs), the cache is one byte per element, and its stats say int8 at 0.5x fp16; a second
    chunk (float attention over the dequantized codes) appends codes of its keys the same way and leaves the
    earlier codes as they were."""
    base, fz = engines["baseline"], engines["int8-fused"]
    ids = base.tokenizer.encode(PROMPT)
    n = len(ids)
    c_base, c_fused = base.new_cache(1, capacity=n + 16), fz.new_cache(1, capacity=n + 16)
    base.forward(np.asarray([ids]), c_base, phase="prefill")
    fz.forward(np.asarray([ids]), c_fused, phase="prefill")
    name = base.info.past_key_fmt % 0
    scales = calibrate(base.info)[name]
    keys = c_base.feeds()[name][:, :, :n]
    codes = c_fused.feeds()[name][:, :, :n].astype(np.int32)
    assert c_fused.feeds()[name].dtype == np.int8
    expected = np.clip(np.round(keys / scales), -128, 127)
    assert np.abs(codes - expected).max() <= 1
    more = base.tokenizer.encode(" and the lamp was lit again")
    before = c_fused.feeds()[name][:, :, :n].copy()
    base.forward(np.asarray([more]), c_base, phase="prefill")
    fz.forward(np.asarray([more]), c_fused, phase="prefill")
    assert np.array_equal(c_fused.feeds()[name][:, :, :n], before)  # re-quantized codes come back unchanged
    m = n + len(more)
    tail = c_fused.feeds()[name][:, :, n:m].astype(np.int32)
    assert np.abs(tail - np.clip(np.round(c_base.feeds()[name][:, :, n:m] / scales), -128, 127)).max() <= 1
    stats = c_fused.stats()
    assert set(stats.tokens) == {"int8"} and stats.tokens["int8"] == m
    elements = 2 * base.info.num_layers * base.info.num_kv_heads * base.info.head_dim  # per token
    assert stats.bytes["int8"] == m * elements  # one byte per element of each token held
    assert stats.reserved["int8"] == elements * c_fused.capacity >= stats.bytes["int8"]  # the whole buffer
    assert stats.ratio_vs_fp16 == 0.5
    twin = clone_cache(c_fused)  # a copy keeps the subclass
    assert isinstance(twin, fused.FusedCache) and twin.stats() == stats


def test_fused_decode_tracks_the_baseline(engines) -> None:
    """Teacher-forced next-token predictions agree with the baseline on most positions (quantized, not
    equal), and generation runs through the shared int8 buffers."""
    base, fz = engines["baseline"], engines["int8-fused"]
    text = ("In 1871 the railway reached the town, and within ten years its population had doubled. New "
            "factories were built along the river, and the old market square was paved with stone.")
    ids = base.tokenizer.encode(text)
    agree = []
    cb, cf = base.new_cache(1, capacity=len(ids) + 2), fz.new_cache(1, capacity=len(ids) + 2)
    lb = base.forward(np.asarray([ids[:8]]), cb, phase="prefill")
    lf = fz.forward(np.asarray([ids[:8]]), cf, phase="prefill")
    for t in ids[8:]:
        agree.append(int(np.argmax(lb[0, -1]) == np.argmax(lf[0, -1])))
        lb = base.forward(np.asarray([[t]]), cb, phase="decode")
        lf = fz.forward(np.asarray([[t]]), cf, phase="decode")
    assert np.mean(agree) >= 0.8
    prompt = base.tokenizer.encode(PROMPT)
    config = GenerationConfig(max_tokens=6)
    events = list(fz.generate(prompt, config))
    assert sum(e.kind == "token" for e in events) == 6
    assert events[-1].kv is not None and set(events[-1].kv.tokens) == {"int8"}


def test_fused_falls_back_to_segmented_int8_without_gqa(stories_onnx: Path) -> None:
    info = inspect_folder(stories_onnx)
    backend = choose_layout(info, _policy("int8-fused"))
    assert isinstance(backend, SegmentedLayout)
    assert backend.plan.name == "int8"
    assert "needs a float32 GroupQueryAttention graph" in backend.describe()


def test_fused_batch_rows_match_their_single_runs(engines) -> None:
    """Rows of different lengths decoded together (per-row prefill merged into one int8 buffer, a row
    retiring early) give each row the tokens it gets alone."""
    fz = engines["int8-fused"]
    prompts = [fz.tokenizer.encode(PROMPT), fz.tokenizer.encode("Water boils at")]
    config = GenerationConfig(max_tokens=5)

    def tokens(events, row=None):
        return [e.token_id for e in events if e.kind == "token" and (row is None or e.seq == row)]

    together = list(fz.generate_batch(prompts, config))
    for row, prompt in enumerate(prompts):
        assert tokens(together, row) == tokens(list(fz.generate(prompt, config)))


def test_fused_cache_applies_to_inferos_gqa_conversions(tmp_path: Path) -> None:
    """A GGUF converted with the default GroupQueryAttention graph takes the fused int8 cache (its logits
    track the float cache's, also when the second chunk reads the quantized past); a conversion with the
    Attention op falls back to the segmented cache."""
    from _tiny_gguf import write_tiny_gguf
    from conftest import make_engine

    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    gqa = inspect_folder(convert_gguf(src, tmp_path / "gqa", accuracy_level=0))
    op = inspect_folder(convert_gguf(src, tmp_path / "op", accuracy_level=0, attention="op"))
    base = make_engine(gqa.onnx_path.parent)
    prompt = [0, 5, 70, 100, 200, 30, 31, 260]
    cb = base.new_cache(1, capacity=len(prompt))
    want = base.forward(np.asarray([prompt[:6]]), cb, phase="prefill")[0, -1]
    want2 = base.forward(np.asarray([prompt[6:]]), cb, phase="prefill")[0, -1]
    assert isinstance(choose_layout(op, _policy("int8-fused")), SegmentedLayout)
    eng = load_engine(gqa.onnx_path.parent, "int8-fused", flags={"scheduler": {"mode": "cpu"}}, use_env=False)
    assert isinstance(eng.layout, fused.FusedLayout)
    check_graph(eng.layout.onnx_path, gqa.onnx_path.parent, full=False)
    cf = eng.new_cache(1, capacity=len(prompt))
    got = eng.forward(np.asarray([prompt[:6]]), cf, phase="prefill")[0, -1]
    got2 = eng.forward(np.asarray([prompt[6:]]), cf, phase="prefill")[0, -1]  # reads the quantized past
    for a, b in ((want, got), (want2, got2)):
        assert np.corrcoef(a, b)[0, 1] > 0.99
    assert len([e for e in eng.generate(prompt, GenerationConfig(max_tokens=3)) if e.kind == "token"]) == 3


def test_auto_picks_the_fused_cache_only_where_it_fits(oga_dir: Path, stories_onnx: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """kv.quant = auto (the default): int8-fused on a GQA graph for the size-class and chat profiles when
    the phases run on the CPU (the 3b profile asks for DirectML, absent here); the tiered segmented cache for
    the quality profile, the guide's window presets, a KV budget (eviction), graphs without GQA, and when
    an asked-for GPU provider is installed."""
    oga = inspect_folder(oga_dir.parent)
    stories = inspect_folder(stories_onnx)

    def policy(profile: str | None, flags: dict | None = None):
        return resolve_settings(profile, param_count=135_000_000, use_env=False,
                                flags={"scheduler": {"mode": "cpu"}, **(flags or {})}).policy

    assert policy(None).kv.quant == "auto"
    assert auto_fused(oga, policy(None)) and auto_fused(oga, policy("chat"))
    assert not auto_fused(oga, policy("quality"))  # quality_optimized: max_delta_ppl 0.1
    assert not auto_fused(oga, policy(None, {"kv": {"budget_bytes": 10_000_000}}))
    assert not auto_fused(stories, policy(None))
    for preset in ("tiered", "conservative", "balanced", "aggressive"):
        assert policy(preset).kv.quant == "tiered"
    backend = choose_layout(oga, policy("quality"))
    assert isinstance(backend, SegmentedLayout) and backend.plan.name == "tiered"
    assert isinstance(choose_layout(stories, policy(None)), SegmentedLayout)
    three_b = resolve_settings("3b", param_count=135_000_000, use_env=False).policy  # gpu_only on dml
    assert auto_fused(oga, three_b)  # DirectML is not installed here: both phases fall back to the CPU
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["DmlExecutionProvider", "CPUExecutionProvider"])
    assert not auto_fused(oga, three_b) and auto_fused(oga, policy(None))  # cpu mode stays fused
    # CUDA installed, prefill on it, decode on the CPU: fused only where the engine can prefill on the
    # Attention-op twin (graphs whose GQA reads position_ids); the OGA folder's cannot
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    hybrid = {"scheduler": {"mode": "hybrid", "prefill_device": "cuda", "decode_device": "cpu"}}
    on_cuda = {"scheduler": {"mode": "gpu_only", "prefill_device": "cuda", "decode_device": "cuda"}}
    assert not auto_fused(oga, policy(None, hybrid)) and not auto_fused(oga, policy(None, on_cuda))


def test_rope_pair_bound_holds_for_every_rotation() -> None:
    """The key scale's bound: whatever angle RoPE turns a channel pair by, both channels stay within the
    largest pair norm of the calibration keys (split-half and interleaved pairings)."""
    from inferos_cli.graphs.fused import rope_pair_bound

    rng = np.random.default_rng(3)
    keys = rng.normal(size=(1, 2, 12, 8)).astype(np.float32) * np.array([1, 5, 0.1, 2, 3, 1, 1, 4], np.float32)
    for interleaved in (False, True):
        bound = rope_pair_bound(keys, interleaved)
        a, b = (keys[..., 0::2], keys[..., 1::2]) if interleaved else (keys[..., :4], keys[..., 4:])
        for theta in rng.uniform(0, 2 * np.pi, size=16):
            ra, rb = a * np.cos(theta) - b * np.sin(theta), a * np.sin(theta) + b * np.cos(theta)
            turned = (np.stack([ra, rb], -1).reshape(keys.shape) if interleaved
                      else np.concatenate([ra, rb], axis=-1))
            assert np.all(np.abs(turned) <= bound + 1e-5)
        assert np.all(bound >= np.abs(keys).max(axis=2, keepdims=True) - 1e-6)  # never below a channel's own max
