"""Request bodies of the Lemonade/OpenAI-compatible routes and the control API (pydantic).

Unknown fields are ignored (OpenAI clients send many we do not use); values we do use are range-checked,
so a bad value is a 422 naming the field, never a 500.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_NEW_TOKENS = 8192


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    """OpenAI ``stream_options``."""

    include_usage: bool = False


class ChatMessage(_Lenient):
    """One chat message; ``content`` may be a string or OpenAI content parts (text parts are used)."""

    role: str = Field(..., min_length=1, max_length=64)
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        """The message's text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type", "text") == "text")


class Sampling(_Lenient):
    """The sampling and streaming fields chat and text completions share."""

    model: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: Optional[float] = Field(None, ge=0.0, le=5.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0, le=100_000)
    repeat_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stops(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def new_tokens(self, default: int) -> int:
        """``max_completion_tokens`` or ``max_tokens`` or the default."""
        return self.max_completion_tokens or self.max_tokens or default


class ChatRequest(Sampling):
    """``POST chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)


class CompletionRequest(Sampling):
    """``POST completions``."""

    prompt: Union[str, list[str]]
    echo: bool = False

    def prompt_text(self) -> str:
        """The single prompt (a one-element list is accepted)."""
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("exactly one prompt per request is supported")
            return self.prompt[0]
        return self.prompt


class LoadRequest(_Lenient):
    """Lemonade ``POST load``."""

    model_name: str = Field(..., min_length=1, max_length=4096)
    ctx_size: Optional[int] = Field(None, ge=16, le=10_000_000)
    llamacpp_args: Optional[str] = None


class BaselineRequest(BaseModel):
    """Control API ``POST /v1/baseline``."""

    model_config = ConfigDict(extra="forbid")
    enable: bool
