"""The AutoAWQ GEMM layout, checked against an unpacking written independently from its spec."""

from __future__ import annotations

import pytest
import torch

from quantlab.formats.awq_layout import (
    awq_quantization_config,
    from_awq_tensors,
    pack_awq_columns,
    to_awq_tensors,
    unpack_awq_columns,
)

# From AutoAWQ's GEMM pack(): nibble i of each int32 holds output column ORDER[i] of its 8.
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _spec_unpack(words: torch.Tensor) -> torch.Tensor:
    """Element by element, as the layout is described: [R, W] int32 -> [R, 8W] nibbles."""
    r, w = words.shape
    out = torch.empty(r, 8 * w, dtype=torch.int64)
    for i in range(r):
        for j in range(w):
            word = int(words[i, j]) & 0xFFFFFFFF
            for nibble in range(8):
                out[i, 8 * j + ORDER[nibble]] = (word >> (4 * nibble)) & 0xF
    return out


def _random_layer(n: int, k: int, g: int, seed: int):  # noqa: ANN202
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand(n, k // g, generator=gen) + 0.01).to(torch.float16).float()
    zeros = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.int32)
    return q, scales, zeros


def test_known_word() -> None:
    # Columns 0..7 hold 1..8: nibbles in order [0,2,4,6,1,3,5,7] -> 1,3,5,7,2,4,6,8.
    word = pack_awq_columns(torch.arange(1, 9).view(1, 8))
    assert int(word) & 0xFFFFFFFF == 0x86427531
    high = pack_awq_columns(torch.full((1, 8), 15))
    assert int(high) == -1  # all ones, stored as a signed int32


@pytest.mark.parametrize(
    ("n", "k", "g"), [(8, 32, 32), (24, 128, 64), (64, 96, 32), (16, 256, 128)]
)
def test_pack_matches_the_spec_and_round_trips(n: int, k: int, g: int) -> None:
    q, scales, zeros = _random_layer(n, k, g, n + k)
    t = to_awq_tensors(q, scales, zeros, 4, g)
    assert t["qweight"].shape == (k, n // 8) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (k // g, n // 8) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (k // g, n) and t["scales"].dtype == torch.float16
    # Independent decode of the stored words: [K, N] and [G, N], transposed back.
    assert torch.equal(_spec_unpack(t["qweight"]).t(), q.long())
    assert torch.equal(_spec_unpack(t["qzeros"]).t(), zeros.long())
    # Dequantization by the layout's formula equals quantlab's.
    w_spec = (_spec_unpack(t["qweight"]) - _spec_unpack(t["qzeros"]).repeat_interleave(g, 0)) * t[
        "scales"
    ].float().repeat_interleave(g, 0)
    from quantlab.formats.groupwise_int import GroupwiseIntResult

    w_ours = GroupwiseIntResult(q, scales, zeros, 4, g).dequantize()
    assert torch.equal(w_spec.t(), w_ours)
    q2, s2, z2 = from_awq_tensors(t, 4, g)
    assert torch.equal(q2, q) and torch.equal(s2, scales) and torch.equal(z2, zeros)
    assert torch.equal(unpack_awq_columns(pack_awq_columns(q)), q)


def test_symmetric_is_written_with_zero_eight() -> None:
    q, scales, _ = _random_layer(8, 64, 32, 0)
    t = to_awq_tensors(q, scales, None, 4, 32)
    assert bool((t["qzeros"] == 0x88888888 - 2**32).all())
    assert from_awq_tensors(t, 4, 32, sym=True)[2] is None
    t["qzeros"][0, 0] = 0
    with pytest.raises(ValueError, match="differ from 8"):
        from_awq_tensors(t, 4, 32, sym=True)


@pytest.mark.parametrize(
    ("shape", "bits", "g", "match"),
    [
        ((8, 64), 3, 32, "only 4-bit"),
        ((8, 64), 4, -1, "per-channel"),
        ((12, 64), 4, 32, "multiple of 8"),
        ((8, 48), 4, 32, "does not divide"),
    ],
)
def test_unrepresentable_encodings_are_refused(shape: tuple, bits: int, g: int, match: str) -> None:
    n, k = shape
    q = torch.zeros(n, k, dtype=torch.int32)
    gg = 1 if g == -1 else max(1, k // g)
    with pytest.raises(ValueError, match=match):
        to_awq_tensors(q, torch.ones(n, gg), None, bits, g)


def test_corrupt_tensors_are_refused() -> None:
    q, scales, zeros = _random_layer(16, 64, 32, 1)
    t = to_awq_tensors(q, scales, zeros, 4, 32)
    with pytest.raises(ValueError, match="missing"):
        from_awq_tensors({"qweight": t["qweight"]}, 4, 32)
    with pytest.raises(ValueError, match="qzeros must be"):
        from_awq_tensors({**t, "qzeros": t["qzeros"][:1]}, 4, 32)
    with pytest.raises(ValueError, match="scales must be"):
        from_awq_tensors({**t, "scales": t["scales"][:, :8]}, 4, 32)
    with pytest.raises(ValueError, match="int32"):
        from_awq_tensors({**t, "qweight": t["qweight"].float()}, 4, 32)


def test_quantization_config_keys() -> None:
    cfg = awq_quantization_config(4, 64, ["lm_head"])
    assert cfg == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 64,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["lm_head"],
    }
    from transformers import AwqConfig

    parsed = AwqConfig.from_dict(cfg)
    assert parsed.bits == 4 and parsed.group_size == 64 and parsed.zero_point
    assert str(parsed.format).lower().endswith("gemm")
