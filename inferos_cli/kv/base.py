"""The interface between the engine's decode loop and any KV cache (plain or segmented).

The engine never touches cache arrays itself: before each ONNX Runtime run it asks the cache for its
``feeds`` (past inputs and, for rewritten graphs, segment inputs) and for the ``attention_mask`` columns
that describe the past in feed order; after the run it hands the cache the session outputs with
:meth:`KVCache.append`. Positions are the engine's business: it keeps each row's true length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from inferos_cli.events import KVStats


class KVBackend(Protocol):
    """A graph plus the cache type that feeds it: the original graph with a plain cache (baseline), or
    the KV-boundary-rewritten graph with the segmented cache."""

    @property
    def onnx_path(self) -> Path:
        """The ONNX file the sessions load."""
        ...

    def new_cache(self, batch: int) -> "KVCache":
        """An empty cache for ``batch`` rows."""
        ...

    def describe(self) -> str:
        """One line for tables: e.g. ``plain fp32`` or ``int4 k-rotated, window 64, 4 sinks``."""
        ...


class KVCache(Protocol):
    """What the decode loop needs from a cache of ``batch`` rows."""

    @property
    def batch(self) -> int:
        """Rows in the cache (sequences decoded together)."""
        ...

    @property
    def past_len(self) -> int:
        """Columns of past the next run sees (padding and all segments included)."""
        ...

    def feeds(self) -> dict[str, np.ndarray]:
        """Graph inputs that carry the past for the next run, keyed by input name."""
        ...

    def past_mask(self) -> np.ndarray:
        """int64 ``[batch, past_len]``: 1 where a past column is a real token, 0 for padding/evicted."""
        ...

    def append(self, outputs: dict[str, np.ndarray], n_new: int, new_mask: np.ndarray) -> None:
        """Take this step's ``present.*`` outputs (``n_new`` new columns, their validity ``new_mask``)."""
        ...

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these rows (finished sequences retire)."""
        ...

    def merge(self, other: "KVCache") -> None:
        """Append ``other``'s rows (new sequences admitted between steps), padding the shorter past with
        masked columns so both parts share one ``past_len``."""
        ...

    def stats(self) -> KVStats:
        """Tokens and resident bytes per tier right now."""
        ...
