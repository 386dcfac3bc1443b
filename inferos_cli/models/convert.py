"""Convert Llama-family models (Hugging Face safetensors folders, GGUF files) to inferos ONNX folders.

Only numpy, ``onnx``, ``gguf``, ``safetensors``-format parsing and ``tokenizers``: no torch. The readers
(:mod:`~inferos_cli.models.hf`, :mod:`~inferos_cli.models.gguf`) give a spec and weights, the builders
(:mod:`~inferos_cli.models.builders`) write the graph. The output folder (written to a temp dir and renamed
into place) holds::

    model.onnx, model.onnx.data   the decoder (see inferos_cli/models/builders/base.py for the graph and its I/O)
    config.json                   HF-style architecture facts
    tokenizer.json, tokenizer_config.json (add_bos_token, chat_template), chat_template.jinja when known
    inferos.json                  name, source, source sha256, dtype, param count, converter version and a
                                  manifest of every file's size and sha256 (inferos_cli/models/manifest.py)

Supported: llama (Llama 2/3 with ``llama3`` RoPE scaling, SmolLM/SmolLM2, TinyLlama), mistral without sliding
window, qwen2 (q/k/v bias), qwen3 (q/k RMSNorm), phi3 (fused qkv and gate/up, long-RoPE), gemma2 (soft-capping)
and gemma3 (sliding-window local layers, q/k norms), one builder each under :mod:`~inferos_cli.models.builders`.
Weights ``dtype``: fp32, fp16 (fp16 storage, cast to fp32 at load), int8 / int4 (block-32 ``MatMulNBits``).

``head_bits`` (default None: the head is stored like the other tensors) caps the width of the logits projection
only (:func:`~inferos_cli.models.weights.store_head`). The default keeps the head: a 4-bit head decodes faster
at batch 1, where decode is bound by the weight bytes read per token, but costs perplexity (figures in
benchmarks/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inferos_cli.errors import ConversionError, ModelError
from inferos_cli.models.builders import build_decoder
from inferos_cli.models.hf import hf_spec, hf_tokenizer_files, hf_weights, read_safetensors
from inferos_cli.models.reading import ProgressFn
from inferos_cli.models.manifest import META_FILE, build_manifest, folder_digest, sha256_file
from inferos_cli.models.weights import (
    DecoderSpec,
    DecoderWeights,
    QuantWeight,
    describe_storage,
    param_count,
    store,
    store_embedding,
    store_head,
)

CONVERTER_VERSION = "6"  # 2: block sums, Gemm offsets; 3: GroupQueryAttention; 4: K-quants kept low-bit, builders;
# 5: local_attention_mask (bounded sliding-window caches); 6: K-quant offsets and 16-wide scales as their factors
DTYPES = ("fp32", "fp16", "int8", "int4")
HEAD_BITS = (4, 8)
ATTENTION_OP_MIN_ORT = (1, 24)  # ONNX Attention-23 and GQA with position_ids on CPU; be conservative


def default_attention(head_dim: int = 64) -> str:
    """``"gqa"`` (onnxruntime's ``GroupQueryAttention``, what onnxruntime-genai's graphs use) when the
    installed onnxruntime is recent enough and ``head_dim`` is a multiple of 16 (the CPU kernel's
    requirement), ``"op"`` (ONNX ``Attention``, opset 23) for other head sizes, ``"plain"`` on an old
    onnxruntime. GQA is preferred: it decodes into preallocated past/present buffers in place and lets the
    fused int8/int4 KV caches (:mod:`inferos_cli.kv.fused`) apply."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("onnxruntime", "onnxruntime-directml", "onnxruntime-gpu"):
        try:
            parts = version(dist).split(".")[:2]
            recent = tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts) >= ATTENTION_OP_MIN_ORT
        except (PackageNotFoundError, ValueError):
            continue
        if not recent:
            return "plain"
        return "gqa" if head_dim % 16 == 0 else "op"
    return "plain"


# ------------------------------------------------------------------------------------------------ checks
def check_dtype(dtype: str | None, *, allow_none: bool = False) -> None:
    """Reject an unknown dtype with the list of valid ones."""
    if dtype is None and allow_none:
        return
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")


