"""GGUF block types re-expressed as MatMulNBits blocks: exact against ``gguf.quants.dequantize``, right inside a
real onnxruntime ``MatMulNBits`` node, and kept low-bit through a whole conversion."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from inferos_cli.models.quants import FORMS, decode, to_weight

# where each type that gguf cannot quantize keeps its fp16 super-scales (byte offsets in a block)
FP16_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,),
               "IQ4_NL": (0,), "IQ4_XS": (0,)}
SCALE = {"Q4_K": 4e-4, "Q5_K": 2e-4, "Q6_K": 4e-5, "Q2_K": 3e-3, "Q3_K": 1e-3, "IQ4_NL": 2e-3, "IQ4_XS": 1e-4}


def make_blocks(kind: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes ``[n, row_bytes]`` of type ``kind``: real blocks from ``gguf.quants.quantize`` when the package
    can quantize the type, else random bytes whose fp16 scale fields hold finite positive values."""
    import gguf
    from gguf.quants import quantize

    if kind not in FP16_FIELDS:
        return quantize(rng.normal(0, 0.2, (n, k)).astype(np.float32), getattr(gguf.GGMLQuantizationType, kind))
    _, _, width, size, _ = FORMS[kind]
    blocks = rng.integers(0, 256, (n, k // width, size), dtype=np.uint8)
    for at in FP16_FIELDS[kind]:
        d = rng.uniform(0.5, 1.5, (n, k // width, 1)) * SCALE[kind]
        blocks[..., at:at + 2] = d.astype(np.float16).view(np.uint8)
    return blocks.reshape(n, -1)


def reference(raw: np.ndarray, kind: str, n: int, k: int) -> np.ndarray:
    import gguf
    from gguf.quants import dequantize

    return np.asarray(dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)), np.float32).reshape(n, k)


def test_gguf_cannot_quantize_the_types_made_from_random_bytes() -> None:
    import gguf
    from gguf.quants import quantize

    for kind in FP16_FIELDS:
        with pytest.raises(NotImplementedError):
            quantize(np.zeros((1, 256), np.float32), getattr(gguf.GGMLQuantizationType, kind))


@pytest.mark.parametrize("kind", list(FORMS))
def test_every_type_is_exact(kind: str) -> None:
    """codes, scales and offsets, computed as MatMulNBits does, equal gguf's own dequantization."""
    rng = np.random.default_rng(list(FORMS).index(kind))
    n, k = 24, 512
    raw = make_blocks(kind, n, k, rng)
    want = reference(raw, kind, n, k)
    codes = decode(raw, kind, n, k)
    bits, block = FORMS[kind][:2]
    assert codes is not None and (codes.bits, codes.block, codes.source) == (bits, block, kind)
    assert codes.codes.shape == (n, k // block, block) and codes.codes.max() < (1 << bits)
    tol = 1e-6 * np.abs(want).max()
    assert np.abs(want).max() > 0
    assert np.abs(codes.values() - want).max() <= tol
    weight = to_weight(codes)  # the builder's QuantWeight: packed data, dequantized as the graph computes it
    assert weight.shape == (n, k) and (weight.bits, weight.block_size) == (bits, block)
    assert (weight.mins is not None) == (codes.mins is not None) and weight.zero_points is None
    assert np.abs(weight.dequantize() - want).max() <= tol


def nbits_session(codes, k: int, n: int):
    """A real onnxruntime session of ``x @ W^T`` as the builder emits it: ``MatMulNBits`` (accuracy_level 0)
    plus, with offsets, ``Gemm(ReduceSum(x as [M, K/block, block]), mins, y, transB=1)``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    c = codes.codes
    data = (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8) if codes.bits == 4 else c
    inits = [numpy_helper.from_array(np.ascontiguousarray(data), "qweight"),
             numpy_helper.from_array(codes.scales.reshape(-1), "scales")]
    nodes = [helper.make_node("MatMulNBits", ["x", "qweight", "scales"], ["mm" if codes.mins is not None else "y"],
                              domain="com.microsoft", K=k, N=n, bits=codes.bits, block_size=codes.block,
                              accuracy_level=0)]
    if codes.mins is not None:
        inits += [numpy_helper.from_array(codes.mins, "mins"),
                  numpy_helper.from_array(np.array([-1, k // codes.block, codes.block], np.int64), "view"),
                  numpy_helper.from_array(np.array([-1], np.int64), "last")]
        nodes += [helper.make_node("Reshape", ["x", "view"], ["xb"]),
                  helper.make_node("ReduceSum", ["xb", "last"], ["sums"], keepdims=0),
                  helper.make_node("Gemm", ["sums", "mins", "mm"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kind", list(FORMS))
def test_matmulnbits_computes_the_dequantized_product(kind: str) -> None:
    """Each form (4/8 bits, blocks of 32 and 16, with and without offsets) runs in onnxruntime's MatMulNBits
    and gives ``x @ W^T`` of the dequantized weight up to fp32 accumulation."""
    rng = np.random.default_rng(7)
    n, k, m = 40, 512, 5
    raw = make_blocks(kind, n, k, rng)
    codes = decode(raw, kind, n, k)
    x = rng.normal(size=(m, k)).astype(np.float32)
    want = x.astype(np.float64) @ reference(raw, kind, n, k).astype(np.float64).T
    got = nbits_session(codes, k, n).run(None, {"x": x})[0]
    bound = (np.abs(x).astype(np.float64) @ np.abs(codes.values()).astype(np.float64).T).max()
    assert np.abs(got - want).max() <= 2e-6 * bound


# ------------------------------------------------------------------------------------------------ end to end
HIDDEN, HEADS, KVH, FFN, LAYERS, CTX = 256, 4, 2, 512, 2, 64
LINEAR_TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_0",
                "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}
EMBED_TYPE = "Q5_0"


def write_kquant_gguf(path: Path) -> tuple[dict[str, np.ndarray], dict, dict[str, str]]:
    """A 2-layer llama GGUF of Q4_K / Q6_K / Q5_0 tensors (tied Q5_0 embedding); returns the HF-named
    dequantized weights, an HF-style config and each matrix's GGUF type by HF name."""
    import gguf
    from _tiny_gguf import add_vocab, vocab

    rng = np.random.default_rng(3)
    tokens = vocab()[0]
    d = HIDDEN // HEADS
    cfg = {"hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_key_value_heads": KVH, "head_dim": d,
           "num_hidden_layers": LAYERS, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "vocab_size": len(tokens)}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CTX)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KVH)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    add_vocab(writer)
    hf: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}

    def put(name: str, hf_name: str, kind: str, n: int, k: int, heads: int | None = None) -> None:
        raw = make_blocks(kind, n, k, rng)
        writer.add_tensor(name, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        w = reference(raw, kind, n, k)
        if heads:  # undo llama.cpp's Q/K row permutation for the HF-layout reference
            w = w.reshape(heads, n // heads // 2, 2, k).swapaxes(1, 2).reshape(n, k)
        hf[hf_name] = w
        kinds[hf_name] = kind

    def norm(name: str, hf_name: str) -> None:
        g = (1 + 0.1 * rng.normal(size=HIDDEN)).astype(np.float32)
        writer.add_tensor(name, g)
        hf[hf_name] = g

    put("token_embd.weight", "model.embed_tokens.weight", EMBED_TYPE, len(tokens), HIDDEN)
    shapes = {"attn_q": (HIDDEN, HIDDEN, "q_proj"), "attn_k": (KVH * d, HIDDEN, "k_proj"),
              "attn_v": (KVH * d, HIDDEN, "v_proj"), "attn_output": (HIDDEN, HIDDEN, "o_proj"),
              "ffn_gate": (FFN, HIDDEN, "gate_proj"), "ffn_up": (FFN, HIDDEN, "up_proj"),
              "ffn_down": (HIDDEN, FFN, "down_proj")}
    for i in range(LAYERS):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        norm(p + "attn_norm.weight", h + "input_layernorm.weight")
        norm(p + "ffn_norm.weight", h + "post_attention_layernorm.weight")
        for short, (n, k, hf_short) in shapes.items():
            part = "mlp" if short.startswith("ffn") else "self_attn"
            heads = {"attn_q": HEADS, "attn_k": KVH}.get(short)
            put(p + short + ".weight", f"{h}{part}.{hf_short}.weight", LINEAR_TYPES[short], n, k, heads)
    norm("output_norm.weight", "model.norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf, cfg, kinds


def logits(folder: Path, ids: list[int], graph: str = "model.onnx") -> np.ndarray:
    """Logits ``[T, vocab]`` of one full forward from an empty cache."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / graph), providers=["CPUExecutionProvider"])
    t, d = len(ids), HIDDEN // HEADS
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, t), np.int64),
             "position_ids": np.arange(t, dtype=np.int64)[None]}
    feeds.update({f"past_key_values.{i}.{kind}": np.zeros((1, KVH, 0, d), np.float32)
                  for i in range(LAYERS) for kind in ("key", "value")})
    return sess.run(["logits"], feeds)[0][0]


def test_kquant_gguf_converts_low_bit_and_matches_the_reference(tmp_path: Path) -> None:
    """Q4_K / Q5_0 / Q6_K stay MatMulNBits blocks (Q6_K in blocks of 16); the data file
    holds exactly those blocks (fp32 scales and offsets) and nothing wider; logits match the numpy forward
    over the file's dequantized weights."""
    import gguf
    import onnx
    from _llama_ref import forward as ref_forward

    from inferos_cli.models.convert import convert_gguf

    src = tmp_path / "kq.gguf"
    hf, cfg, kinds = write_kquant_gguf(src)
    out = convert_gguf(src, tmp_path / "out", accuracy_level=0)

    want_storage: dict[str, int] = {}
    want_bytes = 0
    for name, kind in kinds.items():
        n, k = hf[name].shape
        bits, block = FORMS[kind][:2]
        key = f"{kind}->{bits}bit"
        blocks, supers = n * k // block, n * k // 256
        # codes, float32 scales, and Q4_K's offsets as one uint8 code per block + a float32 per super-block
        # (arrays of <= 1 KiB sit in the graph)
        parts = [n * k * bits // 8, 4 * blocks] + ([blocks, 4 * supers] if kind == "Q4_K" else [])
        want_bytes += sum(p for p in parts if p > 1024)
        want_storage[key] = want_storage.get(key, 0) + 1
    meta = json.loads((out / "inferos.json").read_text())
    assert meta["storage"] == want_storage and "fp32" not in meta["storage"]

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    floats = 4 * (HIDDEN * (2 * LAYERS + 1) + CTX * (HIDDEN // HEADS))  # norms + rope cos/sin tables
    data = (out / "model.onnx.data").stat().st_size
    assert want_bytes <= data <= want_bytes + floats + 64 * len(external)  # each initializer 64-byte aligned
    gguf_tensor_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(src)).tensors)
    # bound for this mix: 8-bit Q5_0 codes + fp32 scales (9 bits a weight against the file's 5.5), Q6_K's 8-bit
    # codes + fp32 scales per 16 (10 against 6.56), 4-bit Q4_K + fp32 scale + 8-bit offset code (5.4 against 4.5)
    assert data <= 1.45 * gguf_tensor_bytes

    ids = [0, 5, 70, 100, 200, 30, 31, 260, 3]
    want = ref_forward(hf, cfg, ids)
    got = logits(out, ids)
    assert np.abs(got - want).max() <= 1e-3
    assert np.abs(want).max() > 0.1  # the logits are not trivially small


def test_factored_scales_fold_to_the_same_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  inferos_home: Path) -> None:
    """Q4_K offsets stored as the file's own factors (a uint8 code per block, a float per super-block) fold in
    onnxruntime to exactly the float32 offsets stored widened: the two conversions give bit-identical logits
    at the int8 compute level, and the factored one is smaller. The exact-compute twin of it matches the numpy
    reference."""
    import dataclasses

    import onnx

    from inferos_cli.graphs.exact import exact_info
    from inferos_cli.models import quants
    from inferos_cli.models.convert import convert_gguf
    from _llama_ref import forward as ref_forward

    from inferos_cli.models.info import inspect_folder

    src = tmp_path / "kq.gguf"
    hf, cfg, _ = write_kquant_gguf(src)
    factored = convert_gguf(src, tmp_path / "factored", accuracy_level=4)
    plain_weight = quants.to_weight
    monkeypatch.setattr(quants, "to_weight", lambda codes: dataclasses.replace(plain_weight(codes), factors=None))
    widened = convert_gguf(src, tmp_path / "widened", accuracy_level=4)
    monkeypatch.undo()

    size = lambda folder: (folder / "model.onnx.data").stat().st_size  # noqa: E731
    assert size(factored) < size(widened)
    ops = lambda folder: [n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node]  # noqa: E731
    assert "Cast" in ops(factored) and ops(factored).count("Cast") > ops(widened).count("Cast")
    ids = [0, 5, 70, 100, 200, 30, 31, 260, 3]
    a, b = logits(factored, ids), logits(widened, ids)
    assert np.array_equal(a, b)

    twin, changed = exact_info(inspect_folder(factored))
    assert changed
    twin_ops = [n.op_type for n in onnx.load(str(twin.onnx_path), load_external_data=False).graph.node]
    eight_bit = sum(1 for kind in LINEAR_TYPES.values() if kind in ("Q6_K", "Q5_0")) * LAYERS
    assert twin_ops.count("MatMul") >= eight_bit and "MatMulNBits" in twin_ops  # 4-bit ones at accuracy_level 0
    got = logits(twin.onnx_path.parent, ids, twin.onnx_path.name)
    assert np.abs(got - ref_forward(hf, cfg, ids)).max() <= 1e-3


@pytest.mark.parametrize("kind", list(FORMS))
def test_chunked_decoding_assembles_the_same_weight(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`blocks_weight` decodes a few rows at a time into preallocated arrays: the codes, scales, offsets
    and K-quant factors equal one whole-tensor decode, also when the last chunk is short."""
    from inferos_cli.models import quants

    rng = np.random.default_rng(11)
    n, k = 37, 512
    raw = make_blocks(kind, n, k, rng)
    whole = to_weight(decode(raw, kind, n, k))
    monkeypatch.setattr(quants, "CHUNK_BYTES", 5 * raw.shape[1])  # 5 rows a chunk: 8 chunks, the last of 2
    parts = quants.blocks_weight(raw, kind, n, k)
    assert parts is not None
    for attr in ("data", "scales", "mins"):
        a, b = getattr(whole, attr), getattr(parts, attr)
        assert (a is None and b is None) or np.array_equal(a, b), attr
    assert (whole.factors is None) == (parts.factors is None)
    if whole.factors is not None:
        for attr in ("d", "sc", "dm", "mn"):
            a, b = getattr(whole.factors, attr), getattr(parts.factors, attr)
            assert (a is None and b is None) or np.array_equal(a, b), attr


DECODE_CHILD = """import resource, sys
import numpy as np
from inferos_cli.models.quants import blocks_weight
n, k = 32768, 4096
raw = np.random.default_rng(0).integers(0, 256, (n, k // 32 * 18), dtype=np.uint8)
raw.reshape(-1, 18)[:, :2] = np.array([0.01], np.float16).view(np.uint8)
import gc; gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
w = blocks_weight(raw, "Q4_0", n, k)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(raw.nbytes, w.data.nbytes + w.scales.nbytes, after - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in kilobytes on Linux")
def test_decoding_a_large_tensor_holds_little_beyond_its_result() -> None:
    """A 75 MB Q4_0 tensor (a 32k-row embedding) decodes with a peak of its result plus a chunk's temporaries;
    decoding it whole unpacked every code to a byte and held several such copies (~7x the file's bytes)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", DECODE_CHILD], capture_output=True, text=True, timeout=120, check=True)
    raw, result, grew = (int(x) for x in done.stdout.split())
    assert grew <= result + 48 * 2**20, (raw, result, grew)
