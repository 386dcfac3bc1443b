"""The fp16 KV graph: onnxruntime's ``GroupQueryAttention`` reads and writes a float16 past.

A float32 GQA graph keeps its weights and every other node in float32; each ``GroupQueryAttention`` runs
in float16 instead: its float inputs (q, k, v, the RoPE cos/sin caches, attention bias, head sinks) are
cast to float16 in front of it and its attention output back to float32 behind it, and the
``past_key_values.*`` inputs and ``present.*`` outputs become float16. The cache is then half the bytes of
the float32 baseline, as llama.cpp's default fp16 cache, with nothing to calibrate (no scales). The casts
of the cos/sin initializers are constant-folded by onnxruntime at session start.

The host-side cache is :class:`inferos_cli.kv.half.HalfCache`. Only float32 GQA graphs (onnxruntime-genai
/ Lemonade folders, inferos' own conversions with head_dim % 16 == 0) whose onnxruntime CPU provider runs a
float16 GQA take it (:func:`supported`). The derived graph is cached as ``<stem>.inferos-kvh-<hash>.onnx``
where :func:`inferos_cli.graphs.naming.derived_path` says; it points at the source's weights.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inferos_cli.graphs.naming import copied_note, derived_path, retype_kv, save_derived
from inferos_cli.graphs.probe import gqa_decode_step

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo

HALF_VERSION = "1"
# GroupQueryAttention inputs of type T (the attention float type): query, key, value, cos_cache, sin_cache,
# attention_bias, head_sink; 3/4 are the past (graph inputs, made float16), the rest are int or absent
FLOAT_SLOTS = (0, 1, 2, 7, 8, 10, 11)
PREFIX = "inferos_kvh/"


def supported(info: "ModelInfo") -> bool:
    """True when the graph's attention is ``GroupQueryAttention`` with a float32 cache and this
    onnxruntime's CPU provider runs a float16 GQA with in-op rotary (:func:`half_gqa_kernel`)."""
    if not info.uses_gqa_op or info.kv_dtype != "float32":
        return False
    return half_gqa_kernel()


@lru_cache(maxsize=1)
def half_gqa_kernel() -> bool:
    """Run a one-node float16 ``GroupQueryAttention`` (rotary on, one decode step over 4 cached tokens) on
    the CPU provider: True when it loads, runs and returns finite float16 outputs."""
    from onnx import TensorProto

    trig = np.full((8, 8), 0.5, np.float16)
    ran = gqa_decode_step(TensorProto.FLOAT16, TensorProto.FLOAT16, ["cos", "sin"], {"cos": trig, "sin": trig},
                          do_rotary=1)
    return ran is not None and ran[1].dtype == np.float16 and bool(np.isfinite(ran[0].astype(np.float32)).all())


def half_model(info: "ModelInfo") -> Any:
    """The original graph with float16 past/present and every ``GroupQueryAttention`` run in float16
    between casts (module docstring). Raises ModelError when a GQA node does not read a graph past input
    and write a graph present output directly, or when not every layer has one."""
    import onnx
    from onnx import TensorProto, helper

    from inferos_cli.errors import ModelError

    model = onnx.load(str(info.onnx_path), load_external_data=False)
    graph = model.graph
    pasts, presents = retype_kv(graph, info, TensorProto.FLOAT16, value_info=True)
    casts: dict[str, str] = {}  # float32 name -> its float16 cast (cos/sin shared by every layer)
    nodes: list[Any] = []
    done = 0
    for idx, node in enumerate(graph.node):
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        ins, outs = list(node.input), list(node.output)
        if len(ins) < 5 or ins[3] not in pasts or ins[4] not in pasts or len(outs) < 3 or \
                outs[1] not in presents or outs[2] not in presents:
            raise ModelError(f"{info.onnx_path}: GroupQueryAttention {node.name or idx} does not read the past "
                             "inputs and write the present outputs directly; use kv.quant int8 (the "
                             "segmented cache) or the baseline for this model")
        if any(a.name == "kv_cache_bit_width" for a in node.attribute):
            raise ModelError(f"{info.onnx_path}: its GroupQueryAttention already holds a quantized cache; "
                             "use the baseline preset for this model")
        for slot in FLOAT_SLOTS:
            if slot < len(ins) and ins[slot]:
                src = ins[slot]
                if src not in casts:
                    casts[src] = f"{PREFIX}{src}/f16"
                    nodes.append(helper.make_node("Cast", [src], [casts[src]], name=f"{PREFIX}cast/{src}",
                                                  to=TensorProto.FLOAT16))
                ins[slot] = casts[src]
        back = []
        for j, out in enumerate(outs):
            if out and j not in (1, 2):  # attention output (and output_qk): back to float32
                outs[j] = f"{PREFIX}{out}/f16"
                back.append(helper.make_node("Cast", [outs[j]], [out], name=f"{PREFIX}uncast/{out}",
                                             to=TensorProto.FLOAT))
        del node.input[:]
        node.input.extend(ins)
        del node.output[:]
        node.output.extend(outs)
        nodes.append(node)
        nodes.extend(back)
        done += 1
    if done != info.num_layers:
        raise ModelError(f"{info.onnx_path}: found {done} GroupQueryAttention layers reading the past, "
                         f"expected {info.num_layers}; use the baseline preset for this model")
    del graph.node[:]
    graph.node.extend(nodes)
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                   "inferos.kv.half": "float16 past/present; GroupQueryAttention in float16"})
    return model


def half_graph(info: "ModelInfo") -> tuple[Path, str]:
    """The fp16 KV graph for ``info`` (from the cache, or built and cached atomically now) and a note for
    tables (non-empty when the weights had to be copied)."""
    src = Path(info.onnx_path)
    path = derived_path(src, "kvh", HALF_VERSION, tag="kv-half")
    if path.is_file():
        return path, ""
    copied = save_derived(half_model(info), src, path)
    return path, copied_note(copied, path.parent)
