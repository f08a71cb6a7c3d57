"""The BitStack layout: sign packing (MSB first, BitStack's own bytes), pack/unpack, shapes."""

from __future__ import annotations

import pytest
import torch

from quantlab.formats.bitstack import (
    BitStackMeta,
    block_bytes,
    pack,
    pack_signs,
    unpack,
    unpack_signs,
)


@pytest.mark.parametrize("k", [1, 7, 8, 9, 16, 100, 576])
def test_sign_packing_round_trips(k: int) -> None:
    torch.manual_seed(k)
    positive = torch.rand(3, 5, k) > 0.5
    packed = pack_signs(positive)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, (k + 7) // 8)
    assert torch.equal(unpack_signs(packed, k), positive)


def test_sign_bits_are_msb_first_row_major_like_bitstack() -> None:
    # Column 8t + i sits at bit 7 - i of byte t; bit 1 = +1. Row 0: + - - - - - - +, then + .
    positive = torch.zeros(2, 9, dtype=torch.bool)
    positive[0, 0] = positive[0, 7] = positive[0, 8] = True
    positive[1, 1] = True
    packed = pack_signs(positive)
    assert packed.tolist() == [[0b10000001, 0b10000000], [0b01000000, 0]]
    # For K % 8 == 0 the bytes equal BitStack's flattened pack_sign: (sign + 1) / 2, 8 per byte.
    torch.manual_seed(0)
    p = torch.rand(4, 16) > 0.5
    flat = p.flatten().view(-1, 8).to(torch.int64)
    bitstack_bytes = (flat * torch.tensor([128, 64, 32, 16, 8, 4, 2, 1])).sum(1)
    assert pack_signs(p).flatten().tolist() == bitstack_bytes.tolist()


def test_pack_unpack_is_exact_and_shapes_match_the_meta() -> None:
    torch.manual_seed(1)
    positive = torch.rand(4, 33, 70) > 0.5
    u = torch.randn(4, 33, 3).half().float()
    v = torch.randn(4, 3, 70).half().float()
    packed = pack(positive, u, v)
    assert packed.meta == BitStackMeta(in_features=70, out_features=33, rank=3, n_blocks=4)
    packed.validate()
    pos2, u2, v2 = unpack(packed)
    assert torch.equal(pos2, positive) and torch.equal(u2, u) and torch.equal(v2, v)
    assert packed.meta.block_bytes == 33 * 9 + 2 * 3 * (33 + 70) == block_bytes(33, 70, 3)
    assert packed.meta.storage_bits() == 8 * 4 * packed.meta.block_bytes
    total = sum(t.numel() * t.element_size() for t in packed.tensors().values())
    assert total * 8 == packed.meta.storage_bits()


def test_bad_inputs_are_named() -> None:
    with pytest.raises(TypeError, match="bool"):
        pack_signs(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_signs(torch.zeros(2, 3, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match="rank 9 exceeds"):
        BitStackMeta(in_features=8, out_features=4, rank=9, n_blocks=1)
    with pytest.raises(ValueError, match="n_blocks must be >= 1"):
        BitStackMeta(in_features=8, out_features=4, rank=1, n_blocks=0)
    with pytest.raises(ValueError, match="overflow float16"):
        pack(torch.ones(1, 2, 4, dtype=torch.bool), torch.full((1, 2, 1), 1e6), torch.ones(1, 1, 4))
    with pytest.raises(ValueError, match=r"u must be \[2, 3, r\]"):
        pack(torch.ones(2, 3, 4, dtype=torch.bool), torch.ones(2, 2, 1), torch.ones(2, 1, 4))
    packed = pack(torch.ones(1, 2, 4, dtype=torch.bool), torch.ones(1, 2, 1), torch.ones(1, 1, 4))
    packed.u = packed.u.float()
    with pytest.raises(ValueError, match=r"layer\.u: expected shape \[1, 2, 1\] torch.float16"):
        packed.validate("layer")
