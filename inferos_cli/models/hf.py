"""Read a Hugging Face safetensors folder into a :class:`DecoderSpec` and :class:`DecoderWeights` (no torch).

Each tensor is read from the safetensors files when it is needed (BF16 widened to fp32) and the layers are
produced one at a time as the builder writes them (:class:`~inferos_cli.models.weights.LazyLayers`), so a
conversion holds about one layer whatever the model size; ``config.json`` gives the spec; weights are stored
at the requested dtype. Family differences in the checkpoint layout are resolved
here: phi3's fused ``qkv_proj`` / ``gate_up_proj`` are split into rows, Gemma's ``(1 + w)`` norm gains get
their 1 added (the graph uses plain gains, as llama.cpp's GGUF files store them). The GGUF counterpart is :mod:`inferos_cli.models.gguf`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from inferos_cli.errors import ConversionError
from inferos_cli.models.builders import BUILDERS
from inferos_cli.models.reading import ProgressFn, ReadProgress, read_at
from inferos_cli.models.weights import DecoderSpec, DecoderWeights, LayerWeights, LazyLayers, store, store_embedding

SUPPORTED_ARCHS = tuple(BUILDERS)  # llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3 (text: gemma3_text)
_GEMMA = ("gemma2", "gemma3")

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8}


class SafetensorsTensors(ReadProgress, Mapping[str, np.ndarray]):
    """The tensors of a (possibly sharded) safetensors checkpoint by name, each read with a plain file read
    when asked for (BF16 widened to fp32) into a fresh array freed with the weight made from it, so a
    conversion never keeps the checkpoint resident; the bytes read so far of all tensor bytes go to
    ``progress`` as the ``"convert"`` stage."""

    def __init__(self, files: list[Path]) -> None:
        self.entries: dict[str, tuple[Path, int, str, tuple[int, ...], int]] = {}
        for path in files:
            self.entries.update(_safetensors_header(path))
        super().__init__(sum(entry[4] for entry in self.entries.values()))

    def __getitem__(self, name: str) -> np.ndarray:
        path, offset, kind, shape, nbytes = self.entries[name]
        raw = np.empty(nbytes, np.uint8)
        read_at(path, offset, raw, name)
        self.report(nbytes)
        arr = raw.view(_ST_DTYPES[kind]).reshape(shape)
        return (arr.astype(np.uint32) << 16).view(np.float32) if kind == "BF16" else arr

    def __contains__(self, name: object) -> bool:  # without reading the tensor (Mapping's default reads it)
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def read_safetensors(folder: Path) -> SafetensorsTensors:
    """All tensors of a (possibly sharded) safetensors checkpoint, read on access; BF16 widened to fp32."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"no .safetensors file in {folder}", "pass a Hugging Face folder with model.safetensors")
    return SafetensorsTensors(files)


