"""Group quantization, int4 packing and the Hadamard rotation (kv/quant.py)."""

from __future__ import annotations

import numpy as np
import pytest

from inferos_cli.graphs.rotation import hadamard
from inferos_cli.kv.quant import (
    dequantize, error_bound, fp16_ceil, nbytes_per_token, pack4, quantize, unpack4,
)


def _keys(seed: int = 0, shape: tuple[int, ...] = (64, 3, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., 5] *= 20.0  # an outlier channel, as real keys have
    return x


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [32, 64])
def test_round_trip_within_half_a_step(bits: int, group: int) -> None:
    x = _keys()
    q = quantize(x, bits, group)
    back = dequantize(q)
    err = np.abs(back - x)
    bound = error_bound(q)
    assert np.all(err <= bound * (1 + 1e-5) + 1e-7)
    # the step is the group's range (widened to contain 0) over 2^bits - 1, rounded up to fp16
    g = x.reshape(*x.shape[:-1], -1, group)
    rng = np.maximum(g.max(-1), 0) - np.minimum(g.min(-1), 0)
    step = q.scale.astype(np.float32)
    assert np.all(step >= rng / ((1 << bits) - 1))
    assert np.all(step <= rng / ((1 << bits) - 1) * (1 + 2**-10) + 1e-12)


def test_int8_is_much_finer_than_int4() -> None:
    x = _keys(1)
    e8 = np.abs(dequantize(quantize(x, 8, 32)) - x).mean()
    e4 = np.abs(dequantize(quantize(x, 4, 32)) - x).mean()
    assert e8 * 10 < e4


def test_rotation_shrinks_int4_error_on_outlier_channels() -> None:
    x = _keys(2)
    h = hadamard(64)
    plain = np.abs(dequantize(quantize(x, 4, 32)) - x).mean()
    rotated = np.abs(dequantize(quantize(x @ h, 4, 32)) @ h.T - x).mean()
    assert rotated < 0.7 * plain
    # rotation itself is exact (orthonormal) and keeps norms (the importance score)
    assert np.allclose(h @ h.T, np.eye(64), atol=1e-6)
    assert np.allclose(np.linalg.norm(x @ h, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rotation_needs_power_of_two() -> None:
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)


def test_pack4_layout_and_round_trip() -> None:
    codes = np.arange(16, dtype=np.uint8).repeat(2).reshape(2, 16)  # values 0..15
    packed = pack4(codes)
    assert packed.shape == (2, 8) and packed.dtype == np.uint8
    # split halves: low nibble = element j, high nibble = element j + D/2
    assert np.array_equal(packed & 0x0F, codes[:, :8])
    assert np.array_equal(packed >> 4, codes[:, 8:])
    assert np.array_equal(unpack4(packed), codes)


def test_int4_bytes_are_packed_two_per_byte() -> None:
    x = _keys(3, (10, 2, 64))
    q4, q8 = quantize(x, 4, 32), quantize(x, 8, 32)
    assert q4.codes.shape == (10, 2, 32) and q8.codes.shape == (10, 2, 64)
    assert q4.scale.dtype == np.float16 and q4.zero.dtype == np.uint8
    assert q4.nbytes == 10 * 2 * nbytes_per_token(64, 4, 32)
    assert q8.nbytes == 10 * 2 * nbytes_per_token(64, 8, 32)
    # per (token, head): 64 codes + 2 fp16 scales + 2 zero points = 70 bytes vs 128 in fp16
    assert nbytes_per_token(64, 8, 32) == 70 and nbytes_per_token(64, 4, 32) == 38


def test_constant_and_zero_groups() -> None:
    x = np.zeros((2, 32), dtype=np.float32)
    x[1] = 3.0
    for bits in (8, 4):
        back = dequantize(quantize(x, bits, 32))
        assert np.allclose(back, x, atol=3.0 / ((1 << bits) - 1))


def test_fp16_ceil_never_rounds_down() -> None:
    v = np.random.default_rng(4).random(1000).astype(np.float32) * 10
    assert np.all(fp16_ceil(v).astype(np.float32) >= v)


def test_bad_group() -> None:
    with pytest.raises(ValueError):
        quantize(np.zeros((1, 48), np.float32), 8, 32)
    with pytest.raises(ValueError):
        quantize(np.zeros((1, 64), np.float32), 2, 32)
