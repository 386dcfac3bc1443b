"""Read a llama.cpp GGUF file into a :class:`DecoderSpec` and :class:`DecoderWeights` (``gguf`` package).

Supported architectures (:data:`GGUF_ARCHS`): llama, mistral, qwen2, qwen3, phi3 (fused ``attn_qkv`` and
gate+up ``ffn_up`` split into rows; longrope factors), gemma2 and gemma3 (sliding-window layers, soft-caps,
sandwich norms, q/k norms; llama.cpp stores their RMSNorm gains as ``1 + w`` already).

Block formats are kept as they are, never re-quantized: :mod:`inferos_cli.models.quants` re-expresses each
type it knows (Q4_0/1, Q5_0/1, Q8_0, the K-quants, IQ4_NL/XS) exactly as ``MatMulNBits`` blocks, with a
per-block float offset where the format has a minimum (see
:class:`~inferos_cli.models.weights.QuantWeight`). F32 / F16 / BF16 pass through (F16 stays fp16 storage);
any other type is dequantized with
``gguf.quants.dequantize`` and stored at fp16, so no tensor is widened to fp32 by default.

With ``dtype`` fp32 / fp16 everything is dequantized to that float type. llama.cpp stores Llama Q/K rows
permuted for its interleaved RoPE; the rows are moved back to the Hugging Face order (whole blocks move, so
this stays lossless) and the graph applies the HF rotate-half RoPE.

The weights stream: :func:`gguf_weights` reads the embedding, head and final norm, and each layer only when
the builder asks for it (:class:`~inferos_cli.models.weights.LazyLayers`), every tensor with a plain file
read (:class:`TensorFile`), so a conversion holds about one layer at a time whatever the model size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from inferos_cli.errors import ConversionError
from inferos_cli.models.quants import FORMS, blocks_weight
from inferos_cli.models.reading import ProgressFn, ReadProgress, read_at
from inferos_cli.models.weights import DecoderSpec, DecoderWeights, LayerWeights, LazyLayers, QuantWeight, Weight

GGUF_ARCHS = ("llama", "qwen2", "mistral", "qwen3", "phi3", "gemma2", "gemma3")
_PERMUTED_ARCHS = ("llama", "mistral")
# end-of-turn tokens that stop generation like EOS (llama.cpp's end-of-generation set does the same)
_EOT_TEXTS = ("<end_of_turn>", "<|end|>", "<|im_end|>", "<|eot_id|>")
_EOT_ARCHS = ("qwen3", "phi3", "gemma2", "gemma3")


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


def drop_vocab(reader: Any) -> None:
    """Forget the reader's parsed vocabulary arrays once the tokenizer is built: the ``gguf`` reader keeps a
    numpy view object per token and merge, 0.3 GiB for a 128k-token vocabulary, for as long as it lives, and a
    conversion needs only the tensors after that (it counts toward ``pull``'s peak, issue 15)."""
    import gc

    for key in [k for k in reader.fields if k.startswith("tokenizer.ggml.") and k != "tokenizer.ggml.model"]:
        if len(reader.fields[key].data) > 1:  # arrays only; scalar ids stay readable
            del reader.fields[key]
    gc.collect()


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
    """Architecture facts from GGUF metadata (llama.cpp's key names and per-architecture defaults)."""
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ConversionError(f"unsupported GGUF architecture {arch!r}",
                              f"inferos converts {', '.join(GGUF_ARCHS)}; pass an ONNX folder for others")

    def key(name: str, default: Any = None) -> Any:
        return field(reader, f"{arch}.{name}", default)

    def need(name: str) -> Any:
        value = key(name)
        if value is None:
            raise ConversionError(f"GGUF metadata {arch}.{name} is missing")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    layers = int(need("block_count"))
    kv = key("attention.head_count_kv", heads)
    if isinstance(kv, list):
        raise ConversionError("GGUF with per-layer KV head counts is not supported")
    if arch == "phi3":  # rope.dimension_count is the rotary width, which may be partial (Phi-4 mini)
        head_dim = int(key("attention.key_length", 0) or hidden // heads)
        if int(key("rope.dimension_count", head_dim)) != head_dim:
            raise ConversionError(f"partial rotary embeddings ({key('rope.dimension_count')} of {head_dim}) "
                                  "are not supported", "use a phi3 model with full rotary embeddings")
    else:
        head_dim = int(key("attention.key_length", 0) or key("rope.dimension_count", 0) or hidden // heads)
    spec = DecoderSpec(
        arch="llama" if arch == "mistral" else arch,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(kv),
        head_dim=head_dim,
        intermediate_size=int(need("feed_forward_length")),
        vocab_size=0,
        context_length=int(key("context_length", 2048)),
        rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch, tensors),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=_eos_ids(reader, arch),
        pad_token_id=field(reader, "tokenizer.ggml.padding_token_id"),
    )
    embd = tensors.get("token_embd.weight")
    spec.vocab_size = int(key("vocab_size", 0) or (embd.shape[-1] if embd is not None else 0))
    window = key("attention.sliding_window")
    if arch in ("gemma2", "gemma3"):
        _gemma_facts(reader, arch, spec, window)
    elif window and arch != "phi3":  # llama.cpp runs phi3 without its window too
        raise ConversionError(f"a sliding attention window ({window}) on {arch} is not supported",
                              "sliding windows are supported on gemma2 and gemma3")
    return spec


def _rope_scaling(reader: Any, arch: str, tensors: dict[str, Any]) -> dict[str, Any] | None:
    """``rope.scaling.*`` keys (linear), or Phi-3's longrope factor tensors; llama3 scaling arrives as the
    ``rope_freqs.weight`` tensor (:func:`gguf_weights`)."""
    if "rope_factors_long.weight" in tensors and "rope_factors_short.weight" in tensors:
        original = field(reader, f"{arch}.rope.scaling.original_context_length")
        if original is None:
            raise ConversionError(f"GGUF metadata {arch}.rope.scaling.original_context_length is missing")
        return {"rope_type": "longrope", "original_max_position_embeddings": int(original),
                "long_factor": as_float(tensors["rope_factors_long.weight"]).reshape(-1).tolist(),
                "short_factor": as_float(tensors["rope_factors_short.weight"]).reshape(-1).tolist(),
                "attention_factor": field(reader, f"{arch}.rope.scaling.attn_factor")}
    kind = field(reader, f"{arch}.rope.scaling.type")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(field(reader, f"{arch}.rope.scaling.factor", 1.0))}
    if kind not in (None, "none"):
        raise ConversionError(f"rope scaling {kind!r} is not supported", "supported: linear, llama3, longrope")
    return None


def _eos_ids(reader: Any, arch: str) -> list[int]:
    """EOS and EOT ids; for the newer chat families also the end-of-turn tokens the vocabulary holds."""
    ids = [field(reader, "tokenizer.ggml.eos_token_id"), field(reader, "tokenizer.ggml.eot_token_id")]
    if arch in _EOT_ARCHS:
        tokens = field(reader, "tokenizer.ggml.tokens") or []
        index = {t: i for i, t in enumerate(tokens) if t in _EOT_TEXTS}
        ids += [index[t] for t in _EOT_TEXTS if t in index]
    return list(dict.fromkeys(int(e) for e in ids if e is not None))


def _gemma_facts(reader: Any, arch: str, spec: DecoderSpec, window: Any) -> None:
    """Gemma's sliding-window layers, local RoPE base, attention scale and soft-caps (llama.cpp's rules:
    gemma2 alternates local/global layers with a 4096 window by default; gemma3 makes every sixth layer
    global, local layers use RoPE base 10000; the 27B models scale queries by ``hidden/heads``)."""
    key = lambda name, default=None: field(reader, f"{arch}.{name}", default)  # noqa: E731
    period = 2 if arch == "gemma2" else 6
    window = int(window if window is not None else (4096 if arch == "gemma2" else 0))
    pattern = key("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        local = [bool(p) for p in pattern]
    else:
        period = int(pattern or period)
        local = [i % period < period - 1 for i in range(spec.num_layers)]
    if window > 0:
        spec.sliding_window = window
        spec.layer_types = ["sliding_attention" if flag else "full_attention" for flag in local]
    if arch == "gemma3":
        spec.rope_local_theta = 10000.0
    big = spec.num_layers == (46 if arch == "gemma2" else 62)  # the 27B models
    spec.query_pre_attn_scalar = spec.hidden_size / spec.num_heads if big else spec.head_dim
    cap = key("attn_logit_softcapping", 50.0 if arch == "gemma2" else None)
    spec.attn_softcap = float(cap) if cap else None
    cap = key("final_logit_softcapping", 30.0 if arch == "gemma2" else None)
    spec.final_softcap = float(cap) if cap else None


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


def native_float(tensor: Any) -> np.ndarray:
    """A tensor without a block form, as stored by default: F32 / BF16 as fp32, F16 and dequantized block
    types as fp16 (never widened to fp32)."""
    import gguf

    w = as_float(tensor)
    Q = gguf.GGMLQuantizationType
    return w.astype(np.float32) if tensor.tensor_type in (Q.F32, Q.BF16) else w.astype(np.float16)


def unpermute_index(rows: int, heads: int) -> np.ndarray:
    """Row index that undoes llama.cpp's Q/K permutation (HF rotate-half order from interleaved pairs)."""
    d = rows // heads
    perm = np.arange(rows).reshape(heads, 2, d // 2).swapaxes(1, 2).reshape(-1)  # gguf row r = hf row perm[r]
    return np.argsort(perm)


def _take_rows(w: Weight, index: np.ndarray) -> Weight:
    return w.take_rows(index) if isinstance(w, QuantWeight) else w[index]


def split_rows(w: Weight, sizes: list[int]) -> list[Weight]:
    """A row-stacked weight cut into consecutive blocks of ``sizes`` output rows (lossless)."""
    if sum(sizes) != w.shape[0]:
        raise ConversionError(f"a fused weight has {w.shape[0]} rows, expected {' + '.join(map(str, sizes))}")
    starts = np.cumsum([0] + sizes)
    return [_take_rows(w, np.arange(a, b)) for a, b in zip(starts[:-1], starts[1:])]


class TensorFile(ReadProgress):
    """Reads a GGUF's tensors with plain file reads, each into a fresh array freed with the weight made from
    it (never through the reader's memory map, whose touched pages would stay resident until the end), and
    reports the bytes read so far of all tensor bytes as the ``"convert"`` progress stage."""

    def __init__(self, reader: Any, progress: ProgressFn | None = None) -> None:
        super().__init__(sum(int(t.n_bytes) for t in reader.tensors), progress)
        self.path = Path(reader.data.filename)
        self.tensors: dict[str, Any] = {t.name: t for t in reader.tensors}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> Any:
        """The reader's ``ReaderTensor`` for ``name`` (its ``data`` is the reader's map: do not touch it)."""
        try:
            return self.tensors[name]
        except KeyError:
            raise ConversionError(f"tensor {name} is missing from the GGUF file") from None

    def blocks(self, name: str) -> QuantWeight | None:
        """Matrix ``name`` as its own blocks (:func:`~inferos_cli.models.quants.blocks_weight`), read from the
        file a few rows at a time, so no buffer of the whole tensor; None for a type kept as floats."""
        tensor = self.info(name)
        if len(tensor.shape) != 2:
            return None
        k, n = (int(s) for s in tensor.shape)
        row_bytes = int(tensor.n_bytes) // n

        def rows(a: int, b: int) -> np.ndarray:
            out = np.empty((b - a, row_bytes), np.uint8)
            read_at(self.path, int(tensor.data_offset) + a * row_bytes, out, name)
            self.report(out.nbytes)
            return out

        return blocks_weight(rows, tensor.tensor_type.name, n, k)

    def read(self, name: str) -> Any:
        """Tensor ``name`` (the reader's ``ReaderTensor``) with ``data`` read from the file."""
        tensor = self.info(name)
        data = np.empty(tensor.data.shape, tensor.data.dtype)
        read_at(self.path, int(tensor.data_offset), data, name)
        self.report(data.nbytes)
        return tensor._replace(data=data)


def has_blocks(reader: Any) -> bool:
    """True when some matrix of the file is in a block format kept as blocks (:meth:`TensorFile.blocks`)."""
    return any(len(t.shape) == 2 and t.tensor_type.name in FORMS for t in reader.tensors)


def gguf_weights(reader: Any, spec: DecoderSpec, arch: str, dtype: str | None,
                 store: Callable[[np.ndarray, str], Weight], store_embedding: Callable[[np.ndarray, str], Weight],
                 progress: ProgressFn | None = None) -> DecoderWeights:
    """Map llama.cpp tensor names to :class:`DecoderWeights`; the layers are read when the builder asks for
    each (:class:`~inferos_cli.models.weights.LazyLayers`), ``progress`` gets the bytes read."""
    tensors = TensorFile(reader, progress)
    get = tensors.read

    def vec(name: str) -> np.ndarray:
        return as_float(get(name)).astype(np.float32).reshape(-1)

    def opt_vec(name: str) -> np.ndarray | None:
        return vec(name) if name in tensors else None

    def weight(name: str, keep: Callable[[np.ndarray, str], Weight]) -> Weight:
        """The file's own blocks when the dtype allows and the type has a form, else floats: ``keep`` at
        ``dtype``, or the file's own float width (:func:`native_float`) when ``dtype`` is None."""
        blocks = tensors.blocks(name) if dtype not in ("fp32", "fp16") else None
        if blocks is not None:
            return blocks
        tensor = get(name)
        return native_float(tensor) if dtype is None else keep(as_float(tensor), dtype)

    def lin(name: str) -> Weight:
        return weight(name, store)

    if "rope_freqs.weight" in tensors:
        factors = vec("rope_freqs.weight")
        spec.rope_scaling = {"rope_type": "freq_factors", "factors": factors.tolist()}
    permute = arch in _PERMUTED_ARCHS
    q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim

    def layer(i: int) -> LayerWeights:
        p = f"blk.{i}."
        if p + "attn_qkv.weight" in tensors:  # phi3: q, k, v stacked along the output rows
            q, k, v = split_rows(lin(p + "attn_qkv.weight"), [q_rows, kv_rows, kv_rows])
            biases = opt_vec(p + "attn_qkv.bias")
            q_bias, k_bias, v_bias = (None, None, None) if biases is None else \
                np.split(biases, [q_rows, q_rows + kv_rows])
        else:
            q, k, v = lin(p + "attn_q.weight"), lin(p + "attn_k.weight"), lin(p + "attn_v.weight")
            q_bias, k_bias, v_bias = opt_vec(p + "attn_q.bias"), opt_vec(p + "attn_k.bias"), opt_vec(p + "attn_v.bias")
        if permute:
            qi = unpermute_index(q.shape[0], spec.num_heads)
            ki = unpermute_index(k.shape[0], spec.num_kv_heads)
            q, k = _take_rows(q, qi), _take_rows(k, ki)
            q_bias = q_bias[qi] if q_bias is not None else None
            k_bias = k_bias[ki] if k_bias is not None else None
        if p + "ffn_gate.weight" in tensors:
            gate, up = lin(p + "ffn_gate.weight"), lin(p + "ffn_up.weight")
        else:  # phi3: ffn_up holds gate then up
            gate, up = split_rows(lin(p + "ffn_up.weight"), [spec.intermediate_size] * 2)
        weights = LayerWeights(
            attn_norm=vec(p + "attn_norm.weight"),
            q=q, k=k, v=v, o=lin(p + "attn_output.weight"),
            ffn_norm=vec(p + "ffn_norm.weight"),
            gate=gate, up=up, down=lin(p + "ffn_down.weight"),
            q_bias=q_bias, k_bias=k_bias, v_bias=v_bias,
            q_norm=opt_vec(p + "attn_q_norm.weight"), k_norm=opt_vec(p + "attn_k_norm.weight"),
            post_attn_norm=opt_vec(p + "post_attention_norm.weight"),
            post_ffn_norm=opt_vec(p + "post_ffw_norm.weight"),
        )
        if i == spec.num_layers - 1:
            tensors.finish()
        return weights

    embed = weight("token_embd.weight", store_embedding)
    lm_head = lin("output.weight") if "output.weight" in tensors else None
    return DecoderWeights(embed, LazyLayers(spec.num_layers, layer), vec("output_norm.weight"), lm_head)
