"""``groupwise_int_grouped_mm`` on a GPU (csrc/groupwise_int/cuda_grouped.cu and its binding):
one launch for all experts when none has more than 8 rows, else each expert through
``groupwise_int_mm``'s kernels. Needs a CUDA device and a CUDA build; skipped otherwise (the
kernel's arithmetic is also checked on the CPU emulation, tests/emulation/).

Integer-valued data (codes, zero points, power-of-two scales, small integer activations) make
every product and partial sum exact in fp32, so the one-launch output must equal the fp64 oracle
rounded once to the output dtype, bit for bit; one wrong weight changes an output.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from quantlab.ops import groupwise_int as ops
from quantlab.ops._extension import extension_error
from tests.emulation.cases import integer_weight


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if not ops.compiled("cuda", "groupwise_int_grouped_mm"):
        return f"CUDA grouped kernel not built: {extension_error() or 'the extension has no CUDA'}"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def _stacked(experts: int, n: int, k: int, bits: int, group: int, sym: bool, sdt) -> tuple:  # noqa: ANN001
    qw, s, qz, dense = integer_weight(experts * n, k, bits, group, sym, sdt, max_scale_exp=1)
    cut = [None if t is None else t.reshape(experts, n, -1) for t in (qw, s, qz, dense)]
    return tuple(None if t is None else t.cuda() for t in cut[:3]) + (cut[3],)


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64)


def _oracle(dense: torch.Tensor, offsets: torch.Tensor, x64: torch.Tensor) -> torch.Tensor:
    bounds = offsets.tolist()
    return torch.cat([x64[a:b] @ dense[e].T for e, (a, b) in enumerate(pairwise(bounds))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("bits", "group", "sym", "scale_dtype"),
    [(4, 32, False, torch.float16), (3, 64, True, torch.bfloat16), (8, -1, False, torch.float32)],
)
@pytest.mark.parametrize(
    "counts",
    [[0, 1, 0, 8, 3, 0], [1] * 64, [0] * 10 + [2]],  # decode shapes: every expert <= 8 rows
)
def test_one_launch_is_exact(
    counts: list[int],
    bits: int,
    group: int,
    sym: bool,
    scale_dtype,
    dtype,  # noqa: ANN001
) -> None:
    n, k = 45, 101 if group == -1 else 192
    qw, s, qz, dense = _stacked(len(counts), n, k, bits, group, sym, scale_dtype)
    offsets = _offsets(counts)
    gen = torch.Generator().manual_seed(sum(counts))
    x64 = torch.randint(-2, 3, (int(offsets[-1]), k), generator=gen).double()
    op = torch.ops.quantlab.groupwise_int_grouped_mm
    y = op(x64.to(dtype).cuda(), offsets, qw, s, qz, bits, group)
    torch.testing.assert_close(y.cpu(), _oracle(dense, offsets, x64).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_experts_take_each_experts_matmul(dtype: torch.dtype) -> None:
    """An expert with more than 8 rows sends every expert through groupwise_int_mm (the fused
    GEMM or dequantize + cuBLAS): bit for bit that op on each expert's rows."""
    counts = [0, 9, 2, 300, 40]
    qw, s, qz, _ = _stacked(len(counts), 64, 256, 4, 64, False, torch.float16)
    offsets = _offsets(counts)
    x = torch.randn(int(offsets[-1]), 256, device="cuda").to(dtype)
    y = torch.ops.quantlab.groupwise_int_grouped_mm(x, offsets, qw, s, qz, 4, 64)
    for e, (a, b) in enumerate(pairwise(offsets.tolist())):
        if b > a:
            alone = torch.ops.quantlab.groupwise_int_mm(x[a:b], qw[e], s[e], qz[e], 4, 64)
            assert torch.equal(y[a:b], alone), f"expert {e}"


def test_bad_offsets_are_refused_before_any_launch() -> None:
    qw, s, qz, _ = _stacked(3, 8, 64, 4, 32, False, torch.float16)
    x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    op = torch.ops.quantlab.groupwise_int_grouped_mm
    with pytest.raises(RuntimeError, match="offsets"):
        op(x, torch.tensor([0, 1, 2, 5]), qw, s, qz, 4, 32)
    with pytest.raises(RuntimeError, match="CPU int64"):
        op(x, torch.tensor([0, 1, 2, 4], device="cuda"), qw, s, qz, 4, 32)
