"""GPTQ checkpoint tensors: bit-exact against an independent spec, exact round trips, clear errors.

The oracle below is written from the layout description only (AutoGPTQ ``pack()`` semantics), with
plain Python integers, and shares no code with ``quantlab.formats.bitstream``:

- ``qweight[w, n]``: column ``n`` is a little-endian bitstream of ``q[n, :]``; value ``k`` sits at
  stream bits ``[k*bits, (k+1)*bits)``, stream bit ``t`` is bit ``t % 32`` of word ``t // 32``.
- ``qzeros[g, w]``: row ``g`` is the same bitstream of the stored zeros of group ``g`` along ``N``;
  v1 stores ``zero - 1``, v2 stores ``zero``.
- ``scales [G, N]`` fp16, ``g_idx[k] = k // group_size`` (all 0 per-channel).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from quantlab.formats.gptq_layout import (
    from_gptq_tensors,
    gptq_quantization_config,
    to_gptq_tensors,
)
from quantlab.formats.groupwise_int import GroupwiseIntResult
from quantlab.solvers.gptq import gptq_quantize


def _spec_pack(values: list[int], bits: int) -> list[int]:
    """Values -> int32 words (as signed Python ints), straight from the bitstream definition."""
    stream = 0
    for j, v in enumerate(values):
        assert 0 <= v < (1 << bits)
        stream |= v << (j * bits)
    n_words = len(values) * bits // 32
    words = [(stream >> (32 * t)) & 0xFFFFFFFF for t in range(n_words)]
    return [w - (1 << 32) if w >= (1 << 31) else w for w in words]


def _spec_unpack(words: list[int], bits: int, count: int) -> list[int]:
    stream = 0
    for t, w in enumerate(words):
        stream |= (w & 0xFFFFFFFF) << (32 * t)
    return [(stream >> (j * bits)) & ((1 << bits) - 1) for j in range(count)]


def _random_case(
    n: int, k: int, bits: int, group_size: int, sym: bool, fmt: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    maxq = (1 << bits) - 1
    q = torch.randint(0, maxq + 1, (n, k), generator=g, dtype=torch.int32)
    scales = (torch.rand(n, groups, generator=g) * 0.1 + 1e-3).half().float()
    zeros = None
    if not sym:
        # v1 cannot store a zero of 0; keep the full [0, maxq] range for v2.
        low = 1 if fmt == "gptq" else 0
        zeros = torch.randint(low, maxq + 1, (n, groups), generator=g, dtype=torch.int32)
        zeros[0, 0] = maxq  # always exercise the extremes
        zeros[-1, -1] = low
    return q, scales, zeros


ALL = list(itertools.product((2, 3, 4, 8), ("gptq", "gptq_v2"), (False, True)))


@pytest.mark.parametrize(("bits", "fmt", "sym"), ALL)
@pytest.mark.parametrize(("n", "k", "group_size"), [(32, 64, 32), (64, 96, 32), (96, 64, -1)])
def test_bit_exact_against_spec(
    bits: int, fmt: str, sym: bool, n: int, k: int, group_size: int
) -> None:
    q, scales, zeros = _random_case(n, k, bits, group_size, sym, fmt, seed=bits + n + k)
    out = to_gptq_tensors(q, scales, zeros, bits, group_size, checkpoint_format=fmt)
    groups = scales.shape[1]

    assert out["qweight"].dtype == torch.int32 and out["qweight"].shape == (k * bits // 32, n)
    assert out["qzeros"].dtype == torch.int32 and out["qzeros"].shape == (groups, n * bits // 32)
    assert out["scales"].dtype == torch.float16 and out["scales"].shape == (groups, n)
    assert out["g_idx"].dtype == torch.int32 and out["g_idx"].shape == (k,)
    assert all(t.is_contiguous() for t in out.values())

    qweight = out["qweight"].tolist()
    for col in range(n):
        words = [row[col] for row in qweight]
        assert words == _spec_pack(q[col].tolist(), bits)
        assert _spec_unpack(words, bits, k) == q[col].tolist()

    true_zero = [[1 << (bits - 1)] * groups for _ in range(n)] if zeros is None else zeros.tolist()
    offset = 1 if fmt == "gptq" else 0
    for grp, words in enumerate(out["qzeros"].tolist()):
        stored = [true_zero[row][grp] - offset for row in range(n)]
        assert words == _spec_pack(stored, bits)

    assert torch.equal(out["scales"], scales.t().half())
    expect_g_idx = [0] * k if group_size == -1 else [c // group_size for c in range(k)]
    assert out["g_idx"].tolist() == expect_g_idx


@pytest.mark.parametrize(("bits", "fmt", "sym"), ALL)
@pytest.mark.parametrize(("n", "k", "group_size"), [(32, 128, 32), (64, 128, 64), (96, 64, -1)])
def test_round_trip_exact(bits: int, fmt: str, sym: bool, n: int, k: int, group_size: int) -> None:
    q, scales, zeros = _random_case(n, k, bits, group_size, sym, fmt, seed=7 * bits + k)
    out = to_gptq_tensors(q, scales, zeros, bits, group_size, checkpoint_format=fmt)
    q2, s2, z2 = from_gptq_tensors(out, bits, group_size, checkpoint_format=fmt, sym=sym)
    assert torch.equal(q2, q)
    assert s2.dtype == torch.float32 and torch.equal(s2, scales)
    if sym:
        assert z2 is None
        # The explicit symmetric zeros decode to the midpoint when read as asymmetric, too.
        _, _, zmid = from_gptq_tensors(out, bits, group_size, checkpoint_format=fmt)
        assert zmid is not None and bool((zmid == 1 << (bits - 1)).all())
    else:
        assert z2 is not None and z2.dtype == torch.int32 and torch.equal(z2, zeros)


def test_three_bit_straddling_values_by_hand() -> None:
    # Value 10 = 0b101: low two bits at bits 30-31 of word 0, high bit at bit 0 of word 1.
    # Value 21 = 0b110: low bit at bit 31 of word 1, high two bits at bits 0-1 of word 2.
    q = torch.zeros(32, 32, dtype=torch.int32)
    q[0, 10] = 0b101
    q[0, 21] = 0b110
    out = to_gptq_tensors(q, torch.ones(32, 1), None, 3, -1, checkpoint_format="gptq_v2")
    assert out["qweight"][:, 0].tolist() == [1 << 30, 1, 0b11]


def test_four_bit_symmetric_zero_words() -> None:
    q = torch.zeros(8, 32, dtype=torch.int32)
    v1 = to_gptq_tensors(q, torch.ones(8, 1), None, 4, 32, checkpoint_format="gptq")
    v2 = to_gptq_tensors(q, torch.ones(8, 1), None, 4, 32, checkpoint_format="gptq_v2")
    assert v1["qzeros"].tolist() == [[0x77777777]]
    assert v2["qzeros"].tolist() == [[0x88888888 - (1 << 32)]]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_v1_to_v2_matches_gptqmodel_word_offset(bits: int) -> None:
    # GPTQModel converts v1 to v2 by adding 1 to every field of the packed word at once
    # (0x11111111 for 4-bit); that only works with no carries, i.e. v1 fields < 2**bits - 1.
    q, scales, zeros = _random_case(32, 64, bits, 32, sym=False, fmt="gptq", seed=bits)
    v1 = to_gptq_tensors(q, scales, zeros, bits, 32, checkpoint_format="gptq")["qzeros"]
    v2 = to_gptq_tensors(q, scales, zeros, bits, 32, checkpoint_format="gptq_v2")["qzeros"]
    ones = sum(1 << s for s in range(0, 32, bits))
    shifted = (v1.to(torch.int64) + ones) & 0xFFFFFFFF
    assert torch.equal(shifted, v2.to(torch.int64) & 0xFFFFFFFF)


def test_loader_dequant_matches_result() -> None:
    # Dequantize the way a v1 kernel does, from the packed words with the spec unpacker.
    w = torch.randn(32, 64)
    h = torch.eye(64)
    res = gptq_quantize(w, h, 4, 32)
    assert res.zeros is not None
    zeros = res.zeros.clamp(min=1)  # v1 cannot hold a zero of 0; keep the test about decoding
    res = GroupwiseIntResult(res.q, res.scales, zeros, 4, 32)
    out = to_gptq_tensors(res.q, res.scales, res.zeros, 4, 32, checkpoint_format="gptq")
    n, k = res.q.shape
    deq = torch.empty(n, k)
    qcols = [[row[c] for row in out["qweight"].tolist()] for c in range(n)]
    zrows = [_spec_unpack(words, 4, n) for words in out["qzeros"].tolist()]
    for c in range(n):
        qv = _spec_unpack(qcols[c], 4, k)
        for kk in range(k):
            grp = int(out["g_idx"][kk])
            zero = zrows[grp][c] + 1
            deq[c, kk] = (qv[kk] - zero) * float(out["scales"][grp, c])
    assert torch.equal(deq, res.dequantize())


def test_v1_rejects_zero_point_zero() -> None:
    q = torch.zeros(32, 32, dtype=torch.int32)
    zeros = torch.ones(32, 1, dtype=torch.int32)
    zeros[5, 0] = 0
    with pytest.raises(ValueError, match="gptq_v2"):
        to_gptq_tensors(q, torch.ones(32, 1), zeros, 4, 32, checkpoint_format="gptq")
    out = to_gptq_tensors(q, torch.ones(32, 1), zeros, 4, 32, checkpoint_format="gptq_v2")
    assert torch.equal(from_gptq_tensors(out, 4, 32, "gptq_v2")[2], zeros)


def test_v1_load_rejects_underflowed_field() -> None:
    # A v1 field of 15 (4-bit) is what an underflowed zero of 0 looks like; kernels read 16.
    out = to_gptq_tensors(
        torch.zeros(8, 32, dtype=torch.int32),
        torch.ones(8, 1),
        torch.full((8, 1), 15, dtype=torch.int32),
        4,
        32,
        checkpoint_format="gptq_v2",
    )
    with pytest.raises(ValueError, match="underflowed"):
        from_gptq_tensors(out, 4, 32, "gptq")


@pytest.mark.parametrize(
    ("n", "k", "bits", "match"),
    [
        (32, 36, 4, r"in_features \(K\)"),
        (32, 48, 3, r"in_features \(K\)"),
        (33, 64, 4, r"out_features \(N\)"),
        (20, 64, 3, r"out_features \(N\)"),
    ],
)
def test_unpackable_shapes(n: int, k: int, bits: int, match: str) -> None:
    q = torch.zeros(n, k, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        to_gptq_tensors(q, torch.ones(n, 1), None, bits, -1)


def test_bad_arguments() -> None:
    q = torch.zeros(32, 64, dtype=torch.int32)
    s = torch.ones(32, 2)
    with pytest.raises(ValueError, match="checkpoint_format"):
        to_gptq_tensors(q, s, None, 4, 32, checkpoint_format="gptq_v3")
    with pytest.raises(ValueError, match="bits"):
        to_gptq_tensors(q, s, None, 5, 32)
    with pytest.raises(ValueError, match="group_size"):
        to_gptq_tensors(q, s, None, 4, 48)
    with pytest.raises(ValueError, match="scales"):
        to_gptq_tensors(q, torch.ones(32, 3), None, 4, 32)
    with pytest.raises(ValueError, match="zeros"):
        to_gptq_tensors(q, s, torch.zeros(32, 2), 4, 32, checkpoint_format="gptq_v2")
    with pytest.raises(ValueError, match="q values"):
        to_gptq_tensors(q + 16, s, None, 4, 32)
    with pytest.raises(ValueError, match=r"zeros must lie"):
        to_gptq_tensors(q, s, torch.full((32, 2), 16, dtype=torch.int32), 4, 32)
    with pytest.raises(ValueError, match="2-D integer"):
        to_gptq_tensors(q.float(), s, None, 4, 32)
    with pytest.raises(ValueError, match="overflow"):
        to_gptq_tensors(q, s * 1e6, None, 4, 32)


def test_from_gptq_validates() -> None:
    q = torch.zeros(32, 64, dtype=torch.int32)
    good = to_gptq_tensors(q, torch.ones(32, 2), None, 4, 32)
    with pytest.raises(ValueError, match="missing"):
        from_gptq_tensors({k: v for k, v in good.items() if k != "qzeros"}, 4, 32)
    with pytest.raises(ValueError, match="scales"):
        from_gptq_tensors(good, 4, 64)  # G=1 expected, checkpoint has 2 groups
    with pytest.raises(ValueError, match="qzeros"):
        from_gptq_tensors({**good, "qzeros": good["qzeros"][:, :2]}, 4, 32)
    with pytest.raises(ValueError, match="int32"):
        from_gptq_tensors({**good, "qweight": good["qweight"].to(torch.int64)}, 4, 32)
    with pytest.raises(ValueError, match="whole number"):
        from_gptq_tensors({**good, "qweight": good["qweight"][:7]}, 3, 32)
    permuted = good["g_idx"].flip(0).contiguous()
    with pytest.raises(ValueError, match="act-order"):
        from_gptq_tensors({**good, "g_idx": permuted}, 4, 32)
    asym = to_gptq_tensors(q, torch.ones(32, 2), torch.full((32, 2), 3), 4, 32)
    with pytest.raises(ValueError, match="sym=True"):
        from_gptq_tensors(asym, 4, 32, sym=True)
    # g_idx is optional.
    no_gidx = {k: v for k, v in good.items() if k != "g_idx"}
    assert torch.equal(from_gptq_tensors(no_gidx, 4, 32)[0], q)


def test_quantization_config() -> None:
    cfg = gptq_quantization_config(
        bits=4,
        group_size=128,
        sym=False,
        desc_act=True,
        checkpoint_format="gptq_v2",
        damp_percent=0.01,
        true_sequential=True,
        static_groups=True,
    )
    assert cfg["quant_method"] == "gptq"
    assert cfg["checkpoint_format"] == "gptq_v2"
    assert cfg["pack_dtype"] == "int32"
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["desc_act"]) == (4, 128, False, True)
    assert cfg["static_groups"] is True and cfg["damp_percent"] == 0.01
    assert cfg["meta"]["quantizer"][0].startswith("quantlab")
    with pytest.raises(ValueError, match="checkpoint_format"):
        gptq_quantization_config(4, 128, True, checkpoint_format="awq")
