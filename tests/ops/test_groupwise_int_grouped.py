"""``groupwise_int_grouped_mm`` (a mixture's experts in one op) against the per-expert op and the
PyTorch reference, and its refusals of bad offsets and stacks."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from quantlab.formats.groupwise_int import pack
from quantlab.ops import groupwise_int as ops
from quantlab.ops import groupwise_int_reference as reference
from quantlab.ops._extension import extension_error
from quantlab.solvers.rtn import rtn_quantize
from tests.tolerances import fp32_dot_bound

needs_cpu_kernel = pytest.mark.skipif(
    not ops.compiled("cpu", "groupwise_int_grouped_mm"),
    reason=f"CPU kernel not built: {extension_error()}",
)


def stacked(experts: int, n: int, k: int, bits: int, group: int, sym: bool, scale_dtype) -> tuple:  # noqa: ANN001
    """``experts`` RTN-quantized random weights stacked ``[E, N, ...]`` and their dense fp32."""
    torch.manual_seed(experts * 101 + n * 7 + k + bits)
    packs, dense = [], []
    for _ in range(experts):
        r = rtn_quantize(torch.randn(n, k), bits, group, sym)
        packs.append(pack(r, scale_dtype=scale_dtype))
        dense.append(r.dequantize())
    qw = torch.stack([p.qweight for p in packs])
    s = torch.stack([p.scales for p in packs])
    qz = None if sym else torch.stack([p.qzeros for p in packs])
    dq = reference.groupwise_int_dequant
    w = torch.stack(
        [dq(p.qweight, p.scales, p.qzeros, bits, group, k, torch.float32) for p in packs]
    )
    return qw, s, qz, w


def offsets_of(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)


# Experts without rows (first, between, last), 1..8 rows (the GEMV), 9..32 rows (chunked GEMV for
# large weights, dequantize + GEMM here) and 40 (dequantize + GEMM).
COUNTS = [0, 1, 8, 0, 3, 9, 40, 2, 0]

CONFIGS = [
    (192, 576, 4, 64, False, "float16"),  # a MoEfied SmolLM2 expert's gate / up
    (576, 192, 4, 64, True, "bfloat16"),  # its down projection
    (45, 100, 3, -1, False, "float32"),  # odd rows, per-channel K not a multiple of 8
    (33, 256, 2, 32, True, "float16"),
    (16, 128, 8, 128, False, "bfloat16"),
]


@needs_cpu_kernel
@pytest.mark.parametrize(("n", "k", "bits", "group", "sym", "scale_dtype"), CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_is_each_experts_matmul(
    n: int, k: int, bits: int, group: int, sym: bool, scale_dtype: str, dtype: torch.dtype
) -> None:
    """Per expert, bit for bit what ``groupwise_int_mm`` gives on that expert's rows (the same
    kernels), and within fp32's accumulation bound of the fp64 product with its own weight."""
    qw, s, qz, w = stacked(len(COUNTS), n, k, bits, group, sym, scale_dtype)
    offsets = offsets_of(COUNTS)
    x = torch.randn(int(offsets[-1]), k).to(dtype)
    y = ops.grouped_matmul(x, offsets, qw, s, qz, bits, group)
    assert y.dtype == dtype and y.shape == (x.shape[0], n)
    bounds = offsets.tolist()
    for e, (first, end) in enumerate(pairwise(bounds)):
        if end == first:
            continue
        zeros = None if qz is None else qz[e]
        alone = ops.matmul(x[first:end], qw[e], s[e], zeros, bits, group)
        assert torch.equal(y[first:end], alone), f"expert {e}"
        if dtype == torch.float32:
            xe = x[first:end]
            oracle = xe.double() @ w[e].double().T
            err = (y[first:end].double() - oracle).abs()
            assert bool((err <= fp32_dot_bound(xe, w[e])).all()), f"expert {e}"


