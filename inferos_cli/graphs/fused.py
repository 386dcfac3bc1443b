"""The fused int8 KV graph: onnxruntime's ``GroupQueryAttention`` reads and writes 8-bit keys and values.

Every cached token is stored as int8 with one static scale per (layer, kv head, channel), and attention
runs on the codes inside the operator (``k_quant_type = v_quant_type = PER_CHANNEL``,
``kv_cache_bit_width = 8``; onnxruntime >= 1.25 CPU). The host-side cache is
:class:`inferos_cli.kv.fused.FusedCache`.

The scales are static, so they are calibrated once per model (:func:`calibrate`): the original graph
prefills :data:`CALIBRATION_TEXT`, the per-channel absolute maximum of every layer's ``present`` values
and the RoPE channel-pair norm of its keys is taken, times a margin (headroom for tokens larger than the
calibration's; the operator saturates beyond it), and baked into the graph as initializers. One step per
channel is coarser than the segmented cache's per-token groups, so quality is a little lower. 4-bit
codes with static scales lose too much quality and are not offered (``benchmarks/README.md``).

onnxruntime's quantized-cache kernel prefills long prompts slower than the float kernel, so prefill (more
than one new token) takes a float path inside the same graph (:func:`fused_model`): every layer's
attention is an ``If`` whose then-branch dequantizes the cached codes, runs the float op and quantizes
the presents with the same static scales, and whose else-branch (decode steps) is the quantized op. No
weights are duplicated (the branches hold only the attention op).

Only graphs that use ``com.microsoft.GroupQueryAttention`` in float32 (onnxruntime-genai / Lemonade
folders, and inferos' own conversions of models with head_dim % 16 == 0) can take it (:func:`supported`).
The derived graph is cached as ``<stem>.inferos-kvf-<hash>.onnx`` where
:func:`inferos_cli.graphs.naming.derived_path` says.
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

FUSED_VERSION = "5"  # 2: first prefill in float (If per layer); 3: every prefill in float; 4: RoPE pair key scales;
# 5: each layer's own total length (bounded sliding-window caches)
KEY_MARGIN = 1.25  # over the RoPE pair bound of the calibration keys (calibrate)
VALUE_MARGIN = 2.5  # over the calibration values' per-channel absolute maximum
BITS = 8
SCALE_FMT = "inferos.kvscale.%d.%s"
CALIBRATION_TEXT = (
    "The history of the city begins with a small harbour on the river, where traders from the north met "
    "farmers who brought grain, wool and salt. Over three centuries the market grew into a town with a "
    "stone bridge, a cathedral and a university, and in 1871 the railway reached it. Today it is known for "
    "its museums, its football club and an annual music festival that draws about 200,000 visitors.\n\n"
    "To install the package, run the installer and follow the prompts; on Windows you may need to restart "
    "after the drivers are updated. If the device is not found, check that the cable is connected, then "
    "open the settings page and select \"Scan for hardware\". Error 0x80070005 means access was denied.\n\n"
    "Once upon a time a little fox lived at the edge of a forest. Every morning she ran to the stream to "
    "drink, and one day she met a turtle who asked, \"Why are you always in such a hurry?\" The fox laughed "
    "and said she did not know. They sat together and watched the water until the sun went down.\n\n"
    "def mean(values):\n    total = sum(values)\n    return total / len(values) if values else 0.0\n\n"
    "Q: What is the boiling point of water at sea level? A: 100 degrees Celsius, or 212 degrees Fahrenheit. "
    "The experiment was repeated five times; the mean error was 0.37 percent (standard deviation 0.05)."
)


def supported(info: "ModelInfo") -> bool:
    """True when the graph's attention is ``GroupQueryAttention`` in a float32 cache (what the CPU kernel
    quantizes) and this onnxruntime's CPU provider runs a quantized-cache GQA (:func:`int8_gqa_kernel`)."""
    if not info.uses_gqa_op or info.kv_dtype != "float32":
        return False
    return int8_gqa_kernel()


