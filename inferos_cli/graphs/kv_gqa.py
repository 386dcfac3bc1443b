"""Graph-building helpers of the KV-boundary rewrite (:mod:`inferos_cli.graphs.kv_segments`) and its
``GroupQueryAttention`` passes: explicit positions and an attention bias (masked columns anywhere), sliding
windows by true positions, and RoPE moved out of the op for key rotation.

Why sliding windows need their own bias: GQA's ``local_window_size`` masks by *column index* (the last
``window`` columns before each query), which holds only for a past in token order. The segmented cache
feeds ``[int8 tier | int4 tier | sinks + recent ring]``, so the last columns are not the latest tokens
once the ring wraps (or tokens are tiered, evicted or merged). The rewritten graph therefore takes each
past column's true position (:data:`KEY_POSITIONS`, ``[B, past]`` int64, fed by the cache) and gives
every windowed GQA node a bias that also masks keys with ``query_pos - key_pos >= window``, with the
op's own window switched off. The window is the op's ``local_window_size`` (HF's ``sliding_window``:
a query sees itself and the ``window - 1`` tokens before it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo

KEY_POSITIONS = "past_key_positions"
INT64_MAX = 2**63 - 1


class Builder:
    """Collects nodes/initializers with fresh names."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.count = 0
        self.initializers: list[Any] = []

    def name(self, base: str) -> str:
        self.count += 1
        return f"{self.prefix}/{base}_{self.count}"

    def const(self, array: np.ndarray, base: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, nodes: list[Any], op: str, inputs: list[str], domain: str = "", n_out: int = 1,
             outputs: list[str] | None = None, **attrs: Any) -> Any:
        from onnx import helper

        outs = outputs or [self.name(op.lower()) for _ in range(n_out)]
        nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs


def opset(model: Any, domain: str = "") -> int:
    for imp in model.opset_import:
        if imp.domain == domain or (domain == "" and imp.domain == "ai.onnx"):
            return int(imp.version)
    return 0


def attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: Any, name: str, value: Any) -> None:
    from onnx import helper

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))



def gqa_positions_and_mask(model: Any, b: Builder, pre: list[Any], info: "ModelInfo", elem: int) -> bool:
    """Make ``GroupQueryAttention`` graphs honour masked columns anywhere and explicit positions.

    GQA normally derives each row's length from the attention-mask row sum (so every row must be
    right-padded, and evicting a token would shift the positions of later ones). Here every GQA node gets
    ``seqlens_k = total - 1`` for all rows (new keys land in the last columns, like a concat), an
    ``attention_bias`` of 0 / -inf built from ``attention_mask`` (padding and evicted columns anywhere),
    and the graph gains a ``position_ids`` input that GQA's rotary embedding uses (the engine feeds each
    row's true positions). Checked on onnxruntime 1.31 CPU: a masked column in the middle of the past
    with explicit positions gives the same output as the past without it (max error 1.2e-7).
    Sliding-window nodes get a bias that also applies their window by position (:func:`_window_bias`)."""
    graph = model.graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    names = {i.name for i in graph.input}
    if not gqa or "attention_mask" not in names or "input_ids" not in names:
        return False
    for node in gqa:
        extra = list(node.input[9:])
        if extra and extra[0] == "position_ids" and "position_ids" in names:
            extra = extra[1:]  # inferos' own GQA conversions already rotate from the graph's position_ids
        if any(extra):
            return False  # the graph already feeds other position ids / a bias: leave it alone
    from onnx import TensorProto, helper

    if "position_ids" not in names:
        graph.input.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                         ["batch_size", "sequence_length"]))
    total = b.node(pre, "Shape", ["attention_mask"], start=1, end=2)
    bsz = b.node(pre, "Shape", ["attention_mask"], start=0, end=1)
    seqlen = b.node(pre, "Shape", ["input_ids"], start=1, end=2)
    one = b.const(np.array([1], dtype=np.int64), "one1")
    seqlens = b.node(pre, "Cast", [b.node(pre, "Expand", [b.node(pre, "Sub", [total, one]), bsz])], to=TensorProto.INT32)
    np_float = np.float16 if elem == TensorProto.FLOAT16 else np.float32
    allowed = b.node(pre, "Cast", ["attention_mask"], to=TensorProto.BOOL)
    bias = b.node(pre, "Where", [allowed, b.const(np.array(0, dtype=np_float), "zero_f"),
                                 b.const(np.array(np.finfo(np_float).min, dtype=np_float), "neg_f")])
    bias = b.node(pre, "Unsqueeze", [bias, b.const(np.array([1, 2], dtype=np.int64), "axes12")])
    shape = b.node(pre, "Concat", [bsz, one, seqlen, total], axis=0)
    bias = b.node(pre, "Expand", [bias, shape])  # [B, 1, T, total]
    windowed: dict[int, str] = {}  # window -> its bias
    for node in gqa:
        ins = list(node.input) + [""] * max(0, 11 - len(node.input))
        ins[5] = seqlens
        ins[9] = "position_ids" if attr(node, "do_rotary", 0) == 1 else ""
        ins[10] = bias
        window = int(attr(node, "local_window_size", -1))
        if window > 0:  # by true positions, not columns (module docstring)
            if window not in windowed:
                windowed[window] = _window_bias(graph, b, pre, allowed, window, np_float)
            ins[10] = windowed[window]
            set_attr(node, "local_window_size", -1)
        del node.input[:]
        node.input.extend(ins)
    return True