@needs_cpu_kernel
def test_grouped_catches_one_wrong_weight() -> None:
    """The bound above is tight enough to see a single code off by one in one expert."""
    n, k, bits, group = 64, 128, 4, 64
    qw, s, qz, w = stacked(4, n, k, bits, group, False, "float16")
    offsets = offsets_of([2, 3, 1, 2])
    x = torch.randn(8, k)
    bad = qw.clone()
    bad[2, 17, 3] ^= 1 << 4  # one 4-bit code of expert 2, row 17
    y = ops.grouped_matmul(x, offsets, bad, s, qz, bits, group)
    xe = x[5:6]
    err = (y[5:6].double() - xe.double() @ w[2].double().T).abs()
    assert not bool((err <= fp32_dot_bound(xe, w[2])).all())


@needs_cpu_kernel
def test_grouped_equals_the_reference_and_the_torch_path() -> None:
    """The reference (registered where no kernel is built) and the kernel agree within fp32
    accumulation; no rows at all is an empty result."""
    n, k, bits, group = 40, 192, 4, 64
    qw, s, qz, w = stacked(5, n, k, bits, group, False, "float16")
    offsets = offsets_of([3, 0, 5, 1, 2])
    x = torch.randn(11, k)
    y = ops.grouped_matmul(x, offsets, qw, s, qz, bits, group)
    ref = reference.groupwise_int_grouped_mm(x, offsets, qw, s, qz, bits, group)
    expert = torch.repeat_interleave(torch.arange(5), offsets.diff())
    wx = w[expert]  # [R, N, K]: each row's own weight
    bound = k * 2**-23 * torch.einsum("rk,rnk->rn", x.abs().double(), wx.abs().double())
    assert bool(((y.double() - ref.double()).abs() <= 2 * bound).all())
    empty = ops.grouped_matmul(x[:0], offsets_of([0] * 5), qw, s, qz, bits, group)
    assert empty.shape == (0, n)


BAD_OFFSETS = [
    (torch.tensor([0, 2, 4], dtype=torch.int64), "entries"),  # E = 3 needs 4
    (torch.tensor([1, 2, 3, 4], dtype=torch.int64), "from 0"),
    (torch.tensor([0, 2, 3, 3], dtype=torch.int64), "from 0 to"),  # ends at 3, x has 4 rows
    (torch.tensor([0, 3, 2, 4], dtype=torch.int64), "nondecreasing"),
    (torch.tensor([0, 1, 2, 4], dtype=torch.int32), "int64"),
]


@needs_cpu_kernel
@pytest.mark.parametrize(("offsets", "message"), BAD_OFFSETS)
def test_bad_offsets_are_refused(offsets: torch.Tensor, message: str) -> None:
    """By the Python op and by the compiled op itself (which the CUDA kernel relies on: it reads
    the offsets on the device unchecked)."""
    qw, s, qz, _ = stacked(3, 8, 64, 4, 32, False, "float16")
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match=message):
        ops.grouped_matmul(x, offsets, qw, s, qz, 4, 32)
    with pytest.raises(RuntimeError, match="offsets"):
        torch.ops.quantlab.groupwise_int_grouped_mm(x, offsets, qw, s, qz, 4, 32)


@needs_cpu_kernel
def test_bad_stacks_are_refused() -> None:
    qw, s, qz, _ = stacked(3, 8, 64, 4, 32, False, "float16")
    x = torch.randn(4, 64)
    offsets = offsets_of([1, 1, 2])
    op = torch.ops.quantlab.groupwise_int_grouped_mm
    with pytest.raises(RuntimeError, match="stacked 3-D"):
        op(x, offsets, qw[0], s[0], qz[0], 4, 32)
    with pytest.raises(RuntimeError, match="same number of experts"):
        op(x, offsets, qw, s[:2], qz, 4, 32)
    with pytest.raises(RuntimeError, match="qweight must be"):
        op(torch.randn(4, 96), offsets, qw, s, qz, 4, 32)