def check_head_bits(bits: int | None) -> None:
    """Reject a ``head_bits`` other than None, 4 or 8."""
    if bits is not None and bits not in HEAD_BITS:
        raise ConversionError(f"unknown head_bits {bits!r}", "use 4, 8 or leave it unset")


# ------------------------------------------------------------------------------------------------ HF folders
def convert_hf_folder(src: Path | str, dst: Path | str, dtype: str = "fp32", *, name: str | None = None,
                      attention: str | None = None, accuracy_level: int | None = None, head_bits: int | None = None,
                      extra_meta: dict[str, Any] | None = None, progress: ProgressFn | None = None) -> Path:
    """Convert a Hugging Face safetensors folder to an inferos ONNX folder at ``dst``; returns ``dst``.

    ``accuracy_level`` is MatMulNBits' compute precision for int8/int4 (default 4: int8 activations, ORT's
    fast kernel; 0: fp32 activations, exact against the dequantized weights). ``attention``: "gqa"
    (onnxruntime's GroupQueryAttention, the default), "op" (ONNX Attention, opset 23) or "plain"
    (MatMul/Softmax, opset 17). ``head_bits``: see :func:`store_head`.
    """
    src, dst = Path(src), Path(dst)
    check_dtype(dtype)
    check_head_bits(head_bits)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{src} has no config.json", "pass a Hugging Face model folder (config.json + *.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {cfg_path}: {exc}") from None
    spec = hf_spec(cfg)
    weights = store_head(hf_weights(read_safetensors(src), spec, dtype, progress), head_bits)
    tokenizer_files = hf_tokenizer_files(src)
    source_hash = folder_digest(src)
    return write_model_folder(spec, weights, dst, name=name or src.name, source=str(src.resolve()),
                              source_sha256=source_hash, dtype=dtype, tokenizer_files=tokenizer_files,
                              progress=progress, attention=attention,
                              extra_meta={"head_bits": head_bits, **(extra_meta or {})},
                              accuracy_level=accuracy_level if accuracy_level is not None
                              else 4 if dtype in ("int4", "int8") else 0)


# ------------------------------------------------------------------------------------------------ GGUF files
def convert_gguf(path: Path | str, dst: Path | str, dtype: str | None = None, *, name: str | None = None,
                 source_sha256: str | None = None, accuracy_level: int | None = None, attention: str | None = None,
                 head_bits: int | None = None, extra_meta: dict[str, Any] | None = None,
                 progress: ProgressFn | None = None) -> Path:
    """Convert a llama.cpp GGUF file to an inferos ONNX folder at ``dst``; returns ``dst``.

    ``dtype`` None keeps the file's own blocks (Q4_0/Q4_1 -> 4-bit, Q8_0 -> 8-bit ``MatMulNBits``, floats as
    they are); int4/int8 keep those blocks too and store other tensors at that width; fp32/fp16 dequantize
    everything. ``accuracy_level`` is MatMulNBits' compute precision (default 4 = int8 activations, ORT's
    fast kernel, when the model has quantized weights). ``head_bits`` caps the logits projection only (see
    :func:`store_head`; None, the default, keeps e.g. SmolLM2's tied Q8_0 head at 8 bits).
    """
    from inferos_cli.models.gguf import drop_vocab, gguf_spec, gguf_weights, has_blocks, open_gguf
    from inferos_cli.models.gguf_tokenizer import tokenizer_files

    path, dst = Path(path), Path(dst)
    check_dtype(dtype, allow_none=True)
    check_head_bits(head_bits)
    if not path.is_file():
        raise ModelError(f"{path} does not exist", "pass the path of a .gguf file")
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    spec = gguf_spec(reader, tensors)
    arch = _arch(reader)
    files = tokenizer_files(reader, spec.context_length)
    drop_vocab(reader)
    weights = store_head(gguf_weights(reader, spec, arch, dtype, store, store_embedding, progress), head_bits)
    # the layers stream during the build: whether any weight is quantized is read from the file's types
    quantized = dtype in ("int4", "int8") or (dtype is None and has_blocks(reader)) or any(
        isinstance(w, QuantWeight) for w in (weights.embed, weights.lm_head))
    level = accuracy_level if accuracy_level is not None else (4 if quantized else 0)
    return write_model_folder(
        spec, weights, dst, name=name or path.stem, source=str(path.resolve()),
        source_sha256=source_sha256 or sha256_file(path), dtype=dtype or "native", tokenizer_files=files,
        extra_meta={"gguf_file_type": _file_types(reader), "head_bits": head_bits, **(extra_meta or {})},
        progress=progress,
        accuracy_level=level, attention=attention,
    )


def _arch(reader: Any) -> str:
    from inferos_cli.models.gguf import field

    return str(field(reader, "general.architecture"))


def _file_types(reader: Any) -> dict[str, int]:
    """How many tensors of each GGML type the source file holds."""
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------ output folder
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                    "gemma3": "Gemma3ForCausalLM"}
NO_BOS_ARCHS = ("qwen2", "qwen3")  # HF's Qwen tokenizers add no BOS token


