"""The weights a decoder graph is built from, held in numpy: architecture facts, block-quantized weights.

:class:`DecoderSpec` (the architecture), :class:`LayerWeights` / :class:`DecoderWeights` (every tensor, in
Hugging Face orientation ``[out, in]``), :class:`QuantWeight` (block-32 weights ready for ``MatMulNBits``),
and the helpers the readers (HF safetensors, GGUF) and the builders share: round-to-nearest quantization,
nibble packing, row concatenation, the storage of a float weight at a dtype, parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np

from inferos_cli.errors import ConversionError

BLOCK = 32


@dataclass
class DecoderSpec:
    """Architecture facts of a decoder (HF config names in comments); ``arch`` picks the graph builder."""

    arch: str  # model_type: llama | mistral | qwen2 | qwen3 | phi3 | gemma2 | gemma3 (inferos_cli.models.builders)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = True
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    sliding_window: int | None = None  # keys a local layer's query sees, itself included (HF/llama.cpp meaning)
    layer_types: list[str] | None = None  # "sliding_attention" | "full_attention" per layer; None: all full
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (gemma3: 10000); None: rope_theta
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this); None: head_dim (gemma)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (gemma2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (gemma2)

    @property
    def attn_scale(self) -> float:
        """The factor on ``q . k`` before the softmax."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_local(self, layer: int) -> bool:
        """True when ``layer`` attends only to the last :attr:`sliding_window` keys."""
        if not self.sliding_window:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    @property
    def has_local(self) -> bool:
        """True when any layer is a sliding-window layer (:meth:`is_local`)."""
        return any(self.is_local(i) for i in range(self.num_layers))

    @property
    def groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def check(self) -> None:
        """Reject shapes the graph cannot express, with a one-line reason."""
        if self.num_heads % self.num_kv_heads:
            raise ConversionError(f"{self.num_heads} heads are not a multiple of {self.num_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ConversionError(f"head_dim {self.head_dim} is odd; RoPE needs an even head size")


@dataclass
class Factors:
    """The exact factors of a GGUF K-quant's per-block scales and offsets, so the file need not hold them widened.

    ``scales = d (x) sc`` (each of a super-block's ``group`` blocks: the super-block's float ``d`` times the
    block's small integer ``sc``) and ``mins = coef * scales + dm (x) mn`` (``dm``: the negated super-block
    minimum scale; ``coef``: 8 for Q4_K's symmetric midpoint, else no scales term). :meth:`scales` /
    :meth:`mins` are the one place these products are computed, in float32 in this order; the graph builder
    spells the offsets' products as constant ``Cast``/``Mul``/``Add`` nodes that onnxruntime folds at load
    (:func:`~inferos_cli.models.builders.base.factored_mins`), with bit-identical values.
    """

    group: int  # blocks per super-block
    d: np.ndarray  # float32 [N, S]
    sc: np.ndarray  # int8 / uint8 [N, S*group]
    coef: float | None = None
    dm: np.ndarray | None = None  # float32 [N, S] (minus the file's dmin)
    mn: np.ndarray | None = None  # uint8 [N, S*group]

    def scales(self) -> np.ndarray:
        """float32 ``[N, S*group]``."""
        n, s = self.d.shape
        return (self.d[..., None] * self.sc.reshape(n, s, self.group).astype(np.float32)).reshape(n, -1)

    def mins(self, scales: np.ndarray) -> np.ndarray | None:
        """float32 ``[N, S*group]`` offsets given the weight's ``scales`` (None without ``mn``)."""
        if self.mn is None or self.dm is None:
            return None
        n, s = self.dm.shape
        term = (self.dm[..., None] * self.mn.reshape(n, s, self.group).astype(np.float32)).reshape(n, -1)
        if self.coef is None:
            return term
        return np.float32(self.coef) * scales.reshape(n, -1) + term

    @property
    def form(self) -> tuple[Any, ...]:
        """What must agree for two factored weights to be stacked."""
        kind = lambda a: None if a is None else a.dtype.str  # noqa: E731
        return self.group, self.sc.dtype.str, self.coef, kind(self.mn)

    def take_rows(self, index: np.ndarray) -> "Factors":
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return Factors(self.group, self.d[index], self.sc[index], self.coef, pick(self.dm), pick(self.mn))

    @staticmethod
    def concat(parts: "list[Factors]") -> "Factors | None":
        """Row-stacked factors, or None when their forms differ."""
        if len({p.form for p in parts}) != 1:
            return None
        cat = lambda attr: None if getattr(parts[0], attr) is None else np.concatenate([getattr(p, attr) for p in parts])  # noqa: E731
        return Factors(parts[0].group, cat("d"), cat("sc"), parts[0].coef, cat("dm"), cat("mn"))


@dataclass
class QuantWeight:
    """A weight of logical shape ``[N, K]`` (out, in) in blocks of 32 along K, ready for ``MatMulNBits``.

    ``data``: uint8 ``[N, K/32, 16]`` (4-bit, element 2i in the low nibble of byte i) or ``[N, K/32, 32]``
    (8-bit). Value = ``scale * (q - zp) + min`` per block, where ``zp`` is ``zero_points`` (integers, per
    block) when given, else the symmetric midpoint (8 for 4-bit, 128 for 8-bit), and ``min`` is ``mins``
    (float, per block) when given, else 0. GGUF Q4_1 (``d*q + m``) is stored exactly as
    ``d*(q - 8) + (m + 8d)``: the fast symmetric ``MatMulNBits`` plus a per-block offset term that the graph
    adds as ``Gemm(blocksum(x), mins, y, transB=1)`` (MatMulNBits' own float zero points take ORT's slow
    unpacked path).
    """

    bits: int
    data: np.ndarray
    scales: np.ndarray  # float32 [N, K/32]
    zero_points: np.ndarray | None = None  # uint8 [N, K/32], values < 2**bits
    mins: np.ndarray | None = None  # float32 [N, K/32]
    source: str = ""  # e.g. "Q4_1" (the file's own blocks) or "rtn" (quantized here)
    block_size: int = BLOCK  # values per block along K: 32, or 16 (GGUF Q6_K / Q2_K / Q3_K sub-blocks)
    factors: Factors | None = None  # exact factors of scales / mins (GGUF K-quants); the mins are stored as them

    @property
    def shape(self) -> tuple[int, int]:
        """Logical ``(N, K)``."""
        n, nb = self.data.shape[:2]
        return n, nb * self.block_size

    @property
    def form(self) -> tuple[int, int, bool, bool]:
        """What must agree for two weights to share one matmul."""
        return self.bits, self.block_size, self.zero_points is not None, self.mins is not None

    def take_rows(self, index: np.ndarray) -> "QuantWeight":
        """Reorder output rows (lossless: whole blocks move)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return QuantWeight(self.bits, self.data[index], self.scales[index], pick(self.zero_points),
                           pick(self.mins), self.source, self.block_size,
                           None if self.factors is None else self.factors.take_rows(index))

    def unpacked(self) -> np.ndarray:
        """The integer codes ``[N, K/32, 32]`` as uint8."""
        if self.bits == 4:
            return np.stack([self.data & 0x0F, self.data >> 4], axis=-1).reshape(*self.data.shape[:2], self.block_size)
        return self.data

    def dequantize(self) -> np.ndarray:
        """The float32 ``[N, K]`` matrix these blocks stand for."""
        n, k = self.shape
        q = self.unpacked().astype(np.float32)
        zp = self.zero_points[..., None].astype(np.float32) if self.zero_points is not None else float(1 << (self.bits - 1))
        x = (q - zp) * self.scales[..., None]
        if self.mins is not None:
            x = x + self.mins[..., None]
        return x.reshape(n, k).astype(np.float32)

    def packed_zero_points(self) -> np.ndarray:
        """Zero points in MatMulNBits layout: 4-bit two per byte along each row (padded per row)."""
        assert self.zero_points is not None
        zp = self.zero_points.astype(np.uint8)
        if self.bits == 8:
            return zp.reshape(-1)
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        return (zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1)


Weight = Union[np.ndarray, QuantWeight]


def concat_rows(parts: list[Weight]) -> Weight | None:
    """Stack weights along N (fusing q/k/v or gate/up); None when their storage differs."""
    if all(isinstance(p, np.ndarray) for p in parts):
        if len({p.dtype for p in parts}) != 1:  # type: ignore[union-attr]
            return None
        return np.concatenate(parts, axis=0)  # type: ignore[arg-type]
    if all(isinstance(p, QuantWeight) for p in parts):
        qs: list[QuantWeight] = parts  # type: ignore[assignment]
        if len({q.form for q in qs}) != 1:
            return None
        cat = lambda attr: None if getattr(qs[0], attr) is None else np.concatenate([getattr(q, attr) for q in qs])  # noqa: E731
        factors = None
        if all(q.factors is not None for q in qs):
            factors = Factors.concat([q.factors for q in qs])  # type: ignore[misc]
        return QuantWeight(qs[0].bits, cat("data"), cat("scales"), cat("zero_points"), cat("mins"), qs[0].source,
                           qs[0].block_size, factors)
    return None


# ----------------------------------------------------------------------------------------------- quantizers
def quantize_rtn(w: np.ndarray, bits: int) -> QuantWeight:
    """Round-to-nearest block-32 quantization of a float ``[N, K]`` weight (K must be a multiple of 32).

    4-bit: asymmetric min/max per block with integer zero points (ORT's fast MatMulNBits path).
    8-bit: symmetric absmax per block, like GGUF Q8_0.
    """
    n, k = w.shape
    if k % BLOCK:
        raise ConversionError(f"cannot quantize a weight with K={k}: not a multiple of {BLOCK}")
    x = w.astype(np.float32).reshape(n, k // BLOCK, BLOCK)
    if bits == 8:
        amax = np.abs(x).max(axis=-1)
        scale = (amax / 127.0).astype(np.float32)
        safe = np.where(scale == 0, 1.0, scale)
        q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int16) + 128
        return QuantWeight(8, q.astype(np.uint8), scale, None, None, "rtn")
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = np.maximum(x.max(axis=-1), 0.0)
    scale = ((hi - lo) / 15.0).astype(np.float32)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.rint(x / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
    return QuantWeight(4, pack_nibbles(q), scale, zp, None, "rtn")


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """``[..., 32]`` values 0..15 -> ``[..., 16]`` bytes, element 2i low nibble, 2i+1 high nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


@dataclass
class LayerWeights:
    """One decoder layer, HF orientation (``[out, in]``)."""

    attn_norm: np.ndarray
    q: Weight
    k: Weight
    v: Weight
    o: Weight
    ffn_norm: np.ndarray
    gate: Weight
    up: Weight
    down: Weight
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    q_norm: np.ndarray | None = None  # per-head RMSNorm gain [head_dim] on q (qwen3, gemma3)
    k_norm: np.ndarray | None = None  # per-head RMSNorm gain [head_dim] on k
    post_attn_norm: np.ndarray | None = None  # RMSNorm gain on the attention output (gemma2/3)
    post_ffn_norm: np.ndarray | None = None  # RMSNorm gain on the MLP output (gemma2/3)


class LazyLayers(Sequence[LayerWeights]):
    """Decoder layers produced one at a time by ``load(i)`` and never kept, so a converter holds one layer's
    tensors while it writes them, whatever the model size. Each layer's parameter count and storage forms are
    remembered when it is produced (:meth:`summary`): the folder's metadata needs no second pass."""

    def __init__(self, count: int, load: Callable[[int], LayerWeights]) -> None:
        self.count = count
        self.load = load
        self.summaries: dict[int, tuple[int, dict[str, int]]] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> LayerWeights:  # type: ignore[override]
        if not 0 <= i < self.count:
            raise IndexError(i)
        layer = self.load(i)
        self.summaries[i] = layer_summary(layer)
        return layer

    def __iter__(self) -> Iterator[LayerWeights]:
        return (self[i] for i in range(self.count))

    def summary(self, i: int) -> tuple[int, dict[str, int]]:
        """(parameters, storage forms) of layer ``i``, loading it only if it was never produced."""
        return self.summaries[i] if i in self.summaries else layer_summary(self[i])


@dataclass
class DecoderWeights:
    """All weights of a decoder. ``lm_head`` None means tied to ``embed``. ``layers`` is a list, or
    :class:`LazyLayers` when the reader streams them."""

    embed: Weight  # [vocab, hidden]
    layers: Sequence[LayerWeights]
    final_norm: np.ndarray
    lm_head: Weight | None = None


# ------------------------------------------------------------------------------------------------ storage
def store(w: np.ndarray, dtype: str) -> Weight:
    """A float ``[N, K]`` weight stored at ``dtype`` (RTN block-32 for int8/int4; K not /32 stays fp32)."""
    if dtype == "fp32":
        return np.asarray(w, dtype=np.float32)
    if dtype == "fp16":
        return np.asarray(w, dtype=np.float16)
    if w.shape[1] % BLOCK:
        return np.asarray(w, dtype=np.float32)
    return quantize_rtn(np.asarray(w, dtype=np.float32), 8 if dtype == "int8" else 4)


def store_embedding(w: np.ndarray, dtype: str) -> Weight:
    """Embedding tables: int4/int8 conversions keep them at 8 bits (they double as the tied lm_head)."""
    return store(w, "int8" if dtype in ("int8", "int4") else dtype)


def store_head(weights: DecoderWeights, bits: int | None) -> DecoderWeights:
    """Cap the logits projection at ``bits`` (None: keep it as stored); other tensors are untouched.

    A head wider than ``bits`` (float, or 8-bit when ``bits`` is 4) is re-quantized from its dequantized values
    with :func:`quantize_rtn` (4: asymmetric with integer zero points, ORT's fast ``MatMulNBits`` path; 8:
    symmetric absmax like Q8_0). A tied head becomes a separate ``lm_head`` and ``embed`` keeps its own storage
    (the embedding gather keeps the wider table, which costs less perplexity). A head already at most ``bits``
    wide, or whose input width is not a multiple of 32, is kept as it is.
    """
    if bits is None:
        return weights
    head = weights.lm_head if weights.lm_head is not None else weights.embed
    if isinstance(head, QuantWeight):
        if head.bits <= bits:
            return weights
        dense = head.dequantize()
    else:
        dense = np.asarray(head, dtype=np.float32)
    if dense.shape[1] % BLOCK:
        return weights
    weights.lm_head = quantize_rtn(dense, bits)
    return weights


LINEAR_FIELDS = ("q", "k", "v", "o", "gate", "up", "down")
LAYER_FIELDS = ("attn_norm", *LINEAR_FIELDS[:4], "ffn_norm", *LINEAR_FIELDS[4:], "q_bias", "k_bias", "v_bias",
                "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")


def _numel(w: Weight | None) -> int:
    if w is None:
        return 0
    if isinstance(w, QuantWeight):
        rows, cols = w.shape
        return rows * cols
    return int(np.prod(w.shape))


def _form(w: Weight) -> str:
    if isinstance(w, QuantWeight):
        return f"{w.source}->{w.bits}bit"
    return "fp16" if w.dtype == np.float16 else "fp32"


def _count(counts: dict[str, int], items: list[Weight]) -> dict[str, int]:
    for w in items:
        counts[_form(w)] = counts.get(_form(w), 0) + 1
    return counts


def layer_summary(layer: LayerWeights) -> tuple[int, dict[str, int]]:
    """A layer's logical parameter count and how many of its linear weights are stored in each form."""
    return (sum(_numel(getattr(layer, f)) for f in LAYER_FIELDS),
            _count({}, [getattr(layer, f) for f in LINEAR_FIELDS]))


def _layer_summaries(weights: DecoderWeights) -> Iterator[tuple[int, dict[str, int]]]:
    """Every layer's summary; a streamed layer already written is not loaded again."""
    layers = weights.layers
    if isinstance(layers, LazyLayers):
        return (layers.summary(i) for i in range(len(layers)))
    return (layer_summary(layer) for layer in layers)


def param_count(weights: DecoderWeights, *, tied: bool = False) -> int:
    """Logical parameter count (tied embeddings counted once, also when ``tied`` and the head was re-stored
    as a separate initializer by :func:`store_head`)."""
    total = _numel(weights.embed) + (0 if tied else _numel(weights.lm_head)) + _numel(weights.final_norm)
    return total + sum(params for params, _ in _layer_summaries(weights))


def describe_storage(weights: DecoderWeights) -> dict[str, int]:
    """How many linear weights are stored in each form (e.g. ``{"Q4_1->4bit": 210, "fp32": 2}``)."""
    counts = _count({}, [weights.embed] + ([weights.lm_head] if weights.lm_head is not None else []))
    for _, forms in _layer_summaries(weights):
        for key, n in forms.items():
            counts[key] = counts.get(key, 0) + n
    return counts
