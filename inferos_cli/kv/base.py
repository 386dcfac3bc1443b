"""The interface between the engine's step and any KV cache (plain, fused, segmented), and between the
plan and a KV layout (the graph a cache feeds plus the cache type).

The engine never touches cache arrays itself: before each ONNX Runtime run it asks the cache for its
``feeds`` (past inputs and, for rewritten graphs, segment inputs) and for the ``attention_mask`` columns
that describe the past in feed order; after the run it hands the cache the session outputs with
:meth:`KVCache.append`. Positions come from :attr:`KVCache.seen_tokens` (each row's true length).

Caches that preallocate their past and let the session write the new columns in place (GQA's shared
past/present buffer) say so with :attr:`KVCache.shares_buffers` and hand those buffers out through
:meth:`KVCache.output_buffers`; every other cache keeps the defaults of the base class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np

from inferos_cli.events import KVStats


class KVCache(ABC):
    """What the engine needs from a cache of ``batch`` rows. Subclasses set :attr:`seen_tokens`."""

    seen_tokens: np.ndarray
    """int64 ``[batch]``: the true length (next position) of each row, padding and eviction excluded."""

    prefill_chunk: int | None = None
    """The longest prefill chunk (tokens) this cache asks for when the caller names none; None: the
    engine's default (:data:`inferos_cli.engine.step.AUTO_PREFILL_CHUNK`)."""

    generation: int | None = None
    """Changes whenever the shared buffers move, so the engine can keep an IOBinding between steps;
    None for caches without shared buffers."""

    @property
    @abstractmethod
    def batch(self) -> int:
        """Rows in the cache (sequences decoded together)."""

    @property
    @abstractmethod
    def past_len(self) -> int:
        """Columns of past the next run sees (padding and all segments included)."""

    @abstractmethod
    def feeds(self) -> dict[str, np.ndarray]:
        """Graph inputs that carry the past for the next run, keyed by input name."""

    @abstractmethod
    def past_mask(self) -> np.ndarray:
        """int64 ``[batch, past_len]``: 1 where a past column is a real token, 0 for padding/evicted."""

    @abstractmethod
    def append(self, outputs: dict[str, np.ndarray], n_new: int, new_mask: np.ndarray) -> None:
        """Take this step's ``present.*`` outputs (``n_new`` new columns, their validity ``new_mask``)."""

    @abstractmethod
    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows (finished sequences retire)."""

    @abstractmethod
    def merge(self, other: "KVCache") -> None:
        """Append ``other``'s rows (new sequences admitted between steps), padding the shorter past with
        masked columns so both parts share one ``past_len``; raises when this cache cannot."""

    @abstractmethod
    def stats(self) -> KVStats:
        """Tokens and resident bytes per tier right now."""

    @property
    def shares_buffers(self) -> bool:
        """True when past and present share preallocated buffers (the session writes in place)."""
        return False

    def output_buffers(self, n_new: int) -> dict[str, np.ndarray] | None:
        """Preallocated arrays the session writes ``present.*`` into (shared buffers), or None."""
        return None

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` columns per row ahead of time (no-op where growth is automatic)."""
        return None

    def local_mask(self, n_new: int) -> np.ndarray | None:
        """int64 ``[batch, local_past_len]``: the past of the sliding-window layers when the cache keeps
        only their window (:mod:`inferos_cli.kv.plain`), after making room for ``n_new`` columns; the step
        feeds it (plus the new tokens' mask) as ``local_attention_mask``. None: every layer reads the
        :meth:`past_mask` past."""
        return None


class KVLayout(ABC):
    """A graph plus the cache type that feeds it: the original graph with a plain cache (baseline), the
    fused int8 graph with its int8 cache, or the KV-boundary-rewritten graph with the segmented cache."""

    note: str = ""
    shared_buffer: bool = False
    """True when :meth:`new_cache` with a ``capacity`` preallocates shared past/present buffers."""

    @property
    @abstractmethod
    def onnx_path(self) -> Path:
        """The ONNX file the sessions load."""

    @abstractmethod
    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty cache for ``batch`` rows; ``capacity`` (columns) preallocates where the layout can."""

    @abstractmethod
    def describe(self) -> str:
        """One line for tables: e.g. ``plain float32`` or ``int4 segmented, group 32, ...``."""

    def scales(self) -> dict[str, np.ndarray] | None:
        """Static scales of a cache that holds int8 codes, by past and present name; None for float caches."""
        return None
