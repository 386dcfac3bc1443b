"""GGUF block formats re-expressed exactly as ``MatMulNBits`` blocks (codes, scale, optional offset).

``MatMulNBits`` computes ``scale * (code - zp)`` per block with ``zp`` = 8 (4-bit) or 128 (8-bit); a format
with a per-block minimum adds the exact float offset term :class:`~inferos_cli.models.weights.QuantWeight`
carries as ``mins``. Every form below reproduces ``gguf.quants.dequantize`` up to fp32 rounding of the sum:

========  ====================================  =============================================
GGUF      value                                 form (bits, block: code, scale, offset)
========  ====================================  =============================================
Q4_0      ``d*(q-8)``                           4, 32: ``q``, ``d``
Q4_1      ``d*q + m``                           4, 32: ``q``, ``d``, ``m + 8d``
Q8_0      ``d*q``                               8, 32: ``q+128``, ``d``
Q5_0      ``d*(q-16)``                          8, 32: ``q+112``, ``d``
Q5_1      ``d*q + m``                           8, 32: ``q+128``, ``d``, ``m``
Q4_K      ``d*sc*q - dmin*m``                   4, 32: ``q``, ``d*sc``, ``8*d*sc - dmin*m``
Q5_K      ``d*sc*q - dmin*m``                   8, 32: ``q+128``, ``d*sc``, ``-dmin*m``
Q6_K      ``d*sc*(q-32)``, 16-wide sub-blocks   8, 16: ``q+96``, ``d*sc``
Q2_K      ``d*sc*q - dmin*m``, 16-wide          4, 16: ``q+8``, ``d*sc``, ``-dmin*m``
Q3_K      ``d*(sc-32)*q``, q in -4..3, 16-wide  4, 16: ``q+8``, ``d*(sc-32)``
IQ4_NL    ``d*kvalues[i]`` (non-linear table)   8, 32: ``kvalues[i]+128``, ``d``
IQ4_XS    ``d*(sc-32)*kvalues[i]``              8, 32: ``kvalues[i]+128``, ``d*(sc-32)``
========  ====================================  =============================================

IQ4_NL / IQ4_XS have no exact 4-bit form (their 16 levels are not evenly spaced), so they take 8 bits. Other
types (IQ1/IQ2/IQ3, TQ, MXFP4, ...) have no form here: the reader dequantizes them to fp16.

Decoding is vectorized numpy over a whole tensor (``[N, K/superblock, bytes]`` views, no per-block loops).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from inferos_cli.models.weights import Factors, QuantWeight, pack_nibbles

QK_K = 256  # K-quant super-block width
CHUNK_BYTES = 4 << 20  # file bytes decoded at a time (:func:`blocks_weight`): ~8x that in temporaries
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int16)


class Codes(NamedTuple):
    """A tensor ``[N, K]`` as ``MatMulNBits`` blocks: ``scales * (codes - 2**(bits-1)) + mins`` per block."""

    bits: int
    block: int
    codes: np.ndarray  # uint8 [N, K/block, block], values < 2**bits
    scales: np.ndarray  # float32 [N, K/block]
    mins: np.ndarray | None  # float32 [N, K/block] or None
    source: str  # the GGUF type name
    factors: Factors | None = None  # K-quants: scales / mins as the file's own factors

    def values(self) -> np.ndarray:
        """The float32 ``[N, K]`` matrix, computed as ``MatMulNBits`` (+ the offset term) does."""
        n = self.codes.shape[0]
        x = (self.codes.astype(np.float32) - float(1 << (self.bits - 1))) * self.scales[..., None]
        if self.mins is not None:
            x = x + self.mins[..., None]
        return x.reshape(n, -1).astype(np.float32)


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian fp16 from two trailing bytes, widened to fp32 (exact)."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[..., m]`` bytes -> ``[..., 2m]``: all low nibbles, then all high nibbles (GGUF's element order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bit_planes(qh: np.ndarray) -> np.ndarray:
    """``[..., m]`` bytes -> ``[..., 8, m]``: plane j holds bit j of every byte."""
    return np.unpackbits(qh[..., None], axis=-1, bitorder="little").swapaxes(-1, -2)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit minimums (uint8) per super-block."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


# Each decoder takes the blocks ``[N, S, bytes]`` (S blocks per row) and returns
# (codes [N, S, groups, width] uint8, scales [N, S, groups], mins [N, S, groups] or None, factors or None).
Parts = tuple[np.ndarray, np.ndarray, "np.ndarray | None", "Factors | None"]


def _factored(codes: np.ndarray, f: Factors) -> Parts:
    """A K-quant's parts with scales and mins computed from its factors (:class:`Factors`, the one formula)."""
    scales = f.scales()
    return codes, scales, f.mins(scales), f


