"""Backends outside this process that produce engine events: a Lemonade server and the GAIA CLI.

`run --backend lemonade|gaia` opens one with :func:`open_backend` and consumes the same
:class:`~inferos_cli.events.Event` stream the in-process engine yields::

    backend = open_backend("lemonade", model="Qwen3-0.6B-GGUF", policy=resolved.policy, url=None)
    for ev in backend.generate("Tell me a story", GenerationConfig(max_tokens=64)):
        ...
    backend.close()

Settings are resolved by the command; a backend takes the resolved policy.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

from inferos_cli.errors import UsageError
from inferos_cli.events import Event

BACKENDS = ("lemonade", "gaia")


class Backend(Protocol):
    """What `run` needs from a backend."""

    name: str

    def generate(self, prompt: str, config: Any, *, chat: bool | None = None, system: str | None = None) -> Iterator[Event]:
        """Events for one prompt: ``prefill`` (first token seen), ``token``\\*, ``done``."""
        ...

    def describe(self) -> dict[str, Any]:
        """Backend, model, URL / providers: for headers and records."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def open_backend(
    name: str,
    *,
    model: str | None = None,
    policy: Any = None,
    url: str | None = None,
    gaia_exe: str | None = None,
    ctx_size: int | None = None,
) -> Backend:
    """Open backend ``name`` (``lemonade`` or ``gaia``).

    For ``lemonade`` the resolved ``policy``'s KV settings become ``llamacpp_args`` of a llamacpp-recipe model;
    for ``gaia`` the GAIA CLI runs as a subprocess against ``url`` (a Lemonade server or ``inferos serve``)."""
    choice = (name or "").lower()
    if choice == "lemonade":
        from inferos_cli.backends.lemonade import LemonadeBackend

        return LemonadeBackend(model=model, policy=policy, url=url, ctx_size=ctx_size)
    if choice == "gaia":
        from inferos_cli.backends.gaia import GaiaBackend

        return GaiaBackend(model=model, url=url, exe=gaia_exe)
    raise UsageError(f"unknown backend {name!r}", f"use one of: {', '.join(BACKENDS)} (or ort, the in-process engine)")
