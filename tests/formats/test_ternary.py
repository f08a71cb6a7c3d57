"""The ternary format: i2 / tq1 packing, the CPU LUT layout, metadata and validation."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantlab.formats import ternary_packing as tp
from quantlab.formats.ternary import PackedTernary, TernaryMeta, TernaryResult, pack, unpack
from quantlab.ops import ternary_reference as ref

# Odd widths first: K not a multiple of 4 or 5 exercises both paddings.
SHAPES = [(1, 1), (3, 5), (7, 9), (5, 100), (33, 160), (16, 128), (17, 577), (192, 576)]


def _trits(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 31 * n + k)
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("packing", ["i2", "tq1"])
def test_packing_round_trip_is_exact(n: int, k: int, packing: str) -> None:
    t = _trits(n, k)
    q = tp.pack_i2(t) if packing == "i2" else tp.pack_tq1(t)
    assert q.dtype == torch.uint8 and q.shape == (n, tp.packed_row_bytes(packing, k))
    assert torch.equal(tp.unpack_trits(q, packing, k), t)


def test_i2_bit_order_and_padding() -> None:
    # Column k -> byte k // 4, bits 2 (k % 4), code t + 1; padding columns hold code 1.
    t = torch.tensor([[1, 0, -1, 1, -1, 0]], dtype=torch.int8)
    q = tp.pack_i2(t)
    assert q.tolist() == [[2 | (1 << 2) | (0 << 4) | (2 << 6), 0 | (1 << 2) | (1 << 4) | (1 << 6)]]


def test_tq1_encoding_by_hand() -> None:
    # Digits c = t + 1 of columns 0..4, first column most significant: v = 2*81 + 1*27 + 0*9 +
    # 2*3 + 1 = 196, stored as ceil(256 * 196 / 243) = 207.
    t = torch.tensor([[1, 0, -1, 1, 0, 1]], dtype=torch.int8)
    q = tp.pack_tq1(t)
    # Second byte: column 5 (t = 1 -> 2) then four padding digits 1: v = 2*81 + 27 + 9 + 3 + 1.
    v2 = 2 * 81 + 27 + 9 + 3 + 1
    assert q.tolist() == [[207, -(-256 * v2 // 243)]]
    # Each digit decodes with one multiply and a shift.
    digits = [((207 * 3**i) % 256) * 3 >> 8 for i in range(5)]
    assert digits == [2, 1, 0, 2, 1]


def test_tq1_covers_all_243_groups_and_rejects_the_other_13_bytes() -> None:
    groups = torch.tensor(list(itertools.product([-1, 0, 1], repeat=5)), dtype=torch.int8)
    q = tp.pack_tq1(groups)
    assert q.unique().numel() == 243
    assert torch.equal(tp.unpack_tq1(q, 5), groups)
    canonical = set(q.flatten().tolist())
    for byte in set(range(256)) - canonical:
        with pytest.raises(ValueError, match="corrupt tq1"):
            tp.unpack_tq1(torch.tensor([[byte]], dtype=torch.uint8), 5)
    assert len(set(range(256)) - canonical) == 13


def test_invalid_i2_code_is_reported() -> None:
    q = tp.pack_i2(_trits(4, 8))
    q[2, 1] |= 0b11 << 4
    with pytest.raises(ValueError, match="invalid code 3"):
        tp.unpack_i2(q, 8)
    # Padding bits past K are ignored (K = 7 leaves bits 6-7 of the last byte unused).
    t = _trits(1, 7)
    q = tp.pack_i2(t)
    q[0, 1] |= 0b11 << 6
    assert torch.equal(tp.unpack_i2(q, 7), t)


def test_trits_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match=r"values in \{-1, 0, 1\}"):
        tp.pack_i2(torch.tensor([[2, 0]], dtype=torch.int8))
    with pytest.raises(TypeError, match="integer"):
        tp.pack_tq1(torch.zeros(2, 2))


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_lut_layout_round_trip(n: int, k: int) -> None:
    t = _trits(n, k, seed=1)
    lut = tp.lut_pack(t)
    assert lut.shape == tp.lut_shape(n, k) == (-(-n // 16), -(-k // 8), 32)
    assert torch.equal(tp.lut_unpack(lut, n, k), t)


def test_lut_layout_by_hand() -> None:
    # Row 3 of the first tile, columns 4..7 (quad 1, the high nibble of pair 0): t = [1, 0, -1, 0]
    # -> plane b1 (t >= 0) bits 0b1011, plane b0 (t > 0) bits 0b0001.
    t = torch.zeros(16, 8, dtype=torch.int8)
    t[3, 4:8] = torch.tensor([1, 0, -1, 0])
    lut = tp.lut_pack(t)
    assert lut[0, 0, 2 * 3] == (0b1011 << 4) | 0b1111  # quad 0 of row 3: t = 0 -> b1 all set
    assert lut[0, 0, 2 * 3 + 1] == (0b0001 << 4) | 0b0000
    # A plane pair that encodes no trit (b1 = -1, b0 = +1) is corruption.
    lut[0, 0, 1] = 0x01
    lut[0, 0, 0] = 0x00
    with pytest.raises(ValueError, match="corrupt LUT"):
        tp.lut_unpack(lut, 16, 8)


@pytest.mark.parametrize("group_size", [0, -1, 32])
def test_lut_scale_layout_round_trip(group_size: int) -> None:
    n, k = 21, 64
    s = torch.rand(tp.scale_shape(n, k, group_size))
    tiled = tp.lut_pack_scales(s, n, k, group_size)
    assert tiled.shape == tp.lut_scale_shape(n, k, group_size)
    assert torch.equal(tp.lut_unpack_scales(tiled, n, k, group_size), s)
    if group_size == 32:
        # Tile 1, group 1, row 3 of the tile = output row 19.
        assert tiled[1, 1, 3] == s[19, 1]
        assert bool((tiled[1, :, 5:] == 0).all())  # rows past N


@pytest.mark.parametrize(
    ("group_size", "packing", "bits"),
    [(0, "i2", 2.0), (-1, "i2", 2.0 + 16 / 576), (64, "i2", 2.25), (0, "tq1", 8 * 116 / 576)],
)
def test_meta_shapes_and_storage(group_size: int, packing: str, bits: float) -> None:
    meta = TernaryMeta(576, 192, packing, group_size, "float16")
    shapes = meta.tensor_shapes()
    assert shapes["qweight"] == ((192, tp.packed_row_bytes(packing, 576)), torch.uint8)
    assert shapes["scales"][0] == tp.scale_shape(192, 576, group_size)
    per_weight = meta.storage_bits() / (192 * 576)
    extra = 16 / (192 * 576) if group_size == 0 else 0.0
    assert per_weight == pytest.approx(bits + extra)


def test_meta_refuses_bad_encodings() -> None:
    with pytest.raises(ValueError, match="packing must be one of"):
        TernaryMeta(64, 8, "i3")
    with pytest.raises(ValueError, match=r"does not divide in_features 96.*\[0, -1, 32\]"):
        TernaryMeta(96, 8, "i2", 64)
    with pytest.raises(ValueError, match="one of"):
        TernaryMeta(96, 8, "i2", 48)
    with pytest.raises(ValueError, match="scale dtype"):
        TernaryMeta(96, 8, "i2", 32, "float64")


@pytest.mark.parametrize("packing", ["i2", "tq1"])
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_pack_unpack_and_safetensors_round_trip(
    packing: str, scale_dtype: str, tmp_path: Path
) -> None:
    t = _trits(33, 160, seed=2)
    scales = torch.rand(33, 5).to(getattr(torch, scale_dtype)).float()
    packed = pack(TernaryResult(t, scales, 32), packing, scale_dtype)
    packed.validate("layer")
    back = unpack(packed)
    assert torch.equal(back.t, t) and torch.equal(back.scales, scales)
    save_file(packed.tensors(), str(tmp_path / "w.safetensors"))
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in packed.tensors().items())
    dense = ref.ternary_dequant(packed.qweight, packed.scales, packing, 160, 32)
    assert torch.equal(dense, t.float() * scales.repeat_interleave(32, 1))


def test_validate_names_the_tensor() -> None:
    packed = pack(TernaryResult(_trits(8, 64), torch.ones(8, 1), -1))
    bad = PackedTernary(packed.qweight[:, :-1], packed.scales, packed.meta)
    with pytest.raises(ValueError, match=r"layer\.qweight: expected shape \[8, 16\]"):
        bad.validate("layer")
    bad = PackedTernary(packed.qweight, -packed.scales, packed.meta)
    with pytest.raises(ValueError, match=r"layer\.scales: .*finite and >= 0"):
        bad.validate("layer")


def test_overflowing_scales_are_refused() -> None:
    with pytest.raises(ValueError, match="overflow float16"):
        pack(TernaryResult(_trits(2, 8), torch.tensor([[1e6]]), 0))
