"""The fp16 KV cache (kv/half.py, graphs/half_kv.py): onnxruntime's GroupQueryAttention in float16 on a float16
past, on the OGA folder (at accuracy_level 0, so activation quantization does not amplify float rounding) and on
an inferos GQA conversion."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from _engines import home_env, load_engine
from conftest import check_graph
from inferos_cli.engine.plan import choose_layout
from inferos_cli.engine.sampling import GenerationConfig
from inferos_cli.graphs.half_kv import half_model
from inferos_cli.kv.half import HalfCache, HalfLayout
from inferos_cli.kv.layouts import PlainLayout
from inferos_cli.models.info import inspect_folder
from inferos_cli.profiles import resolve_settings

PROMPT = "The old lighthouse keeper climbed the stairs every evening, counting the steps as he went, and"
CPU = {"scheduler": {"mode": "cpu"}}
# measured on this prompt (2-core EPYC, onnxruntime 1.32): prefill logits differ by at most 0.039 (|logit| up to
# 27), decode logits by at most 0.017 over 32 greedy steps; the bound leaves room, a float16 error in the
# weights path or a wrong cache column gives differences of whole units
LOGIT_TOL = 0.1


def _policy(profile: str, **flags):
    return resolve_settings(profile, param_count=135_000_000, flags={**CPU, **flags}, use_env=False).policy


@pytest.fixture(scope="module")
def engines(oga_exact: Path, tmp_path_factory: pytest.TempPathFactory):
    """Baseline and fp16 engines on the exact OGA folder (the fp16 graph built once, in a temp home)."""
    home = tmp_path_factory.mktemp("half-home")
    with home_env(home):
        yield {name: load_engine(oga_exact, name, flags=CPU, use_env=False) for name in ("baseline", "fp16")}


def test_fp16_graph_has_float16_past_and_gqa_in_float16(engines) -> None:
    """Every past input and present output is float16 (in the file and in the session), every GQA reads
    float16 casts and its output is cast back to float32, and no weight is added (same external data)."""
    eng = engines["fp16"]
    assert isinstance(eng.layout, HalfLayout) and eng.plan.iobinding
    assert "fp16: float16 past/present" in eng.layout.describe()
    path = eng.layout.onnx_path
    check_graph(path, path.parent, full=False)  # OGA graphs fail full shape checks as shipped
    model = onnx.load(str(path), load_external_data=False)
    info = eng.info
    past = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    present = [o for o in model.graph.output if o.name.startswith("present.")]
    assert len(past) == len(present) == 2 * info.num_layers
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in past + present)
    sess_inputs = {i.name: i.type for i in eng.plan.decode.session.get_inputs()}
    assert sess_inputs[info.past_key_fmt % 0] == "tensor(float16)"
    producers = {out: n for n in model.graph.node for out in n.output}
    gqas = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqas) == info.num_layers
    for node in gqas:
        for slot in (0, 7, 8):  # packed qkv, cos/sin caches
            cast = producers[node.input[slot]]
            assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT16
        consumer = [n for n in model.graph.node if node.output[0] in n.input]
        assert [n.op_type for n in consumer] == ["Cast"] and consumer[0].attribute[0].i == onnx.TensorProto.FLOAT
    source = onnx.load(str(info.onnx_path), load_external_data=False)
    assert len(model.graph.initializer) == len(source.graph.initializer)
    assert path.stat().st_size < 2 * (Path(info.onnx_path).stat().st_size + 1_000_000)  # weights stay external


def test_fp16_cache_follows_the_baseline_at_half_the_bytes(engines) -> None:
    """Greedy tokens equal the baseline's, logits within LOGIT_TOL, layer 0's keys are the baseline's keys
    in float16 (within one float16 step), and the cache's stats say fp16 at exactly half the float32 bytes."""
    base, half = engines["baseline"], engines["fp16"]
    ids = base.tokenizer.encode(PROMPT)
    steps = 16
    cb, ch = base.new_cache(1, capacity=len(ids) + steps), half.new_cache(1, capacity=len(ids) + steps)
    assert isinstance(ch, HalfCache) and ch.shares_buffers
    lb = base.forward(np.asarray([ids]), cb, phase="prefill")
    lh = half.forward(np.asarray([ids]), ch, phase="prefill")
    assert np.abs(lb - lh).max() < LOGIT_TOL
    name = base.info.past_key_fmt % 0
    keys, halves = cb.feeds()[name][:, :, : len(ids)], ch.feeds()[name][:, :, : len(ids)]
    assert halves.dtype == np.float16
    assert np.abs(halves.astype(np.float32) - keys).max() <= np.spacing(np.float16(np.abs(keys).max()))
    got, want = [], []
    for _ in range(steps):
        want.append(int(np.argmax(lb[0, -1])))
        got.append(int(np.argmax(lh[0, -1])))
        assert np.abs(lb[0, -1] - lh[0, -1]).max() < LOGIT_TOL
        lb = base.forward(np.asarray([[want[-1]]]), cb, phase="decode")
        lh = half.forward(np.asarray([[want[-1]]]), ch, phase="decode")
    assert got == want
    sb, sh = cb.stats(), ch.stats()
    n = len(ids) + steps
    assert set(sh.tokens) == {"fp16"} and sh.tokens["fp16"] == sb.tokens["fp"] == n
    assert sh.total_bytes * 2 == sb.total_bytes
    assert sh.reserved_bytes * 2 == sb.reserved_bytes
    assert sh.ratio_vs_fp16 == 1.0 and sb.ratio_vs_fp16 == 2.0


