"""A twin of a float32 ``GroupQueryAttention`` graph with the ONNX ``Attention`` op, for CUDA prefill.

onnxruntime's CUDA kernel of ``com.microsoft.GroupQueryAttention`` is registered for float16 and bfloat16
only, so in a CUDA session the float32 GQA nodes of an inferos conversion run on the CPU, with copies of
the packed q/k/v and of the whole past in and out of the GPU around each of them. The same weights with
the ONNX ``Attention`` op (opset 23) run every node but a few shape ops on CUDA (prefill timings in
``benchmarks/README.md``).

This module derives that twin from a GQA graph: each GQA node becomes ``Split`` (when q/k/v arrive
packed) -> ``RotaryEmbedding`` on q and k from the graph's ``position_ids`` -> ``Attention`` with an
additive bias built once from ``attention_mask`` (padding + causality, the converter's own
:func:`~inferos_cli.models.builders.base.attention_bias`). Same inputs, outputs and weights (the twin reads
the source's external data; :mod:`inferos_cli.graphs.naming` says where it is written); the presents follow
the concat convention (``present = past + new columns``), so a caller that keeps a GQA-style packed cache copies the new
columns into it (:mod:`inferos_cli.engine.step` does, for the prefill of the ``hybrid`` plan).

Only GQA nodes whose RoPE reads a ``position_ids`` input (inferos conversions), without local windows,
softcap, smooth softmax or quantized caches, are translated; for any other graph (onnxruntime-genai
folders derive positions inside the op) :func:`attention_op_graph` returns None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferos_cli.graphs.naming import derived_path, save_derived

VERSION = "1"
_MS = "com.microsoft"


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def translatable(node: Any) -> bool:
    """True for a GQA node this module can express with standard RoPE + ``Attention``."""
    a = _attrs(node)
    ins = list(node.input) + [""] * (12 - len(node.input))
    if a.get("local_window_size", -1) not in (-1,) or a.get("softcap", 0.0) or a.get("smooth_softmax", 0):
        return False
    if a.get("k_quant_type", b"NONE") not in (b"NONE", "NONE") or a.get("v_quant_type", b"NONE") not in (b"NONE", "NONE"):
        return False
    if any(ins[i] for i in (10, 11)):  # attention_bias / head_sink
        return False
    if a.get("do_rotary", 0) and not (ins[7] and ins[8] and ins[9]):
        return False  # RoPE positions derived inside the op (onnxruntime-genai): not expressible here
    return True


def _prune(graph: Any) -> None:
    """Drop nodes none of whose outputs reach a graph output (the GQA length inputs, say)."""
    needed = {o.name for o in graph.output}
    keep: list[Any] = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output if out):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    used = needed | {i.name for i in graph.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    produced = {o for n in graph.node for o in n.output}
    infos = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _gqa_nodes(model: Any) -> list[Any] | None:
    """The model's ``GroupQueryAttention`` nodes when there are some and every one can be translated (and
    the graph has the inputs the attention bias is built from); else None."""
    graph = model.graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.domain == _MS]
    inputs = {i.name for i in graph.input}
    if not gqa or not all(translatable(n) for n in gqa) or not {"input_ids", "attention_mask"} <= inputs:
        return None
    return gqa


def rewrite(model: Any) -> bool:
    """Replace every ``GroupQueryAttention`` node of ``model`` in place; False (model untouched) when the
    graph has none or one that cannot be translated (see :func:`translatable`)."""
    from onnx import helper

    from inferos_cli.models.builders.base import attention_bias, rope_attention
    from inferos_cli.models.builders.writer import GraphWriter

    graph = model.graph
    gqa = _gqa_nodes(model)
    if gqa is None:
        return False
    w = GraphWriter(None, prefix="inferos_attn_")
    bias = attention_bias(w, "op")
    head = list(w.nodes)
    body: list[Any] = []
    for node in graph.node:
        if node not in gqa:
            body.append(node)
            continue
        w.nodes = []
        a = _attrs(node)
        ins = list(node.input) + [""] * (12 - len(node.input))
        heads, kvh = int(a["num_heads"]), int(a["kv_num_heads"])
        q, k, v = ins[0], ins[1], ins[2]
        if not k:  # packed [B, T, (heads + 2 kvh) * d]; d from the cos table or the past's last dimension
            dim = _head_dim(graph, ins[3], ins[7])
            if dim is None:
                return False
            q, k, v = w.node("Split", [q, w.const([heads * dim, kvh * dim, kvh * dim])], n_out=3, axis=-1)
        scale = float(a.get("scale", 0.0)) or None
        outs = (node.output[0], node.output[1] if len(node.output) > 1 else w.fresh("present_key"),
                node.output[2] if len(node.output) > 2 else w.fresh("present_value"))
        if a.get("do_rotary", 0):
            rope_attention(w, q, k, v, ins[9], (ins[7], ins[8]), bias, ins[3], ins[4], outs, heads=heads,
                           kv_heads=kvh, scale=scale if scale is not None else _default_scale(graph, ins[3]),
                           interleaved=int(a.get("rotary_interleaved", 0)))
        else:
            extra = {"scale": scale} if scale is not None else {}
            w.node("Attention", [q, k, v, bias, ins[3], ins[4]], outputs=list(outs), q_num_heads=heads,
                   kv_num_heads=kvh, **extra)
        body.extend(w.nodes)
    del graph.node[:]
    graph.node.extend(head + body)
    graph.initializer.extend(w.initializers)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < 23:
            op.version = 23
    if not any(op.domain == _MS for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS, 1))
    _prune(graph)
    return True


def _head_dim(graph: Any, past: str, cos: str) -> int | None:
    """head_dim from the past input's static last dimension, else twice the cos table's width."""
    for inp in graph.input:
        if inp.name == past:
            dims = inp.type.tensor_type.shape.dim
            if len(dims) == 4 and dims[3].dim_value:
                return int(dims[3].dim_value)
    for init in graph.initializer:
        if init.name == cos and len(init.dims) == 2:
            return int(init.dims[1]) * 2
    return None


def _default_scale(graph: Any, past: str) -> float:
    """GQA's default scale, 1/sqrt(head_dim)."""
    dim = _head_dim(graph, past, "")
    return 1.0 / float(dim) ** 0.5 if dim else 1.0


def has_twin(src: Path | str) -> bool:
    """True when :func:`attention_op_graph` can derive a twin of ``src`` (reads the graph, writes nothing)."""
    import onnx

    return _gqa_nodes(onnx.load(str(src), load_external_data=False)) is not None


def attention_op_graph(src: Path | str) -> Path | None:
    """The twin of ``src`` with the ONNX ``Attention`` op (written once, where
    :func:`~inferos_cli.graphs.naming.derived_path` says), or None when ``src`` has no translatable ``GroupQueryAttention``."""
    import onnx

    src = Path(src)
    path = derived_path(src, "attn", VERSION)
    if path.is_file():
        return path
    model = onnx.load(str(src), load_external_data=False)
    if not rewrite(model):
        return None
    save_derived(model, src, path)
    return path


__all__ = ["attention_op_graph", "has_twin", "rewrite", "translatable"]
