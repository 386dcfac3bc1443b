"""Backends that produce engine events: in-process ONNX Runtime, a Lemonade server, the GAIA CLI.

`run` and `bench` pick one with :func:`open_backend` and consume the same
:class:`~inferos_cli.events.Event` stream from each::

    backend = open_backend("lemonade", model="Qwen3-0.6B-GGUF", profile="chat", url=None)
    for ev in backend.generate("Tell me a story", GenerationConfig(max_tokens=64)):
        ...
    backend.close()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Protocol

from inferos_cli.errors import UsageError
from inferos_cli.events import Event

BACKENDS = ("ort", "lemonade", "gaia")


class Backend(Protocol):
    """What `run` / `bench` need from a backend."""

    name: str

    def generate(self, prompt: str, config: Any, *, chat: bool | None = None, system: str | None = None) -> Iterator[Event]:
        """Events for one prompt: ``prefill`` (first token seen), ``token``\\*, ``done``."""
        ...

    def describe(self) -> dict[str, Any]:
        """Backend, model, URL / providers: for headers and bench records."""
        ...

    def close(self) -> None:
        """Release sessions / connections."""
        ...


class EngineBackend:
    """The in-process engine as a backend (what `run` does without ``--backend``)."""

    name = "ort"

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def generate(self, prompt: str, config: Any, *, chat: bool | None = None, system: str | None = None) -> Iterator[Event]:
        """Encode with the model's chat template (when it has one) and generate."""
        ids = self.engine.encode_prompt(prompt, chat=chat, system=system)
        return self.engine.generate(ids, config)

    def describe(self) -> dict[str, Any]:
        """The engine's own description."""
        return {"backend": self.name, **self.engine.describe()}

    def close(self) -> None:
        """Nothing to release beyond garbage collection."""


def open_backend(
    name: str | None,
    *,
    model: str | None = None,
    profile: str | None = None,
    config: Path | None = None,
    flags: dict[str, Any] | None = None,
    url: str | None = None,
    threads: int | None = None,
    strict_devices: bool = False,
    gaia_exe: str | None = None,
    ctx_size: int | None = None,
) -> Backend:
    """Open backend ``name`` (``ort`` by default, ``lemonade`` or ``gaia``) with resolved settings.

    For ``lemonade`` the policy's KV settings become ``llamacpp_args`` of a llamacpp-recipe model; for
    ``gaia`` the GAIA CLI runs as a subprocess against ``url`` (a Lemonade server or ``inferos serve``)."""
    choice = (name or "ort").lower()
    if choice == "ort":
        from inferos_cli.engine.engine import Engine

        return EngineBackend(Engine.load(model=model, profile=profile, config=config, flags=flags,
                                         threads=threads, strict_devices=strict_devices, progress=True))
    from inferos_cli.profiles import resolve_settings

    resolved = resolve_settings(profile, config_path=config, flags=flags)
    if choice == "lemonade":
        from inferos_cli.backends.lemonade import LemonadeBackend

        return LemonadeBackend(model=model, policy=resolved.policy, url=url, ctx_size=ctx_size)
    if choice == "gaia":
        from inferos_cli.backends.gaia import GaiaBackend

        return GaiaBackend(model=model, url=url, exe=gaia_exe)
    raise UsageError(f"unknown backend {name!r}", f"use one of: {', '.join(BACKENDS)}")
