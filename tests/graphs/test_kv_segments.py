"""The KV-boundary rewrite (inferos_cli/graphs/kv_segments.py) on the converter's graph (stories260K) and the OGA GQA graph."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import check_graph as check, exact_matmulnbits

from inferos_cli.graphs.naming import graphs_dir
from inferos_cli.graphs.kv_segments import RewriteSpec, new_output_name, rewrite_model, rewritten_graph, segment_name
from inferos_cli.models.info import ModelInfo, inspect_folder

PROMPT = [1, 403, 407, 261, 378, 275, 263, 124, 291, 102, 263, 338]  # valid ids for both vocabularies


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _segment_feeds(info: ModelInfo, fp: dict[str, np.ndarray], group: int) -> dict[str, np.ndarray]:
    """All past in the fp segment, empty quantized segments (2-D codes, 1-D scales)."""
    d = info.head_dim
    feeds = {}
    for i in range(info.num_layers):
        for kind in ("key", "value"):
            feeds[segment_name(info, i, kind, "q8")] = np.zeros((0, group), np.uint8)
            feeds[segment_name(info, i, kind, "q4")] = np.zeros((0, d // 2), np.uint8)
            for tier in ("q8", "q4"):
                feeds[segment_name(info, i, kind, tier + "s")] = np.zeros((0,), np.float16)
                feeds[segment_name(info, i, kind, tier + "z")] = np.zeros((0,), np.uint8)
            feeds[segment_name(info, i, kind, "fp")] = fp[f"{i}.{kind}"]
    return feeds


def compare_logits(info: ModelInfo, original: Path, rewritten: Path, group: int, steps: int = 4,
                   prompt: list[int] = PROMPT) -> float:
    """Greedy-decode with both graphs from the same prompt; max |logits difference| over all steps."""
    ref, new = _session(original), _session(rewritten)
    h, d = info.num_kv_heads, info.head_dim
    ref_out = [o.name for o in ref.get_outputs()]
    new_out = [o.name for o in new.get_outputs()]
    past = {}
    fp = {}
    for i in range(info.num_layers):
        for kind in ("key", "value"):
            name = (info.past_key_fmt if kind == "key" else info.past_value_fmt) % i
            past[name] = np.zeros((1, h, 0, d), np.float32)
            fp[f"{i}.{kind}"] = np.zeros((1, h, 0, d), np.float32)
    n, worst, ids = 0, 0.0, list(prompt)
    for _ in range(steps):
        n += len(ids)
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, n), np.int64)}
        pos = {"position_ids": np.arange(n - len(ids), n, dtype=np.int64)[None]}
        ref_pos = pos if "position_ids" in {i.name for i in ref.get_inputs()} else {}
        a = dict(zip(ref_out, ref.run(None, {**feeds, **ref_pos, **past})))
        b = dict(zip(new_out, new.run(None, {**feeds, **pos, **_segment_feeds(info, fp, group)})))
        worst = max(worst, float(np.abs(a["logits"] - b["logits"]).max()))
        for i in range(info.num_layers):
            for kind in ("key", "value"):
                pname = (info.past_key_fmt if kind == "key" else info.past_value_fmt) % i
                past[pname] = a[(info.present_key_fmt if kind == "key" else info.present_value_fmt) % i]
                step_new = b[new_output_name(i, kind)]
                assert step_new.shape == (1, h, len(ids), d)  # only this step's columns come back
                fp[f"{i}.{kind}"] = np.concatenate([fp[f"{i}.{kind}"], step_new], axis=2)
        ids = [int(a["logits"][0, -1].argmax())]
    return worst


def test_stories_rewrite_passes_checker_and_matches(stories_onnx: Path) -> None:
    info = inspect_folder(stories_onnx)
    check(info.onnx_path, stories_onnx)  # the original passes the same check
    plain = rewritten_graph(info, RewriteSpec(group_size=8, rotate_keys=False))
    assert graphs_dir() in plain.path.parents and plain.rotation == "none"  # never in the user's folder
    check(plain.path, stories_onnx)
    assert compare_logits(info, info.onnx_path, plain.path, group=8) <= 1e-5
    rotated = rewritten_graph(info, RewriteSpec(group_size=8, rotate_keys=True))
    assert rotated.rotation == "qk" and rotated.path != plain.path
    check(rotated.path, stories_onnx)
    # q.k is invariant under the orthonormal rotation: equal up to float rounding
    assert compare_logits(info, info.onnx_path, rotated.path, group=8) <= 1e-4


def test_rewrite_cache_is_reused_and_keyed_by_spec(stories_onnx: Path) -> None:
    info = inspect_folder(stories_onnx)
    first = rewritten_graph(info, RewriteSpec(8, False))
    mtime = first.path.stat().st_mtime_ns
    again = rewritten_graph(info, RewriteSpec(8, False))
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime


def test_oga_rewrite_matches_with_every_token_in_fp(oga_dir: Path, inferos_home: Path) -> None:
    info = inspect_folder(oga_dir.parent)
    res = rewritten_graph(info, RewriteSpec(group_size=32, rotate_keys=False))
    # a folder inferos did not make (read-only or not): the graph goes to its cache, beside a link to the weights
    assert inferos_home in res.path.parents
    assert not list(oga_dir.parent.glob("*.inferos-kv-*"))
    # GQA now takes explicit positions and an attention bias from the mask (masked columns anywhere)
    assert res.positions
    assert compare_logits(info, info.onnx_path, res.path, group=32, steps=3) <= 1e-5


def test_oga_rotation_moves_rope_out_of_gqa(oga_dir: Path, tmp_path: Path) -> None:
    """With keys rotated, RoPE runs outside GroupQueryAttention and q, k are rotated. The OGA graph
    quantizes activations to int8 inside MatMulNBits (accuracy_level 4), which turns float rounding
    into visible noise, so both graphs are compared with accuracy_level 0."""
    import onnx

    info = inspect_folder(oga_dir.parent)
    model, rotation, _ = rewrite_model(info, RewriteSpec(32, True))
    assert rotation == "qk"
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(len(n.input) <= 7 or not (n.input[7] or n.input[8]) for n in gqa)  # no cos/sin: RoPE is outside
    assert sum(n.op_type == "RotaryEmbedding" for n in model.graph.node) == 2 * len(gqa)
    shutil.copyfile(oga_dir.parent / "model.onnx.data", tmp_path / "model.onnx.data")  # checker refuses links
    onnx.save(model, str(tmp_path / "rot-checked.onnx"))
    # the OGA builder's own value_info fails strict shape inference, so the structural check only
    shutil.copyfile(info.onnx_path, tmp_path / "orig-checked.onnx")
    check(tmp_path / "orig-checked.onnx", tmp_path, full=False)
    check(tmp_path / "rot-checked.onnx", tmp_path, full=False)
    original = onnx.load(str(info.onnx_path), load_external_data=False)
    exact_matmulnbits(original)
    exact_matmulnbits(model)
    onnx.save(original, str(tmp_path / "orig.onnx"))
    onnx.save(model, str(tmp_path / "rot.onnx"))
    assert compare_logits(info, tmp_path / "orig.onnx", tmp_path / "rot.onnx", group=32, steps=2) <= 1e-3


def test_rewrite_of_an_inferos_gqa_conversion(tmp_path: Path) -> None:
    """The converter's GroupQueryAttention graph (RoPE from the graph's own position_ids) rewrites like the
    OGA graph: explicit positions kept, mask bias added, logits equal with every token in full precision,
    and with keys rotated (RoPE moved out of the op) equal up to rounding."""
    import onnx
    from _tiny_gguf import write_tiny_gguf

    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    folder = convert_gguf(src, tmp_path / "gqa", accuracy_level=0)
    info = inspect_folder(folder)
    assert info.uses_gqa_op and info.has_position_ids
    prompt = [0, 5, 70, 100, 200, 30, 31, 260]
    plain = rewritten_graph(info, RewriteSpec(group_size=16, rotate_keys=False))
    assert plain.positions
    check(plain.path, folder, full=False)
    model = onnx.load(str(plain.path), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.input[9] == "position_ids" and n.input[10] for n in gqa)  # positions + mask bias
    assert compare_logits(info, info.onnx_path, plain.path, group=16, prompt=prompt) <= 1e-5
    rotated = rewritten_graph(info, RewriteSpec(group_size=16, rotate_keys=True))
    assert rotated.rotation == "qk"
    assert compare_logits(info, info.onnx_path, rotated.path, group=16, prompt=prompt) <= 1e-4


def test_group_must_divide_head_dim(stories_onnx: Path) -> None:
    from inferos_cli.errors import ModelError

    info = inspect_folder(stories_onnx)
    with pytest.raises(ModelError, match="group"):
        rewrite_model(info, RewriteSpec(group_size=32, rotate_keys=False))