def test_fp16_generation_batches_and_runs_without_iobinding(engines, oga_exact: Path) -> None:
    """Rows of different lengths decoded together get the tokens they get alone, events report fp16 KV,
    and with IOBinding off (session-allocated presents) generation gives the same tokens."""
    half = engines["fp16"]
    prompts = [half.tokenizer.encode(PROMPT), half.tokenizer.encode("Water boils at")]
    config = GenerationConfig(max_tokens=5)

    def tokens(events, row=None):
        return [e.token_id for e in events if e.kind == "token" and (row is None or e.seq == row)]

    alone = [list(half.generate(p, config)) for p in prompts]
    assert alone[0][-1].kv is not None and set(alone[0][-1].kv.tokens) == {"fp16"}
    together = list(half.generate_batch(prompts, config))
    for row in range(2):
        assert tokens(together, row) == tokens(alone[row])
    unbound = load_engine(oga_exact, "fp16", flags={**CPU, "io": {"enable_iobinding": False}}, use_env=False)
    assert isinstance(unbound.layout, HalfLayout) and not unbound.plan.iobinding
    assert tokens(list(unbound.generate(prompts[0], config))) == tokens(alone[0])


def test_fp16_preset_resolves_and_falls_back_without_gqa(oga_dir: Path, stories_onnx: Path) -> None:
    policy = _policy("fp16")
    assert policy.kv.quant == "fp16" and policy.kv.enabled
    assert isinstance(choose_layout(inspect_folder(oga_dir.parent), policy), HalfLayout)
    stories = inspect_folder(stories_onnx)  # stories260K: head_dim 8, no GroupQueryAttention
    layout = choose_layout(stories, policy)
    assert isinstance(layout, PlainLayout)
    assert "fp16 needs a float32 GroupQueryAttention graph" in layout.describe()


def test_fp16_cache_applies_to_inferos_gqa_conversions(tmp_path: Path) -> None:
    """A GGUF converted with the default GroupQueryAttention graph takes the fp16 cache and its logits
    track the float32 cache's, also when a second chunk reads the float16 past."""
    from _tiny_gguf import write_tiny_gguf
    from conftest import make_engine

    from inferos_cli.errors import ModelError
    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    gqa = inspect_folder(convert_gguf(src, tmp_path / "gqa", accuracy_level=0))
    base = make_engine(gqa.onnx_path.parent)
    prompt = [0, 5, 70, 100, 200, 30, 31, 260]
    cb = base.new_cache(1, capacity=len(prompt))
    want = [base.forward(np.asarray([prompt[:6]]), cb, phase="prefill")[0, -1],
            base.forward(np.asarray([prompt[6:]]), cb, phase="prefill")[0, -1]]
    eng = load_engine(gqa.onnx_path.parent, "fp16", flags=CPU, use_env=False)
    assert isinstance(eng.layout, HalfLayout)
    ch = eng.new_cache(1, capacity=len(prompt))
    got = [eng.forward(np.asarray([prompt[:6]]), ch, phase="prefill")[0, -1],
           eng.forward(np.asarray([prompt[6:]]), ch, phase="prefill")[0, -1]]
    for a, b in zip(want, got):
        assert np.abs(a - b).max() < 1e-2 * max(1.0, float(np.abs(a).max()))
    op = inspect_folder(convert_gguf(src, tmp_path / "op", accuracy_level=0, attention="op"))
    assert isinstance(choose_layout(op, _policy("fp16")), PlainLayout)
    with pytest.raises(ModelError):
        half_model(op)  # no GroupQueryAttention layer: a one-line error, not a silent float32 graph
