"""The fused caches (kv/fused.py): onnxruntime's GroupQueryAttention on int8 codes, and on 4-bit codes of
Hadamard-rotated keys and values; on the OGA folder and on an inferos GQA conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import check_graph
from inferos_cli.kv import fused
from inferos_cli.kv.backend import SegmentedBackend, kv_backend
from inferos_cli.profiles import resolve_settings
from inferos_cli.runtime.modelinfo import inspect_folder
from inferos_cli.runtime.sampling import GenerationConfig

PROMPT = "The old lighthouse keeper climbed the stairs every evening, counting the steps as he went, and"


def _policy(profile: str):
    return resolve_settings(profile, param_count=135_000_000, flags={"scheduler": {"mode": "cpu"}},
                            use_env=False).policy


@pytest.fixture(scope="module")
def engines(oga_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Baseline, int8-fused and int4-fused engines on the OGA folder (fused graphs built once, in a temp home)."""
    import os

    from inferos_cli.runtime.engine import Engine

    home = tmp_path_factory.mktemp("fused-home")
    old = os.environ.get("INFEROS_HOME")
    os.environ["INFEROS_HOME"] = str(home)
    try:
        info = inspect_folder(oga_dir.parent)
        out = {}
        for name in ("baseline", "int8-fused", "int4-fused"):
            resolved = resolve_settings(name, param_count=info.param_count,
                                        flags={"scheduler": {"mode": "cpu"}}, use_env=False)
            out[name] = Engine(info, resolved, threads=1)
        yield out
    finally:
        if old is None:
            os.environ.pop("INFEROS_HOME", None)
        else:
            os.environ["INFEROS_HOME"] = old


def test_fused_backend_is_chosen_for_gqa_graphs(engines) -> None:
    eng = engines["int8-fused"]
    assert isinstance(eng.backend, fused.FusedBackend)
    assert "int8-fused" in eng.backend.describe()
    import onnx

    model = onnx.load(str(eng.backend.onnx_path), load_external_data=False)
    check_graph(eng.backend.onnx_path, eng.backend.onnx_path.parent, full=False)  # OGA graphs fail full shape checks as shipped
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["kv_cache_bit_width"] == 8 and attrs["k_quant_type"] == b"PER_CHANNEL"
    past = [i for i in model.graph.input if i.name.startswith("past_key_values")]
    assert past and all(i.type.tensor_type.elem_type == onnx.TensorProto.INT8 for i in past)


def test_fused_cache_holds_int8_codes_of_the_real_keys(engines) -> None:
    """After a prefill, layer 0's codes are round(key / scale) of the baseline's keys (layer 0 sees the same
    input in both graphs), the cache is one byte per element, and its stats say int8 at 0.5x fp16."""
    base, fz = engines["baseline"], engines["int8-fused"]
    ids = base.tokenizer.encode(PROMPT)
    n = len(ids)
    c_base, c_fused = base.new_cache(1, capacity=n + 4), fz.new_cache(1, capacity=n + 4)
    base.forward(np.asarray([ids]), c_base, phase="prefill")
    fz.forward(np.asarray([ids]), c_fused, phase="prefill")
    name = base.info.past_key_fmt % 0
    scales = fused.calibrate(base.info, fused.PRESETS["int8-fused"])[name]
    keys = c_base.feeds()[name][:, :, :n]
    codes = c_fused.feeds()[name][:, :, :n].astype(np.int32)
    assert c_fused.feeds()[name].dtype == np.int8
    expected = np.clip(np.round(keys / scales), -128, 127)
    assert np.abs(codes - expected).max() <= 1
    stats = c_fused.stats()
    assert set(stats.tokens) == {"int8"} and stats.tokens["int8"] == n
    per_elem = stats.bytes["int8"] / (2 * base.info.num_layers * base.info.num_kv_heads * base.info.head_dim * (n + 4))
    assert per_elem == 1.0
    twin = c_fused.clone()  # PlainCache.clone keeps the subclass
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
    backend = kv_backend(info, _policy("int8-fused"))
    assert isinstance(backend, SegmentedBackend)
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


