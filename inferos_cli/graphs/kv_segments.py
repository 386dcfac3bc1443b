"""The KV-boundary rewrite: a decoder ONNX whose past inputs are quantized segments.

For each layer ``i`` and ``kind`` in (key, value), the graph input ``past_key_values.{i}.{kind}`` is
replaced by segment inputs (only the quantized tiers the KV plan uses exist), head-major like the
original past, with codes as 2-D rows and scales as 1-D (free reshapes on the host):

====================  ========  =========================  ==========================================
input                 dtype     shape                      holds
====================  ========  =========================  ==========================================
``<past>.q8``         uint8     ``[B*H*n*D/g, g]``         int8-tier codes, one row per group
``<past>.q4``         uint8     ``[B*H*n, D/2]``           int4-tier codes (split-half nibbles)
``<past>.q{8,4}s``    fp16      ``[B*H*n*D/g]``            scale of each group (rounded up to fp16)
``<past>.q{8,4}z``    uint8     ``[B*H*n*D/g]``            zero point of each group
``<past>.fp``         model fp  ``[B, H, nf, D]``          sinks + recent window, full precision
====================  ========  =========================  ==========================================

A few nodes per tier unpack nibbles (``BitwiseAnd``/``BitShift`` + ``Concat``), dequantize with one
per-row ``DequantizeLinear`` (rows = groups; ORT's blocked ``DequantizeLinear`` is much slower on CPU) and reshape to ``[B, H, n, D]``; ``Concat([int8 | int4 | fp], axis=2)`` produces the tensor
with the original past name, so every consumer (the converter's ``Attention`` or onnxruntime-genai's
``GroupQueryAttention``) is untouched. ORT releases each layer's dequantized past once its layer ran,
so only about one layer of dequantized past is alive at a time.

Each ``present.{i}.{kind}`` output is replaced by ``kvnew.{i}.{kind}``: a ``Slice`` holding only this
step's new columns (``[B, H, T, D]``), so the host appends O(new tokens) per step. onnxruntime keeps a
node's unconsumed outputs to the end of the run and runs output-only branches last, so the next attention
node is made to read its length off these slices (:func:`_new_columns`): each layer's float present is
freed before the next layer runs, instead of all of them (the size of an fp32 cache) living to the end.

``GroupQueryAttention`` graphs also get explicit positions and a bias built from ``attention_mask`` (masked
columns anywhere); their sliding-window layers are windowed by true token positions, read from one more
input, ``past_key_positions`` ``[B, past]`` int64, because the segments are not in token order
(:mod:`inferos_cli.graphs.kv_gqa`).

Key rotation (``rotation`` in :class:`RewriteInfo`):

- ``qk``: q and k are multiplied by an orthonormal Hadamard ``H`` right after RoPE (``q.k`` is invariant
  under an orthogonal map), so cached keys are *stored* rotated and never un-rotated. For the inferos
  converter's graphs this traces ``Concat(past, k) -> (Fused)MatMul(q, k^T)``; for
  ``GroupQueryAttention`` graphs RoPE is moved out of the op (``com.microsoft.RotaryEmbedding`` with
  positions from ``CumSum(attention_mask)``, exactly what GQA derives) and GQA runs with ``do_rotary=0``.
- ``host``: fallback when neither pattern is found: the cache rotates keys on the host when it
  quantizes them and the graph un-rotates the dequantized int segments with a ``MatMul`` (P*D^2 per head
  per step: slow, correct).
- ``none``: rotation off.

The rewritten graph is cached as ``<stem>.inferos-kv-<hash>.onnx`` where
:func:`inferos_cli.graphs.naming.derived_path` says (never in a folder the user owns). Written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inferos_cli.errors import ModelError
from inferos_cli.graphs.kv_gqa import (
    INT64_MAX,
    KEY_POSITIONS,
    Builder,
    attr,
    gqa_positions_and_mask,
    opset,
    rotate_gqa,
)
from inferos_cli.graphs.naming import copied_note, derived_path, save_derived

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo

REWRITE_VERSION = "9"
NEW_FMT = "kvnew.%d.%s"
SEGMENTS = ("q8", "q8s", "q8z", "q4", "q4s", "q4z", "fp")


@dataclass(frozen=True)
class RewriteSpec:
    """What the rewritten graph needs to know: the group size, whether keys are rotated, and which
    quantized segments exist for keys and for values (bits, in feed order; unused ones are left out so
    the graph carries no dead nodes)."""

    group_size: int = 32
    rotate_keys: bool = True
    key_bits: tuple[int, ...] = (8, 4)
    value_bits: tuple[int, ...] = (8, 4)

    def bits(self, kind: str) -> tuple[int, ...]:
        """Quantized segments of ``kind`` in feed order (8-bit first)."""
        return tuple(sorted(self.key_bits if kind == "key" else self.value_bits, reverse=True))

    def digest(self) -> str:
        """Stable text for the cache hash."""
        k = "".join(map(str, self.bits("key")))
        v = "".join(map(str, self.bits("value")))
        return f"g{self.group_size}-r{int(self.rotate_keys)}-k{k}-v{v}"


@dataclass
class RewriteInfo:
    """A rewritten graph on disk, how it rotates keys, whether it takes ``position_ids`` (then masked
    columns may sit anywhere: eviction and ragged batches work) and whether it takes the past's positions
    (:data:`~inferos_cli.graphs.kv_gqa.KEY_POSITIONS`: sliding-window layers, windowed by position)."""

    path: Path
    rotation: str  # "qk" | "host" | "none"
    note: str = ""
    positions: bool = True
    key_positions: bool = False


def segment_name(info: "ModelInfo", layer: int, kind: str, segment: str) -> str:
    """Input name of one segment, e.g. ``past_key_values.3.key.q8s``."""
    fmt = info.past_key_fmt if kind == "key" else info.past_value_fmt
    return f"{fmt % layer}.{segment}"


def new_output_name(layer: int, kind: str) -> str:
    """Output name holding this step's new columns of one layer, e.g. ``kvnew.3.key``."""
    return NEW_FMT % (layer, kind)


