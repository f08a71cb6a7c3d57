"""The tensor-core kernel (csrc/groupwise_int/cuda_mma_kernel.cuh) run on the CPU emulation.

Data are integer-valued (codes, zero points, small integer activations, power-of-two scales), so
every product and every partial sum is exact in fp32 whatever the summation order (split-K,
mma.sync's internal order): the kernel's output must equal the fp64 oracle rounded once to the
output dtype, bit for bit. With one-hot activation rows the output *is* the dequantized weight,
so a single wrong weight anywhere changes an output. Both run under ASan + UBSan (out-of-bounds
and misaligned accesses, cp.async destinations read before their wait) and under TSan (races
between barriers).
"""

from __future__ import annotations

import pytest
import torch

from quantlab.formats import bitstream
from quantlab.formats.groupwise_int_mma_layout import repack
from quantlab.ops import groupwise_int_reference as reference
from tests.emulation.cases import integer_weight, one_hot_x, small_integer_x
from tests.emulation.emulator import DTYPE_CODE, Call, Emulator, assert_bits

pytestmark = pytest.mark.emulation


def mma_call(
    x: torch.Tensor, qw, s, qz, bits: int, group: int, n: int, k: int, splits: int
) -> Call:  # noqa: ANN001
    rep = repack(qw, s, qz, bits, group, k)
    inputs = {"x": x, "qweight": rep.qweight, "scales": rep.scales}
    if rep.zeros is not None:
        inputs["zeros"] = rep.zeros
    params = {
        "n": n,
        "k": k,
        "group_size": rep.layout.kernel_group,
        "bits": bits,
        "m": x.shape[0],
        "dtype": DTYPE_CODE[x.dtype],
        "scale_dtype": DTYPE_CODE[s.dtype],
        "splits": splits,
    }
    return Call("groupwise_int_mma", params, inputs, {"y": (x.dtype, (x.shape[0], n))})


