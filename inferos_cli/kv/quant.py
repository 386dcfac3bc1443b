"""Group quantization of KV tensors (numpy): asymmetric int8 / int4 per token, groups along head_dim.

Layout (shared with the graph rewrite in :mod:`inferos_cli.graphs.kv_segments`, which dequantizes with one
``DequantizeLinear`` per segment):

- ``codes``: uint8, ``[..., D]`` for 8 bits, ``[..., D/2]`` for 4 bits. 4-bit codes are packed two per
  byte as *split halves*: the low nibble of byte ``j`` holds element ``j`` and the high nibble holds
  element ``j + D/2`` (unpacking in the graph is then ``Concat(And(b, 15), BitShift(b, 4))``, no
  interleave).
- ``scale``: float16, ``[..., D/group]``; rounded *up* to fp16 so the group's range always fits.
- ``zero``: uint8, ``[..., D/group]``; integer zero point (what ``DequantizeLinear`` takes).
- dequantized value ``x' = scale * (code - zero)``.

Each group's range is widened to contain 0 (``lo = min(min, 0)``, ``hi = max(max, 0)``), so the integer
zero point is always representable; then ``|x - x'| <= scale / 2`` for every element, with
``scale = (hi - lo) / (2**bits - 1)`` rounded up to fp16. Groups along head_dim of RoPE'd keys and of
values hold both signs in practice, so the widening costs (almost) nothing.

Keys may be Hadamard-rotated before quantization (:func:`hadamard`): an orthonormal ``H`` spreads
outlier channels over the group, which is what makes 4-bit keys usable (QuaRot / KVQuant).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = (8, 4)


@dataclass
class QTensor:
    """Quantized groups: codes (packed for 4 bits), per-group fp16 scales and uint8 zero points."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    group: int

    @property
    def nbytes(self) -> int:
        """Resident bytes of codes + scales + zero points."""
        return int(self.codes.nbytes + self.scale.nbytes + self.zero.nbytes)


def _check(dim: int, bits: int, group: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if group <= 0 or dim % group:
        raise ValueError(f"head_dim {dim} is not a multiple of the group size {group}")
    if bits == 4 and dim % 2:
        raise ValueError(f"4-bit packing needs an even head_dim, got {dim}")


def fp16_ceil(x: np.ndarray) -> np.ndarray:
    """``x`` (float32, >= 0) rounded up to the next float16, so ``float16 >= x`` holds exactly."""
    h = x.astype(np.float16)
    low = h.astype(np.float32) < x
    if np.any(low):
        h = np.where(low, np.nextafter(h, np.float16(np.inf)), h)
    return h


def quantize(x: np.ndarray, bits: int, group: int) -> QTensor:
    """Quantize ``x[..., D]`` per token in groups of ``group`` along the last axis (see module doc)."""
    x = np.asarray(x, dtype=np.float32)
    dim = x.shape[-1]
    _check(dim, bits, group)
    qmax = (1 << bits) - 1
    g = x.reshape(*x.shape[:-1], dim // group, group)
    lo = np.minimum(g.min(axis=-1), 0.0)
    hi = np.maximum(g.max(axis=-1), 0.0)
    rng = hi - lo
    scale16 = fp16_ceil(np.where(rng > 0, rng / qmax, 1.0).astype(np.float32))
    scale = scale16.astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, qmax)
    codes = np.clip(np.rint(g / scale[..., None]) + zero[..., None], 0, qmax).astype(np.uint8)
    codes = codes.reshape(x.shape)
    if bits == 4:
        codes = pack4(codes)
    return QTensor(codes=codes, scale=scale16, zero=zero.astype(np.uint8), bits=bits, group=group)


def dequantize(q: QTensor, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """The float values a quantized tensor stands for (what the rewritten graph computes)."""
    codes = unpack4(q.codes) if q.bits == 4 else q.codes
    dim = codes.shape[-1]
    g = codes.reshape(*codes.shape[:-1], dim // q.group, q.group).astype(np.float32)
    out = (g - q.zero[..., None].astype(np.float32)) * q.scale[..., None].astype(np.float32)
    return out.reshape(codes.shape).astype(dtype)


def error_bound(q: QTensor) -> np.ndarray:
    """Per-element worst-case absolute error of :func:`quantize` (half a step of each group), ``[..., D]``."""
    dim = q.codes.shape[-1] * (2 if q.bits == 4 else 1)
    half = q.scale.astype(np.float32) / 2
    return np.repeat(half, q.group, axis=-1).reshape(*q.scale.shape[:-1], dim)


def pack4(codes: np.ndarray) -> np.ndarray:
    """uint8 codes 0..15 ``[..., D]`` -> ``[..., D/2]``: low nibble element j, high nibble element j+D/2."""
    half = codes.shape[-1] // 2
    return (codes[..., :half] | (codes[..., half:] << 4)).astype(np.uint8)


def unpack4(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack4`."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.uint8)


def nbytes_per_token(head_dim: int, bits: int, group: int) -> int:
    """Bytes one (token, head) row of one of K or V takes in a tier: codes + fp16 scales + uint8 zeros."""
    groups = head_dim // group
    return (head_dim * bits) // 8 + groups * 2 + groups
