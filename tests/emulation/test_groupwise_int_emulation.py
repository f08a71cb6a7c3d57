"""The groupwise-int CUDA kernels on the exported layout (csrc/groupwise_int/cuda_kernels.cu:
dequant and the warp-per-row GEMV; cuda_gemm.cu: the wmma GEMM with split-K) on the CPU
emulation, under ASan + UBSan and under TSan.

Integer-valued data make every product and partial sum exact in fp32, so each output must equal
the fp64 oracle rounded once to the output dtype, bit for bit; the binding's preparation (scales
converted to fp32) is done here as the binding does it.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from tests.emulation.cases import integer_weight
from tests.emulation.emulator import DTYPE_CODE, Call, Emulator, assert_bits

pytestmark = pytest.mark.emulation


def weight(n: int, k: int, bits: int, group: int, sym: bool) -> tuple:
    """fp32 scales in [2**-3, 2], as the binding hands them to the kernels."""
    return integer_weight(n, k, bits, group, sym, torch.float32, max_scale_exp=1)


def call(op: str, n: int, k: int, bits: int, group: int, qw, s, qz, **extra) -> Call:  # noqa: ANN001
    inputs = {"qweight": qw, "scales": s.float()}
    if qz is not None:
        inputs["qzeros"] = qz
    params = {"n": n, "k": k, "bits": bits, "group_size": k if group == -1 else group}
    c = Call(op, params, inputs)
    for name, value in extra.items():
        if isinstance(value, torch.Tensor):
            c.inputs[name] = value
        else:
            c.params[name] = value
    return c


def assert_exact(y: torch.Tensor, want: torch.Tensor) -> None:
    assert_bits(y, want)


ENCODINGS = [(2, 32, False), (3, 64, False), (3, -1, True), (4, 128, True), (8, 32, False)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize(("bits", "group", "sym"), ENCODINGS)
def test_dequant_is_the_reference(emulator: Emulator, bits: int, group: int, sym: bool) -> None:
    n, k = 37, 96 if group == -1 else 128
    if group == -1:
        k = 100  # per-channel: any K
    qw, s, qz, dense = weight(n, k, bits, group, sym)
    calls = [
        call("groupwise_int_dequant", n, k, bits, group, qw, s, qz, dtype=DTYPE_CODE[dt])
        for dt in DTYPES
    ]
    for c, dt in zip(calls, DTYPES, strict=True):
        c.outputs["out"] = (dt, (n, k))
    for out, dt in zip(emulator.run(calls), DTYPES, strict=True):
        assert_exact(out["out"], dense.to(dt))


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize(("bits", "group", "sym"), ENCODINGS)
def test_gemv_integer_products_are_exact(
    emulator: Emulator, m: int, bits: int, group: int, sym: bool
) -> None:
    # N not a multiple of the 8 rows of a CTA; per-channel K = 101 exercises the scalar tail.
    n, k = 45, 101 if group == -1 else 256
    qw, s, qz, dense = weight(n, k, bits, group, sym)
    gen = torch.Generator().manual_seed(m)
    x64 = torch.randint(-2, 3, (m, k), generator=gen).double()
    calls = []
    for dt in DTYPES:
        c = call("groupwise_int_gemv", n, k, bits, group, qw, s, qz, x=x64.to(dt), m=m)
        c.params["dtype"] = DTYPE_CODE[dt]
        c.outputs["y"] = (dt, (m, n))
        calls.append(c)
    for out, dt in zip(emulator.run(calls), DTYPES, strict=True):
        assert_exact(out["y"], (x64 @ dense.T).to(dt))


@pytest.mark.parametrize("splits", [1, 3, 0])
@pytest.mark.parametrize(
    ("m", "n", "k", "bits", "group"),
    [(9, 100, 192, 4, 64), (33, 64, 320, 3, 32), (70, 70, 128, 8, -1)],
)
def test_wmma_gemm_integer_products_are_exact(
    emulator: Emulator, splits: int, m: int, n: int, k: int, bits: int, group: int
) -> None:
    qw, s, qz, dense = weight(n, k, bits, group, False)
    gen = torch.Generator().manual_seed(m + splits)
    x64 = torch.randint(-2, 3, (m, k), generator=gen).double()
    calls = []
    for dt in (torch.float16, torch.bfloat16):
        c = call("groupwise_int_gemm", n, k, bits, group, qw, s, qz, x=x64.to(dt), m=m)
        c.params.update(dtype=DTYPE_CODE[dt], splits=splits)
        c.outputs["y"] = (dt, (m, n))
        calls.append(c)
    for out, dt in zip(emulator.run(calls), (torch.float16, torch.bfloat16), strict=True):
        assert_exact(out["y"], (x64 @ dense.T).to(dt))


def stacked_weight(experts: int, n: int, k: int, bits: int, group: int, sym: bool, sdt) -> tuple:  # noqa: ANN001
    """``experts`` different weights of one shape, stacked ``[E, N, ...]`` (one integer weight of
    E * N rows cut into experts, so a CTA that reads the wrong expert gets other codes)."""
    qw, s, qz, dense = integer_weight(experts * n, k, bits, group, sym, sdt, max_scale_exp=1)
    stack = (t.reshape(experts, n, -1) if t is not None else None for t in (qw, s, qz, dense))
    return tuple(stack)


def grouped_call(w: tuple, offsets: list[int], x: torch.Tensor, bits: int, group: int) -> Call:
    qw, s, qz, _dense = w
    experts, n, k = qw.shape[0], qw.shape[1], x.shape[1]
    inputs = {"qweight": qw, "scales": s, "offsets": torch.tensor(offsets, dtype=torch.int64)}
    if qz is not None:
        inputs["qzeros"] = qz
    if x.shape[0]:
        inputs["x"] = x
    params = {
        "experts": experts,
        "n": n,
        "k": k,
        "bits": bits,
        "group_size": k if group == -1 else group,
        "rows": x.shape[0],
        "dtype": DTYPE_CODE[x.dtype],
        "scale_dtype": DTYPE_CODE[s.dtype],
    }
    c = Call("groupwise_int_grouped_gemv", params, inputs)
    if x.shape[0]:
        c.outputs["y"] = (x.dtype, (x.shape[0], n))
    return c


def grouped_oracle(w: tuple, offsets: list[int], x64: torch.Tensor) -> torch.Tensor:
    dense = w[3]
    parts = [x64[a:b] @ dense[e].T for e, (a, b) in enumerate(pairwise(offsets))]
    return torch.cat(parts)


# Rows per expert: experts without rows first, last and between; tiles of 8 cut at 1, 7, 8, 9 and
# 17 rows (one expert spans three CTA rows); every row count of a tile appears.
GROUPED_COUNTS = [0, 3, 0, 9, 1, 8, 17, 0, 2, 4, 5, 6, 7, 0]


@pytest.mark.parametrize(
    ("bits", "group", "sym", "scale_dtype"),
    [
        (4, 32, False, torch.float16),
        (3, 64, False, torch.bfloat16),
        (2, -1, True, torch.float32),
        (8, 32, True, torch.float16),
    ],
)
def test_grouped_gemv_is_every_experts_gemv(
    emulator: Emulator, bits: int, group: int, sym: bool, scale_dtype: torch.dtype
) -> None:
    """Each row of the sorted tokens gets exactly its own expert's product: integer data, so the
    output is the fp64 oracle rounded once, bit for bit; N = 45 is not a multiple of a CTA's 8
    warps, per-channel K = 101 takes the scalar tail."""
    n, k = 45, 101 if group == -1 else 128
    counts = GROUPED_COUNTS
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    w = stacked_weight(len(counts), n, k, bits, group, sym, scale_dtype)
    gen = torch.Generator().manual_seed(bits * 11 + k)
    x64 = torch.randint(-2, 3, (offsets[-1], k), generator=gen).double()
    calls = [grouped_call(w, offsets, x64.to(dt), bits, group) for dt in DTYPES]
    want = grouped_oracle(w, offsets, x64)
    for out, dt in zip(emulator.run(calls), DTYPES, strict=True):
        assert_exact(out["y"], want.to(dt))


def test_grouped_gemv_single_expert_and_single_row(emulator: Emulator) -> None:
    """Degenerate mixtures: one expert holding every row (several tiles), and one row among many
    experts (grid.y's bound far above the one tile)."""
    n, k, bits, group = 19, 64, 4, 32
    one = stacked_weight(1, n, k, bits, group, False, torch.float16)
    many = stacked_weight(64, n, k, bits, group, False, torch.float16)
    gen = torch.Generator().manual_seed(5)
    x_all = torch.randint(-2, 3, (20, k), generator=gen).double()
    x_one = x_all[:1]
    lone = [0] * 41 + [1] * 24  # the row goes to expert 40
    calls = [
        grouped_call(one, [0, 20], x_all.half(), bits, group),
        grouped_call(many, lone, x_one.half(), bits, group),
    ]
    out = emulator.run(calls)
    assert_exact(out[0]["y"], grouped_oracle(one, [0, 20], x_all).half())
    assert_exact(out[1]["y"], (x_one @ many[3][40].T).half())


def test_grouped_gemv_refuses_a_grid_it_cannot_launch(emulator: Emulator) -> None:
    """More CTA rows than a launch takes: the launcher refuses (no launch, no partial output)
    rather than computing part of the rows; zero rows launch nothing and succeed."""
    n, k, bits, group = 8, 32, 4, 32
    w = stacked_weight(2, n, k, bits, group, True, torch.float16)
    rows = 8 * 65535  # grid rows = 65535 + 2 > 65535
    big = grouped_call(w, [0, 0, rows], torch.zeros(1, k, dtype=torch.float16), bits, group)
    big.params["rows"] = rows
    big.params["expect_error"] = 1
    empty = grouped_call(w, [0, 0, 0], torch.zeros(0, k, dtype=torch.float16), bits, group)
    emulator.run([big, empty])
    assert emulator.last_stdout.count("error invalid argument") == 1
