"""The KV-boundary rewrite: a decoder ONNX whose past inputs are quantized segments.

For each layer ``i`` and ``kind`` in (key, value), the graph input ``past_key_values.{i}.{kind}`` is
replaced by seven segment inputs, all **token-major** (``[tokens, batch, kv_heads, ...]``, so the host can
feed a contiguous prefix of a preallocated buffer without a copy):

====================  ========  ===============================  =====================================
input                 dtype     shape                            holds
====================  ========  ===============================  =====================================
``<past>.q8``         uint8     ``[n8, B, H, D]``                int8-tier codes
``<past>.q8s/.q8z``   fp16/u8   ``[n8, B, H, D/group]``          their scales / zero points
``<past>.q4``         uint8     ``[n4, B, H, D/2]``              int4-tier codes (split-half nibbles)
``<past>.q4s/.q4z``   fp16/u8   ``[n4, B, H, D/group]``          their scales / zero points
``<past>.fp``         model fp  ``[nf, B, H, D]``                sinks + recent window, full precision
====================  ========  ===============================  =====================================

A small subgraph transposes the (1-byte) codes to ``[B, H, n, D]``, unpacks nibbles with ``BitShift``,
dequantizes with one per-row ``DequantizeLinear`` (rows = groups; ORT's blocked ``DequantizeLinear`` is
7x slower on CPU, measured) and concatenates ``[int8 | int4 | fp]`` into a tensor with the original past
name, so every consumer (the converter's ``Concat`` or onnxruntime-genai's ``GroupQueryAttention``) is
untouched. ORT frees each layer's dequantized past after the layer, so at most one layer of
dequantized past is alive at a time (plus the next layer's when the executor runs ahead).

Each ``present.{i}.{kind}`` output is replaced by ``kvnew.{i}.{kind}``: a ``Slice`` holding only this
step's new columns (``[B, H, T, D]``), so the host appends O(new tokens) per step.

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

The rewritten graph is cached beside the model as ``<stem>.inferos-kv-<hash>.onnx`` (its external data
references stay valid: onnxruntime refuses external data outside the model's folder). When that folder
is read-only it goes to ``<cache>/kv/<hash>/`` with a hard link to (or, across file systems, a copy of)
the weights file. Written atomically.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inferos_cli import paths
from inferos_cli.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.runtime.modelinfo import ModelInfo

REWRITE_VERSION = "3"
NEW_FMT = "kvnew.%d.%s"
SEGMENTS = ("q8", "q8s", "q8z", "q4", "q4s", "q4z", "fp")
_INT64_MAX = 2**63 - 1
_PERM_TOKEN_TO_HEAD = [1, 2, 0, 3]


@dataclass(frozen=True)
class RewriteSpec:
    """What the rewritten graph needs to know: the group size and whether keys are rotated."""

    group_size: int = 32
    rotate_keys: bool = True

    def digest(self) -> str:
        """Stable text for the cache hash."""
        return f"g{self.group_size}-r{int(self.rotate_keys)}"


@dataclass
class RewriteInfo:
    """A rewritten graph on disk and how it rotates keys."""

    path: Path
    rotation: str  # "qk" | "host" | "none"
    note: str = ""


def segment_name(info: "ModelInfo", layer: int, kind: str, segment: str) -> str:
    """Input name of one segment, e.g. ``past_key_values.3.key.q8s``."""
    fmt = info.past_key_fmt if kind == "key" else info.past_value_fmt
    return f"{fmt % layer}.{segment}"


def new_output_name(layer: int, kind: str) -> str:
    """Output name holding this step's new columns of one layer, e.g. ``kvnew.3.key``."""
    return NEW_FMT % (layer, kind)


class _Builder:
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


