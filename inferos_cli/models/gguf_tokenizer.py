"""Build ``tokenizer.json`` / ``tokenizer_config.json`` / ``chat_template.jinja`` from GGUF metadata.

Two vocabularies exist in llama.cpp GGUF files:

* ``tokenizer.ggml.model == "gpt2"``: GPT-2 style byte-level BPE (tokens already in byte-level form plus
  ``merges``); the pre-tokenizer follows ``tokenizer.ggml.pre`` (smollm, llama-bpe, qwen2, gpt2 ...).
* ``"llama"``: SentencePiece BPE with scores and byte-fallback tokens ``<0xNN>``; merges are rebuilt from
  the scores the way Hugging Face's ``LlamaConverter`` does.

Control and user-defined tokens become special added tokens (``<|im_start|>`` stays one token). The BOS
convention mirrors Hugging Face folders: a ``TemplateProcessing`` post-processor adds BOS when the model wants
it, and ``tokenizer_config.json`` says ``add_bos_token``.
"""

from __future__ import annotations

import json
from typing import Any

from inferos_cli.errors import ConversionError
from inferos_cli.models.gguf import field

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str | None) -> Any:
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "smaug-bpe", "dbrx", "tekken"):
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in ("qwen2", "deepseek-llm"):
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return byte_level


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges of a SentencePiece BPE vocabulary, ranked by the merged piece's score (HF LlamaConverter)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    found: list[tuple[str, str, float]] = []
    for piece, idx in vocab.items():
        local = []
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                local.append((left, right, scores[idx]))
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: m[2], reverse=True)
    return [(a, b) for a, b, _ in found]


def build_tokenizer(reader: Any) -> Any:
    """A ``tokenizers.Tokenizer`` from the GGUF metadata of ``reader``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    kind = field(reader, "tokenizer.ggml.model")
    tokens: list[str] | None = field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ConversionError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types: list[int] = list(field(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    unk = field(reader, "tokenizer.ggml.unknown_token_id")
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges") or []]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        tok.pre_tokenizer = _pre_tokenizer(field(reader, "tokenizer.ggml.pre"))
        tok.decoder = decoders.ByteLevel()
        add_bos_default = False
    elif kind == "llama":
        scores = list(field(reader, "tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))])
        unk_token = tokens[unk] if unk is not None else next((t for t, k in zip(tokens, types) if k == UNKNOWN), None)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types), unk_token=unk_token,
                                   fuse_unk=True, byte_fallback=True))
        prefix = field(reader, "tokenizer.ggml.add_space_prefix", True)
        norms = ([normalizers.Prepend("\u2581")] if prefix else []) + [normalizers.Replace(" ", "\u2581")]
        tok.normalizer = normalizers.Sequence(norms)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
        add_bos_default = True
    else:
        raise ConversionError(f"GGUF tokenizer model {kind!r} is not supported", "use a gpt2 or llama (SentencePiece) vocabulary")
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", add_bos_default))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B", special_tokens=[(tokens[bos], bos)])
    tok.add_bos = add_bos  # type: ignore[attr-defined]
    return tok


def tokenizer_files(reader: Any, context_length: int | None = None) -> dict[str, str]:
    """The tokenizer files of a converted GGUF model, as ``{file name: text}``."""
    tok = build_tokenizer(reader)
    tokens: list[str] = field(reader, "tokenizer.ggml.tokens")

    def name(key: str) -> str | None:
        idx = field(reader, f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    template = field(reader, "tokenizer.chat_template")
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tok.add_bos,
        "add_eos_token": False,
        "bos_token": name("bos_token_id"),
        "eos_token": name("eos_token_id"),
        "unk_token": name("unknown_token_id"),
        "pad_token": name("padding_token_id"),
        "clean_up_tokenization_spaces": False,
    }
    if context_length:
        cfg["model_max_length"] = context_length
    files = {"tokenizer.json": tok.to_str(), "tokenizer_config.json": ""}
    if isinstance(template, str) and template:
        cfg["chat_template"] = template
        files["chat_template.jinja"] = template
    files["tokenizer_config.json"] = json.dumps(cfg, indent=2, ensure_ascii=False)
    return files
