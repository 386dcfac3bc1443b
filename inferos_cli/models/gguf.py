"""Read a llama.cpp GGUF file into a :class:`DecoderSpec` and :class:`DecoderWeights` (``gguf`` package).

Block formats are kept as they are, never re-quantized:

* Q4_0 (``d*(q-8)``) -> 4-bit ``MatMulNBits`` with the default zero point 8, nibbles re-ordered only.
* Q4_1 (``d*q + m``) -> 4-bit ``MatMulNBits`` as ``d*(q-8) + (m+8d)``: the per-block offset is an exact
  float term the graph adds (see :class:`~inferos_cli.models.builder.QuantWeight`).
* Q8_0 (``d*q``) -> 8-bit ``MatMulNBits`` (``q+128`` with zero point 128).
* F32 / F16 / BF16 pass through (F16 stays fp16 storage); K-quants and every other type are dequantized
  with ``gguf.quants.dequantize`` and stored at ``dtype``.

With ``dtype`` fp32 / fp16 everything is dequantized to that float type. llama.cpp stores Llama Q/K rows
permuted for its interleaved RoPE; the rows are moved back to the Hugging Face order (whole blocks move, so
this stays lossless) and the graph applies the HF rotate-half RoPE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from inferos_cli.errors import ConversionError
from inferos_cli.models.builder import BLOCK, DecoderSpec, DecoderWeights, LayerWeights, QuantWeight, Weight, pack_nibbles

ProgressFn = Callable[[str, int, int], None]
GGUF_ARCHS = ("llama", "qwen2", "mistral")
_PERMUTED_ARCHS = ("llama", "mistral")


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` for ``path``; truncated or foreign files give a one-line ConversionError."""
    import gguf

    path = Path(path)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ConversionError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise ConversionError(f"{path} is not a GGUF file (bad magic)", "pass a llama.cpp .gguf file")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # gguf raises ValueError/IndexError/struct.error on damaged files
        raise ConversionError(f"{path} is truncated or damaged: {exc}", "download the file again") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ConversionError(f"{path} is truncated: tensor {tensor.name} runs past the end of the file",
                                  "download the file again")
    return reader


