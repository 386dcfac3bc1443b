"""Architecture facts of a ready-to-run ONNX decoder folder, read from its files (never guessed).

A folder is one of: an onnxruntime-genai / Lemonade folder (``genai_config.json``), an optimum /
transformers.js export (``config.json`` beside ``model.onnx`` or ``onnx/model.onnx``), or a folder that
inferos converted itself (``inferos.json`` + ``config.json``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inferos_cli.errors import ModelError
from inferos_cli.models.params import size_class

_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16"}
LOCAL_MASK = "local_attention_mask"
"""Optional input of inferos' GQA graphs with sliding-window layers: those layers' own row lengths, so their
caches may hold only the window (:mod:`inferos_cli.models.builders.base`, :mod:`inferos_cli.kv.plain`)."""


@dataclass
class ModelInfo:
    """Everything the engine, the KV rewrite and the profiles need to know about a decoder."""

    name: str
    path: Path
    onnx_path: Path
    source_format: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    param_count: int | None
    tokenizer_path: Path | None
    chat_template: str | None
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    past_key_fmt: str = "past_key_values.%d.key"
    past_value_fmt: str = "past_key_values.%d.value"
    present_key_fmt: str = "present.%d.key"
    present_value_fmt: str = "present.%d.value"
    kv_dtype: str = "float32"
    uses_gqa_op: bool = False
    add_bos: bool = True
    kv_windows: list[int] = field(default_factory=list)
    """Per layer: the sliding window (keys a query sees, its own included) of a layer whose cache may keep
    only its last ``window - 1`` tokens (the graph takes :data:`LOCAL_MASK`), 0 for full-context layers;
    empty when no layer can."""

    @property
    def windowed_layers(self) -> list[int]:
        """The layers whose cache may keep only their window (:attr:`kv_windows` > 1)."""
        return [i for i, w in enumerate(self.kv_windows) if w > 1]

    @property
    def has_position_ids(self) -> bool:
        """True when the graph takes explicit ``position_ids`` (needed for eviction and true positions)."""
        return "position_ids" in self.input_names

    @property
    def size_class(self) -> str | None:
        """The size-class profile name for this model's parameter count."""
        return size_class(self.param_count)

    def to_json(self) -> dict[str, Any]:
        """Plain data for `inferos models --format json` and bench host records."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["onnx_path"] = str(self.onnx_path)
        data["tokenizer_path"] = str(self.tokenizer_path) if self.tokenizer_path else None
        data["has_position_ids"] = self.has_position_ids
        data["size_class"] = self.size_class
        data.pop("chat_template", None)
        return data


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def find_onnx(folder: Path) -> Path | None:
    """The decoder ONNX file of a folder: ``model.onnx``, ``decoder_model_merged.onnx``, ``onnx/...``."""
    for rel in ("model.onnx", "decoder_model_merged.onnx", "onnx/model.onnx", "onnx/decoder_model_merged.onnx"):
        if (folder / rel).is_file():
            return folder / rel
    found = sorted(folder.glob("*.onnx"))
    return found[0] if len(found) == 1 else None


def count_params(model: Any) -> int:
    """Parameter count of a loaded ONNX graph (without external data): initializer elements, with
    ``MatMulNBits`` weights counted by their logical ``N*K`` and tied embeddings counted once."""
    import numpy as np

    nbits_weights: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: a.i for a in node.attribute}
            if node.op_type == "MatMulNBits":
                nbits_weights[node.input[1]] = attrs.get("N", 0) * attrs.get("K", 0)
    skip = {n for node in model.graph.node if node.op_type in ("MatMulNBits", "GatherBlockQuantized")
            for n in node.input[2:]}
    total = 0
    for init in model.graph.initializer:
        if init.name in nbits_weights:
            total += nbits_weights[init.name]
        elif init.name in skip:
            continue
        else:
            n = int(np.prod(init.dims)) if len(init.dims) else 1
            if init.data_type in (2, 3) and any(  # uint8/int8 packed 4-bit: 2 values per byte
                node.op_type == "GatherBlockQuantized" and node.input[0] == init.name for node in model.graph.node
            ):
                n *= 2
            total += n
    return total


def inspect_folder(folder: Path, name: str | None = None) -> ModelInfo:
    """Read a ready ONNX decoder folder into :class:`ModelInfo`; a one-line ModelError otherwise."""
    import onnx

    folder = Path(folder)
    onnx_path = find_onnx(folder)
    if onnx_path is None:
        raise ModelError(f"no decoder .onnx file in {folder}", "pass a folder with model.onnx or a .gguf file")
    try:
        graph = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelError(f"{onnx_path} is not a readable ONNX model: {exc}") from None
    inputs = [i.name for i in graph.graph.input]
    outputs = [o.name for o in graph.graph.output]
    past = next((i for i in graph.graph.input if i.name.startswith("past_key_values.")), None)
    kv_dtype = _ONNX_DTYPES.get(past.type.tensor_type.elem_type, "float32") if past is not None else "float32"
    uses_gqa = any(n.op_type == "GroupQueryAttention" for n in graph.graph.node)
    num_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))

    genai = folder / "genai_config.json"
    hf = folder / "config.json"
    meta = folder / "inferos.json"
    tokenizer_cfg = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    chat_template: str | None = None
    if (folder / "chat_template.jinja").is_file():
        chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(tokenizer_cfg.get("chat_template"), str):
        chat_template = tokenizer_cfg["chat_template"]

    if genai.is_file():
        cfg = _read_json(genai)["model"]
        dec = cfg["decoder"]
        source, arch = "oga", cfg.get("type", "llama")
        heads, kv_heads, head_dim = dec["num_attention_heads"], dec["num_key_value_heads"], dec["head_size"]
        hidden, layers = dec["hidden_size"], dec["num_hidden_layers"]
        vocab, ctx = cfg["vocab_size"], cfg.get("context_length", 2048)
        bos, eos, pad = cfg.get("bos_token_id"), _as_list(cfg.get("eos_token_id")), cfg.get("pad_token_id")
        names_in, names_out = dec.get("inputs", {}), dec.get("outputs", {})
        fmts = (
            names_in.get("past_key_names", "past_key_values.%d.key"),
            names_in.get("past_value_names", "past_key_values.%d.value"),
            names_out.get("present_key_names", "present.%d.key"),
            names_out.get("present_value_names", "present.%d.value"),
        )
    elif hf.is_file():
        cfg = _read_json(hf)
        source = "inferos" if meta.is_file() else "optimum"
        arch = cfg.get("model_type", "llama")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads", heads)
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // heads
        layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
        ctx = cfg.get("max_position_embeddings", 2048)
        bos, eos, pad = cfg.get("bos_token_id"), _as_list(cfg.get("eos_token_id")), cfg.get("pad_token_id")
        fmts = ("past_key_values.%d.key", "past_key_values.%d.value", "present.%d.key", "present.%d.value")
    else:
        raise ModelError(
            f"{folder} has neither genai_config.json nor config.json",
            "use an onnxruntime-genai, optimum or inferos-converted folder",
        )
    if num_layers and num_layers != layers:
        raise ModelError(f"{onnx_path} has {num_layers} past inputs but the config says {layers} layers")
    extra: dict[str, Any] = _read_json(meta) if meta.is_file() else {}
    tokenizer = folder / "tokenizer.json"
    windows: list[int] = []
    if LOCAL_MASK in inputs:  # the window of each layer's GroupQueryAttention, found by its past input
        layer_of = {fmts[0] % i: i for i in range(layers)}
        windows = [0] * layers
        for node in graph.graph.node:
            if node.op_type == "GroupQueryAttention" and len(node.input) > 3 and node.input[3] in layer_of:
                size = next((a.i for a in node.attribute if a.name == "local_window_size"), -1)
                windows[layer_of[node.input[3]]] = max(0, int(size))
    return ModelInfo(
        name=name or extra.get("name") or folder.name,
        path=folder,
        onnx_path=onnx_path,
        source_format=source,
        architecture=arch,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=vocab,
        context_length=int(ctx),
        bos_token_id=bos,
        eos_token_ids=eos,
        pad_token_id=pad,
        param_count=extra.get("param_count") or count_params(graph),
        tokenizer_path=tokenizer if tokenizer.is_file() else None,
        chat_template=chat_template,
        input_names=inputs,
        output_names=outputs,
        past_key_fmt=fmts[0],
        past_value_fmt=fmts[1],
        present_key_fmt=fmts[2],
        present_value_fmt=fmts[3],
        kv_dtype=kv_dtype,
        uses_gqa_op=uses_gqa,
        add_bos=bool(tokenizer_cfg.get("add_bos_token", source != "oga")),
        kv_windows=windows if any(windows) else [],
    )
