"""Convert Llama-family models (Hugging Face safetensors folders, GGUF files) to inferos ONNX folders.

Only numpy, ``onnx``, ``gguf``, ``safetensors``-format parsing and ``tokenizers``: no torch. The output folder
(written to a temp dir and renamed into place) holds::

    model.onnx, model.onnx.data   the decoder (see inferos_cli/models/builder.py for the graph and its I/O)
    config.json                   HF-style architecture facts
    tokenizer.json, tokenizer_config.json (add_bos_token, chat_template), chat_template.jinja when known
    inferos.json                  name, source, source sha256, dtype, param count, converter version and a
                                  manifest of every file's size and sha256 (checked by inferos_cli/models/resolve.py)

Supported: llama (Llama 2/3, SmolLM/SmolLM2, TinyLlama), mistral without sliding window, qwen2 (q/k/v bias).
Weights ``dtype``: fp32, fp16 (fp16 storage, cast to fp32 at load), int8 / int4 (block-32 ``MatMulNBits``).

``head_bits`` (default None: the head is stored like the other tensors) caps the width of the logits projection
only: a wider head is re-quantized from its dequantized values (4: asymmetric block-32 RTN with integer zero
points, ORT's fast ``MatMulNBits`` path; 8: symmetric absmax like Q8_0); a head already that narrow is kept. A
tied head becomes its own initializer and the embedding gather keeps its table (gathering from the 4-bit table
instead measured 1.2 % worse perplexity). Why the default keeps the head: on SmolLM2-135M (tied Q8_0 head) a
4-bit head decodes 10-14 % faster at 1 thread (0.77x -> 0.85-0.88x the OGA int4 folder) but raises wikitext-2
perplexity from 30.29 to 32.91 (+8.7 %; fp32 30.20), see benchmarks/results/smollm2-135m-convert-*-2026-11-22.json.
Decode at batch 1 is bound by the weight bytes read per token, and the lossless conversion reads more than the
OGA folder (the 8-bit head, 32 MB vs 18 MB, and the fp32 Q4_1 offsets, 13 MB): no storage choice measured here
reaches the OGA folder's speed within 1 % of fp32 perplexity.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from inferos_cli.errors import ConversionError, ModelError
from inferos_cli.models.builder import (
    BLOCK,
    DecoderSpec,
    DecoderWeights,
    LayerWeights,
    QuantWeight,
    Weight,
    build_decoder,
    quantize_rtn,
)

CONVERTER_VERSION = "3"  # 2: ReduceSum block sums, Gemm(transB) offsets; 3: GroupQueryAttention by default
DTYPES = ("fp32", "fp16", "int8", "int4")
HEAD_BITS = (4, 8)
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
META_FILE = "inferos.json"
ProgressFn = Callable[[str, int, int], None]


ATTENTION_OP_MIN_ORT = (1, 24)  # ONNX Attention-23 and GQA with position_ids on CPU; be conservative


def default_attention(head_dim: int = 64) -> str:
    """``"gqa"`` (onnxruntime's ``GroupQueryAttention``, what onnxruntime-genai's graphs use) when the
    installed onnxruntime is recent enough and ``head_dim`` is a multiple of 16 (the CPU kernel's
    requirement), ``"op"`` (ONNX ``Attention``, opset 23) for other head sizes, ``"plain"`` on an old
    onnxruntime.

    Measured on SmolLM2-135M Q4_1, batch 1, engine A/B in one process (2-core EPYC): against ``"op"``, GQA
    decodes 6-7 % faster (in-place past/present buffers: 130.9 vs 123.0 tok/s at a 128-token prompt, 112.2
    vs 104.7 at 512), prefills at the same speed at 128 tokens and 7 % slower at 512, and lets the fused
    int8/int4 KV caches (:mod:`inferos_cli.kv.fused`) apply."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "plain"
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


# ------------------------------------------------------------------------------------------------ hashing
def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks (large files never sit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def build_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative name: {size, sha256}}`` for every file of ``folder`` except ``inferos.json``."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == META_FILE:
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def check_manifest(folder: Path, *, deep: bool = False) -> list[str]:
    """Problems of a converted folder against its manifest (sizes always, hashes when ``deep``); [] when sound."""
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{meta_path.name} is missing or unreadable"]
    problems = []
    for rel, entry in files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != entry.get("size"):
            problems.append(f"{rel} has {path.stat().st_size} bytes, the manifest says {entry.get('size')}")
        elif deep and sha256_file(path) != entry.get("sha256"):
            problems.append(f"{rel} does not match its sha256")
    return problems


