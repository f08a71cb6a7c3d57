from __future__ import annotations

import pytest
import torch

from quantlab.formats.groupwise_int import GroupwiseIntMeta, pack, unpack
from quantlab.solvers.rtn import rtn_quantize

CASES = [
    (bits, group, sym, shape)
    for bits in (2, 3, 4, 8)
    for group in (32, 64, -1)
    for sym in (False, True)
    for shape in ((7, 64), (33, 192), (5, 576))
    if group == -1 or shape[1] % group == 0
]


@pytest.mark.parametrize(("bits", "group", "sym", "shape"), CASES)
def test_pack_unpack_is_exact(bits: int, group: int, sym: bool, shape: tuple[int, int]) -> None:
    torch.manual_seed(bits * 100 + shape[0])
    result = rtn_quantize(torch.randn(shape), bits, group, sym)
    packed = pack(result)
    packed.validate()
    back = unpack(packed)
    assert torch.equal(back.q, result.q)
    assert torch.equal(back.scales, result.scales)  # scales were already fp16-representable
    if sym:
        assert back.zeros is None and packed.qzeros is None
    else:
        assert torch.equal(back.zeros, result.zeros)
    assert torch.equal(back.dequantize(), result.dequantize())


def test_storage_bits_counts_scales_and_zeros() -> None:
    meta = GroupwiseIntMeta(in_features=1536, out_features=576, bits=4, group_size=64, sym=False)
    # 4 bits per weight + one fp16 scale and one 4-bit zero per 64 weights (24 zeros = 3 words).
    assert meta.storage_bits() / (576 * 1536) == pytest.approx(4 + 16 / 64 + 4 / 64)
    # 9 groups of 4-bit zeros need 36 bits: each row's zero stream is padded to 2 words.
    padded = GroupwiseIntMeta(in_features=576, out_features=10, bits=4, group_size=64, sym=False)
    assert padded.storage_bits() == 10 * (576 * 4 + 9 * 16 + 64)
    sym = GroupwiseIntMeta(in_features=576, out_features=1536, bits=4, group_size=64, sym=True)
    assert sym.storage_bits() / (576 * 1536) == pytest.approx(4 + 16 / 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 5}, "bits must be one of"),
        ({"group_size": 128}, "does not divide in_features 576"),
        ({"group_size": 48}, "group_size must be one of"),
        ({"scale_dtype": "float64"}, "scale dtype must be one of"),
    ],
)
def test_meta_rejects_bad_encodings(kwargs: dict, message: str) -> None:
    base = {"in_features": 576, "out_features": 8, "bits": 4, "group_size": 64, "sym": False}
    with pytest.raises(ValueError, match=message):
        GroupwiseIntMeta(**(base | kwargs))


def test_validate_names_the_bad_tensor() -> None:
    packed = pack(rtn_quantize(torch.randn(8, 64), 4, 32))
    packed.scales = packed.scales[:, :1]
    with pytest.raises(ValueError, match=r"layer\.x\.scales: expected shape \[8, 2\]"):
        packed.validate("layer.x")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bitstream_packs_row_chunks_exactly(monkeypatch: pytest.MonkeyPatch, bits: int) -> None:
    """pack_bitstream works a chunk of rows at a time (bounded int64 temporaries); 2-row chunks
    (ragged last chunk, straddling 3-bit values) give exactly the one-chunk streams."""
    from quantlab.formats import bitstream

    values = torch.randint(0, 2**bits, (7, 45), generator=torch.Generator().manual_seed(bits))
    whole = bitstream.pack_bitstream(values, bits)
    monkeypatch.setattr(bitstream, "_PACK_CHUNK_VALUES", 2 * 45)
    chunked = bitstream.pack_bitstream(values, bits)
    assert torch.equal(chunked, whole)
    assert torch.equal(bitstream.unpack_bitstream(chunked, bits, 45), values)
