"""The PVQ format: exact pack/unpack, the documented byte layout, and validation errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantlab.formats.bitstream import field_words, pack_fields, unpack_fields
from quantlab.formats.pvq import (
    PackedPVQ,
    PVQMeta,
    check_codes,
    pack,
    pack_signs,
    unpack,
    unpack_signs,
)
from quantlab.formats.pvq_codebook import PVQParams, pyramid_size, unrank
from quantlab.ops.pvq_reference import pvq_decode
from quantlab.solvers.pvq import pvq_quantize
from quantlab.transforms.rotation import random_signs

CASES = [
    # (out, in, dim, pulses, levels): odd row counts, codes of 8 to 63 bits, 1 or many levels.
    (7, 96, 16, 28, 6),
    (5, 100, 4, 9, 3),
    (33, 576, 8, 14, 8),
    (3, 64, 16, 40, 1),
    (2, 24, 12, 30, 4),
    (4, 32, 2, 5, 2),
]


def _result(n: int, k: int, d: int, p: int, levels: int, seed: int = 0):  # noqa: ANN202
    torch.manual_seed(seed)
    return pvq_quantize(torch.randn(n, k), PVQParams(d, p, levels), random_signs(k, seed))


@pytest.mark.parametrize("width", [1, 3, 8, 13, 31, 32, 33, 51, 62, 63])
def test_fields_round_trip_for_every_width(width: int) -> None:
    torch.manual_seed(width)
    hi = 1 << width
    values = torch.randint(0, min(hi, 1 << 62), (37,), dtype=torch.int64)
    values[0] = hi - 1  # all ones: every bit of the field, straddles included
    values[1] = 0
    words = pack_fields(values, width)
    assert words.shape == (field_words(37, width),) and words.dtype == torch.int32
    assert torch.equal(unpack_fields(words, width, 37), values)


def test_field_errors() -> None:
    with pytest.raises(ValueError, match=r"field width must be in \[1, 63\]"):
        pack_fields(torch.tensor([1]), 64)
    with pytest.raises(ValueError, match="out of range for 3-bit"):
        pack_fields(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="expected 2 for"):
        unpack_fields(torch.zeros(3, dtype=torch.int32), 8, 5)


@pytest.mark.parametrize(("n", "k", "d", "p", "levels"), CASES)
def test_pack_unpack_is_exact(n: int, k: int, d: int, p: int, levels: int) -> None:
    r = _result(n, k, d, p, levels)
    packed = pack(r)
    packed.validate()
    meta = packed.meta
    assert meta == PVQMeta(k, n, d, p, levels)
    for suffix, (shape, dtype) in meta.tensor_shapes().items():
        t = packed.tensors()[suffix]
        assert tuple(t.shape) == shape and t.dtype == dtype
    back = unpack(packed)
    assert torch.equal(back.points, r.points)
    assert torch.equal(back.gain_codes, r.gain_codes)
    assert torch.equal(back.row_scales, r.row_scales)
    assert torch.equal(back.levels, r.levels)
    assert torch.equal(back.signs, r.signs)
    assert torch.equal(back.dequantize(), r.dequantize())


def _independent_decode(packed: PackedPVQ) -> np.ndarray:
    """W' decoded from the raw bytes, following docs/formats.md alone (Python ints, numpy fp32)."""
    m = packed.meta
    raw = packed.codes.numpy().astype("<i4").tobytes()
    stream = int.from_bytes(raw, "little")  # stream bit t = bit t of this integer
    size = pyramid_size(m.dim, m.pulses)
    f = (size * m.levels - 1).bit_length()
    per_row = m.in_features // m.dim
    scales = packed.row_scales.numpy().astype(np.float32)
    levels = packed.levels.numpy().astype(np.float32)
    out = np.zeros((m.out_features, m.in_features), dtype=np.float32)
    for j in range(m.n_codes):
        code = (stream >> (j * f)) & ((1 << f) - 1)
        level, index = divmod(code, size)
        y = np.array(unrank(index, m.dim, m.pulses), dtype=np.float32)
        row, v = divmod(j, per_row)
        g = scales[row] * levels[level]
        r = g / np.sqrt(np.float32((y * y).sum()))
        out[row, v * m.dim : (v + 1) * m.dim] = y * r
    return out


@pytest.mark.parametrize(("n", "k", "d", "p", "levels"), CASES[:4])
def test_layout_matches_the_documented_decode(n: int, k: int, d: int, p: int, levels: int) -> None:
    packed = pack(_result(n, k, d, p, levels, seed=1))
    ref = pvq_decode(packed.codes, packed.row_scales, packed.levels, d, p, k)
    assert np.array_equal(ref.numpy(), _independent_decode(packed))


def test_signs_bitstream() -> None:
    signs = random_signs(100, 3)
    words = pack_signs(signs)
    assert words.shape == (4,) and words.dtype == torch.int32
    assert torch.equal(unpack_signs(words, 100), signs)
    # Bit k set <=> sign -1 (bit 0 of word 0 is column 0).
    first = [(int(words[0]) >> b) & 1 for b in range(8)]
    assert first == [int(s < 0) for s in signs[:8].tolist()]
    with pytest.raises(ValueError, match=r"\+1 or -1"):
        pack_signs(torch.tensor([1, 0, -1]))


def test_storage_accounting() -> None:
    meta = PVQMeta(576, 576, 16, 28, 6)
    assert meta.code_bits == 51
    codes_bits = field_words(576 * 36, 51) * 32
    assert meta.storage_bits() == codes_bits + 576 * 16 + 6 * 16 + field_words(576, 1) * 32
    # 51/16 = 3.1875 for the codes, + 16/576 for the row scale, + levels and signs.
    assert meta.bits_per_weight() == pytest.approx(3.2173, abs=1e-4)


def test_validation_names_the_problem() -> None:
    packed = pack(_result(7, 96, 16, 28, 6))
    t = packed.tensors()
    with pytest.raises(ValueError, match=r"w\.codes: expected shape"):
        PackedPVQ(t["codes"][:-1], t["row_scales"], t["levels"], t["signs"], packed.meta).validate(
            "w"
        )
    with pytest.raises(ValueError, match=r"w\.row_scales: expected shape \[7\] torch\.float16"):
        PackedPVQ(
            t["codes"], t["row_scales"].float(), t["levels"], t["signs"], packed.meta
        ).validate("w")
    nan_levels = t["levels"].clone()
    nan_levels[0] = float("nan")
    with pytest.raises(ValueError, match=r"w\.levels has NaN"):
        PackedPVQ(t["codes"], t["row_scales"], nan_levels, t["signs"], packed.meta).validate("w")
    with pytest.raises(ValueError, match="does not divide in_features"):
        PVQMeta(100, 4, 16, 28, 6)
    with pytest.raises(ValueError, match="at most 63"):
        PVQMeta(64, 4, 32, 64, 1)


def test_corrupt_codes_are_detected() -> None:
    packed = pack(_result(7, 96, 16, 28, 6))
    check_codes(packed, "w")
    codes = packed.codes.clone()
    codes[:] = -1  # all ones: every code is 2^51 - 1 > N(16, 28) * 6
    bad = PackedPVQ(codes, packed.row_scales, packed.levels, packed.signs, packed.meta)
    with pytest.raises(ValueError, match=r"w\.codes: 42 of 42 codes are >="):
        check_codes(bad, "w")
    with pytest.raises(ValueError, match="corrupt code"):
        unpack(bad)
