"""The orthonormal Hadamard rotation of keys before 4-bit quantization: the KV rewrite applies it inside the
graph (:mod:`inferos_cli.graphs.kv_segments`) and the segmented cache on the host (:mod:`inferos_cli.kv.segmented`).
Rotating spreads outlier channels over the whole head, so one group scale fits them all; norms are unchanged."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def _hadamard(dim: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < dim:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(dim)).astype(np.float32)


def hadamard(dim: int) -> np.ndarray:
    """The orthonormal Sylvester-Hadamard matrix of size ``dim`` (a power of two): ``H @ H.T = I``."""
    if dim <= 0 or dim & (dim - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {dim}")
    return _hadamard(dim).copy()


def can_rotate(dim: int) -> bool:
    """True when :func:`hadamard` exists for this head_dim."""
    return dim > 0 and not dim & (dim - 1)