def _safetensors_header(path: Path) -> dict[str, tuple[Path, int, str, tuple[int, ...], int]]:
    """``{name: (path, absolute offset, dtype, shape, bytes)}`` of one safetensors file."""
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
    except (OSError, struct.error, ValueError) as exc:
        raise ConversionError(f"{path} is not a readable safetensors file: {exc}") from None
    size = path.stat().st_size
    out: dict[str, tuple[Path, int, str, tuple[int, ...], int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _ST_DTYPES:
            raise ConversionError(f"{path.name}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        if 8 + header_len + end > size:
            raise ConversionError(f"{path} is truncated (tensor {name} runs past the end)", "download it again")
        out[name] = (path, 8 + header_len + start, entry["dtype"], tuple(entry["shape"]), end - start)
    return out


def hf_spec(cfg: dict[str, Any]) -> DecoderSpec:
    """A :class:`DecoderSpec` from a Hugging Face ``config.json``; ConversionError for unsupported ones."""
    arch = str(cfg.get("model_type", "")).lower()
    arch = "gemma3" if arch == "gemma3_text" else arch
    if arch == "gemma3" and "text_config" in cfg:
        raise ConversionError("multimodal gemma3 checkpoints are not supported",
                              "use a text-only Gemma 3 (model_type gemma3_text: 270m, 1b) or its GGUF file")
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
    if arch == "phi3":
        if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ConversionError("partial rotary embeddings are not supported", "use a phi3 model with full rotary")
        if scaling and (scaling.get("rope_type") or scaling.get("type")) in ("longrope", "su"):
            scaling = {"rope_type": "longrope", "short_factor": scaling["short_factor"],
                       "long_factor": scaling["long_factor"], "attention_factor": scaling.get("attention_factor"),
                       "original_max_position_embeddings": int(cfg["original_max_position_embeddings"])}
    spec = DecoderSpec(
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
    if arch in _GEMMA:
        period = 2 if arch == "gemma2" else int(cfg.get("sliding_window_pattern", 6))
        spec.sliding_window = int(window) if window else None
        spec.layer_types = list(cfg.get("layer_types") or [
            "sliding_attention" if (i + 1) % period else "full_attention" for i in range(spec.num_layers)])
        spec.rope_local_theta = float(cfg.get("rope_local_base_freq", 10000.0)) if arch == "gemma3" else None
        spec.query_pre_attn_scalar = float(cfg.get("query_pre_attn_scalar") or spec.head_dim)
        spec.attn_softcap = cfg.get("attn_logit_softcapping") or None
        spec.final_softcap = cfg.get("final_logit_softcapping") or None
        spec.tie_embeddings = bool(cfg.get("tie_word_embeddings", True))
    return spec


def _split(w: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """A row-stacked HF weight (phi3's qkv_proj / gate_up_proj) cut into its parts."""
    return np.split(np.asarray(w), np.cumsum(sizes)[:-1], axis=0)


def hf_weights(tensors: Mapping[str, np.ndarray], spec: DecoderSpec, dtype: str,
               progress: ProgressFn | None = None) -> DecoderWeights:
    """Map HF tensor names to :class:`DecoderWeights`, stored at ``dtype``; the layers are read when the
    builder asks for each. ``progress`` gets the bytes read from a :class:`SafetensorsTensors`."""
    if isinstance(tensors, SafetensorsTensors):
        tensors.progress = progress

    def get(name: str) -> np.ndarray:
        try:
            return tensors[name]
        except KeyError:
            raise ConversionError(f"weight {name} is missing from the checkpoint") from None

    def opt(name: str) -> np.ndarray | None:
        return np.asarray(tensors[name], np.float32) if name in tensors else None

    def f32(name: str) -> np.ndarray:
        return np.asarray(get(name), dtype=np.float32)

    gemma = spec.arch in _GEMMA
    shift = 1.0 if gemma else 0.0  # Gemma's RMSNorm multiplies by (1 + w)

    def gain(name: str) -> np.ndarray:
        return f32(name) + shift

    def opt_gain(name: str) -> np.ndarray | None:
        return gain(name) if name in tensors else None

    q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    def layer(i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        if p + "self_attn.qkv_proj.weight" in tensors:  # phi3
            q, k, v = _split(get(p + "self_attn.qkv_proj.weight"), [q_rows, kv_rows, kv_rows])
        else:
            q, k, v = (get(p + f"self_attn.{n}_proj.weight") for n in "qkv")
        if p + "mlp.gate_up_proj.weight" in tensors:  # phi3: gate first
            gate, up = _split(get(p + "mlp.gate_up_proj.weight"), [spec.intermediate_size] * 2)
        else:
            gate, up = get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")
        weights = LayerWeights(
            attn_norm=gain(p + "input_layernorm.weight"),
            q=store(q, dtype), k=store(k, dtype), v=store(v, dtype),
            o=store(get(p + "self_attn.o_proj.weight"), dtype),
            ffn_norm=gain(p + ("pre_feedforward_layernorm.weight" if gemma else "post_attention_layernorm.weight")),
            gate=store(gate, dtype), up=store(up, dtype),
            down=store(get(p + "mlp.down_proj.weight"), dtype),
            q_bias=opt(p + "self_attn.q_proj.bias"),
            k_bias=opt(p + "self_attn.k_proj.bias"),
            v_bias=opt(p + "self_attn.v_proj.bias"),
            q_norm=opt_gain(p + "self_attn.q_norm.weight"),
            k_norm=opt_gain(p + "self_attn.k_norm.weight"),
            post_attn_norm=gain(p + "post_attention_layernorm.weight") if gemma else None,
            post_ffn_norm=gain(p + "post_feedforward_layernorm.weight") if gemma else None,
        )
        if i == spec.num_layers - 1 and isinstance(tensors, SafetensorsTensors):
            tensors.finish()
        return weights

    embed = store_embedding(get("model.embed_tokens.weight"), dtype)
    head = None if spec.tie_embeddings or "lm_head.weight" not in tensors else store(get("lm_head.weight"), dtype)
    return DecoderWeights(embed, LazyLayers(spec.num_layers, layer), gain("model.norm.weight"), head)


def hf_tokenizer_files(src: Path) -> dict[str, str | bytes]:
    """Tokenizer files to copy from an HF folder (``tokenizer.json`` is required)."""
    if not (src / "tokenizer.json").is_file():
        raise ConversionError(f"{src} has no tokenizer.json", "inferos needs the fast-tokenizer file tokenizer.json")
    files: dict[str, str | bytes] = {}
    for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                  "generation_config.json"):
        if (src / fname).is_file():
            files[fname] = (src / fname).read_bytes()
    return files
