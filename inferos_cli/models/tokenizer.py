"""Tokenizer of a model folder (``tokenizer.json`` via the ``tokenizers`` package), its chat template,
and an incremental decoder that turns a stream of token ids into a stream of text without breaking
multi-byte characters or losing the leading space of SentencePiece-style tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from inferos_cli.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo

# A ChatML template for instruct models whose folder ships none but whose vocabulary has <|im_start|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """Encode / decode text for one model; knows its BOS/EOS ids and chat template."""

    def __init__(
        self,
        backend: Any,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos: bool = True,
        chat_template: str | None = None,
    ) -> None:
        self._tok = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._compiled_template: Any = None

    @classmethod
    def from_file(
        cls,
        path: Path,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        add_bos: bool = True,
        chat_template: str | None = None,
    ) -> "Tokenizer":
        """Load a ``tokenizer.json``."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception on malformed files
            raise ModelError(f"cannot read tokenizer {path}: {exc}", "re-convert or re-download the model") from None
        return cls(backend, bos_token_id=bos_token_id, eos_token_ids=eos_token_ids, add_bos=add_bos,
                   chat_template=chat_template)

    @classmethod
    def from_model(cls, info: "ModelInfo") -> "Tokenizer":
        """The tokenizer of a resolved model folder (``tokenizer.json`` beside the ONNX file)."""
        if info.tokenizer_path is None or not Path(info.tokenizer_path).is_file():
            raise ModelError(
                f"model {info.name} has no tokenizer.json in {info.path}",
                "use a folder that ships tokenizer.json (inferos-converted, optimum or onnxruntime-genai)",
            )
        return cls.from_file(
            Path(info.tokenizer_path),
            bos_token_id=info.bos_token_id,
            eos_token_ids=info.eos_token_ids,
            add_bos=info.add_bos,
            chat_template=info.chat_template,
        )

    @property
    def vocab_size(self) -> int:
        """Number of tokens the tokenizer knows (added tokens included)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, None when unknown."""
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; a BOS id is prepended when ``add_bos`` (default: the model's habit)."""
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, int(self.bos_token_id))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids`` (special tokens dropped by default)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    @property
    def has_chat_template(self) -> bool:
        """True when a chat template is known for this model."""
        return bool(self.chat_template)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``[{"role", "content"}, ...]`` with the model's Jinja chat template."""
        if not self.chat_template:
            raise ModelError("this model has no chat template", "run with --no-chat")
        if self._compiled_template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)

            def raise_exception(message: str) -> None:
                raise ModelError(f"chat template error: {message}")

            env.globals["raise_exception"] = raise_exception
            self._compiled_template = env.from_string(self.chat_template)
        bos = self._tok.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self._tok.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""
        return self._compiled_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos or "", eos_token=eos or ""
        )

    def stream(self, context: Sequence[int] = ()) -> "StreamDecoder":
        """A fresh incremental decoder; ``context`` (the last prompt ids) fixes leading spaces."""
        return StreamDecoder(self, context)


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns the text the new id completes (maybe ``""``).

    It decodes a short window ``ids[prefix:]`` and emits only what lies beyond the text of
    ``ids[prefix:read]``, holding back output that ends in an incomplete UTF-8 sequence. Seeding it with
    the prompt's last ids keeps the leading space that tokenizers strip at the start of a decode.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = [int(i) for i in list(context)[-4:]]
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one id; return newly completed text."""
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        new_text = self._tok.decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):] if new_text.startswith(prefix_text) else new_text
            self._prefix = self._read
            self._read = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete character, if any)."""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        new_text = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