def _window_bias(graph: Any, b: Builder, pre: list[Any], allowed: str, window: int, np_float: type) -> str:
    """``[B, 1, T, total]`` bias of a sliding-window layer: 0 where the column is unmasked and its token
    lies within ``window`` positions of the query (``query_pos - key_pos < window``), else the float's
    minimum. Key positions: :data:`KEY_POSITIONS` (the past's, in feed order; added as a graph input on
    first use) then ``position_ids`` (the new tokens'). Causality inside the new block stays GQA's."""
    from onnx import TensorProto, helper

    if KEY_POSITIONS not in {i.name for i in graph.input}:
        graph.input.append(helper.make_tensor_value_info(KEY_POSITIONS, TensorProto.INT64,
                                                         ["batch_size", "past_sequence_length"]))
    keys = b.node(pre, "Concat", [KEY_POSITIONS, "position_ids"], axis=1)  # [B, total]
    queries = b.node(pre, "Unsqueeze", ["position_ids", b.const(np.array([2], dtype=np.int64), "axis2")])
    keys = b.node(pre, "Unsqueeze", [keys, b.const(np.array([1], dtype=np.int64), "axis1")])
    near = b.node(pre, "Less", [b.node(pre, "Sub", [queries, keys]), b.const(np.array(window, dtype=np.int64), "window")])
    ok = b.node(pre, "And", [near, b.node(pre, "Unsqueeze", [allowed, b.const(np.array([1], dtype=np.int64), "axis1")])])
    bias = b.node(pre, "Where", [ok, b.const(np.array(0, dtype=np_float), "zero_f"),
                                 b.const(np.array(np.finfo(np_float).min, dtype=np_float), "neg_f")])
    return b.node(pre, "Unsqueeze", [bias, b.const(np.array([1], dtype=np.int64), "axis1")])  # [B, 1, T, total]


def rotate_gqa(model: Any, b: Builder, pre: list[Any], before: dict[int, list[Any]], h_name: str,
                info: "ModelInfo", pos_name: str | None = None) -> bool:
    """``GroupQueryAttention`` graphs: apply RoPE outside the op, rotate q and k by ``H``, run GQA with
    ``do_rotary=0``. Positions: ``pos_name`` (the graph's ``position_ids``) when given, else GQA's own
    derivation, ``CumSum(attention_mask) - 1`` at the new tokens."""
    graph = model.graph
    gqa = [(i, n) for i, n in enumerate(graph.node) if n.op_type == "GroupQueryAttention"]
    if not gqa or "attention_mask" not in info.input_names or "input_ids" not in info.input_names:
        return False
    for _, node in gqa:
        if attr(node, "do_rotary", 0) != 1 or len(node.input) < 9 or not node.input[7] or not node.input[8]:
            return False
        if pos_name is None and len(node.input) > 9 and node.input[9]:
            return False  # explicit position_ids: leave it alone
    d = info.head_dim
    if pos_name is not None:
        pos = pos_name
    else:  # positions of the new tokens: CumSum(mask)-1, last T columns, clamped at 0
        cum = b.node(pre, "CumSum", ["attention_mask", b.const(np.array(1, dtype=np.int64), "axis1")])
        pos_all = b.node(pre, "Sub", [cum, b.const(np.array(1, dtype=np.int64), "one")])
        neg_t = b.node(pre, "Neg", [b.node(pre, "Shape", ["input_ids"], start=1, end=2)])
        pos = b.node(pre, "Slice", [pos_all, neg_t, b.const(np.array([INT64_MAX], dtype=np.int64), "end"),
                                    b.const(np.array([1], dtype=np.int64), "axis1v")])
        pos = b.node(pre, "Max", [pos, b.const(np.array(0, dtype=np.int64), "zero")])
    heads_shape = b.const(np.array([0, 0, -1, d], dtype=np.int64), "heads")
    merge_shape = b.const(np.array([0, 0, -1], dtype=np.int64), "merge")
    for idx, node in gqa:
        ins = before.setdefault(idx, [])
        nh, kvh = int(attr(node, "num_heads")), int(attr(node, "kv_num_heads"))
        inter = int(attr(node, "rotary_interleaved", 0))
        if node.input[1]:
            q, k, v = node.input[0], node.input[1], node.input[2]
        else:
            split = b.const(np.array([nh * d, kvh * d, kvh * d], dtype=np.int64), "split")
            q, k, v = b.node(ins, "Split", [node.input[0], split], n_out=3, axis=-1)
        cos, sin = node.input[7], node.input[8]

        def rope_rot(x: str) -> str:
            r = b.node(ins, "RotaryEmbedding", [x, pos, cos, sin], domain="com.microsoft", interleaved=inter)
            r = b.node(ins, "MatMul", [b.node(ins, "Reshape", [r, heads_shape]), h_name])
            return b.node(ins, "Reshape", [r, merge_shape])

        new_inputs = list(node.input)
        new_inputs[0], new_inputs[1], new_inputs[2] = rope_rot(q), rope_rot(k), v
        new_inputs[7] = new_inputs[8] = ""
        if len(new_inputs) > 9:
            new_inputs[9] = ""  # RoPE already applied
        while new_inputs and not new_inputs[-1]:
            new_inputs.pop()
        del node.input[:]
        node.input.extend(new_inputs)
        set_attr(node, "do_rotary", 0)
    return True

