"""An "exact compute" twin of a model graph for quality measurements.

onnxruntime-genai int4 graphs (and any ``MatMulNBits`` with ``accuracy_level`` 4) quantize activations to
int8 inside every matmul. That rounding turns any perturbation of the hidden state, however small, into
logit noise about as large as quantizing the cache to int8 does, so KV-cache quality measured on such a
graph is mostly that noise floor. :func:`exact_info` returns the model with every ``MatMulNBits`` at
``accuracy_level`` 0 (float activations; the same 4-bit weights), so ``inferos eval`` compares KV
configurations on a deterministic function of the cache. The derived graph is cached as
``<stem>.inferos-exact-<hash>.onnx`` where :func:`inferos_cli.graphs.naming.derived_path` says.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from inferos_cli.graphs.naming import derived_path, save_derived

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo

EXACT_VERSION = "1"


def _lowered(model: object) -> int:
    """Set every ``MatMulNBits`` ``accuracy_level`` above 0 to 0 in ``model``; return how many changed."""
    changed = 0
    for node in model.graph.node:  # type: ignore[attr-defined]
        if node.op_type != "MatMulNBits":
            continue
        for attr in node.attribute:
            if attr.name == "accuracy_level" and attr.i != 0:
                attr.i = 0
                changed += 1
    return changed


def exact_info(info: "ModelInfo") -> tuple["ModelInfo", bool]:
    """``info`` pointing at the exact-compute twin of its graph, and whether anything had to change
    (False: the graph already computes in float, ``info`` is returned as is)."""
    import onnx

    src = Path(info.onnx_path)
    path = derived_path(src, "exact", EXACT_VERSION)
    if path.is_file():
        return dataclasses.replace(info, onnx_path=path), True
    model = onnx.load(str(src), load_external_data=False)
    if not _lowered(model):
        return info, False
    save_derived(model, src, path)
    return dataclasses.replace(info, onnx_path=path), True