def assert_exact(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> None:
    assert_bits(y, (x.double() @ dense.T).to(x.dtype))


# (m, n, k): one m16 block (MB 1) and two / four (MB 2, 4), partial tiles in M; N not a multiple
# of 64, one partial CTA; K not a multiple of 64 (zero-filled tail); several stages.
SHAPES = [(1, 64, 64), (5, 100, 96), (17, 300, 200), (40, 72, 520), (65, 136, 128)]
ENCODINGS = [
    # (bits, group, sym, scale dtype, act dtype)
    (4, 32, False, torch.float16, torch.float16),  # half math
    (4, 128, True, torch.bfloat16, torch.bfloat16),  # half math, bf16
    (4, -1, False, torch.float16, torch.bfloat16),  # fp32 math (scale dtype != act dtype)
    (8, 64, False, torch.float16, torch.float16),  # 8-bit half math (prmt)
    (8, 16, True, torch.bfloat16, torch.bfloat16),  # 8-bit bf16: fp32 math
    (8, -1, False, torch.bfloat16, torch.float16),
]


@pytest.mark.parametrize(
    "encoding",
    ENCODINGS,
    ids=lambda e: f"{e[0]}b-g{e[1]}-{'sym' if e[2] else 'asym'}-{str(e[3])[6:]}-{str(e[4])[6:]}",
)
def test_mma_recovers_every_weight_exactly(emulator: Emulator, encoding: tuple) -> None:
    """One-hot rows: output row i is column k_i of W, so every weight of the matrix is read back
    through the kernel's whole path (B tiles, lop3/prmt dequant, scales and zeros per group,
    ldmatrix, mma.sync, epilogue placement) and must equal the reference dequantization."""
    bits, group, sym, sdt, act = encoding
    # Per-channel: K = 200 leaves a zero-filled tail in the last 64-deep stage.
    n, k = 136, 200 if group == -1 else (192 if 192 % group == 0 else 256)
    qw, s, qz, dense = integer_weight(n, k, bits, group, sym, sdt)
    calls, xs = [], []
    for start in range(0, k, 96):
        x = one_hot_x(k, range(start, min(k, start + 96)), act)
        xs.append(x)
        calls.append(mma_call(x, qw, s, qz, bits, group, n, k, splits=1))
    for x, out in zip(xs, emulator.run(calls), strict=True):
        assert_exact(out["y"], x, dense)


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_mma_integer_products_are_exact_with_and_without_split_k(
    emulator: Emulator, m: int, n: int, k: int
) -> None:
    bits, group, sym, sdt, act = (4, 8, False, torch.float16, torch.float16)
    group = 8 * 2 if k % 16 == 0 else -1
    qw, s, qz, dense = integer_weight(n, k, bits, group, sym, sdt)
    x = small_integer_x(m, k, act, seed=m + n + k)
    calls = [mma_call(x, qw, s, qz, bits, group, n, k, splits=sp) for sp in (1, 3, 0)]
    for out in emulator.run(calls):
        assert_exact(out["y"], x, dense)


def test_one_wrong_weight_at_k_4096_changes_an_output(plain_emulator: Emulator) -> None:
    """The check above can fail: one code of a 64 x 4096 weight changed by one step (the
    smallest error a layout bug can make) changes exactly the output that reads it."""
    n, k, bits, group = 64, 4096, 4, 128
    qw, s, qz, dense = integer_weight(n, k, bits, group, False, torch.float16)
    codes = bitstream.unpack_bitstream(qw, bits, k)
    codes[37, 4001] ^= 1
    broken = bitstream.pack_bitstream(codes, bits)
    x = one_hot_x(k, range(3990, 4010), torch.float16)
    good, bad = plain_emulator.run(
        [
            mma_call(x, qw, s, qz, bits, group, n, k, 1),
            mma_call(x, broken, s, qz, bits, group, n, k, 1),
        ]
    )
    assert_exact(good["y"], x, dense)
    diff = (good["y"] != bad["y"]).nonzero().tolist()
    assert diff == [[4001 - 3990, 37]]


def test_no_output_depends_on_uninitialised_shared_memory(plain_emulator: Emulator) -> None:
    """Every encoding and shape above, with shared memory filled with 0x00 and then 0xFF bytes
    before each CTA: bit-identical outputs (an output that read unwritten shared memory would
    differ; the deliberately broken variant in test_checkers.py shows that it does)."""
    calls = []
    for bits, group, sym, sdt, act in ENCODINGS:
        for m, n, k in SHAPES[:3]:
            g = group if group == -1 or k % group == 0 else -1
            qw, s, qz, _ = integer_weight(n, k, bits, g, sym, sdt)
            calls.append(mma_call(small_integer_x(m, k, act, m), qw, s, qz, bits, g, n, k, 3))
    zero = plain_emulator.run(calls, env={"QUANTLAB_EMU_SMEM_FILL": "0x00"})
    ones = plain_emulator.run(calls, env={"QUANTLAB_EMU_SMEM_FILL": "0xFF"})
    for a, b in zip(zero, ones, strict=True):
        assert torch.equal(a["y"].view(torch.int16), b["y"].view(torch.int16))


@pytest.mark.parametrize("order", ["reverse", "shuffle:1", "shuffle:2"])
def test_split_k_result_does_not_depend_on_which_cta_finishes_last(
    plain_emulator: Emulator, order: str
) -> None:
    """The last CTA of a tile adds the splits in index order: any CTA order gives the same bits
    (here with real-valued data, where a different summation order would show)."""
    n, k = 300, 1024
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(0, 16, (n, k), generator=gen)
    s = (torch.rand(n, k // 64, generator=gen) + 0.5).to(torch.float16)
    qw = bitstream.pack_bitstream(q, 4)
    x = torch.randn(9, k, generator=gen).to(torch.float16)
    call = mma_call(x, qw, s, None, 4, 64, n, k, 8)
    forward = plain_emulator.run([call])[0]["y"]
    other = plain_emulator.run([call], env={"QUANTLAB_EMU_CTA_ORDER": order})[0]["y"]
    assert torch.equal(forward.view(torch.int16), other.view(torch.int16))
    want = (
        x.double()
        @ reference.groupwise_int_dequant(qw, s, None, 4, 64, k, torch.float16).double().T
    )
    # Real-valued data: the fp32 sums are not exact; each output within its own operands' bound.
    abs_dot = (
        x.double().abs()
        @ reference.groupwise_int_dequant(qw, s, None, 4, 64, k, torch.float16).double().abs().T
    )
    bound = abs_dot * (k * 2.0**-24) + want.abs() * 2.0**-11
    assert bool(((forward.double() - want).abs() <= bound).all())
