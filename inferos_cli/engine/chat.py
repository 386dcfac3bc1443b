"""A conversation that keeps its KV cache across turns: each turn prefills only the new tokens.

For chat models the new tokens are the text the chat template adds after what the cache already holds
(the end of the last assistant turn, the new user message, the assistant header). When a template
rewrites earlier turns (so the cached prefix no longer matches), the cache is dropped and the whole
conversation is prefilled again; ``Conversation.reprefills`` counts how often that happened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from inferos_cli.events import Event
from inferos_cli.engine.sampling import GenerationConfig

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.engine.engine import Engine


class Conversation:
    """Multi-turn generation over one cache."""

    def __init__(self, engine: "Engine", *, chat: bool | None = None, system: str | None = None) -> None:
        self.engine = engine
        self.chat = engine.tokenizer.has_chat_template if chat is None else chat
        self.system = system
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.cache: Any = None
        self._cached_text = ""  # template text the cache holds (chat mode)
        self.reprefills = 0
        self.turns = 0

    def reset(self) -> None:
        """Forget the conversation and its cache."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = None
        self._cached_text = ""

    @property
    def cached_tokens(self) -> int:
        """Tokens held by the cache."""
        if self.cache is None:
            return 0
        return int(self.cache.seen_tokens[0])

    def _new_ids(self, user: str) -> tuple[list[int], str, bool]:
        """(ids to prefill, template text the cache will hold, whether the cache must be dropped)."""
        tok = self.engine.tokenizer
        if not self.chat:
            if self.cache is None:
                return tok.encode(user), "", False
            return tok.encode("\n" + user, add_bos=False), "", False
        full = tok.apply_chat_template(self.messages + [{"role": "user", "content": user}], add_generation_prompt=True)
        if self.cache is not None and full.startswith(self._cached_text):
            return tok.encode(full[len(self._cached_text):], add_bos=False), full, False
        return tok.encode(full, add_bos=False), full, self.cache is not None

    def turn(self, user: str, config: GenerationConfig | None = None) -> Iterator[Event]:
        """Generate the reply to ``user``; events as :meth:`Engine.generate`. The reply joins the history.
        A turn that does not fit the context raises ContextOverflowError and leaves the conversation as
        it was (``reset()`` starts over)."""
        config = config or GenerationConfig()
        ids, cached_text, drop = self._new_ids(user)
        self.engine.check_context(len(ids), 0 if drop else self.cached_tokens)
        if drop:
            self.reprefills += 1
            self.cache = None
        self._cached_text = cached_text
        if self.cache is None:
            room = self.engine.info.context_length
            self.cache = self.engine.new_cache(1, capacity=min(room, len(ids) + config.max_tokens + 1))
        reply: list[str] = []
        try:
            for ev in self.engine.generate(ids, config, cache=self.cache):
                if ev.kind == "done":
                    reply = [ev.extra.get("output_text", "".join(reply))]
                elif ev.text:
                    reply.append(ev.text)
                yield ev
        finally:
            text = "".join(reply)
            self.turns += 1
            self.messages.append({"role": "user", "content": user})
            self.messages.append({"role": "assistant", "content": text})
            if self.chat:
                # what the cache holds now: the prompt text plus the reply's tokens (not the EOS id)
                self._cached_text += text
            # an interrupted reply is recorded as far as it got: the cache holds exactly those tokens