def field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value (scalars unwrapped, strings decoded, arrays as lists)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # very old gguf packages: decode by hand
        import gguf

        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            return [f.parts[i].tolist()[0] if f.types[-1] != gguf.GGUFValueType.STRING
                    else bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return f.parts[f.data[0]].tolist()[0]


def gguf_spec(reader: Any, tensors: dict[str, Any]) -> DecoderSpec:
    """Architecture facts from GGUF metadata."""
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ConversionError(f"unsupported GGUF architecture {arch!r}",
                              f"inferos converts {', '.join(GGUF_ARCHS)}; pass an ONNX folder for others")

    def need(key: str) -> Any:
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise ConversionError(f"GGUF metadata {arch}.{key} is missing")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    kv = field(reader, f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv, list):
        raise ConversionError("GGUF with per-layer KV head counts is not supported")
    head_dim = int(field(reader, f"{arch}.attention.key_length", 0) or field(reader, f"{arch}.rope.dimension_count", 0)
                   or hidden // heads)
    window = field(reader, f"{arch}.attention.sliding_window")
    if window:
        raise ConversionError(f"a sliding attention window ({window}) is not supported")
    scaling = None
    kind = field(reader, f"{arch}.rope.scaling.type")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(field(reader, f"{arch}.rope.scaling.factor", 1.0))}
    elif kind not in (None, "none"):
        raise ConversionError(f"rope scaling {kind!r} is not supported")
    embd = tensors.get("token_embd.weight")
    vocab = int(field(reader, f"{arch}.vocab_size", 0) or (embd.shape[-1] if embd is not None else 0))
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    eot = field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = [int(e) for e in (eos, eot) if e is not None]
    return DecoderSpec(
        arch="llama" if arch == "mistral" else arch,
        hidden_size=hidden,
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=head_dim,
        intermediate_size=int(need("feed_forward_length")),
        vocab_size=vocab,
        context_length=int(field(reader, f"{arch}.context_length", 2048)),
        rms_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        pad_token_id=field(reader, "tokenizer.ggml.padding_token_id"),
    )


def _blocks(tensor: Any, block_bytes: int) -> np.ndarray:
    """Raw blocks ``[N, K/32, block_bytes]`` of a quantized 2-D tensor."""
    k = int(tensor.shape[0])
    raw = np.asarray(tensor.data, dtype=np.uint8)
    return raw.reshape(-1, k // BLOCK, block_bytes)


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian fp16 from two trailing bytes, widened to fp32 (exact)."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def native_blocks(tensor: Any) -> QuantWeight | None:
    """The GGUF tensor's own blocks as a :class:`QuantWeight`, or None for types kept as floats."""
    import gguf

    kind = tensor.tensor_type
    Q = gguf.GGMLQuantizationType
    if kind == Q.Q4_0:
        b = _blocks(tensor, 18)
        d, qs = _f16(b[..., 0:2]), b[..., 2:18]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # GGUF: low nibbles = 0..15, high = 16..31
        return QuantWeight(4, pack_nibbles(q), d, None, None, "Q4_0")
    if kind == Q.Q4_1:
        b = _blocks(tensor, 20)
        d, m, qs = _f16(b[..., 0:2]), _f16(b[..., 2:4]), b[..., 4:20]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        return QuantWeight(4, pack_nibbles(q), d, None, (m + 8.0 * d).astype(np.float32), "Q4_1")
    if kind == Q.Q8_0:
        b = _blocks(tensor, 34)
        d = _f16(b[..., 0:2])
        q = (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return QuantWeight(8, q, d, None, None, "Q8_0")
    return None


def as_float(tensor: Any) -> np.ndarray:
    """Any GGUF tensor as a float array in HF orientation (``[N, K]`` for matrices), F16 kept as fp16."""
    import gguf

    kind = tensor.tensor_type
    Q = gguf.GGMLQuantizationType
    shape = tuple(int(s) for s in reversed(tensor.shape))
    if kind == Q.F32:
        return np.asarray(tensor.data, dtype=np.float32).reshape(shape)
    if kind == Q.F16:
        return np.asarray(tensor.data, dtype=np.float16).reshape(shape)
    if kind == Q.BF16:
        raw = np.asarray(tensor.data).view(np.uint16).astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    try:
        from gguf.quants import dequantize
    except ImportError:
        raise ConversionError(f"tensor {tensor.name} is {kind.name}; the installed gguf package cannot dequantize it",
                              "pip install -U gguf") from None
    try:
        return np.asarray(dequantize(tensor.data, kind), dtype=np.float32).reshape(shape)
    except NotImplementedError:
        raise ConversionError(f"tensor {tensor.name} uses {kind.name}, which the gguf package cannot dequantize") from None


def load_weight(tensor: Any, dtype: str | None, store: Callable[[np.ndarray, str], Weight]) -> Weight:
    """A linear weight: the file's own blocks when the dtype allows, else floats stored at ``dtype``."""
    if dtype not in ("fp32", "fp16"):
        blocks = native_blocks(tensor)
        if blocks is not None:
            return blocks
    w = as_float(tensor)
    if dtype is None:
        return w if w.dtype == np.float16 else w.astype(np.float32)
    return store(w, dtype)


def unpermute_index(rows: int, heads: int) -> np.ndarray:
    """Row index that undoes llama.cpp's Q/K permutation (HF rotate-half order from interleaved pairs)."""
    d = rows // heads
    perm = np.arange(rows).reshape(heads, 2, d // 2).swapaxes(1, 2).reshape(-1)  # gguf row r = hf row perm[r]
    return np.argsort(perm)


def _take_rows(w: Weight, index: np.ndarray) -> Weight:
    return w.take_rows(index) if isinstance(w, QuantWeight) else w[index]


def gguf_weights(reader: Any, spec: DecoderSpec, arch: str, dtype: str | None,
                 store: Callable[[np.ndarray, str], Weight], store_embedding: Callable[[np.ndarray, str], Weight],
                 progress: ProgressFn | None = None) -> DecoderWeights:
    """Map llama.cpp tensor names to :class:`DecoderWeights`."""
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> Any:
        try:
            return tensors[name]
        except KeyError:
            raise ConversionError(f"tensor {name} is missing from the GGUF file") from None

    def vec(name: str) -> np.ndarray:
        return as_float(get(name)).astype(np.float32).reshape(-1)

    def opt_vec(name: str) -> np.ndarray | None:
        return vec(name) if name in tensors else None

    def lin(name: str) -> Weight:
        return load_weight(get(name), dtype, store)

    if "rope_freqs.weight" in tensors:
        factors = vec("rope_freqs.weight")
        spec.rope_scaling = {"rope_type": "freq_factors", "factors": factors.tolist()}
    permute = arch in _PERMUTED_ARCHS
    layers = []
    for i in range(spec.num_layers):
        p = f"blk.{i}."
        q, k = lin(p + "attn_q.weight"), lin(p + "attn_k.weight")
        q_bias, k_bias = opt_vec(p + "attn_q.bias"), opt_vec(p + "attn_k.bias")
        if permute:
            qi = unpermute_index(q.shape[0], spec.num_heads)
            ki = unpermute_index(k.shape[0], spec.num_kv_heads)
            q, k = _take_rows(q, qi), _take_rows(k, ki)
            q_bias = q_bias[qi] if q_bias is not None else None
            k_bias = k_bias[ki] if k_bias is not None else None
        layers.append(LayerWeights(
            attn_norm=vec(p + "attn_norm.weight"),
            q=q, k=k, v=lin(p + "attn_v.weight"), o=lin(p + "attn_output.weight"),
            ffn_norm=vec(p + "ffn_norm.weight"),
            gate=lin(p + "ffn_gate.weight"), up=lin(p + "ffn_up.weight"), down=lin(p + "ffn_down.weight"),
            q_bias=q_bias, k_bias=k_bias, v_bias=opt_vec(p + "attn_v.bias"),
        ))
        if progress:
            progress("convert", i + 1, spec.num_layers)
    embd = get("token_embd.weight")
    embed: Weight
    if dtype in ("fp32", "fp16"):
        embed = store_embedding(as_float(embd), dtype)
    else:
        blocks = native_blocks(embd)
        embed = blocks if blocks is not None else store_embedding(as_float(embd), dtype or "fp32")
    head = tensors.get("output.weight")
    lm_head = lin("output.weight") if head is not None else None
    return DecoderWeights(embed, layers, vec("output_norm.weight"), lm_head)
