"""The BitStack CUDA kernels (csrc/bitstack/cuda_kernels.cu: the tensor-core sign GEMV and the row
rebuild) on the CPU emulation, under ASan + UBSan and under TSan.

Inputs are what csrc/bindings/bitstack_cuda.cpp hands the kernels: signs uint8 ``[B, N, KB]``
(MSB first), ``u`` and ``v`` as fp16 ``[B, N, r]`` / ``[B, r, K]``, x and y fp16 or bf16 (the
binding sends fp32 activations, K % 32 != 0 and batches above 8 to the row rebuild).

GEMV exactness. The kernel's right-hand sides are ``T(T(v) * x)`` (v rounded from fp16 to the
activation type T -- a real rounding for bf16 -- then one rounded product), summed by mma.sync
in fp32, weighted by u in fp32 and summed over ranks, blocks, lanes and warps in fp32. Here v is
``+-[1, 2)`` with fp16's 10 fraction bits (not bf16-representable: the bf16 rounding of v shows),
u is ``+-1`` or ``+-2`` and x is ``{-1, 0, 1} * 2^e`` (one e per row), so ``T(v) * x`` is exact,
every term is a multiple of ``2^(e - 10)`` and every partial sum is bounded by
``4 B r K 2^e < 2^(e + 14)`` (B r K < 4096 below): every fp32 partial sum is exact, whatever the
order, and the output is the fp64 oracle (the right-hand sides rounded as the kernel rounds them)
rounded once to T, bit for bit. A flipped sign changes an exact output by ``2 sum_r u v x``
(a multiple of 2^(e-10), non-zero unless the rank terms cancel exactly); the fp16 / bf16 output
shows it unless the output's rounding (2^-11 / 2^-8 relative) absorbs it, see
test_one_wrong_sign_changes_exactly_the_outputs_that_read_it.

Row rebuild: ``out = sum_b +-(sum_r u v)`` in fp32, in that order (products of fp16 values are
exact in fp32), reproduced in the same order in torch fp32, bit for bit with Gaussian factors.
"""

from __future__ import annotations

import pytest
import torch

from quantlab.formats.bitstack import pack_signs
from tests.emulation.emulator import DTYPE_CODE, Call, Emulator, assert_bits

pytestmark = pytest.mark.emulation

HALF_TYPES = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def exact_factors(n: int, k: int, rank: int, blocks: int, seed: int) -> tuple:
    """Random signs; u in +-{1, 2}, v in +-[1, 2) with 10 fraction bits (fp16)."""
    gen = torch.Generator().manual_seed(seed)
    positive = torch.rand(blocks, n, k, generator=gen) > 0.5

    def sign(*shape: int) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=gen) * 2.0 - 1.0

    u = sign(blocks, n, rank) * 2.0 ** torch.randint(0, 2, (blocks, n, rank), generator=gen)
    v = sign(blocks, rank, k) * (
        1 + torch.randint(0, 1024, (blocks, rank, k), generator=gen) / 1024
    )
    return positive, u.half(), v.half()


def gaussian_factors(n: int, k: int, rank: int, blocks: int, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    positive = torch.rand(blocks, n, k, generator=gen) > 0.5
    u = torch.randn(blocks, n, rank, generator=gen).half()
    v = torch.randn(blocks, rank, k, generator=gen).half()
    return positive, u, v


def sign_activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``{-1, 0, 1} * 2^e`` with e in -2 .. 2 per row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (m, k), generator=gen).double()
    return (x * 2.0 ** torch.randint(-2, 3, (m, 1), generator=gen)).to(dtype)


def inputs(positive: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "signs": pack_signs(positive).contiguous(),
        "u": u.view(torch.int16),
        "v": v.view(torch.int16),
    }


def params(positive: torch.Tensor, rank: int) -> dict[str, int]:
    blocks, n, k = positive.shape
    return {"blocks": blocks, "n": n, "k": k, "rank": rank}


