"""CUDA ternary kernels against the fp64 oracle of the W1.58A8 arithmetic (skipped without a GPU
or without a CUDA build of quantlab._C_ternary)."""

from __future__ import annotations

import pytest
import torch

from quantlab.formats import ternary_packing as tp
from quantlab.nn.ternary_linear import TernaryLinear
from quantlab.ops import ternary as ops
from quantlab.ops import ternary_reference as ref
from tests.shapes import M_VALUES, NK_SHAPES
from tests.tolerances import LOW_PRECISION_SLACK, ternary_epilogue_bound

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not ops.compiled("cuda"),
        reason="needs a CUDA device and the CUDA build of quantlab._C_ternary",
    ),
]

GRANULARITIES = (0, -1, 32, 64, 128)
SHAPES = (*NK_SHAPES, (4096, 4096), (17, 4), (40, 1000), (300, 4160))


def _case(n: int, k: int, group_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 7919 * n + 31 * k + group_size)
    t = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    s = (0.5 + torch.rand(tp.scale_shape(n, k, group_size), generator=g)).half().float()
    return t, s


def _oracle(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, ...]:
    xq, inv = ref.quantize_activations(x.float().cpu())
    n, k = t.shape
    w = t.double() * s.double().repeat_interleave(k // s.shape[1], dim=1).expand(n, k)
    inv64 = inv.double().unsqueeze(1)
    return (xq.double() @ w.t()) / inv64, (xq.double().abs() @ w.abs().t()) / inv64


def _adds(k: int, m: int, group_size: int) -> int:
    # GEMV: one fp32 add per 32/64-column chunk plus the lane reduction (exact integers per
    # tensor / per row); larger batches: the GEMM's K products.
    return k + 8 if m > 8 else k // 32 + 8


def _valid(k: int, group_size: int) -> bool:
    return group_size <= 0 or k % group_size == 0


CASES = [(n, k, g) for n, k in SHAPES for g in GRANULARITIES if _valid(k, g)]


@pytest.mark.parametrize(("n", "k", "group_size"), CASES)
@pytest.mark.parametrize("m", M_VALUES)
def test_cuda_mm_fp32_matches_oracle(m: int, n: int, k: int, group_size: int) -> None:
    _check_fp32(m, n, k, group_size, "i2")


# tq1 rows and i2 rows that are not 16-byte aligned are converted by the op once per call.
@pytest.mark.parametrize(("n", "k", "group_size"), [(7, 96, 32), (5, 100, -1), (192, 576, 64)])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_cuda_mm_converts_tq1(m: int, n: int, k: int, group_size: int) -> None:
    _check_fp32(m, n, k, group_size, "tq1")


def _check_fp32(m: int, n: int, k: int, group_size: int, packing: str) -> None:
    t, s = _case(n, k, group_size)
    q = (tp.pack_i2(t) if packing == "i2" else tp.pack_tq1(t)).cuda()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).cuda()
    y = ops.matmul(x, q, s.cuda(), packing, k, group_size)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    oracle, abs_dot = _oracle(x, t, s)
    bound = ternary_epilogue_bound(abs_dot, _adds(k, m, group_size))
    assert bool(((y.double().cpu() - oracle).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8, 17, 64])
@pytest.mark.parametrize(("n", "k", "group_size"), [(96, 576, 64), (33, 160, 32), (512, 4096, -1)])
def test_cuda_mm_low_precision(dtype: torch.dtype, m: int, n: int, k: int, group_size: int) -> None:
    t, s = _case(n, k, group_size)
    x = torch.randn(m, k).to(dtype).cuda()
    y = ops.matmul(x, tp.pack_i2(t).cuda(), s.cuda(), "i2", k, group_size)
    assert y.dtype == dtype
    oracle, abs_dot = _oracle(x, t, s)
    err = (y.double().cpu() - oracle).abs()
    if m <= 8:
        # The GEMV keeps fp32 to the end: epilogue bound plus the rounding to the output dtype.
        bound = (
            ternary_epilogue_bound(abs_dot, _adds(k, m, group_size))
            + torch.finfo(dtype).eps * oracle.abs()
        )
        assert bool((err <= bound).all())
    else:
        # Dequantize + cuBLAS in the activation dtype: at most 2x PyTorch's own error on the same
        # dense computation (flash-attention's rule).
        xq, inv = ref.quantize_activations(x.float().cpu())
        xf = (xq.float() / inv.unsqueeze(1)).to(dtype).cuda()
        w = ref.ternary_dequant(tp.pack_i2(t), s, "i2", k, group_size, dtype).cuda()
        torch_err = ((xf @ w.t()).double().cpu() - oracle).abs().max()
        assert float(err.max()) <= 2 * float(torch_err) + LOW_PRECISION_SLACK


@pytest.mark.parametrize("packing", ["i2", "tq1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dequant_is_exact(packing: str, dtype: torch.dtype) -> None:
    t, s = _case(33, 160, 32)
    q = tp.pack_i2(t) if packing == "i2" else tp.pack_tq1(t)
    dense = ops.dequant(q.cuda(), s.cuda(), packing, 160, 32, dtype)
    assert torch.equal(dense.cpu(), ref.ternary_dequant(q, s, packing, 160, 32, dtype))


@pytest.mark.parametrize("group_size", [0, -1, 64])
def test_cuda_integer_arithmetic_is_exact(group_size: int) -> None:
    n, k = 70, 576
    t, _ = _case(n, k, group_size, seed=5)
    g = torch.Generator().manual_seed(9)
    s = 2.0 ** torch.randint(-3, 3, tp.scale_shape(n, k, group_size), generator=g).float()
    x = torch.randint(-127, 128, (5, k), generator=g).float()
    x[:, 0] = 127.0
    y = ops.matmul(x.cuda(), tp.pack_i2(t).cuda(), s.cuda(), "i2", k, group_size)
    oracle, _ = _oracle(x, t, s)
    assert torch.equal(y.double().cpu(), oracle)


def test_cuda_layer_matches_the_oracle_like_the_cpu_layer() -> None:
    from quantlab.formats.ternary import pack
    from quantlab.solvers.ternary import mse_ternarize

    torch.manual_seed(0)
    # tq1 and K = 320: the layer converts to 16-byte-aligned i2 rows once on the GPU.
    cpu = TernaryLinear.from_packed(pack(mse_ternarize(torch.randn(200, 320), 64), "tq1"))
    gpu = TernaryLinear.from_packed(cpu.packed()).cuda()
    x = torch.randn(3, 320)
    oracle, abs_dot = _oracle(x, cpu.trits(), cpu.scales.float())
    for y in (cpu(x), gpu(x.cuda()).cpu()):
        assert bool(((y.double() - oracle).abs() <= ternary_epilogue_bound(abs_dot, 80)).all())


def test_cuda_non_finite_rows() -> None:
    t, s = _case(24, 64, -1)
    x = torch.randn(3, 64)
    x[1, 7] = float("nan")
    x[2, 3] = float("inf")
    y = ops.matmul(x.cuda(), tp.pack_i2(t).cuda(), s.cuda(), "i2", 64, -1).cpu()
    assert bool(torch.isfinite(y[0]).all())
    assert bool(torch.isnan(y[1]).all()) and bool(torch.isnan(y[2]).all())