def test_rotating_queries_keys_and_values_leaves_the_logits_unchanged(oga_exact: Path, tmp_path: Path) -> None:
    """rotate_gqa_model (RoPE moved out of the op, q/k/v times H, the output times H) on the exact-compute
    OGA graph: same logits as the original over a prefill and cached decode steps; the cached keys are the
    original keys times H."""
    import os

    import onnx
    import onnxruntime as ort

    from inferos_cli.kv.quant import hadamard
    from inferos_cli.kv.rewrite import rotate_gqa_model

    info = inspect_folder(oga_exact)
    model = onnx.load(str(info.onnx_path), load_external_data=False)
    assert rotate_gqa_model(model, info)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert all((len(n.input) < 8 or not n.input[7]) and onnx.helper.get_attribute_value(
        next(a for a in n.attribute if a.name == "do_rotary")) == 0 for n in gqa)
    os.link(oga_exact / "model.onnx.data", tmp_path / "model.onnx.data")
    onnx.save(model, str(tmp_path / "model.onnx"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    orig, rot = (ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                 for p in (info.onnx_path, tmp_path / "model.onnx"))
    names = [o.name for o in orig.get_outputs()]
    ids = [1, 504, 3458, 282, 1789, 30, 2583, 314, 253, 1165, 314, 4051]
    h = hadamard(info.head_dim)
    empty = np.zeros((1, info.num_kv_heads, 0, info.head_dim), np.float32)
    past_o = {n: empty for i in range(info.num_layers) for n in (info.past_key_fmt % i, info.past_value_fmt % i)}
    past_r = dict(past_o)
    start = 0
    for end in (8, 9, 10, 11, 12):
        feeds = {"input_ids": np.asarray([ids[start:end]], np.int64), "attention_mask": np.ones((1, end), np.int64)}
        out_o = dict(zip(names, orig.run(None, {**feeds, **past_o})))
        out_r = dict(zip(names, rot.run(None, {**feeds, **past_r})))
        assert np.abs(out_o["logits"] - out_r["logits"]).max() < 2e-3
        key = info.present_key_fmt % 3
        assert np.abs(out_o[key] @ h - out_r[key]).max() < 1e-3
        past_o = {n.replace("present.", "past_key_values."): v for n, v in out_o.items() if n.startswith("present.")}
        past_r = {n.replace("present.", "past_key_values."): v for n, v in out_r.items() if n.startswith("present.")}
        start = end


def test_int4_fused_cache_holds_packed_codes_of_the_rotated_keys(engines) -> None:
    """int4-fused: uint8 buffers of head_dim/2 bytes per row; layer 0's low/high nibbles are
    round(key @ H / scale) + 8 of the baseline's keys (within 1 code); stats say int4 at a quarter of fp16."""
    from inferos_cli.kv.quant import hadamard

    base, fz = engines["baseline"], engines["int4-fused"]
    assert isinstance(fz.backend, fused.FusedBackend) and "int4-fused" in fz.backend.describe()
    ids = base.tokenizer.encode(PROMPT)
    n = len(ids)
    c_base, c_fused = base.new_cache(1, capacity=n + 4), fz.new_cache(1, capacity=n + 4)
    base.forward(np.asarray([ids]), c_base, phase="prefill")
    fz.forward(np.asarray([ids]), c_fused, phase="prefill")
    name = base.info.past_key_fmt % 0
    buf = c_fused.feeds()[name]
    assert buf.dtype == np.uint8 and buf.shape[-1] == base.info.head_dim // 2
    packed = buf[:, :, :n].astype(np.int32)
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,)) - 8
    scales = fused.calibrate(base.info, fused.PRESETS["int4-fused"])[name]
    rotated = c_base.feeds()[name][:, :, :n] @ hadamard(base.info.head_dim)
    expected = np.clip(np.round(rotated / scales), -8, 7)
    assert np.abs(codes - expected).max() <= 1
    stats = c_fused.stats()
    assert set(stats.tokens) == {"int4"} and stats.tokens["int4"] == n
    assert stats.bytes["int4"] * 4 == stats.bytes_fp16 * (n + 4) // n


