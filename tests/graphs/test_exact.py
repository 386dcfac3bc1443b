"""The exact-compute twin for quality measurements (inferos_cli/graphs/exact.py) and `inferos eval --exact`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from inferos_cli.cli import app
from inferos_cli.graphs.exact import exact_info
from inferos_cli.models.info import inspect_folder


def _levels(path: Path) -> set[int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "accuracy_level"}


def test_float_graphs_are_left_alone(stories_onnx: Path) -> None:
    info = inspect_folder(stories_onnx)
    same, changed = exact_info(info)
    assert not changed and same.onnx_path == info.onnx_path


def test_int4_graph_gets_float_activations_and_same_weights(oga_dir: Path, inferos_home: Path) -> None:
    info = inspect_folder(oga_dir.parent)
    assert _levels(info.onnx_path) == {4}
    twin, changed = exact_info(info)
    assert changed and twin.onnx_path != info.onnx_path and _levels(twin.onnx_path) == {0}
    assert exact_info(info)[0].onnx_path == twin.onnx_path  # cached
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    ids = np.asarray([[504, 3156, 314, 253, 1345]], dtype=np.int64)
    logits = []
    for path in (info.onnx_path, twin.onnx_path):
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for i in range(info.num_layers):
            for fmt in (info.past_key_fmt, info.past_value_fmt):
                feeds[fmt % i] = np.zeros((1, info.num_kv_heads, 0, info.head_dim), np.float32)
        logits.append(sess.run(["logits"], feeds)[0][0, -1])
    # same weights: the same prediction and close logits; not identical (activation rounding differs)
    assert int(np.argmax(logits[0])) == int(np.argmax(logits[1]))
    assert 0 < np.abs(logits[0] - logits[1]).max() < 2.0


def test_eval_reports_exact_scoring(oga_dir: Path, tinystories_text: Path, inferos_home: Path) -> None:
    common = ["eval", "--model", str(oga_dir.parent), "--text", str(tinystories_text), "--ctx", "48",
              "--prefix", "16", "--max-tokens", "32", "--compare", "baseline,int8", "--no-rss", "--format", "json"]
    exact = json.loads(CliRunner().invoke(app, common + ["--exact"]).stdout)
    shipped = json.loads(CliRunner().invoke(app, common + ["--as-shipped"]).stdout)
    assert exact["exact_matmul"] is True and shipped["exact_matmul"] is False
    assert exact["results"][0]["ppl"] != shipped["results"][0]["ppl"]