def _rows(a: np.ndarray) -> np.ndarray:
    """``[N, S, ...]`` -> ``[N, S*...]``."""
    return np.ascontiguousarray(a).reshape(a.shape[0], -1)


def _q4_0(b: np.ndarray) -> Parts:
    return _nibbles(b[..., 2:18])[..., None, :], _f16(b[..., 0:2])[..., None], None, None


def _q4_1(b: np.ndarray) -> Parts:
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    return _nibbles(b[..., 4:20])[..., None, :], d[..., None], (m + 8.0 * d)[..., None], None


def _q8_0(b: np.ndarray) -> Parts:
    q = (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q[..., None, :], _f16(b[..., 0:2])[..., None], None, None


def _q5(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1: 5-bit codes ``[N, S, 1, 32]`` from the 16 nibble bytes and the 4 high-bit bytes."""
    high = np.unpackbits(qh, axis=-1, bitorder="little")  # element i's bit 4 is bit i of the uint32
    return (_nibbles(qs) | (high << 4))[..., None, :]


def _q5_0(b: np.ndarray) -> Parts:
    return _q5(b[..., 6:22], b[..., 2:6]) + 112, _f16(b[..., 0:2])[..., None], None, None


def _q5_1(b: np.ndarray) -> Parts:
    return _q5(b[..., 8:24], b[..., 4:8]) + 128, _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None], None


def _q4_k(b: np.ndarray) -> Parts:
    sc, mn = _k_scale_min(b[..., 4:16])
    q = _nibbles(b[..., 16:144].reshape(*b.shape[:2], 4, 32)).reshape(*b.shape[:2], 8, 32)
    return _factored(q, Factors(8, _f16(b[..., 0:2]), _rows(sc), 8.0, -_f16(b[..., 2:4]), _rows(mn)))


def _q5_k(b: np.ndarray) -> Parts:
    sc, mn = _k_scale_min(b[..., 4:16])
    low = _nibbles(b[..., 48:176].reshape(*b.shape[:2], 4, 32)).reshape(*b.shape[:2], 8, 32)
    q = low | (_bit_planes(b[..., 16:48]) << 4)
    return _factored(q + 128, Factors(8, _f16(b[..., 0:2]), _rows(sc), None, -_f16(b[..., 2:4]), _rows(mn)))


def _q6_k(b: np.ndarray) -> Parts:
    n, s = b.shape[:2]
    ql = b[..., 0:128].reshape(n, s, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
    ql = (ql & 0x0F).reshape(n, s, 8, 32)
    qh = b[..., 128:192].reshape(n, s, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    qh = (qh & 0x03).reshape(n, s, 8, 32)
    q = (ql | (qh << 4)).reshape(n, s, 16, 16)
    return _factored(q + 96, Factors(16, _f16(b[..., 208:210]), _rows(b[..., 192:208].view(np.int8))))


def _q2_k(b: np.ndarray) -> Parts:
    n, s = b.shape[:2]
    sc = b[..., 0:16]
    q = (b[..., 16:80].reshape(n, s, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 0x03
    f = Factors(16, _f16(b[..., 80:82]), _rows(sc & 0x0F), None, -_f16(b[..., 82:84]), _rows(sc >> 4))
    return _factored(q.reshape(n, s, 16, 16) + 8, f)


def _q3_k(b: np.ndarray) -> Parts:
    n, s = b.shape[:2]
    hmask, qs, packed = b[..., 0:32], b[..., 32:96], b[..., 96:108]
    low = (packed[..., 0:8].reshape(n, s, 1, 8) >> np.array([0, 4], np.uint8).reshape(2, 1)).reshape(n, s, 16)
    high = (packed[..., 8:12].reshape(n, s, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)).reshape(n, s, 16)
    sc = (((low & 0x0F) | ((high & 0x03) << 4)).astype(np.int16) - 32).astype(np.int8)
    ql = ((qs.reshape(n, s, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 0x03).reshape(n, s, 16, 16)
    hb = ((hmask.reshape(n, s, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 0x01).reshape(n, s, 16, 16)
    q = ql + 8 - 4 * (1 - hb)  # q - 4*(1-hbit) in -4..3, plus 8
    return _factored(q.astype(np.uint8), Factors(16, _f16(b[..., 108:110]), _rows(sc)))


def _iq4_nl(b: np.ndarray) -> Parts:
    q = (IQ4_VALUES[_nibbles(b[..., 2:18])] + 128).astype(np.uint8)
    return q[..., None, :], _f16(b[..., 0:2])[..., None], None, None


def _iq4_xs(b: np.ndarray) -> Parts:
    n, s = b.shape[:2]
    high = b[..., 2:4].copy().view(np.uint16).reshape(n, s, 1) >> (2 * np.arange(8, dtype=np.uint16))
    low = (b[..., 4:8].reshape(n, s, 4, 1) >> np.array([0, 4], np.uint8)).reshape(n, s, 8)
    sc = (((low & 0x0F) | ((high & 0x03).astype(np.uint8) << 4)).astype(np.int16) - 32).astype(np.int8)
    q = (IQ4_VALUES[_nibbles(b[..., 8:136].reshape(n, s, 8, 16))] + 128).astype(np.uint8)
    return _factored(q, Factors(8, _f16(b[..., 0:2]), _rows(sc)))


# GGUF type -> (bits, block, super-block width, bytes per super-block, decoder)
FORMS: dict[str, tuple[int, int, int, int, Callable[[np.ndarray], Parts]]] = {
    "Q4_0": (4, 32, 32, 18, _q4_0),
    "Q4_1": (4, 32, 32, 20, _q4_1),
    "Q8_0": (8, 32, 32, 34, _q8_0),
    "Q5_0": (8, 32, 32, 22, _q5_0),
    "Q5_1": (8, 32, 32, 24, _q5_1),
    "Q4_K": (4, 32, QK_K, 144, _q4_k),
    "Q5_K": (8, 32, QK_K, 176, _q5_k),
    "Q6_K": (8, 16, QK_K, 210, _q6_k),
    "Q2_K": (4, 16, QK_K, 84, _q2_k),
    "Q3_K": (4, 16, QK_K, 110, _q3_k),
    "IQ4_NL": (8, 32, 32, 18, _iq4_nl),
    "IQ4_XS": (8, 32, QK_K, 136, _iq4_xs),
}


def decode(raw: np.ndarray, kind: str, n: int, k: int) -> Codes | None:
    """The ``[N, K]`` tensor of GGUF type ``kind`` held in ``raw`` (its bytes) as :class:`Codes`; None for a
    type without an exact form here."""
    if kind not in FORMS:
        return None
    bits, block, width, size, fn = FORMS[kind]
    blocks = np.asarray(raw, dtype=np.uint8).reshape(n, k // width, size)
    codes, scales, mins, factors = fn(blocks)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32).reshape(n, k // block)  # noqa: E731
    return Codes(bits, block, np.ascontiguousarray(codes, dtype=np.uint8).reshape(n, k // block, block),
                 f32(scales), None if mins is None else f32(mins), kind, factors)


def blocks_weight(raw: np.ndarray | Callable[[int, int], np.ndarray], kind: str, n: int,
                  k: int) -> QuantWeight | None:
    """The ``[N, K]`` GGUF tensor as a :class:`QuantWeight` (None for a type without a form here), decoded
    :data:`CHUNK_BYTES` of the file at a time into preallocated arrays: unpacked codes and their temporaries
    are several times a tensor's bytes, which for a 128k-row embedding was 2 GB in one go. ``raw``: the
    tensor's bytes, or ``raw(a, b)`` returning rows ``a..b-1`` of them (a reader that never holds it whole)."""
    if kind not in FORMS:
        return None
    _, _, width, size, _ = FORMS[kind]
    row_bytes = k // width * size
    if callable(raw):
        rows = raw
    else:
        whole = np.asarray(raw, dtype=np.uint8).reshape(n, row_bytes)
        rows = lambda a, b: whole[a:b]  # noqa: E731
    step = max(1, CHUNK_BYTES // row_bytes)
    out: QuantWeight | None = None
    factors = []
    for a in range(0, n, step):
        b = min(a + step, n)
        part = to_weight(decode(rows(a, b), kind, b - a, k))  # type: ignore[arg-type]
        if out is None:
            full = lambda x: None if x is None else np.empty((n, *x.shape[1:]), x.dtype)  # noqa: E731
            out = QuantWeight(part.bits, full(part.data), full(part.scales), None, full(part.mins), part.source,
                              part.block_size)
        for mine, theirs in ((out.data, part.data), (out.scales, part.scales), (out.mins, part.mins)):
            if mine is not None:
                mine[a:b] = theirs
        factors.append(part.factors)
    if out is not None and all(f is not None for f in factors):
        out.factors = factors[0] if len(factors) == 1 else Factors.concat(factors)  # type: ignore[arg-type]
    return out


def to_weight(codes: Codes) -> QuantWeight:
    """``codes`` as a :class:`QuantWeight` for the graph builder."""
    data = pack_nibbles(codes.codes) if codes.bits == 4 else codes.codes
    return QuantWeight(codes.bits, data, codes.scales, None, codes.mins, codes.source, codes.block, codes.factors)
