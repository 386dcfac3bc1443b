"""The served model and its engines (the model provider): one engine per policy, built on first use and
kept in a small LRU, so a policy change or the baseline toggle costs one engine build and switching
back costs nothing."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable

from inferos_cli.settings import Policy, Resolved

if TYPE_CHECKING:  # pragma: no cover
    from inferos_cli.models.info import ModelInfo

#: Engines kept at once (the current policy, the baseline and one more).
KEEP_ENGINES = 3

EngineFactory = Callable[["ModelInfo", Policy], Any]


def policy_key(policy: Policy) -> str:
    """A stable key of a policy for the engine cache."""
    return json.dumps(policy.model_dump(mode="json"), sort_keys=True)


def default_engine_factory(
    threads: int | None = None,
    strict_devices: bool = False,
    telemetry: Callable[[], dict[str, float | None]] | None = None,
) -> EngineFactory:
    """Build an :class:`~inferos_cli.engine.engine.Engine` for a model and a policy."""

    def build(info: "ModelInfo", policy: Policy) -> Any:
        from inferos_cli.engine.engine import Engine
        from inferos_cli.engine.sessions import default_threads

        # serve batches concurrent requests: batched decode wants every core (see default_threads)
        return Engine(info, Resolved(policy=policy), threads=threads or default_threads(batched=True),
                      strict_devices=strict_devices, telemetry=telemetry)

    return build


class EngineProvider:
    """The served model's engines by policy (at most ``keep``, least recently built goes first).

    ``on_evict(key)`` runs (under ``lock``) when an engine leaves the cache, so the service can retire
    whatever it built on that engine. ``lock`` is the service's lock: engine and batcher bookkeeping
    change together."""

    def __init__(self, info: "ModelInfo", factory: EngineFactory, *, lock: threading.RLock | None = None,
                 on_evict: Callable[[str], None] | None = None, keep: int = KEEP_ENGINES) -> None:
        self.info = info
        self._factory = factory
        self._lock = lock or threading.RLock()
        self._on_evict = on_evict
        self._keep = max(1, keep)
        self._engines: OrderedDict[str, Any] = OrderedDict()

    def get(self, policy: Policy) -> Any:
        """The engine for ``policy``, built once."""
        key = policy_key(policy)
        with self._lock:
            eng = self._engines.get(key)
            if eng is None:
                eng = self._factory(self.info, policy)
                if len(self._engines) >= self._keep:
                    oldest, _ = self._engines.popitem(last=False)
                    if self._on_evict is not None:
                        self._on_evict(oldest)
                self._engines[key] = eng
            return eng

    def swap(self, info: "ModelInfo") -> None:
        """Serve another model: every engine of the old one is dropped."""
        with self._lock:
            self.info = info
            self._engines.clear()