# ------------------------------------------------------------------------------------------------ safetensors
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8}


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) safetensors checkpoint, memory-mapped; BF16 widened to fp32."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"no .safetensors file in {folder}", "pass a Hugging Face folder with model.safetensors")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(_read_one_safetensors(file))
    return tensors


def _read_one_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
    except (OSError, struct.error, ValueError) as exc:
        raise ConversionError(f"{path} is not a readable safetensors file: {exc}") from None
    size = path.stat().st_size
    raw = np.memmap(path, dtype=np.uint8, mode="r") if size > 8 + header_len else np.zeros(0, np.uint8)
    out: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ConversionError(f"{path.name}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        begin = 8 + header_len + start
        if 8 + header_len + end > size:
            raise ConversionError(f"{path} is truncated (tensor {name} runs past the end)", "download it again")
        arr = raw[begin:8 + header_len + end].view(dtype).reshape(entry["shape"])
        if entry["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr
    return out


# ------------------------------------------------------------------------------------------------ dtype
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


def store_head(weights: DecoderWeights, bits: int | None) -> DecoderWeights:
    """Cap the logits projection at ``bits`` (see the module docstring); other tensors are untouched.

    A head wider than ``bits`` (float, or 8-bit when ``bits`` is 4) is re-quantized from its dequantized values
    with :func:`quantize_rtn`; a tied head becomes a separate ``lm_head`` and ``embed`` keeps its own storage.
    A head already at most ``bits`` wide, or whose input width is not a multiple of 32, is kept as it is.
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


def param_count(weights: DecoderWeights, *, tied: bool = False) -> int:
    """Logical parameter count (tied embeddings counted once, also when ``tied`` and the head was re-stored
    as a separate initializer by :func:`store_head`)."""

    def n(w: Weight | np.ndarray | None) -> int:
        if w is None:
            return 0
        if isinstance(w, QuantWeight):
            rows, cols = w.shape
            return rows * cols
        return int(np.prod(w.shape))

    total = n(weights.embed) + (0 if tied else n(weights.lm_head)) + n(weights.final_norm)
    for layer in weights.layers:
        total += sum(n(getattr(layer, f)) for f in (
            "attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up", "down", "q_bias", "k_bias", "v_bias"))
    return total


def describe_storage(weights: DecoderWeights) -> dict[str, int]:
    """How many linear weights are stored in each form (e.g. ``{"Q4_1": 210, "fp32": 0}``)."""
    counts: dict[str, int] = {}
    items: list[Weight] = [weights.embed] + ([weights.lm_head] if weights.lm_head is not None else [])
    for layer in weights.layers:
        items += [layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down]
    for w in items:
        if isinstance(w, QuantWeight):
            key = f"{w.source}->{w.bits}bit"
        else:
            key = "fp16" if w.dtype == np.float16 else "fp32"
        counts[key] = counts.get(key, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------ HF folders
def hf_spec(cfg: dict[str, Any]) -> DecoderSpec:
    """A :class:`DecoderSpec` from a Hugging Face ``config.json``; ConversionError for unsupported ones."""
    arch = str(cfg.get("model_type", "")).lower()
    if arch not in SUPPORTED_ARCHS:
        raise ConversionError(
            f"unsupported architecture {arch or '(none)'!r}",
            f"inferos converts {', '.join(SUPPORTED_ARCHS)}; pass an ONNX folder for others",
        )
    window = cfg.get("sliding_window")
    ctx = int(cfg.get("max_position_embeddings", 2048))
    if arch == "mistral" and window and int(window) < ctx and cfg.get("use_sliding_window", True):
        raise ConversionError(f"mistral with a sliding window of {window} is not supported",
                              "use a Mistral without sliding window (v0.2+)")
    rope = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    eos = cfg.get("eos_token_id")
    return DecoderSpec(
        arch=arch,
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        context_length=ctx,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=[int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])],
        pad_token_id=cfg.get("pad_token_id"),
    )


def hf_weights(tensors: dict[str, np.ndarray], spec: DecoderSpec, dtype: str,
               progress: ProgressFn | None = None) -> DecoderWeights:
    """Map HF tensor names to :class:`DecoderWeights`, stored at ``dtype``."""

    def get(name: str) -> np.ndarray:
        try:
            return tensors[name]
        except KeyError:
            raise ConversionError(f"weight {name} is missing from the checkpoint") from None

    def opt(name: str) -> np.ndarray | None:
        return np.asarray(tensors[name], np.float32) if name in tensors else None

    def f32(name: str) -> np.ndarray:
        return np.asarray(get(name), dtype=np.float32)

    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(
            attn_norm=f32(p + "input_layernorm.weight"),
            q=store(get(p + "self_attn.q_proj.weight"), dtype),
            k=store(get(p + "self_attn.k_proj.weight"), dtype),
            v=store(get(p + "self_attn.v_proj.weight"), dtype),
            o=store(get(p + "self_attn.o_proj.weight"), dtype),
            ffn_norm=f32(p + "post_attention_layernorm.weight"),
            gate=store(get(p + "mlp.gate_proj.weight"), dtype),
            up=store(get(p + "mlp.up_proj.weight"), dtype),
            down=store(get(p + "mlp.down_proj.weight"), dtype),
            q_bias=opt(p + "self_attn.q_proj.bias"),
            k_bias=opt(p + "self_attn.k_proj.bias"),
            v_bias=opt(p + "self_attn.v_proj.bias"),
        ))
        if progress:
            progress("convert", i + 1, spec.num_layers)
    embed = get("model.embed_tokens.weight")
    head = tensors.get("lm_head.weight")
    if spec.tie_embeddings or head is None:
        lm_head = None
    else:
        lm_head = store(head, dtype)
    return DecoderWeights(store_embedding(embed, dtype), layers, f32("model.norm.weight"), lm_head)


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
    tokenizer_files = _hf_tokenizer_files(src)
    source_hash = _folder_digest(src)
    return write_model_folder(spec, weights, dst, name=name or src.name, source=str(src.resolve()),
                              source_sha256=source_hash, dtype=dtype, tokenizer_files=tokenizer_files,
                              progress=progress, attention=attention,
                              extra_meta={"head_bits": head_bits, **(extra_meta or {})},
                              accuracy_level=accuracy_level if accuracy_level is not None
                              else 4 if dtype in ("int4", "int8") else 0)


def _folder_digest(folder: Path) -> str:
    """sha256 over the sorted (name, sha256) pairs of a source folder's files."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode("utf-8"))
        digest.update(sha256_file(path).encode("ascii"))
    return digest.hexdigest()


def _hf_tokenizer_files(src: Path) -> dict[str, str | bytes]:
    """Tokenizer files to copy from an HF folder (``tokenizer.json`` is required)."""
    if not (src / "tokenizer.json").is_file():
        raise ConversionError(f"{src} has no tokenizer.json", "inferos needs the fast-tokenizer file tokenizer.json")
    files: dict[str, str | bytes] = {}
    for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                  "generation_config.json"):
        if (src / fname).is_file():
            files[fname] = (src / fname).read_bytes()
    return files


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
    from inferos_cli.models.gguf import gguf_spec, gguf_weights, open_gguf
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
    weights = store_head(gguf_weights(reader, spec, arch, dtype, store, store_embedding, progress), head_bits)
    quantized = any(k.endswith("bit") for k in describe_storage(weights))
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
def hf_config(spec: DecoderSpec) -> dict[str, Any]:
    """The HF-style ``config.json`` of a converted model."""
    return {
        "architectures": ["Qwen2ForCausalLM" if spec.arch == "qwen2" else "LlamaForCausalLM"],
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
    }


def write_model_folder(spec: DecoderSpec, weights: DecoderWeights, dst: Path, *, name: str, source: str,
                       source_sha256: str | None, dtype: str, tokenizer_files: dict[str, str | bytes],
                       extra_meta: dict[str, Any] | None = None, progress: ProgressFn | None = None,
                       accuracy_level: int = 0, attention: str | None = None) -> Path:
    """Write the whole converted folder atomically (temp dir + rename) and its manifest."""
    from inferos_cli.paths import atomic_dir

    attention = attention or default_attention(spec.head_dim)
    with atomic_dir(dst) as tmp:
        if progress:
            progress("write", 0, 1)
        build_decoder(spec, weights, tmp, accuracy_level=accuracy_level, attention=attention)
        (tmp / "config.json").write_text(json.dumps(hf_config(spec), indent=2), encoding="utf-8")
        for fname, content in tokenizer_files.items():
            target = tmp / fname
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        _finish_tokenizer_config(tmp, spec)
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


def _finish_tokenizer_config(folder: Path, spec: DecoderSpec) -> None:
    """Make sure ``tokenizer_config.json`` states add_bos_token and carries the chat template."""
    path = folder / "tokenizer_config.json"
    cfg: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    template_file = folder / "chat_template.jinja"
    if "chat_template" not in cfg and template_file.is_file():
        cfg["chat_template"] = template_file.read_text(encoding="utf-8")
    elif isinstance(cfg.get("chat_template"), str) and not template_file.is_file():
        template_file.write_text(cfg["chat_template"], encoding="utf-8")
    cfg.setdefault("add_bos_token", spec.bos_token_id is not None and spec.arch != "qwen2")
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


def remove_tree(path: Path) -> None:
    """Remove a converted folder (used to drop a corrupted cache entry)."""
    shutil.rmtree(path, ignore_errors=True)