def test_int4_fused_decode_tracks_the_baseline(engines) -> None:
    """Teacher-forced next-token predictions of the 4-bit fused cache agree with the baseline on most
    positions; generation runs and reports the int4 tier."""
    base, fz = engines["baseline"], engines["int4-fused"]
    text = ("In 1871 the railway reached the town, and within ten years its population had doubled. New "
            "factories were built along the river, and the old market square was paved with stone.")
    ids = base.tokenizer.encode(text)
    cb, cf = base.new_cache(1, capacity=len(ids) + 2), fz.new_cache(1, capacity=len(ids) + 2)
    lb = base.forward(np.asarray([ids[:8]]), cb, phase="prefill")
    lf = fz.forward(np.asarray([ids[:8]]), cf, phase="prefill")
    agree = []
    for t in ids[8:]:
        agree.append(int(np.argmax(lb[0, -1]) == np.argmax(lf[0, -1])))
        lb = base.forward(np.asarray([[t]]), cb, phase="decode")
        lf = fz.forward(np.asarray([[t]]), cf, phase="decode")
    assert np.mean(agree) >= 0.7
    events = list(fz.generate(base.tokenizer.encode(PROMPT), GenerationConfig(max_tokens=4)))
    assert sum(e.kind == "token" for e in events) == 4 and set(events[-1].kv.tokens) == {"int4"}


def test_fused_caches_apply_to_inferos_gqa_conversions(tmp_path: Path) -> None:
    """A GGUF converted with the default GroupQueryAttention graph takes both fused caches (the graph's own
    position_ids drive RoPE after rotation); a conversion with the Attention op falls back."""
    from _tiny_gguf import write_tiny_gguf
    from conftest import make_engine

    from inferos_cli.runtime.convert import convert_gguf
    from inferos_cli.runtime.engine import Engine

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    gqa = inspect_folder(convert_gguf(src, tmp_path / "gqa", accuracy_level=0))
    op = inspect_folder(convert_gguf(src, tmp_path / "op", accuracy_level=0, attention="op"))
    base = make_engine(gqa.onnx_path.parent)
    prompt = [0, 5, 70, 100, 200, 30, 31, 260]
    cb = base.new_cache(1, capacity=len(prompt))
    want = base.forward(np.asarray([prompt[:6]]), cb, phase="prefill")[0, -1]
    want2 = base.forward(np.asarray([prompt[6:]]), cb, phase="prefill")[0, -1]
    for name, floor in (("int8-fused", 0.99), ("int4-fused", 0.85)):  # random weights: broad K/V, coarse 4-bit
        assert isinstance(kv_backend(op, _policy(name)), SegmentedBackend)
        resolved = resolve_settings(name, param_count=gqa.param_count, flags={"scheduler": {"mode": "cpu"}},
                                    use_env=False)
        eng = Engine(gqa, resolved, threads=1)
        assert isinstance(eng.backend, fused.FusedBackend)
        check_graph(eng.backend.onnx_path, gqa.onnx_path.parent, full=False)
        cf = eng.new_cache(1, capacity=len(prompt))
        got = eng.forward(np.asarray([prompt[:6]]), cf, phase="prefill")[0, -1]
        got2 = eng.forward(np.asarray([prompt[6:]]), cf, phase="prefill")[0, -1]  # reads the quantized past
        for a, b in ((want, got), (want2, got2)):
            assert np.corrcoef(a, b)[0, 1] > floor
        assert len([e for e in eng.generate(prompt, GenerationConfig(max_tokens=3)) if e.kind == "token"]) == 3