def gemv_call(positive: torch.Tensor, u: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> Call:
    p = params(positive, u.shape[2]) | {"m": x.shape[0], "dtype": DTYPE_CODE[x.dtype]}
    c = Call(
        "bitstack_gemv",
        p,
        inputs(positive, u, v),
        {"y": (x.dtype, (x.shape[0], positive.shape[1]))},
    )
    c.inputs["x"] = x
    return c


def rows_call(
    positive: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    row0: int,
    row1: int,
    dtype: torch.dtype,
) -> Call:
    p = params(positive, u.shape[2]) | {"row0": row0, "row1": row1, "dtype": DTYPE_CODE[dtype]}
    return Call(
        "bitstack_dequant_rows",
        p,
        inputs(positive, u, v),
        {"out": (dtype, (row1 - row0, positive.shape[2]))},
    )


def gemv_terms(positive: torch.Tensor, u: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> tuple:
    """fp64 ``y`` and ``sum |terms|`` [M, N] with the kernel's right-hand sides T(T(v) * x)."""
    rhs = (v.to(x.dtype).unsqueeze(2) * x.unsqueeze(0).unsqueeze(0)).double()  # [B, r, M, K] in T
    s = positive.double() * 2 - 1
    z = torch.einsum("bnk,brmk->bnrm", s, rhs)
    z_abs = torch.einsum("bnk,brmk->bnrm", torch.ones_like(s), rhs.abs())
    y = torch.einsum("bnr,bnrm->mn", u.double(), z)
    y_abs = torch.einsum("bnr,bnrm->mn", u.double().abs(), z_abs)
    return y, y_abs


def rows_oracle(
    positive: torch.Tensor, u: torch.Tensor, v: torch.Tensor, row0: int, row1: int
) -> torch.Tensor:
    """The rebuild's fp32 arithmetic in its order: mag = sum_r u v (r ascending), then
    total = sum_b +-mag (b ascending)."""
    blocks, _, k = positive.shape
    total = torch.zeros(row1 - row0, k, dtype=torch.float32)
    for b in range(blocks):
        mag = torch.zeros(row1 - row0, k, dtype=torch.float32)
        for r in range(u.shape[2]):
            mag = mag + u[b, row0:row1, r : r + 1].float() * v[b, r].float()
        total = total + torch.where(positive[b, row0:row1], mag, -mag)
    return total


# (n, k, rank, blocks, m): every batch size 1..8 (one template each), r * M columns filling 1, 2,
# 3 and 4 n8 tiles (the last one partly: columns past r * M masked), N not a multiple of the 16
# rows of a CTA, K / 32 steps fewer than the 4 warps (K = 32, 96), not a multiple of 4 (96, 160,
# 224) and several per warp; rank 1, several blocks.
GEMV_CASES = [
    (7, 96, 3, 2, 1),
    (33, 160, 5, 3, 2),
    (40, 256, 2, 2, 3),
    (20, 64, 4, 1, 4),
    (17, 128, 4, 2, 5),
    (24, 32, 4, 3, 6),
    (12, 128, 5, 2, 6),
    (16, 192, 1, 4, 7),
    (50, 224, 4, 1, 8),
]


def test_gemv_is_exact(emulator: Emulator) -> None:
    """Every case in fp16 and bf16, one runner process; each output bit for bit."""
    calls, wants, names = [], [], []
    for n, k, rank, blocks, m in GEMV_CASES:
        assert blocks * rank * k < 4096 and rank * m <= 32  # exactness; kGemvMaxColumns
        positive, u, v = exact_factors(n, k, rank, blocks, seed=n * k + m)
        for dt in HALF_TYPES:
            x = sign_activations(m, k, dt, seed=m + k)
            calls.append(gemv_call(positive, u, v, x))
            wants.append(gemv_terms(positive, u, v, x)[0].to(dt))
            names.append(f"{n}x{k} r{rank} b{blocks} m{m} {dt}")
    for out, want, name in zip(emulator.run(calls), wants, names, strict=True):
        assert_bits(out["y"], want, name)


def test_gemv_with_gaussian_factors_is_within_its_rounding_bound(emulator: Emulator) -> None:
    """Gaussian u, v and x: the right-hand sides T(T(v) * x) are reproduced exactly; the fp32
    sums (at most K / 64 mma roundings per warp, then r products and sums, B blocks, 2 lane and
    4 warp additions: n <= K / 16 + 2 r + 2 B + 8 roundings) and the final rounding to T bound
    each output's error by ``n 2^-24 sum|terms| + 2^-p |y|`` (p = 11 fp16, 8 bf16). For the
    shapes here that is about 4e-6 sum|terms| + 2^-p |y|, while a flipped sign moves an output
    by 2 |sum_r u v x| (about 1 here, sum|terms| ~ 60)."""
    calls, cases = [], []
    for n, k, rank, blocks, m in [(33, 160, 5, 3, 2), (20, 256, 4, 2, 8)]:
        positive, u, v = gaussian_factors(n, k, rank, blocks, seed=k)
        for dt in HALF_TYPES:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dt)
            calls.append(gemv_call(positive, u, v, x))
            cases.append((positive, u, v, x, k // 16 + 2 * rank + 2 * blocks + 8))
    for out, (positive, u, v, x, n_round) in zip(emulator.run(calls), cases, strict=True):
        y, y_abs = gemv_terms(positive, u, v, x)
        p = 11 if x.dtype == torch.float16 else 8
        bound = n_round * 2.0**-24 * y_abs * 1.01 + y.abs() * 2.0**-p + 2.0**-24
        err = (out["y"].double() - y).abs()
        assert bool((err <= bound).all()), f"{x.dtype}: worst {float((err / bound).max()):.2f}"


# (n, k, rank, blocks, row ranges): K not a multiple of 8 (a partial last sign byte) or of 32
# (the binding's fallback for such K), one row, sub-ranges as the binding's tiles take them.
ROWS_CASES = [
    (33, 100, 5, 3, [(0, 33), (5, 21)]),
    (7, 96, 3, 2, [(0, 7)]),
    (3, 13, 1, 1, [(0, 3), (2, 3)]),
    (70, 40, 2, 2, [(64, 70)]),
]


def test_dequant_rows_is_the_fp32_rebuild(emulator: Emulator) -> None:
    calls, wants = [], []
    for n, k, rank, blocks, ranges in ROWS_CASES:
        positive, u, v = gaussian_factors(n, k, rank, blocks, seed=n + k)
        for row0, row1 in ranges:
            want = rows_oracle(positive, u, v, row0, row1)
            for dt in DTYPES:
                calls.append(rows_call(positive, u, v, row0, row1, dt))
                wants.append(want.to(dt))
    for i, (out, want) in enumerate(zip(emulator.run(calls), wants, strict=True)):
        assert_bits(out["out"], want, f"call {i}")


def test_one_wrong_sign_changes_exactly_the_outputs_that_read_it(plain_emulator: Emulator) -> None:
    """The checks above can fail: one sign bit of block 1 flipped changes exactly the GEMV
    outputs of its row (every batch row, in fp16 and bf16) and exactly one rebuilt weight."""
    n, k, rank, blocks, m, row, col = 40, 256, 2, 2, 3, 5, 77
    positive, u, v = exact_factors(n, k, rank, blocks, seed=1)
    flipped = positive.clone()
    flipped[1, row, col] = ~flipped[1, row, col]
    calls, wants = [], []
    for dt in HALF_TYPES:
        x = sign_activations(m, k, dt, seed=2)
        x[:, col] = 1
        y_good = gemv_terms(positive, u, v, x)[0]
        assert bool((gemv_terms(flipped, u, v, x)[0][:, row] != y_good[:, row]).all())
        calls += [gemv_call(positive, u, v, x), gemv_call(flipped, u, v, x)]
        wants.append(y_good.to(dt))
    calls.append(rows_call(flipped, u, v, 0, n, torch.float32))
    outs = plain_emulator.run(calls)
    for i, want in enumerate(wants):
        good, bad = outs[2 * i]["y"], outs[2 * i + 1]["y"]
        assert_bits(good, want, str(want.dtype))
        assert (bad != want).nonzero().tolist() == [[j, row] for j in range(m)]
    rebuilt = rows_oracle(positive, u, v, 0, n)
    assert (outs[-1]["out"] != rebuilt).nonzero().tolist() == [[row, col]]