def hf_config(spec: DecoderSpec) -> dict[str, Any]:
    """The HF-style ``config.json`` of a converted model (the sliding-window and soft-capping facts only
    when the spec sets them)."""
    optional = {
        "sliding_window": spec.sliding_window,
        "layer_types": spec.layer_types,
        "rope_local_base_freq": spec.rope_local_theta,
        "query_pre_attn_scalar": spec.query_pre_attn_scalar,
        "attn_logit_softcapping": spec.attn_softcap,
        "final_logit_softcapping": spec.final_softcap,
    }
    return {
        "architectures": [HF_ARCHITECTURES.get(spec.arch, "LlamaForCausalLM")],
        "model_type": spec.arch,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "num_hidden_layers": spec.num_layers,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.context_length,
        "rms_norm_eps": spec.rms_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": spec.rope_scaling,
        "tie_word_embeddings": spec.tie_embeddings,
        "attention_bias": spec.qkv_bias,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_ids[0] if len(spec.eos_token_ids) == 1 else (spec.eos_token_ids or None),
        "pad_token_id": spec.pad_token_id,
        **{key: value for key, value in optional.items() if value is not None},
    }


def write_model_folder(spec: DecoderSpec, weights: DecoderWeights, dst: Path, *, name: str, source: str,
                       source_sha256: str | None, dtype: str, tokenizer_files: dict[str, str | bytes],
                       extra_meta: dict[str, Any] | None = None, progress: ProgressFn | None = None,
                       accuracy_level: int = 0, attention: str | None = None) -> Path:
    """Write the whole converted folder atomically (temp dir + rename) and its manifest."""
    from inferos_cli.paths import atomic_dir

    attention = attention or default_attention(spec.head_dim)
    with atomic_dir(dst) as tmp:
        build_decoder(spec, weights, tmp, accuracy_level=accuracy_level, attention=attention)
        if progress:
            progress("write", 0, 1)
        (tmp / "config.json").write_text(json.dumps(hf_config(spec), indent=2), encoding="utf-8")
        for fname, content in tokenizer_files.items():
            target = tmp / fname
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        finish_tokenizer_config(tmp, spec)
        meta = {
            "name": name,
            "source": source,
            "source_sha256": source_sha256,
            "dtype": dtype,
            "param_count": param_count(weights, tied=spec.tie_embeddings),
            "storage": describe_storage(weights),
            "converter_version": CONVERTER_VERSION,
            "architecture": spec.arch,
            "attention": attention,
            "accuracy_level": accuracy_level,
            **(extra_meta or {}),
            "files": build_manifest(tmp),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if progress:
            progress("write", 1, 1)
    return dst


def finish_tokenizer_config(folder: Path, spec: DecoderSpec) -> None:
    """Make sure ``tokenizer_config.json`` states add_bos_token and carries the chat template."""
    path = folder / "tokenizer_config.json"
    cfg: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    template_file = folder / "chat_template.jinja"
    if "chat_template" not in cfg and template_file.is_file():
        cfg["chat_template"] = template_file.read_text(encoding="utf-8")
    elif isinstance(cfg.get("chat_template"), str) and not template_file.is_file():
        template_file.write_text(cfg["chat_template"], encoding="utf-8")
    cfg.setdefault("add_bos_token", spec.bos_token_id is not None and spec.arch not in NO_BOS_ARCHS)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