@lru_cache(maxsize=1)
def int8_gqa_kernel() -> bool:
    """Run a one-node ``GroupQueryAttention`` with an int8 per-channel cache on the CPU provider (one
    decode step over 4 cached tokens): True when it loads, runs and returns int8 presents.

    A probe rather than a look at the kernel registry: ``get_all_opkernel_def()`` can crash the process
    on some GPU builds of onnxruntime."""
    from onnx import TensorProto

    scale = np.full((1, 1, 1, 16), 0.05, np.float32)
    ran = gqa_decode_step(TensorProto.INT8, TensorProto.FLOAT, [""] * 5 + ["ks", "vs"], {"ks": scale, "vs": scale},
                          k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=BITS)
    return ran is not None and ran[1].dtype == np.int8 and bool(np.isfinite(ran[0]).all())


def calibrate(info: "ModelInfo", text: str = CALIBRATION_TEXT, key_margin: float = KEY_MARGIN,
              value_margin: float = VALUE_MARGIN) -> dict[str, np.ndarray]:
    """Static per-channel scales ``[1, kv_heads, 1, head_dim]`` (float32) by past input name: the original
    graph prefills ``text`` once.

    - values: the per-channel absolute maximum x ``value_margin`` / 127;
    - keys: RoPE turns each channel pair ``(i, i + d/2)`` (``(2i, 2i+1)`` when interleaved) by a
      position-dependent angle, so a channel's range at positions the calibration never reached is bounded
      by the pair's norm, not by the channel's own maximum: both channels get the largest pair norm seen x
      ``key_margin`` / 127.

    The margins and the pair bound were chosen on measured key/value errors and KL (figures in
    ``benchmarks/README.md``); what limits the quality is the static per-channel step itself."""
    import onnxruntime as ort

    from inferos_cli.models.tokenizer import Tokenizer

    ids = Tokenizer.from_model(info).encode(text)[: info.context_length]
    opts = ort.SessionOptions()  # onnxruntime's default threads: the prefill splits rows, not sums, so the
    opts.log_severity_level = 3  # scales come out the same on 1 or all cores, and a 7B model calibrates faster
    sess = ort.InferenceSession(str(info.onnx_path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    empty = np.zeros((1, info.num_kv_heads, 0, info.head_dim), dtype=np.float32)
    feeds: dict[str, Any] = {"input_ids": np.asarray([ids], dtype=np.int64),
                             "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
    for i in range(info.num_layers):
        feeds[info.past_key_fmt % i] = empty
        feeds[info.past_value_fmt % i] = empty
    if "position_ids" in info.input_names:
        feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None, :]
    outs = dict(zip(names, sess.run(None, feeds)))
    interleaved = rotary_interleaved(info)
    scales: dict[str, np.ndarray] = {}
    for i in range(info.num_layers):
        keys, values = outs[info.present_key_fmt % i], outs[info.present_value_fmt % i]
        bound = rope_pair_bound(keys, interleaved) * key_margin
        scales[info.past_key_fmt % i] = (np.maximum(bound, 1e-6) / 127.0).astype(np.float32)
        amax = np.abs(values).max(axis=2, keepdims=True) * value_margin  # [1, H, 1, D]
        scales[info.past_value_fmt % i] = (np.maximum(amax, 1e-6) / 127.0).astype(np.float32)
    return scales


def rope_pair_bound(keys: np.ndarray, interleaved: bool = False) -> np.ndarray:
    """``[1, H, 1, D]``: for every channel, the largest norm its RoPE pair reaches over ``keys``'
    ``[1, H, T, D]`` tokens (a rotation keeps a pair's norm and moves it between the two channels)."""
    d = keys.shape[-1]
    if interleaved:
        a, b = keys[..., 0::2], keys[..., 1::2]
    else:
        a, b = keys[..., : d // 2], keys[..., d // 2:]
    norm = np.sqrt(a.astype(np.float64) ** 2 + b.astype(np.float64) ** 2).max(axis=2, keepdims=True)
    if interleaved:
        return np.repeat(norm, 2, axis=-1)
    return np.concatenate([norm, norm], axis=-1)


def rotary_interleaved(info: "ModelInfo") -> bool:
    """The graph's RoPE pairing: ``rotary_interleaved`` of its GroupQueryAttention (or ``interleaved`` of
    its RotaryEmbedding) nodes; False when neither says."""
    import onnx
    from onnx import helper

    model = onnx.load(str(info.onnx_path), load_external_data=False)
    for node in model.graph.node:
        for attr in node.attribute:
            if (node.op_type, attr.name) in (("GroupQueryAttention", "rotary_interleaved"),
                                             ("RotaryEmbedding", "interleaved")):
                return bool(helper.get_attribute_value(attr))
    return False


def fused_model(info: "ModelInfo", scales: dict[str, np.ndarray]) -> Any:
    """The original graph with int8 past/present and every ``GroupQueryAttention`` reading them through
    the per-channel ``scales`` (initializers)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(info.onnx_path), load_external_data=False)
    graph = model.graph
    retype_kv(graph, info, TensorProto.INT8)
    done = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        ins = list(node.input) + [""] * (14 - len(node.input))
        past_k, past_v = ins[3], ins[4]
        if past_k not in scales or past_v not in scales:
            continue
        for slot, past in ((12, past_k), (13, past_v)):
            name = SCALE_FMT % (done, "key" if slot == 12 else "value")
            graph.initializer.append(numpy_helper.from_array(scales[past], name))
            ins[slot] = name
        del node.input[:]
        node.input.extend(ins)
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", BITS)])
        done += 1
    if done != info.num_layers:
        from inferos_cli.errors import ModelError

        raise ModelError(f"{info.onnx_path}: found {done} GroupQueryAttention layers reading the past, "
                         f"expected {info.num_layers}; use kv.quant int8 (the segmented cache) for this model")
    _float_prefill(model)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                        "inferos.kv.fused": f"int{BITS} per-channel, keys x{KEY_MARGIN} of the RoPE pair bound, "
                                                            f"values x{VALUE_MARGIN} of the absolute maximum"})
    return model


def _float_prefill(model: Any) -> None:
    """Route prefill (more than one new token) around the quantized kernel: each quantized
    ``GroupQueryAttention`` becomes an ``If`` on "more than one new token". Then-branch: the cached codes
    (the first ``total - new`` columns) dequantized with the static scales, the float op on them, its
    presents quantized again (``round(x / scale)`` clipped to int8: the old codes come back unchanged) and
    zero-padded to the past buffer's width (the shared buffer's capacity); else-branch: the quantized op
    unchanged (decode steps). Each layer reads its own ``total_sequence_length`` input (a sliding-window
    layer's bounded cache has its own, :mod:`inferos_cli.kv.plain`)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    pre = [
        helper.make_node("Shape", ["input_ids"], ["inferos_fp/new"], start=1, end=2),
        helper.make_node("Greater", ["inferos_fp/new", "inferos_fp/one1"], ["inferos_fp/prefill1"]),
        helper.make_node("Squeeze", ["inferos_fp/prefill1", "inferos_fp/axis0"], ["inferos_fp/prefill"]),
    ]
    consts = {"inferos_fp/axis0": np.array([0], np.int64), "inferos_fp/axis2": np.array([2], np.int64),
              "inferos_fp/zero1": np.array([0], np.int64), "inferos_fp/one1": np.array([1], np.int64),
              "inferos_fp/lo": np.array(-128.0, np.float32),
              "inferos_fp/hi": np.array(127.0, np.float32),
              "inferos_fp/pads_head": np.zeros(6, np.int64), "inferos_fp/pads_tail": np.zeros(1, np.int64)}
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    types = (TensorProto.FLOAT, TensorProto.INT8, TensorProto.INT8)

    def outputs(names: list[str]) -> list[Any]:
        return [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types)]

    nodes = list(pre)
    for idx, node in enumerate(graph.node):
        if node.op_type != "GroupQueryAttention" or not any(a.name == "kv_cache_bit_width" for a in node.attribute):
            nodes.append(node)
            continue
        p = f"inferos_fp/{idx}/"
        ins = list(node.input)
        outs = list(node.output)
        attrs = [a for a in node.attribute if a.name not in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")]
        # this layer's total length (GQA's int32 scalar input 6) as int64 [1], and its cached columns
        then_nodes = [
            helper.make_node("Cast", [ins[6]], [p + "total0"], to=TensorProto.INT64),
            helper.make_node("Unsqueeze", [p + "total0", "inferos_fp/axis0"], [p + "total"]),
            helper.make_node("Sub", [p + "total", "inferos_fp/new"], [p + "cached"]),
        ]
        cached = []
        for j, past, scale in ((3, ins[3], ins[12]), (4, ins[4], ins[13])):
            sl = helper.make_node("Slice", [past, "inferos_fp/zero1", p + "cached", "inferos_fp/axis2"],
                                  [p + f"past{j}i8"])
            cast = helper.make_node("Cast", [p + f"past{j}i8"], [p + f"past{j}c"], to=TensorProto.FLOAT)
            scaled = helper.make_node("Mul", [p + f"past{j}c", scale], [p + f"past{j}"])
            then_nodes += [sl, cast, scaled]
            cached.append(p + f"past{j}")
        f_ins = ins[:3] + cached + ins[5:12]
        gqa = helper.make_node("GroupQueryAttention", f_ins, [p + "out", p + "pk", p + "pv"], domain="com.microsoft")
        gqa.attribute.extend(attrs)
        # pads for the sequence axis up to the past buffer's width (capacity; zero without one): the
        # presents are ``total`` columns long for keys and values alike
        then_nodes += [
            helper.make_node("Shape", [ins[3]], [p + "cap"], start=2, end=3),
            helper.make_node("Sub", [p + "cap", p + "total"], [p + "gap"]),
            helper.make_node("Max", [p + "gap", "inferos_fp/zero1"], [p + "gap0"]),
            helper.make_node("Concat", ["inferos_fp/pads_head", p + "gap0", "inferos_fp/pads_tail"], [p + "pads"],
                             axis=0),
        ]
        then_nodes.append(gqa)
        then_outs = [p + "out"]
        for kind, scale in (("pk", ins[12]), ("pv", ins[13])):
            q = p + kind
            then_nodes += [
                helper.make_node("Div", [q, scale], [q + "/s"]),
                helper.make_node("Round", [q + "/s"], [q + "/r"]),
                helper.make_node("Clip", [q + "/r", "inferos_fp/lo", "inferos_fp/hi"], [q + "/c"]),
                helper.make_node("Cast", [q + "/c"], [q + "/i8"], to=TensorProto.INT8),
                helper.make_node("Pad", [q + "/i8", p + "pads"], [q + "/out"]),
            ]
            then_outs.append(q + "/out")
        else_gqa = helper.make_node("GroupQueryAttention", ins, [p + "qout", p + "qpk", p + "qpv"],
                                    domain="com.microsoft")
        else_gqa.attribute.extend(node.attribute)
        then_g = helper.make_graph(then_nodes, p + "then", [], outputs(then_outs))
        else_g = helper.make_graph([else_gqa], p + "else", [], outputs([p + "qout", p + "qpk", p + "qpv"]))
        nodes.append(helper.make_node("If", ["inferos_fp/prefill"], outs, name=p + "if",
                                      then_branch=then_g, else_branch=else_g))
    del graph.node[:]
    graph.node.extend(nodes)


def fused_graph(info: "ModelInfo") -> tuple[Path, str]:
    """The fused graph for ``info`` (from the cache, or calibrated, built and cached atomically now) and a
    note for tables (non-empty when the weights had to be copied)."""
    src = Path(info.onnx_path)
    path = derived_path(src, "kvf", FUSED_VERSION, KEY_MARGIN, VALUE_MARGIN, BITS, tag="kv-fused")
    if path.is_file():
        return path, ""
    copied = save_derived(fused_model(info, calibrate(info)), src, path)
    return path, copied_note(copied, path.parent)


def graph_scales(path: Path, info: "ModelInfo") -> dict[str, np.ndarray]:
    """The fused graph's static scales ``[1, kv_heads, 1, head_dim]`` by past *and* present name:
    codes = clip(round(x / scale), -128, 127), x = codes * scale."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    found: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        branches = [a.g for a in node.attribute if a.name == "else_branch"] if node.op_type == "If" else []
        for gqa in [n for b in branches for n in b.node] + [node]:
            if gqa.op_type != "GroupQueryAttention" or len(gqa.input) < 14:
                continue
            for past, scale in ((gqa.input[3], gqa.input[12]), (gqa.input[4], gqa.input[13])):
                if scale in inits:
                    found[past] = numpy_helper.to_array(inits[scale]).astype(np.float32)
    for i in range(info.num_layers):
        for past, present in ((info.past_key_fmt % i, info.present_key_fmt % i),
                              (info.past_value_fmt % i, info.present_value_fmt % i)):
            if past in found:
                found[present] = found[past]
    return found
