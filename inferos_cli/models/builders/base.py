"""The decoder graph builder every architecture shares; an architecture's module overrides its hooks.

The graph has the standard decoder I/O that every inferos component relies on::

    input_ids [B, T] int64, attention_mask [B, P+T] int64, position_ids [B, T] int64,
    past_key_values.{i}.key|value [B, kv_heads, P, head_dim] float32
    -> logits [B, T, vocab] float32, present.{i}.key|value [B, kv_heads, P+T, head_dim] float32

Attention (the builder's ``attention`` form): by default onnxruntime's ``GroupQueryAttention`` (as
onnxruntime-genai builds it: packed qkv, RoPE inside the op from ``position_ids``, row lengths from
``attention_mask``, in-place past/present buffers); or the ONNX ``Attention`` op / plain
``MatMul``/``Softmax`` over ``Concat(past, new)`` with an additive mask built once per forward from
``attention_mask`` (padding) and the block structure (every cached key is visible to every new query, new
keys causally), so the KV-boundary rewrite can replace the past inputs and keep true positions. Outside
GQA, RoPE is applied from ``position_ids`` inside the graph (``com.microsoft.RotaryEmbedding`` gathering
precomputed cos/sin tables). Norms use ORT's fused ``SimplifiedLayerNormalization`` /
``SkipSimplifiedLayerNormalization`` (the residual add folded into the next norm); q/k/v and gate/up are
fused into one matmul each. Quantized weights use ``com.microsoft.MatMulNBits`` with block size 32.

Sliding-window layers (``spec.is_local``) attend to the last ``sliding_window`` keys only (GQA's
``local_window_size``, or a windowed bias), with their own RoPE tables when ``spec.rope_local_theta`` is set.
A GQA graph with such layers has one more, optional input, ``local_attention_mask [B, L+T]`` (default: an
empty ``[1, 0]`` initializer): when fed, the sliding layers' GQA takes its row lengths from it instead of
``attention_mask``, so their past buffers may hold only each row's last ``sliding_window - 1`` tokens (the
engine's bounded caches, :mod:`inferos_cli.kv.plain`); RoPE still reads the true ``position_ids``. Left
unfed, every layer reads the full past, so the standard decoder I/O above is all a caller needs.

Hooks an architecture may override (see :mod:`inferos_cli.models.builders.llama`, ``gemma``, ``qwen3``,
``phi3``): :meth:`embedding`, :meth:`layer`, :meth:`self_attention`, :meth:`qk_norm`, :meth:`mlp`,
:meth:`activation`, :meth:`norm`, :meth:`lm_head`, :meth:`rope_caches`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from inferos_cli.errors import ConversionError
from inferos_cli.models.builders.writer import GraphWriter
from inferos_cli.models.info import LOCAL_MASK
from inferos_cli.models.weights import BLOCK, DecoderSpec, DecoderWeights, LayerWeights, QuantWeight, Weight, concat_rows

NEG_INF_BIAS = -1.0e9  # additive mask; finite so a fully padded query row stays a valid softmax
ATTENTION_MODES = ("op", "plain", "gqa")


def rope_inv_freq(spec: DecoderSpec, *, theta: float | None = None, scaled: bool = True) -> np.ndarray:
    """RoPE inverse frequencies ``[head_dim/2]`` (float64) for base ``theta`` (default ``spec.rope_theta``),
    with the spec's rope scaling (llama3, linear, llama.cpp frequency factors) when ``scaled``."""
    dim = spec.head_dim
    inv_freq = 1.0 / ((theta or spec.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = (spec.rope_scaling if scaled else None) or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled_freq = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled_freq / factor + smooth * scaled_freq
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_mid, mid, scaled_freq)
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "freq_factors":  # llama.cpp's rope_freqs.weight: per-frequency divisors (llama3 scaling)
        inv_freq = inv_freq / np.asarray(scaling["factors"], dtype=np.float64)
    elif kind not in (None, "default"):
        raise ConversionError(f"rope scaling {kind!r} is not supported", "use a model without rope scaling")
    return inv_freq


def rope_tables(spec: DecoderSpec, max_positions: int, *, theta: float | None = None,
                scaled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin tables ``[max_positions, head_dim/2]`` (float32) of :func:`rope_inv_freq`."""
    angles = np.outer(np.arange(max_positions, dtype=np.float64), rope_inv_freq(spec, theta=theta, scaled=scaled))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_cache(w: GraphWriter, name: str, inv_freq: np.ndarray, positions: int) -> tuple[str, str]:
    """cos / sin caches ``[positions, head_dim/2]`` named ``{name}.cos`` / ``{name}.sin``, built in the graph
    from two small tables: with ``L = ceil(sqrt(positions))``, position ``p = L*a + b`` rotates by
    angle(L*a) + angle(b), so ``cos = cos_a*cos_b - sin_a*sin_b`` and ``sin = sin_a*cos_b + cos_a*sin_b``
    (float32 products of float64 angles, within 3e-7 of direct tables). onnxruntime folds them to constants
    at load; on disk they are about ``4 * sqrt(positions)`` rows instead of ``2 * positions`` (a 32k-context
    table pair of 256-wide heads would be 34 MB)."""
    lo = max(1, math.isqrt(positions - 1) + 1) if positions > 1 else 1
    hi = -(-positions // lo)
    a_hi = np.outer(np.arange(hi, dtype=np.float64) * lo, inv_freq)[:, None, :]  # [hi, 1, d/2]
    a_lo = np.outer(np.arange(lo, dtype=np.float64), inv_freq)[None, :, :]  # [1, lo, d/2]
    ch, sh = (w.init(f"{name}.{f.__name__}_hi", f(a_hi).astype(np.float32)) for f in (np.cos, np.sin))
    cl, sl = (w.init(f"{name}.{f.__name__}_lo", f(a_lo).astype(np.float32)) for f in (np.cos, np.sin))
    flat = w.const([-1, len(inv_freq)])
    starts, ends = w.const([0]), w.const([positions])

    def table(out: str, a: str, b: str, c: str, d: str, op: str) -> str:
        full = w.op(op, w.op("Mul", a, b), w.op("Mul", c, d))  # [hi, lo, d/2]
        return w.node("Slice", [w.op("Reshape", full, flat), starts, ends], outputs=[out])[0]

    return (table(f"{name}.cos", ch, cl, sh, sl, "Sub"), table(f"{name}.sin", sh, cl, ch, sl, "Add"))


def factored_mins(w: GraphWriter, weight: QuantWeight, name: str, scales: str) -> str | None:
    """A GGUF K-quant's float32 block offsets (``mins``) as constant ``Cast``/``Mul``(/``Add``) nodes over the
    file's own factors (:class:`~inferos_cli.models.weights.Factors`: a uint8 code per block and a float per
    super-block instead of a float32 per block), which onnxruntime folds at load; None when the weight has no
    such factors or they do not give its offsets bit for bit (then they are stored widened).

    Only offsets: the ``Gemm`` that adds them prepacks them and the folded copy is freed, so RSS after load is
    unchanged once the heap is trimmed (:func:`inferos_cli.engine.sessions.open_session`), while factored
    ``MatMulNBits`` scales would stay in anonymous memory for the session's life instead of being trimmed file
    pages (:mod:`inferos_cli.engine.weightmaps`); ``benchmarks/README.md`` has the 7B figures."""
    f, want = weight.factors, weight.mins
    if f is None or f.mn is None or f.dm is None or want is None:
        return None
    got = f.mins(weight.scales)
    if got is None or not np.array_equal(got, want.reshape(got.shape)):
        return None
    n, s = f.dm.shape
    term = w.op("Mul", w.op("Cast", w.init(name + ".min_codes", f.mn.reshape(n * s, f.group)), to=1),
                w.init(name + ".min_base", f.dm.reshape(n * s, 1).astype(np.float32)))
    if f.coef is not None:
        scaled = w.op("Mul", w.op("Reshape", scales, w.const([n * s, f.group])), w.const(f.coef, np.float32))
        term = w.op("Add", scaled, term)
    return w.node("Reshape", [term, w.const([n, -1])], outputs=[name + ".mins"])[0]


class DecoderBuilder:
    """Emits the decoder graph for a :class:`DecoderSpec` and :class:`DecoderWeights`.

    Activations between layers are 2-D ``[B*T, hidden]`` so each block-offset correction is one ``Gemm``
    (``blocksum(x) @ mins^T + y``). ``attention``: ``"op"`` uses the standard ONNX ``Attention`` (opset 23,
    GQA-aware, past/present in the standard layout: one kernel per layer instead of ~15 small ops);
    ``"plain"`` spells it out as Reshape/Transpose/Concat/MatMul/Softmax/MatMul at opset 17; ``"gqa"`` uses
    onnxruntime's ``com.microsoft.GroupQueryAttention`` the way onnxruntime-genai's builder does (packed qkv,
    RoPE inside the op from ``position_ids``, each row's length from ``attention_mask``, rows right-padded),
    which lets the engine decode into preallocated past/present buffers in place and the fused int8 KV cache
    (:mod:`inferos_cli.kv.fused`) read 8-bit keys and values inside the op.
    """

    archs: tuple[str, ...] = ()  # the DecoderSpec.arch values a subclass builds

    def __init__(self, spec: DecoderSpec, writer: GraphWriter, *, accuracy_level: int = 0,
                 attention: str = "op") -> None:
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, not {attention!r}")
        self.spec = spec
        self.w = writer
        self.accuracy_level = accuracy_level
        self.attention = attention
        self._block_sums: dict[str, str] = {}
        self.embed_inits: dict[str, str] = {}
        self.embed_name = ""

    # -- linear layers ------------------------------------------------------------------------------
    def linear(self, x: str, weight: Weight, name: str, bias: np.ndarray | None = None) -> str:
        """``x @ W^T (+ bias)`` on 2-D ``x`` for a float or block-quantized ``W`` of shape ``[N, K]``."""
        w = self.w
        if isinstance(weight, QuantWeight):
            names = self.quant_inits(weight, name)
            bias_name = w.init(name + ".bias", bias.astype(np.float32)) if bias is not None else None
            return self.nbits(x, weight, names, bias_name)
        weight_t = w.float_init(name + ".weight", np.ascontiguousarray(weight.T))
        if bias is not None:
            return w.op("Gemm", x, weight_t, w.init(name + ".bias", bias.astype(np.float32)))
        return w.op("MatMul", x, weight_t)

    def quant_inits(self, weight: QuantWeight, name: str) -> dict[str, str]:
        """Values of a block-quantized weight: qweight, scales, zero_points, mins (``[N, K/32]``; from
        :func:`factored_mins` where the file's factors give them exactly in fewer bytes)."""
        w = self.w
        names = {
            "qweight": w.init(name + ".qweight", weight.data),
            "scales": w.init(name + ".scales", weight.scales.reshape(-1).astype(np.float32)),
        }
        if weight.zero_points is not None:
            names["zero_points"] = w.init(name + ".zero_points", weight.packed_zero_points())
        if weight.mins is not None:
            names["mins"] = (factored_mins(w, weight, name, names["scales"])
                             or w.init(name + ".mins", np.ascontiguousarray(weight.mins.astype(np.float32))))
        return names

    def nbits(self, x: str, weight: QuantWeight, names: dict[str, str], bias: str | None = None) -> str:
        """``MatMulNBits`` (+ the exact per-block offset ``Gemm(blocksum(x), mins, y, transB=1)`` when the weight
        has mins). ``mins`` stays ``[N, K/32]`` (each output's block offsets contiguous, and the embedding
        gathers its rows directly)."""
        w = self.w
        n, k = weight.shape
        inputs = [x, names["qweight"], names["scales"]]
        if "zero_points" in names:
            inputs.append(names["zero_points"])
        if bias is not None:
            inputs += [""] * (5 - len(inputs)) + [bias]  # A, B, scales, zero_points, g_idx, bias
        y = w.op("MatMulNBits", *inputs, domain="com.microsoft", K=k, N=n, bits=weight.bits, block_size=weight.block_size,
                 accuracy_level=self.accuracy_level)
        if "mins" in names:
            y = w.op("Gemm", self.block_sums(x, k, weight.block_size), names["mins"], y, transB=1)
        return y

    def block_sums(self, x: str, k: int, block: int = BLOCK) -> str:
        """``x [M, K]`` summed over each block of 32 columns, ``[M, K/32]`` (``ReduceSum`` over a
        ``[M, K/32, 32]`` view; cached per input), instead of a ``MatMul`` with a 0/1 block-indicator matrix:
        no indicator initializer, and the same perplexity up to float summation order."""
        if (x, block) not in self._block_sums:
            shaped = self.w.op("Reshape", x, self.w.const([-1, k // block, block]))
            self._block_sums[x, block] = self.w.op("ReduceSum", shaped, self.w.const([-1]), keepdims=0)
        return self._block_sums[x, block]

    def fused_linear(self, x: str, parts: list[Weight], name: str, biases: list[np.ndarray | None],
                     reshape: str | None = None, split: bool = True) -> list[str]:
        """One matmul over row-stacked weights, split back (optionally reshaped first, once, before the
        split; ``split=False`` returns the one stacked output); separate matmuls when storages differ."""
        sizes = [p.shape[0] for p in parts]
        fused = concat_rows(parts)
        if fused is None:
            outs = [self.linear(x, p, f"{name}.{i}", b) for i, (p, b) in enumerate(zip(parts, biases))]
            return [self.w.op("Reshape", o, reshape) for o in outs] if reshape else outs
        bias = None
        if any(b is not None for b in biases):
            bias = np.concatenate([b if b is not None else np.zeros(s, np.float32) for b, s in zip(biases, sizes)])
        y = self.linear(x, fused, name, bias)
        if reshape:
            y = self.w.op("Reshape", y, reshape)
        if not split:
            return [y]
        return self.w.node("Split", [y, self.w.const(sizes)], n_out=len(parts), axis=-1)

    # -- whole graph --------------------------------------------------------------------------------
    def build(self, weights: DecoderWeights) -> Any:
        """Return the ``onnx.ModelProto`` (initializers external) for ``weights``."""
        from onnx import helper

        spec, w = self.spec, self.w
        spec.check()
        inputs, outputs = self.graph_io()
        self.rope, self.rope_local = self.rope_caches()
        self.bt_shape = w.op("Concat", w.op("Shape", "input_ids"), w.const([-1]), axis=0)  # [B, T, -1]
        if self.attention == "gqa":
            self.lengths = self.gqa_lengths()
            self.lengths_local = self.gqa_local_lengths() if spec.has_local else self.lengths
        else:
            form = "op" if self.attention == "op" else "plain"
            self.mask = attention_bias(w, form)
            self.mask_local = attention_bias(w, form, spec.sliding_window) if spec.has_local else self.mask
        residual = self.embedding(weights.embed)  # [B*T, hidden]
        pending: str | None = None  # a block's output not yet added to the residual stream
        for i in range(len(weights.layers)):  # by index: a streamed layer is dropped once written
            pending, residual = self.layer(i, weights.layers[i], pending, residual)
        x, _ = self.norm(pending, residual, weights.final_norm, "final_norm", first=not weights.layers)
        logits = self.lm_head(x, weights)
        w.node("Reshape", [logits, self.bt_shape], outputs=["logits"])

        graph = helper.make_graph(w.nodes, "inferos_decoder", inputs, outputs, w.initializers)
        opset = 23 if self.attention == "op" else 17  # GroupQueryAttention is com.microsoft
        model = helper.make_model(graph, producer_name="inferos", opset_imports=[
            helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        return model

    def rope_caches(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """(cos, sin) initializers of the full layers and of the sliding ones (the same pair unless
        ``spec.rope_local_theta`` gives the local layers their own base, without scaling)."""
        spec, w = self.spec, self.w
        rope = rope_cache(w, "rope", rope_inv_freq(spec), spec.context_length)
        if spec.rope_local_theta is None or not spec.has_local:
            return rope, rope
        return rope, rope_cache(w, "rope_local", rope_inv_freq(spec, theta=spec.rope_local_theta, scaled=False),
                                spec.context_length)

    def graph_io(self) -> tuple[list[Any], list[Any]]:
        """The graph's inputs and outputs (the standard decoder I/O of the module docstring)."""
        from onnx import TensorProto, helper

        spec = self.spec
        kvh, d = spec.num_kv_heads, spec.head_dim
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", spec.vocab_size])]
        for i in range(spec.num_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch_size", kvh, "past_sequence_length", d]))
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kind}", TensorProto.FLOAT, ["batch_size", kvh, "total_sequence_length", d]))
        if self.attention == "gqa" and spec.has_local:
            # optional: an initializer of the same name is its default (onnxruntime lets a feed override it)
            inputs.append(helper.make_tensor_value_info(
                LOCAL_MASK, TensorProto.INT64, ["local_batch_size", "local_sequence_length"]))
            self.w.init(LOCAL_MASK, np.zeros((1, 0), dtype=np.int64))
        return inputs, outputs

    # -- one decoder block --------------------------------------------------------------------------
    def layer(self, i: int, layer: LayerWeights, pending: str | None, residual: str) -> tuple[str, str]:
        """Pre-norm block ``i``: norm, self-attention, o_proj, norm, MLP. ``pending`` (the previous block's
        output) is added to ``residual`` inside the first norm; returns (this block's output, residual)."""
        x, residual = self.norm(pending, residual, layer.attn_norm, f"layers.{i}.attn_norm", first=(i == 0))
        ctx = self.self_attention(i, x, layer)
        attn = self.linear(ctx, layer.o, f"layers.{i}.o_proj")
        x, residual = self.norm(attn, residual, layer.ffn_norm, f"layers.{i}.ffn_norm")
        return self.mlp(i, x, layer), residual

    def self_attention(self, i: int, x: str, layer: LayerWeights) -> str:
        """Self-attention of layer ``i`` on the normed 2-D input; returns the 2-D context before o_proj.

        A local layer (:meth:`DecoderSpec.is_local`) sees only the last ``sliding_window`` keys (GQA's
        ``local_window_size``, or a windowed bias) and reads its own RoPE tables; the scale is
        ``spec.attn_scale`` and ``spec.attn_softcap`` caps the scores."""
        w, spec = self.w, self.spec
        heads, kvh, d, g = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.groups
        local = spec.is_local(i)
        rope = self.rope_local if local else self.rope
        scale, cap = spec.attn_scale, float(spec.attn_softcap or 0.0)
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        presents = [w.fresh("attn"), f"present.{i}.key", f"present.{i}.value"]
        parts, biases = [layer.q, layer.k, layer.v], [layer.q_bias, layer.k_bias, layer.v_bias]
        if self.attention == "gqa":
            if layer.q_norm is None:  # packed q/k/v straight into the op
                qkv = self.fused_linear(x, parts, f"layers.{i}.qkv", biases, reshape=self.bt_shape, split=False)
                q, k, v = qkv if len(qkv) == 3 else (qkv[0], "", "")
            else:
                q, k, v = self.fused_linear(x, parts, f"layers.{i}.qkv", biases, reshape=self.bt_shape)
                q, k = self.qk_norm(i, q, k, layer)
            window = spec.sliding_window if local and spec.sliding_window else -1  # keys seen, the query's own included
            extra = {"softcap": cap} if cap else {}
            lengths = self.lengths_local if local else self.lengths
            ctx = w.node("GroupQueryAttention", [q, k, v, past_k, past_v, *lengths, *rope, "position_ids"],
                         outputs=presents, domain="com.microsoft", num_heads=heads, kv_num_heads=kvh, scale=scale,
                         do_rotary=1, rotary_interleaved=0, local_window_size=window, **extra)[0]
            return w.op("Reshape", ctx, w.const([-1, heads * d]))
        q, k, v = self.fused_linear(x, parts, f"layers.{i}.qkv", biases, reshape=self.bt_shape)  # [B, T, n*d]
        q, k = self.qk_norm(i, q, k, layer)
        mask = self.mask_local if local else self.mask
        if self.attention == "op":
            extra = {"softcap": cap} if cap else {}
            ctx = rope_attention(w, q, k, v, "position_ids", rope, mask, past_k, past_v, tuple(presents),  # type: ignore[arg-type]
                                 heads=heads, kv_heads=kvh, scale=scale, **extra)
            return w.op("Reshape", ctx, w.const([-1, heads * d]))
        q = w.op("RotaryEmbedding", q, "position_ids", *rope, domain="com.microsoft")
        k = w.op("RotaryEmbedding", k, "position_ids", *rope, domain="com.microsoft")
        kh = w.op("Transpose", w.op("Reshape", k, w.const([0, 0, kvh, d])), perm=[0, 2, 1, 3])
        vh = w.op("Transpose", w.op("Reshape", v, w.const([0, 0, kvh, d])), perm=[0, 2, 1, 3])
        pk = w.node("Concat", [past_k, kh], outputs=[f"present.{i}.key"], axis=2)[0]
        pv = w.node("Concat", [past_v, vh], outputs=[f"present.{i}.value"], axis=2)[0]
        # q as [B, T, kvh, g, d]; past+new keys broadcast over T as [B, 1, kvh, S, d]
        q5 = w.op("Reshape", q, w.const([0, 0, kvh, g, d]))
        k5 = w.op("Unsqueeze", pk, w.const([1]))
        v5 = w.op("Unsqueeze", pv, w.const([1]))
        scores = w.op("FusedMatMul", q5, k5, domain="com.microsoft", transB=1, alpha=scale)
        if cap:
            scores = w.op("Mul", w.op("Tanh", w.op("Mul", scores, w.const(1.0 / cap, np.float32))),
                          w.const(cap, np.float32))
        probs = w.op("Softmax", w.op("Add", scores, mask), axis=-1)  # [B, T, kvh, g, S]
        return w.op("Reshape", w.op("MatMul", probs, v5), w.const([-1, heads * d]))

    def qk_norm(self, i: int, q: str, k: str, layer: LayerWeights) -> tuple[str, str]:
        """Transform of q and k (``[B, T, n*d]``) before RoPE; none in the base (qwen3 / gemma3 norm them)."""
        return q, k

    def head_norm(self, x: str, gamma: np.ndarray, name: str) -> str:
        """RMSNorm of each head of ``x`` (``[B, T, n*d]``) with one ``[head_dim]`` gain."""
        w, d = self.w, self.spec.head_dim
        heads = w.op("Reshape", x, w.const([0, 0, -1, d]))
        normed = w.op("SimplifiedLayerNormalization", heads, w.init(name + ".weight", gamma.astype(np.float32)),
                      axis=-1, epsilon=self.spec.rms_eps)
        return w.op("Reshape", normed, w.const([0, 0, -1]))

    def rms_norm(self, x: str, gamma: np.ndarray, name: str) -> str:
        """Plain RMSNorm of ``x`` (no residual)."""
        g = self.w.init(name + ".weight", gamma.astype(np.float32))
        return self.w.op("SimplifiedLayerNormalization", x, g, axis=-1, epsilon=self.spec.rms_eps)

    def mlp(self, i: int, x: str, layer: LayerWeights) -> str:
        """Gated MLP of layer ``i``: ``down(activation(gate(x)) * up(x))``, gate and up in one matmul."""
        gate, up = self.fused_linear(x, [layer.gate, layer.up], f"layers.{i}.gate_up", [None, None])
        return self.linear(self.activation(gate, up), layer.down, f"layers.{i}.down_proj")

    def activation(self, gate: str, up: str) -> str:
        """The MLP's gated activation: SwiGLU, ``silu(gate) * up``."""
        w = self.w
        return w.op("Mul", w.op("Mul", gate, w.op("Sigmoid", gate)), up)

    def norm(self, x: str | None, residual: str, gamma: np.ndarray, name: str, first: bool = False) -> tuple[str, str]:
        """RMSNorm of ``x + residual``; returns (normed, new residual)."""
        w = self.w
        g = w.init(name + ".weight", gamma.astype(np.float32))
        if first or x is None:
            return w.op("SimplifiedLayerNormalization", residual, g, axis=-1, epsilon=self.spec.rms_eps), residual
        # outputs 1 and 2 (mean, inverse std) left unnamed, as onnxruntime-genai's graphs do: ORT then does
        # not allocate them
        normed, total = w.fresh("norm"), w.fresh("residual")
        w.node("SkipSimplifiedLayerNormalization", [x, residual, g], outputs=[normed, "", "", total],
               domain="com.microsoft", epsilon=self.spec.rms_eps)
        return normed, total

    def gqa_lengths(self) -> tuple[str, str]:
        """``GroupQueryAttention``'s ``seqlens_k`` (int32 ``[B]``: each row's real tokens - 1, from the mask)
        and ``total_sequence_length`` (int32 scalar: the mask's width)."""
        w = self.w
        self.mask_lengths = w.op("ReduceSum", "attention_mask", w.const([1]), keepdims=0)
        self.mask_width = w.op("Shape", "attention_mask", start=1, end=2)
        return self.seqlens_total(self.mask_lengths, self.mask_width)

    def seqlens_total(self, lengths: str, width: str) -> tuple[str, str]:
        """GQA's int32 ``seqlens_k`` (``lengths - 1``) and scalar ``total_sequence_length`` (``width`` [1])."""
        w = self.w
        seqlens = w.op("Cast", w.op("Sub", lengths, w.const(1)), to=6)
        total = w.op("Cast", w.op("Squeeze", width, w.const([0])), to=6)
        return seqlens, total

    def gqa_local_lengths(self) -> tuple[str, str]:
        """``seqlens_k`` and ``total_sequence_length`` of the sliding layers: from ``local_attention_mask``
        when it is fed (non-empty), else the same as :meth:`gqa_lengths` (call that first). GQA places a
        row's new keys right after its ``seqlens_k + 1 - new`` cached ones and masks the window relative to
        them, so a buffer holding only the row's last tokens is exact as long as RoPE gets true positions."""
        w = self.w
        width = w.op("Shape", LOCAL_MASK, start=1, end=2)
        fed = w.op("Greater", width, w.const([0]))
        lengths = w.op("Where", fed, w.op("ReduceSum", LOCAL_MASK, w.const([1]), keepdims=0), self.mask_lengths)
        return self.seqlens_total(lengths, w.op("Where", fed, width, self.mask_width))

    # -- ends ---------------------------------------------------------------------------------------
    def embedding(self, embed: Weight) -> str:
        """Token embeddings ``[B*T, hidden]``; block-quantized tables are dequantized per gathered row."""
        w = self.w
        if isinstance(embed, QuantWeight) and embed.zero_points is not None:
            embed = embed.dequantize()  # only RTN weights carry integer zero points; keep the gather simple
        if isinstance(embed, np.ndarray):
            self.embed_name = w.float_init("embed_tokens.weight", embed)
            return w.op("Reshape", w.op("Gather", self.embed_name, "input_ids", axis=0), w.const([-1, embed.shape[1]]))
        n, k = embed.shape
        nb = k // embed.block_size
        names = self.embed_inits = self.quant_inits(embed, "embed_tokens")
        ids = w.op("Reshape", "input_ids", w.const([-1]))
        rows = w.op("Gather", names["qweight"], ids, axis=0)  # [M, nb, bytes] uint8
        if embed.bits == 4:
            hi = w.op("BitShift", rows, w.const(4, np.uint8), direction="RIGHT")
            lo = w.op("Sub", rows, w.op("BitShift", hi, w.const(4, np.uint8), direction="LEFT"))
            both = w.op("Concat", w.op("Unsqueeze", lo, w.const([-1])), w.op("Unsqueeze", hi, w.const([-1])), axis=-1)
            rows = w.op("Reshape", both, w.const([0, nb, embed.block_size]))
        q = w.op("Sub", w.op("Cast", rows, to=1), w.const(float(1 << (embed.bits - 1)), np.float32))
        scales = w.op("Gather", w.op("Reshape", names["scales"], w.const([n, nb, 1])), ids, axis=0)
        vals = w.op("Mul", q, scales)
        if "mins" in names:
            mins = w.op("Gather", names["mins"], ids, axis=0)  # [M, nb]
            vals = w.op("Add", vals, w.op("Unsqueeze", mins, w.const([-1])))
        return w.op("Reshape", vals, w.const([-1, k]))

    def lm_head(self, x: str, weights: DecoderWeights) -> str:
        """2-D logits; a tied head reuses the embedding initializers (stored once)."""
        w = self.w
        head = weights.lm_head
        if head is not None:
            return self.linear(x, head, "lm_head")
        if not self.embed_inits:
            return w.op("Gemm", x, self.embed_name, transB=1)
        assert isinstance(weights.embed, QuantWeight)
        return self.nbits(x, weights.embed, self.embed_inits)


def attention_bias(w: GraphWriter, form: str, window: int | None = None) -> str:
    """Additive attention bias from ``attention_mask`` (padding) and causality within the new block.

    Every cached key is visible to every new query (the cache only holds earlier tokens, whatever their
    positions after eviction); new keys are causal. With ``window``, a query sees only the last ``window``
    slots up to its own (sliding-window layers; slots, so rows are left-padded). Shape ``[B, 1, T, S]`` for
    the ONNX ``Attention`` op (``form="op"``), ``[B, T, 1, 1, S]`` for the plain form. Finite (-1e9) so a
    fully padded row stays a valid softmax.
    """
    t = w.op("Shape", "input_ids", start=1, end=2)
    s = w.op("Shape", "attention_mask", start=1, end=2)
    zero, one = w.const(0), w.const(1)
    kv_idx = w.op("Range", zero, w.op("Squeeze", s, w.const([0])), one)  # [S]
    q_idx = w.op("Add", w.op("Range", zero, w.op("Squeeze", t, w.const([0])), one),
                 w.op("Squeeze", w.op("Sub", s, t), w.const([0])))  # [T] slots of the new tokens
    kv_row, q_col = w.op("Unsqueeze", kv_idx, w.const([0])), w.op("Unsqueeze", q_idx, w.const([1]))
    causal = w.op("LessOrEqual", kv_row, q_col)
    if window:
        causal = w.op("And", causal, w.op("Greater", kv_row, w.op("Sub", q_col, w.const(window))))
    pad = w.op("Cast", "attention_mask", to=9)
    if form == "op":
        allowed = w.op("And", causal, w.op("Unsqueeze", pad, w.const([1, 2])))  # [B, 1, T, S]
    else:
        allowed = w.op("And", w.op("Unsqueeze", causal, w.const([1, 2])), w.op("Unsqueeze", pad, w.const([1, 2, 3])))
    return w.op("Where", allowed, w.const(0.0, np.float32), w.const(NEG_INF_BIAS, np.float32))


def rope_attention(w: GraphWriter, q: str, k: str, v: str, positions: str, rope: tuple[str, str], bias: str,
                   past_k: str, past_v: str, outputs: tuple[str, str, str], *, heads: int, kv_heads: int,
                   scale: float, interleaved: int = 0, **attrs: Any) -> str:
    """RoPE on ``q`` and ``k`` (``[B, T, n*d]``, ``com.microsoft.RotaryEmbedding`` from ``positions`` and the
    cos/sin tables), then the ONNX ``Attention`` op (opset 23) over past + new keys with the additive
    ``bias``; ``outputs`` names (context ``[B, T, heads*d]``, present key, present value). Returns the
    context's name; ``attrs`` go to ``Attention`` (``softcap``)."""
    q = w.op("RotaryEmbedding", q, positions, *rope, domain="com.microsoft", interleaved=interleaved)
    k = w.op("RotaryEmbedding", k, positions, *rope, domain="com.microsoft", interleaved=interleaved)
    return w.node("Attention", [q, k, v, bias, past_k, past_v], outputs=list(outputs),
                  q_num_heads=heads, kv_num_heads=kv_heads, scale=scale, **attrs)[0]
