"""A graph input that limits the LM head to the last ``k`` positions: ``logits_keep``.

Decoder exports (onnxruntime-genai, optimum, the inferos converter) compute logits for every position of
the input, so a prefill of T tokens runs the vocabulary projection T times (a large share of a small
model's prefill) and returns a ``[B, T, vocab]`` float tensor, while generation only samples from the
last position. This rewrite inserts
``Slice(hidden, starts=-logits_keep, axis=1)`` in front of the node that produces ``logits``
(``MatMul``/``MatMulNBits``/``FusedMatMul``/``Gemm`` fed by the final norm), behind a new int64 input
``logits_keep`` (shape ``[1]``): feeding ``T`` gives the original logits, ``1`` only the last position's.

The rewritten graph is written as ``<stem>.inferos-logits-<hash>.onnx`` where
:func:`inferos_cli.graphs.naming.derived_path` says (never in a folder the user owns). Written atomically; reused while the source graph is unchanged. A graph whose weights live inside
a .onnx file larger than 64 MiB is left alone (a rewritten copy would duplicate the weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferos_cli.graphs.naming import derived_path, external_files, save_derived

KEEP_INPUT = "logits_keep"
VERSION = "3"
_HEADS = ("MatMul", "MatMulNBits", "FusedMatMul", "Gemm")
EMBEDDED_LIMIT = 64 * 1024**2  # larger .onnx files without external data are not copied


def rewrite(model: Any) -> bool:
    """Add ``logits_keep`` to an ``onnx.ModelProto`` in place; False when no known LM head pattern is
    found (or the graph already has the input). Patterns:

    - ``logits = Head(hidden[B, T, H], W)`` (onnxruntime-genai ``MatMulNBits``, ``MatMul``/``FusedMatMul``):
      ``hidden`` is sliced to its last ``k`` positions;
    - ``logits = Reshape(Head(hidden[B*T, H], W), [B, T, V])`` (a flattened 2-D LM head): ``hidden`` is
      viewed as ``[B, T, H]``, sliced, flattened back, and the final shape becomes ``[B, k, V]``.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    if any(i.name == KEEP_INPUT for i in graph.input) or not any(o.name == "logits" for o in graph.output):
        return False
    producers = {out: node for node in graph.node for out in node.output}
    last = producers.get("logits")
    if last is None:
        return False
    reshape = None
    head = last
    if last.op_type == "Reshape" and last.input[0] in producers:
        reshape, head = last, producers[last.input[0]]
        if "input_ids" not in {i.name for i in graph.input}:
            return False
    if head.op_type not in _HEADS or not head.input:
        return False

    def const(name: str, values: list[int]) -> Any:
        return helper.make_node("Constant", [], [name], name=name,
                                value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    p = "inferos_logits/"
    act = head.input[0]
    nodes = [
        helper.make_node("Neg", [KEEP_INPUT], [p + "neg"], name=p + "Neg"),
        const(p + "ends", [2**62]),
        const(p + "axis1", [1]),
    ]
    if reshape is None:
        nodes.append(helper.make_node("Slice", [act, p + "neg", p + "ends", p + "axis1"], [p + "hidden_last"],
                                      name=p + "Slice"))
        head.input[0] = p + "hidden_last"
    else:
        nodes += [
            const(p + "zero", [0]), const(p + "one", [1]), const(p + "two", [2]), const(p + "three", [3]),
            const(p + "minus1", [-1]),
            helper.make_node("Shape", ["input_ids"], [p + "ids_shape"], name=p + "ShapeIds"),
            helper.make_node("Slice", [p + "ids_shape", p + "zero", p + "one"], [p + "batch"], name=p + "Batch"),
            helper.make_node("Shape", [act], [p + "act_shape"], name=p + "ShapeAct"),
            helper.make_node("Slice", [p + "act_shape", p + "one", p + "two"], [p + "hsize"], name=p + "Hidden"),
            helper.make_node("Concat", [p + "batch", p + "minus1", p + "hsize"], [p + "shape3"], name=p + "Shape3",
                             axis=0),
            helper.make_node("Reshape", [act, p + "shape3"], [p + "act3"], name=p + "To3D"),
            helper.make_node("Slice", [p + "act3", p + "neg", p + "ends", p + "axis1"], [p + "act3_last"],
                             name=p + "Slice"),
            helper.make_node("Concat", [p + "minus1", p + "hsize"], [p + "shape2"], name=p + "Shape2", axis=0),
            helper.make_node("Reshape", [p + "act3_last", p + "shape2"], [p + "act2_last"], name=p + "To2D"),
            helper.make_node("Slice", [reshape.input[1], p + "two", p + "three"], [p + "vocab"], name=p + "Vocab"),
            # [B, k, V or -1]: k (<= T, as the engine feeds it) and the original last entry
            helper.make_node("Concat", [p + "batch", KEEP_INPUT, p + "vocab"], [p + "logits_shape"],
                             name=p + "LogitsShape", axis=0),
        ]
        head.input[0] = p + "act2_last"
        reshape.input[1] = p + "logits_shape"
    index = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    graph.input.append(helper.make_tensor_value_info(KEEP_INPUT, TensorProto.INT64, [1]))
    for out in graph.output:
        if out.name == "logits":
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].ClearField("dim_value")
                dims[1].dim_param = "logits_length"
    return True


def last_logits_graph(src: Path | str) -> Path | None:
    """The path of ``src`` with the ``logits_keep`` input (written once and cached), or None when the
    graph's LM head does not match the pattern (the engine then keeps all logits)."""
    import onnx

    src = Path(src)
    path = derived_path(src, "logits", VERSION)
    if path.is_file():
        return path
    if src.stat().st_size > EMBEDDED_LIMIT:
        # weights stored inside the .onnx file itself: a rewritten copy would duplicate them on disk
        probe = onnx.load(str(src), load_external_data=False)
        if not external_files(probe):
            return None
        model = probe
    else:
        model = onnx.load(str(src), load_external_data=False)
    if not rewrite(model):
        return None
    save_derived(model, src, path)
    return path
