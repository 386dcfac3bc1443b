"""An "exact compute" twin of a model graph for quality measurements.

onnxruntime-genai int4 graphs (and any ``MatMulNBits`` with ``accuracy_level`` 4) quantize activations to
int8 inside every matmul. That rounding turns any perturbation of the hidden state, however small, into
logit noise about as large as quantizing the cache to int8 does, so KV-cache quality measured on such a
graph is mostly that noise floor. :func:`exact_info` returns the model with float activations in every
matmul and the same weights: 4-bit ``MatMulNBits`` at ``accuracy_level`` 0 (onnxruntime's CPU has float
kernels for them), and every other ``MatMulNBits`` (8-bit: a GGUF Q8_0 output head) as a float ``MatMul``
on its weights dequantized once here, since onnxruntime has no float kernel for those and would dequantize
the whole matrix again at every call. The twin and the dequantized weights are cached like every derived
graph (:mod:`inferos_cli.graphs.naming`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferos_cli import paths
from inferos_cli.graphs.naming import derived_path, save_derived

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from inferos_cli.models.info import ModelInfo

EXACT_VERSION = "2"


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _array(tensor: Any, folder: Path) -> "np.ndarray":
    """An initializer's values, read straight from its external data file when it has one (onnx's own
    loader refuses data files with several hard links, which derived-graph folders use)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    where = {e.key: e.value for e in tensor.external_data}
    with open(folder / where["location"], "rb") as f:
        f.seek(int(where.get("offset", 0)))
        raw = f.read(int(where["length"]))
    return np.frombuffer(raw, dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tuple(tensor.dims))


def _dequantized(node: Any, inits: dict[str, Any], folder: Path) -> "np.ndarray | None":
    """The ``[K, N]`` float32 weight of an 8-bit ``MatMulNBits`` (``w = scale * (q - zero_point)``, the
    dequantization onnxruntime does), or None for a node this does not cover (packed zero points of other
    widths, ``g_idx``, float16 scales)."""
    import numpy as np

    a = _attrs(node)
    k, n, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
    extra = [x for x in node.input[3:] if x]
    if bits != 8 or extra or node.input[2] not in inits or node.input[1] not in inits:
        return None
    scales = _array(inits[node.input[2]], folder)
    if scales.dtype != np.float32:
        return None
    blocks = (k + block - 1) // block
    q = _array(inits[node.input[1]], folder).reshape(n, blocks, block).astype(np.float32)
    w = ((q - 128.0) * scales.reshape(n, blocks, 1)).reshape(n, blocks * block)[:, :k]
    return np.ascontiguousarray(w.T)


def _exact(model: Any, src: Path, data_name: str) -> tuple[int, bytes]:
    """Make ``model`` compute in float (see module doc); returns how many nodes changed and the bytes of
    the dequantized weights, which the graph now reads from ``data_name`` beside it."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    inits = {t.name: t for t in model.graph.initializer}
    nodes, blob, changed = [], bytearray(), 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        w = _dequantized(node, inits, src.parent) if _attrs(node)["bits"] != 4 else None
        if w is None:
            for attr in node.attribute:
                if attr.name == "accuracy_level" and attr.i != 0:
                    attr.i = 0
                    changed += 1
            nodes.append(node)
            continue
        tensor = numpy_helper.from_array(w, f"{node.input[1]}.inferos-float")
        raw = tensor.raw_data
        set_external_data(tensor, data_name, offset=len(blob), length=len(raw))
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        blob += raw
        model.graph.initializer.append(tensor)
        nodes.append(helper.make_node("MatMul", [node.input[0], tensor.name], list(node.output),
                                      name=f"{node.name}.inferos-float"))
        changed += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {x for node in nodes for x in node.input}
    kept = [t for t in model.graph.initializer if t.name in used or t.name.endswith(".inferos-float")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return changed, bytes(blob)


def exact_info(info: "ModelInfo") -> tuple["ModelInfo", bool]:
    """``info`` pointing at the exact-compute twin of its graph, and whether anything had to change
    (False: the graph already computes in float, ``info`` is returned as is)."""
    import onnx

    src = Path(info.onnx_path)
    path = derived_path(src, "exact", EXACT_VERSION)
    if path.is_file():
        return dataclasses.replace(info, onnx_path=path), True
    model = onnx.load(str(src), load_external_data=False)
    data_name = f"{path.name}.data"
    changed, blob = _exact(model, src, data_name)
    if not changed:
        return info, False
    if blob:
        paths.atomic_write_bytes(path.parent / data_name, blob)  # before the graph: a graph on disk is complete
    save_derived(model, src, path)
    return dataclasses.replace(info, onnx_path=path), True