def _opset(model: Any, domain: str = "") -> int:
    for imp in model.opset_import:
        if imp.domain == domain or (domain == "" and imp.domain == "ai.onnx"):
            return int(imp.version)
    return 0


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_attr(node: Any, name: str, value: Any) -> None:
    from onnx import helper

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def rewrite_model(info: "ModelInfo", spec: RewriteSpec) -> tuple[Any, str, str]:
    """Build the rewritten ``onnx.ModelProto`` (external data references untouched).

    Returns ``(model, rotation, note)``; see the module docstring for ``rotation``.
    """
    import onnx
    from onnx import TensorProto, helper

    from inferos_cli.kv.quant import can_rotate, hadamard

    try:
        model = onnx.load(str(info.onnx_path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise ModelError(f"{info.onnx_path} is not a readable ONNX model: {exc}") from None
    graph = model.graph
    d, group = info.head_dim, spec.group_size
    if d % group:
        raise ModelError(f"head_dim {d} is not a multiple of kv.group_size {group}", "set kv.group_size to 32")
    if _opset(model) < 14:
        raise ModelError(f"{info.onnx_path} uses ONNX opset {_opset(model)} < 14", "re-export with opset >= 14")
    past_names = {info.past_key_fmt % i: (i, "key") for i in range(info.num_layers)}
    past_names.update({info.past_value_fmt % i: (i, "value") for i in range(info.num_layers)})
    inputs_by_name = {vi.name: vi for vi in graph.input}
    missing = [n for n in past_names if n not in inputs_by_name]
    if missing:
        raise ModelError(f"{info.onnx_path} has no input {missing[0]!r}", "the KV rewrite needs standard past inputs")
    elem = inputs_by_name[next(iter(past_names))].type.tensor_type.elem_type
    if elem not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise ModelError(f"past inputs of {info.onnx_path} are not float32/float16", "use a float KV model")
    b = _Builder("inferos_kv")
    pre: list[Any] = []  # nodes placed before the original ones
    before: dict[int, list[Any]] = {}  # original node index -> nodes inserted right before it
    h_mat = hadamard(d) if (spec.rotate_keys and can_rotate(d)) else None
    note = ""
    if spec.rotate_keys and h_mat is None:
        note = f"head_dim {d} is not a power of two: keys are not rotated"

    # --- rotation: try the q/k path first -------------------------------------------------------------
    rotation = "none"
    if h_mat is not None:
        rotation = "host"
        h_name = b.const(h_mat.astype(np.float16 if elem == TensorProto.FLOAT16 else np.float32), "hadamard")
        if info.uses_gqa_op:
            if _rotate_gqa(model, b, pre, before, h_name, info):
                rotation = "qk"
        elif _rotate_attention(model, b, before, h_name, past_names, d) or _rotate_concat(
                model, b, before, h_name, past_names):
            rotation = "qk"
        if rotation == "host":
            note = "q/k after RoPE not found: keys are un-rotated per step (slower)"

    # --- segment inputs + dequant subgraph -------------------------------------------------------------
    scale_cast = elem != TensorProto.FLOAT16
    shift4 = b.const(np.array(4, dtype=np.uint8), "four")
    rows_shape = b.const(np.array([-1, group], dtype=np.int64), "rows")
    flat = b.const(np.array([-1], dtype=np.int64), "flat")
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
        groups = d // group
        n8, n4 = f"n_int8_{kind}", f"n_int4_{kind}"  # k8v4 stores keys and values in different tiers
        new_inputs += [
            helper.make_tensor_value_info(seg["q8"], TensorProto.UINT8, [n8, batch, heads, d]),
            helper.make_tensor_value_info(seg["q8s"], TensorProto.FLOAT16, [n8, batch, heads, groups]),
            helper.make_tensor_value_info(seg["q8z"], TensorProto.UINT8, [n8, batch, heads, groups]),
            helper.make_tensor_value_info(seg["q4"], TensorProto.UINT8, [n4, batch, heads, d // 2]),
            helper.make_tensor_value_info(seg["q4s"], TensorProto.FLOAT16, [n4, batch, heads, groups]),
            helper.make_tensor_value_info(seg["q4z"], TensorProto.UINT8, [n4, batch, heads, groups]),
            helper.make_tensor_value_info(seg["fp"], elem, ["n_fp", batch, heads, d]),
        ]
        parts = []
        for tier in ("q8", "q4"):
            codes = b.node(pre, "Transpose", [seg[tier]], perm=_PERM_TOKEN_TO_HEAD)
            if tier == "q4":  # split-half nibbles: low = element j, high = element j + D/2
                hi = b.node(pre, "BitShift", [codes, shift4], direction="RIGHT")
                lo = b.node(pre, "BitShift", [b.node(pre, "BitShift", [codes, shift4], direction="LEFT"), shift4],
                            direction="RIGHT")
                codes = b.node(pre, "Concat", [lo, hi], axis=-1)
            scale = b.node(pre, "Transpose", [seg[tier + "s"]], perm=_PERM_TOKEN_TO_HEAD)
            if scale_cast:
                scale = b.node(pre, "Cast", [scale], to=elem)
            zero = b.node(pre, "Transpose", [seg[tier + "z"]], perm=_PERM_TOKEN_TO_HEAD)
            deq = b.node(pre, "DequantizeLinear", [
                b.node(pre, "Reshape", [codes, rows_shape]),
                b.node(pre, "Reshape", [scale, flat]),
                b.node(pre, "Reshape", [zero, flat]),
            ], axis=0)
            deq = b.node(pre, "Reshape", [deq, b.node(pre, "Shape", [codes])], allowzero=1)  # 0 tokens stay 0
            if kind == "key" and rotation == "host":
                deq = b.node(pre, "MatMul", [deq, b.const(h_mat.T.astype(np.float32 if scale_cast else np.float16))])
            parts.append(deq)
        parts.append(b.node(pre, "Transpose", [seg["fp"]], perm=_PERM_TOKEN_TO_HEAD))
        b.node(pre, "Concat", parts, outputs=[vi.name], axis=2)

    # --- present outputs -> this step's new columns ---------------------------------------------------
    present = {info.present_key_fmt % i: (i, "key") for i in range(info.num_layers)}
    present.update({info.present_value_fmt % i: (i, "value") for i in range(info.num_layers)})
    new_outputs = []
    post: list[Any] = []
    axis2 = b.const(np.array([2], dtype=np.int64), "axis2")
    end = b.const(np.array([_INT64_MAX], dtype=np.int64), "end")
    for vo in graph.output:
        if vo.name not in present:
            new_outputs.append(vo)
            continue
        layer, kind = present[vo.name]
        past = (info.past_key_fmt if kind == "key" else info.past_value_fmt) % layer
        start = b.node(post, "Shape", [past], start=2, end=3)
        out = new_output_name(layer, kind)
        b.node(post, "Slice", [vo.name, start, end, axis2], outputs=[out])
        dims = vo.type.tensor_type.shape.dim
        new_outputs.append(helper.make_tensor_value_info(
            out, elem, [dims[0].dim_param or "batch_size", dims[1].dim_value or info.num_kv_heads, "sequence_length", d]))

    nodes = list(pre)
    for idx, node in enumerate(graph.node):
        nodes.extend(before.get(idx, []))
        nodes.append(node)
    nodes.extend(post)
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
    meta = {"inferos.kv.rewrite": REWRITE_VERSION, "inferos.kv.rotation": rotation, "inferos.kv.spec": spec.digest()}
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


_PASS_THROUGH = {"Identity", "Expand", "Tile", "Unsqueeze", "Reshape", "Cast"}


def _rotate_concat(model: Any, b: _Builder, before: dict[int, list[Any]], h_name: str,
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
        if _attr(concat, "axis") not in (2, -2) or concat.input[0] != name:
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
                    if node.input[1] == tensor and _attr(node, "transB", 0) == 1 and _attr(node, "transA", 0) == 0:
                        score = (ui, 0)
                    elif node.op_type == "MatMul":
                        continue  # probs @ V-like use; not the score
                elif node.op_type == "Transpose" and list(_attr(node, "perm", [])) [-2:] == [
                        len(_attr(node, "perm", [])) - 1, len(_attr(node, "perm", [])) - 2]:
                    for uj in consumers.get(node.output[0], []):
                        nj = graph.node[uj]
                        if (nj.op_type in ("MatMul", "FusedMatMul") and nj.input[1] == node.output[0]
                                and _attr(nj, "transB", 0) == 0 and _attr(nj, "transA", 0) == 0):
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


def _rotate_attention(model: Any, b: _Builder, before: dict[int, list[Any]], h_name: str,
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
        three_d = _attr(node, "q_num_heads") is not None
        for slot in (0, 1):
            x = node.input[slot]
            if three_d:
                r = b.node(ins, "MatMul", [b.node(ins, "Reshape", [x, heads_shape]), h_name])
                r = b.node(ins, "Reshape", [r, merge_shape])
            else:
                r = b.node(ins, "MatMul", [x, h_name])
            node.input[slot] = r
    return True


def _rotate_gqa(model: Any, b: _Builder, pre: list[Any], before: dict[int, list[Any]], h_name: str,
                info: "ModelInfo") -> bool:
    """``GroupQueryAttention`` graphs: apply RoPE outside the op, rotate q and k by ``H``, run GQA with
    ``do_rotary=0``. Positions are GQA's own: ``CumSum(attention_mask) - 1`` at the new tokens."""
    graph = model.graph
    gqa = [(i, n) for i, n in enumerate(graph.node) if n.op_type == "GroupQueryAttention"]
    if not gqa or "attention_mask" not in info.input_names or "input_ids" not in info.input_names:
        return False
    for _, node in gqa:
        if _attr(node, "do_rotary", 0) != 1 or len(node.input) < 9 or not node.input[7] or not node.input[8]:
            return False
        if len(node.input) > 9 and node.input[9]:
            return False  # explicit position_ids: leave it alone
    d = info.head_dim
    # positions of the new tokens: CumSum(mask)-1, last T columns, clamped at 0
    mask_i64 = "attention_mask"
    cum = b.node(pre, "CumSum", [mask_i64, b.const(np.array(1, dtype=np.int64), "axis1")])
    pos_all = b.node(pre, "Sub", [cum, b.const(np.array(1, dtype=np.int64), "one")])
    t = b.node(pre, "Shape", ["input_ids"], start=1, end=2)
    neg_t = b.node(pre, "Neg", [t])
    pos = b.node(pre, "Slice", [pos_all, neg_t, b.const(np.array([_INT64_MAX], dtype=np.int64), "end"),
                                b.const(np.array([1], dtype=np.int64), "axis1v")])
    pos = b.node(pre, "Max", [pos, b.const(np.array(0, dtype=np.int64), "zero")])
    heads_shape = b.const(np.array([0, 0, -1, d], dtype=np.int64), "heads")
    merge_shape = b.const(np.array([0, 0, -1], dtype=np.int64), "merge")
    for idx, node in gqa:
        ins = before.setdefault(idx, [])
        nh, kvh = int(_attr(node, "num_heads")), int(_attr(node, "kv_num_heads"))
        inter = int(_attr(node, "rotary_interleaved", 0))
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
        while new_inputs and not new_inputs[-1]:
            new_inputs.pop()
        del node.input[:]
        node.input.extend(new_inputs)
        _set_attr(node, "do_rotary", 0)
    return True


def cache_key(info: "ModelInfo", spec: RewriteSpec) -> str:
    """Hash of the source graph (path, size, mtime) and the spec."""
    src = Path(info.onnx_path).resolve()
    st = src.stat()
    text = f"{REWRITE_VERSION}|{src}|{st.st_size}|{st.st_mtime_ns}|{spec.digest()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _external_files(model: Any) -> set[str]:
    found = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                found.add(entry.value)
    return found


def _writable(folder: Path) -> bool:
    """True when we may add a file to ``folder``: it grants write access *and* has a write bit set
    (root passes ``os.access`` on read-only shared folders; those must stay untouched)."""
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return os.access(folder, os.W_OK) and bool(mode & 0o222)


def rewritten_graph(info: "ModelInfo", spec: RewriteSpec) -> RewriteInfo:
    """The rewritten graph for ``info`` + ``spec``: from the cache, or built now and cached atomically."""
    import onnx

    key = cache_key(info, spec)
    src = Path(info.onnx_path)
    beside = src.parent / f"{src.stem}.inferos-kv-{key}.onnx"
    elsewhere = paths.cache_dir() / "kv" / key / src.name
    for candidate in (beside, elsewhere):
        if candidate.is_file():
            meta = {p.key: p.value for p in onnx.load(str(candidate), load_external_data=False).metadata_props}
            return RewriteInfo(candidate, meta.get("inferos.kv.rotation", "none"), "")
    model, rotation, note = rewrite_model(info, spec)
    data = model.SerializeToString()
    if _writable(src.parent):
        paths.atomic_write_bytes(beside, data)
        return RewriteInfo(beside, rotation, note)
    target = elsewhere.parent
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for rel in sorted(_external_files(model)):
        want, have = src.parent / rel, target / rel
        if have.exists():
            continue
        have.parent.mkdir(parents=True, exist_ok=True)
        tmp = have.with_name(f".{have.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(want, tmp)
        except OSError:
            shutil.copyfile(want, tmp)
            copied.append(rel)
        os.replace(tmp, have)
    paths.atomic_write_bytes(elsewhere, data)
    if copied:
        extra = f"model folder is read-only: weights copied to {target}"
        note = f"{note}; {extra}" if note else extra
    return RewriteInfo(elsewhere, rotation, note)