def rewrite_model(info: "ModelInfo", spec: RewriteSpec) -> tuple[Any, str, str]:
    """Build the rewritten ``onnx.ModelProto`` (external data references untouched).

    Returns ``(model, rotation, note)``; see the module docstring for ``rotation``. Whether the graph
    takes ``position_ids`` (and so honours masked columns anywhere) is in its metadata
    (``inferos.kv.positions``) and in :func:`graph_takes_positions`.
    """
    import onnx
    from onnx import TensorProto, helper

    from inferos_cli.graphs.rotation import can_rotate, hadamard

    try:
        model = onnx.load(str(info.onnx_path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise ModelError(f"{info.onnx_path} is not a readable ONNX model: {exc}") from None
    graph = model.graph
    d, group = info.head_dim, spec.group_size
    if d % group:
        raise ModelError(f"head_dim {d} is not a multiple of kv.group_size {group}", "set kv.group_size to 32")
    if opset(model) < 14:
        raise ModelError(f"{info.onnx_path} uses ONNX opset {opset(model)} < 14", "re-export with opset >= 14")
    past_names = {info.past_key_fmt % i: (i, "key") for i in range(info.num_layers)}
    past_names.update({info.past_value_fmt % i: (i, "value") for i in range(info.num_layers)})
    inputs_by_name = {vi.name: vi for vi in graph.input}
    missing = [n for n in past_names if n not in inputs_by_name]
    if missing:
        raise ModelError(f"{info.onnx_path} has no input {missing[0]!r}", "the KV rewrite needs standard past inputs")
    elem = inputs_by_name[next(iter(past_names))].type.tensor_type.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise ModelError(f"past inputs of {info.onnx_path} are not float32/float16", "use a float KV model")
    b = Builder("inferos_kv")
    pre: list[Any] = []  # nodes placed before the original ones
    before: dict[int, list[Any]] = {}  # original node index -> nodes inserted right before it
    h_mat = hadamard(d) if (spec.rotate_keys and can_rotate(d)) else None
    note = ""
    if spec.rotate_keys and h_mat is None:
        note = f"head_dim {d} is not a power of two: keys are not rotated"

    # --- GQA: masks anywhere + explicit positions (eviction, ragged batches) ------------------------------
    positions = info.has_position_ids
    if info.uses_gqa_op:
        positions = gqa_positions_and_mask(model, b, pre, info, elem)

    # --- rotation: try the q/k path first -------------------------------------------------------------
    rotation = "none"
    if h_mat is not None:
        rotation = "host"
        h_name = b.const(h_mat.astype(np.float16 if elem == TensorProto.FLOAT16 else np.float32), "hadamard")
        if info.uses_gqa_op:
            if rotate_gqa(model, b, pre, before, h_name, info, "position_ids" if positions else None):
                rotation = "qk"
        elif _rotate_attention(model, b, before, h_name, past_names, d) or _rotate_concat(
                model, b, before, h_name, past_names):
            rotation = "qk"
        if rotation == "host":
            note = "q/k after RoPE not found: keys are un-rotated per step (slower)"

    # --- segment inputs + dequant subgraph -------------------------------------------------------------
    # Segments come head-major ([B, H, n, ...], what the attention op reads) with codes as 2-D rows and
    # scales/zero points as 1-D, so a tier costs 3-7 nodes per layer and kind and no Transpose: ORT's
    # per-node overhead and a float Transpose of the whole past cost more than the host's contiguous
    # copy of the (1-byte) codes of a capacity buffer's prefix.
    scale_cast = elem != TensorProto.FLOAT16
    shift4 = b.const(np.array(4, dtype=np.uint8), "four")
    low4 = b.const(np.array(15, dtype=np.uint8), "fifteen")
    rows_shape = b.const(np.array([-1, group], dtype=np.int64), "rows")
    bitwise_and = opset(model) >= 18
    head_shape: str | None = None
    new_inputs = []
    for vi in graph.input:
        if vi.name not in past_names:
            new_inputs.append(vi)
            continue
        layer, kind = past_names[vi.name]
        dims = vi.type.tensor_type.shape.dim
        heads = dims[1].dim_value or info.num_kv_heads
        batch = dims[0].dim_param or "batch_size"
        seg = {s: segment_name(info, layer, kind, s) for s in SEGMENTS}
        if head_shape is None:  # [B, H, -1, D] for every layer, B from the attention mask
            bsz = b.node(pre, "Shape", ["attention_mask"], start=0, end=1)
            head_shape = b.node(pre, "Concat", [bsz, b.const(np.array([heads, -1, d], dtype=np.int64), "hd")], axis=0)
        parts = []
        for bits in spec.bits(kind):
            tier = f"q{bits}"
            rows = f"rows{bits}_{kind}"  # k8v4 stores keys and values in different tiers
            if bits == 8:
                new_inputs.append(helper.make_tensor_value_info(seg[tier], TensorProto.UINT8, [rows, group]))
                codes = seg[tier]
            else:  # split-half nibbles: low = element j, high = element j + D/2
                new_inputs.append(helper.make_tensor_value_info(seg[tier], TensorProto.UINT8, [f"heads4_{kind}", d // 2]))
                hi = b.node(pre, "BitShift", [seg[tier], shift4], direction="RIGHT")
                if bitwise_and:
                    lo = b.node(pre, "BitwiseAnd", [seg[tier], low4])
                else:
                    lo = b.node(pre, "BitShift", [b.node(pre, "BitShift", [seg[tier], shift4], direction="LEFT"),
                                                  shift4], direction="RIGHT")
                codes = b.node(pre, "Reshape", [b.node(pre, "Concat", [lo, hi], axis=-1), rows_shape])
            new_inputs += [
                helper.make_tensor_value_info(seg[tier + "s"], TensorProto.FLOAT16, [rows]),
                helper.make_tensor_value_info(seg[tier + "z"], TensorProto.UINT8, [rows]),
            ]
            scale = b.node(pre, "Cast", [seg[tier + "s"]], to=elem) if scale_cast else seg[tier + "s"]
            deq = b.node(pre, "DequantizeLinear", [codes, scale, seg[tier + "z"]], axis=0)
            deq = b.node(pre, "Reshape", [deq, head_shape])
            if kind == "key" and rotation == "host":
                deq = b.node(pre, "MatMul", [deq, b.const(h_mat.T.astype(np.float32 if scale_cast else np.float16))])
            parts.append(deq)
        new_inputs.append(helper.make_tensor_value_info(seg["fp"], elem, [batch, heads, "n_fp", d]))
        parts.append(seg["fp"])
        if len(parts) > 1:
            b.node(pre, "Concat", parts, outputs=[vi.name], axis=2)
        else:
            b.node(pre, "Identity", parts, outputs=[vi.name])

    # --- present outputs -> this step's new columns ---------------------------------------------------
    present = {info.present_key_fmt % i: (i, "key") for i in range(info.num_layers)}
    present.update({info.present_value_fmt % i: (i, "value") for i in range(info.num_layers)})
    new_outputs = []
    after: dict[int, list[Any]] = {}  # original node index -> nodes inserted right after it
    _new_columns(model, b, pre, before, after, present, past_names, d)
    for vo in graph.output:
        if vo.name not in present:
            new_outputs.append(vo)
            continue
        layer, kind = present[vo.name]
        out = new_output_name(layer, kind)
        dims = vo.type.tensor_type.shape.dim
        new_outputs.append(helper.make_tensor_value_info(
            out, elem, [dims[0].dim_param or "batch_size", dims[1].dim_value or info.num_kv_heads, "sequence_length", d]))

    nodes = list(pre)
    for idx, node in enumerate(graph.node):
        nodes.extend(before.get(idx, []))
        nodes.append(node)
        nodes.extend(after.get(idx, []))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend(new_inputs)
    del graph.output[:]
    graph.output.extend(new_outputs)
    graph.initializer.extend(b.initializers)
    if model.ir_version > 10:
        model.ir_version = 10
    if not any(i.domain == "com.microsoft" for i in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    meta = {"inferos.kv.rewrite": REWRITE_VERSION, "inferos.kv.rotation": rotation, "inferos.kv.spec": spec.digest(),
            "inferos.kv.positions": "1" if positions else "0",
            "inferos.kv.key_positions": "1" if any(i.name == KEY_POSITIONS for i in graph.input) else "0"}
    for key, value in meta.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    return model, rotation, note


def _producers(graph: Any) -> dict[str, int]:
    return {out: i for i, node in enumerate(graph.node) for out in node.output}


def _consumers(graph: Any) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            found.setdefault(name, []).append(i)
    return found


def _new_columns(model: Any, b: Builder, pre: list[Any], before: dict[int, list[Any]], after: dict[int, list[Any]],
                 present: dict[str, tuple[int, str]], past_names: dict[str, tuple[int, str]], d: int) -> None:
    """Nodes (in ``before``/``after``) writing each layer's new columns ``[B, H, T, D]`` to ``kvnew.*``, laid out so a
    long step holds about one layer's full present (past + new, in float) at a time, not every layer's:
    onnxruntime keeps a node's unconsumed outputs until the run ends and runs output-only branches last.

    - ``GroupQueryAttention`` and the ``Attention`` op (which must write its presents when given a past):
      each present is sliced (its last ``T`` columns) right after the node, and the next attention node
      reads a length computed from those slices' shapes (the same value, ``past + T``): GQA's
      ``total_sequence_length``, or the ``Attention`` op's mask sliced to that many columns (a copy of
      the whole mask). So the slices run, and free the presents, before the next layer.
    - ``Concat(past, new)``: its second input. Anything else: a ``Slice`` of the present."""
    from itertools import pairwise

    from onnx import TensorProto

    graph = model.graph
    axis2 = b.const(np.array([2], dtype=np.int64), "axis2")
    last = b.const(np.array([-1], dtype=np.int64), "axis_last")
    zero = b.const(np.array([0], dtype=np.int64), "zero1")
    end = b.const(np.array([INT64_MAX], dtype=np.int64), "end")
    new_len = b.node(pre, "Shape", ["input_ids"], start=1, end=2)
    start = b.node(pre, "Sub", [b.node(pre, "Shape", ["attention_mask"], start=1, end=2), new_len])
    out_of = {name: new_output_name(*where) for name, where in present.items()}
    done: set[str] = set()
    attention: list[tuple[int, list[str]]] = []  # (node index, its two kvnew outputs)
    for idx, node in enumerate(graph.node):
        slots = [name for name in node.output if name in present]
        if not slots:
            continue
        nodes = after.setdefault(idx, [])
        if (node.op_type == "Concat" and len(node.input) == 2 and node.input[0] in past_names
                and attr(node, "axis") in (2, -2) and len(slots) == 1):
            b.node(nodes, "Identity", [node.input[1]], outputs=[out_of[slots[0]]])
        else:
            for name in slots:
                b.node(nodes, "Slice", [name, start, end, axis2], outputs=[out_of[name]])
            if node.op_type in ("GroupQueryAttention", "Attention") and len(slots) == 2:
                attention.append((idx, [out_of[name] for name in slots]))
        done.update(slots)
    for name in present:  # a present that is a graph input passed through, or the like
        if name not in done:
            b.node(after.setdefault(len(graph.node) - 1, []), "Slice", [name, start, end, axis2], outputs=[out_of[name]])
    base = b.node(pre, "Sub", [start, new_len])  # past + T = (past - T) + T_key + T_value
    for (_, outs), (idx, _) in pairwise(attention):
        node = graph.node[idx]
        gqa = node.op_type == "GroupQueryAttention"
        slot = 6 if gqa else 3
        if len(node.input) <= slot or not node.input[slot]:
            continue
        ins = before.setdefault(idx, [])
        total = base
        for o in outs:  # (Sum takes no int64)
            total = b.node(ins, "Add", [total, b.node(ins, "Shape", [o], start=2, end=3)])
        if gqa:
            node.input[slot] = b.node(ins, "Cast", [total], to=TensorProto.INT32)
        else:
            node.input[slot] = b.node(ins, "Slice", [node.input[slot], zero, total, last])


_PASS_THROUGH = {"Identity", "Expand", "Tile", "Unsqueeze", "Reshape", "Cast"}


def _rotate_concat(model: Any, b: Builder, before: dict[int, list[Any]], h_name: str,
                   past_names: dict[str, tuple[int, str]]) -> bool:
    """Converter-style graphs: ``present = Concat(past, k_new)`` feeding ``(Fused)MatMul(q, present^T)``.

    Rotates ``k_new`` and ``q`` by ``H`` (inserting ``MatMul``s) for every layer, or changes nothing and
    returns False when a layer does not match the pattern."""
    graph = model.graph
    consumers = _consumers(graph)
    plan: list[tuple[int, int, int, int]] = []  # (concat idx, k input slot, score idx, q input slot)
    for name, (_, kind) in past_names.items():
        if kind != "key":
            continue
        users = consumers.get(name, [])
        if len(users) != 1 or graph.node[users[0]].op_type != "Concat" or len(graph.node[users[0]].input) != 2:
            return False
        ci = users[0]
        concat = graph.node[ci]
        if attr(concat, "axis") not in (2, -2) or concat.input[0] != name:
            return False
        # follow the concat output to the score MatMul (k^T side)
        frontier, score = [concat.output[0]], None
        seen = 0
        while frontier and score is None and seen < 16:
            seen += 1
            tensor = frontier.pop()
            for ui in consumers.get(tensor, []):
                node = graph.node[ui]
                if node.op_type in ("MatMul", "FusedMatMul") and node.domain in ("", "com.microsoft"):
                    if node.input[1] == tensor and attr(node, "transB", 0) == 1 and attr(node, "transA", 0) == 0:
                        score = (ui, 0)
                    elif node.op_type == "MatMul":
                        continue  # probs @ V-like use; not the score
                elif node.op_type == "Transpose" and list(attr(node, "perm", [])) [-2:] == [
                        len(attr(node, "perm", [])) - 1, len(attr(node, "perm", [])) - 2]:
                    for uj in consumers.get(node.output[0], []):
                        nj = graph.node[uj]
                        if (nj.op_type in ("MatMul", "FusedMatMul") and nj.input[1] == node.output[0]
                                and attr(nj, "transB", 0) == 0 and attr(nj, "transA", 0) == 0):
                            score = (uj, 0)
                elif node.op_type in _PASS_THROUGH:
                    frontier.append(node.output[0])
        if score is None:
            return False
        plan.append((ci, 1, score[0], score[1]))
    for ci, kslot, si, qslot in plan:
        concat, scorer = graph.node[ci], graph.node[si]
        rk = b.node(before.setdefault(ci, []), "MatMul", [concat.input[kslot], h_name])
        concat.input[kslot] = rk
        rq = b.node(before.setdefault(si, []), "MatMul", [scorer.input[qslot], h_name])
        scorer.input[qslot] = rq
    return True


def _rotate_attention(model: Any, b: Builder, before: dict[int, list[Any]], h_name: str,
                      past_names: dict[str, tuple[int, str]], d: int) -> bool:
    """ONNX ``Attention`` (opset 23) graphs: ``Attention(Q, K, V, mask, past_key, past_value)`` with Q and K
    after RoPE. Rotates Q and K by ``H`` (3-D inputs ``[B, S, heads*D]`` are viewed as ``[B, S, heads, D]``)."""
    graph = model.graph
    keys = {n for n, (_, kind) in past_names.items() if kind == "key"}
    nodes = [(i, n) for i, n in enumerate(graph.node)
             if n.op_type == "Attention" and n.domain in ("", "ai.onnx") and len(n.input) > 4 and n.input[4] in keys]
    if len(nodes) != len(keys):
        return False
    heads_shape = b.const(np.array([0, 0, -1, d], dtype=np.int64), "heads")
    merge_shape = b.const(np.array([0, 0, -1], dtype=np.int64), "merge")
    for idx, node in nodes:
        ins = before.setdefault(idx, [])
        three_d = attr(node, "q_num_heads") is not None
        for slot in (0, 1):
            x = node.input[slot]
            if three_d:
                r = b.node(ins, "MatMul", [b.node(ins, "Reshape", [x, heads_shape]), h_name])
                r = b.node(ins, "Reshape", [r, merge_shape])
            else:
                r = b.node(ins, "MatMul", [x, h_name])
            node.input[slot] = r
    return True



def rewritten_graph(info: "ModelInfo", spec: RewriteSpec) -> RewriteInfo:
    """The rewritten graph for ``info`` + ``spec``: from the cache, or built now and cached atomically."""
    import onnx

    src = Path(info.onnx_path)
    path = derived_path(src, "kv", REWRITE_VERSION, spec.digest())
    if path.is_file():
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return RewriteInfo(path, meta.get("inferos.kv.rotation", "none"), "",
                           meta.get("inferos.kv.positions", "1") == "1", meta.get("inferos.kv.key_positions") == "1")
    model, rotation, note = rewrite_model(info, spec)
    meta = {p.key: p.value for p in model.metadata_props}
    extra = copied_note(save_derived(model, src, path), path.parent)
    if extra:
        note = f"{note}; {extra}" if note else extra
    return RewriteInfo(path, rotation, note, meta.get("inferos.kv.positions") == "1",
                       meta.get("inferos.kv.key_positions") == "1")
