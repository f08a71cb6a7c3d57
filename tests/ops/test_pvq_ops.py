"""Compiled PVQ kernels (CPU, and CUDA on a GPU) against the PyTorch reference."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from quantlab.formats.bitstream import pack_fields
from quantlab.formats.pvq_codebook import PVQParams
from quantlab.ops import pvq as ops
from quantlab.ops import pvq_reference as reference
from quantlab.ops._extension import extension_error
from tests.shapes import M_VALUES, NK_SHAPES
from tests.tolerances import LOW_PRECISION_SLACK, fp32_dot_bound

ROOT = Path(__file__).resolve().parents[2]

needs_cpu_kernel = pytest.mark.skipif(
    not ops.compiled("cpu"),
    reason=f"PVQ CPU kernel not built: {extension_error('pvq')}",
)
needs_cuda_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.compiled("cuda")),
    reason="needs a CUDA device and the CUDA build of quantlab._C_pvq",
)


def _encoding(k: int) -> list[tuple[int, int, int]]:
    """(dim, pulses, levels) choices that divide K: the default 3.25-bit one, a short vector
    with many levels, and one with a single level."""
    out = []
    for d, p, lv in ((16, 28, 6), (8, 14, 8), (4, 9, 3), (5, 7, 1), (2, 40, 2)):
        if k % d == 0:
            out.append((d, p, lv))
    return out[:2]


CASES = [(n, k, *enc) for n, k in NK_SHAPES for enc in _encoding(k)]
CASE_NAMES = ("n", "k", "dim", "pulses", "levels")


def _packed(n: int, k: int, dim: int, pulses: int, levels: int, device: str = "cpu") -> tuple:
    """Random codes over the whole valid range (every pyramid point and level is reachable),
    random fp16 row scales and ascending levels."""
    gen = torch.Generator().manual_seed(n * 7919 + k * 31 + dim)
    p = PVQParams(dim, pulses, levels)
    n_codes = n * (k // dim)
    codes = (torch.rand(n_codes, generator=gen, dtype=torch.float64) * (p.size * levels)).long()
    codes = codes.clamp_(0, p.size * levels - 1)
    words = pack_fields(codes, p.code_bits)
    scales = (torch.rand(n, generator=gen) + 0.5).half()
    lv = torch.sort(torch.rand(levels, generator=gen) * 2 + 0.1).values.half()
    to = {"device": device}
    return words.to(**to), scales.to(**to), lv.to(**to)


@lru_cache(maxsize=4)
def _reference_weight(n: int, k: int, dim: int, pulses: int, levels: int) -> torch.Tensor:
    """The reference decode of :func:`_packed`'s weight (computed once per case)."""
    codes, scales, lv = _packed(n, k, dim, pulses, levels)
    return reference.pvq_decode(codes, scales, lv, dim, pulses, k)


@needs_cpu_kernel
@pytest.mark.parametrize(CASE_NAMES, CASES)
def test_cpu_decode_is_exact(n: int, k: int, dim: int, pulses: int, levels: int) -> None:
    codes, scales, lv = _packed(n, k, dim, pulses, levels)
    out = ops.decode(codes, scales, lv, dim, pulses, k)
    ref = _reference_weight(n, k, dim, pulses, levels)
    assert out.dtype == torch.float32 and out.shape == (n, k)
    assert torch.equal(out, ref)
    low = ops.decode(codes, scales, lv, dim, pulses, k, torch.bfloat16)
    assert torch.equal(low, ref.bfloat16())


@needs_cpu_kernel
@pytest.mark.parametrize(CASE_NAMES, CASES)
def test_cpu_mm_matches_oracle(n: int, k: int, dim: int, pulses: int, levels: int) -> None:
    """Every batch size: 1-8 take the decode-GEMV kernel, larger ones decode + GEMM."""
    codes, scales, lv = _packed(n, k, dim, pulses, levels)
    w = _reference_weight(n, k, dim, pulses, levels)
    for m in M_VALUES:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        y = ops.matmul(x, codes, scales, lv, dim, pulses)
        oracle = x.double() @ w.double().t()
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert bool(((y.double() - oracle).abs() <= fp32_dot_bound(x, w)).all()), m


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_cpu_low_precision_activations(dtype: torch.dtype, m: int) -> None:
    n, k, d, p, lv_count = 33, 576, 16, 28, 6
    codes, scales, lv = _packed(n, k, d, p, lv_count)
    w = reference.pvq_decode(codes, scales, lv, d, p, k)
    x = torch.randn(m, k).to(dtype)
    y = ops.matmul(x, codes, scales, lv, d, p)
    assert y.dtype == dtype
    oracle = x.double() @ w.double().t()
    same_dtype = (x @ w.to(dtype).t()).double()
    limit = 2 * float((same_dtype - oracle).abs().max()) + LOW_PRECISION_SLACK
    assert float((y.double() - oracle).abs().max()) <= limit


_SCALAR_SCRIPT = """
import torch
from quantlab.ops import pvq as ops
from quantlab.ops import pvq_reference as reference
from tests.ops.test_pvq_ops import _packed
from tests.tolerances import fp32_dot_bound
assert ops.cpu_path() == "scalar", ops.cpu_path()
for n, k, d, p, lv in [(33, 160, 16, 28, 6), (5, 100, 4, 9, 3), (7, 96, 8, 14, 8)]:
    codes, scales, levels = _packed(n, k, d, p, lv)
    w = reference.pvq_decode(codes, scales, levels, d, p, k)
    assert torch.equal(ops.decode(codes, scales, levels, d, p, k), w)
    for m in (1, 3, 8):
        x = torch.randn(m, k)
        y = ops.matmul(x, codes, scales, levels, d, p)
        err = (y.double() - x.double() @ w.double().t()).abs()
        assert bool((err <= fp32_dot_bound(x, w)).all())
print("scalar-ok")
"""


@needs_cpu_kernel
def test_cpu_scalar_path_matches_reference() -> None:
    """The portable dot-product path (CPUs without AVX2) forced in a subprocess."""
    env = {**os.environ, "QUANTLAB_CPU_ISA": "scalar", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _SCALAR_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "scalar-ok" in done.stdout


@needs_cpu_kernel
def test_cpu_path_reports_the_isa() -> None:
    assert ops.backend("cpu") == "cpu-kernel"
    assert ops.cpu_path() in ("avx2", "scalar")


def _bad_calls() -> list[tuple[str, tuple, str]]:
    codes, scales, lv = _packed(7, 96, 16, 28, 6)
    return [
        ("short codes", (codes[:-1], scales, lv, 16, 28, 96), "codes must be int32"),
        ("int64 codes", (codes.long(), scales, lv, 16, 28, 96), "codes must be int32"),
        ("dim does not divide", (codes, scales, lv, 16, 28, 100), "must divide in_features"),
        ("no levels", (codes, scales, lv[:0], 16, 28, 96), "levels must be"),
        ("2-D scales", (codes, scales.view(7, 1), lv, 16, 28, 96), "row_scales must be"),
        ("codes too wide", (codes, scales, lv, 32, 64, 96), "bits"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_are_clear_errors(case: int) -> None:
    """The compiled op (RuntimeError from TORCH_CHECK) and the reference (ValueError) both name
    the problem."""
    _, args, message = _bad_calls()[case]
    with pytest.raises((ValueError, RuntimeError), match=message):
        ops.decode(*args)
    with pytest.raises(ValueError, match=message):
        reference.pvq_decode(*args)


def test_mm_rejects_bad_x() -> None:
    codes, scales, lv = _packed(7, 96, 16, 28, 6)
    with pytest.raises((ValueError, RuntimeError), match="must divide in_features|codes must"):
        ops.matmul(torch.randn(2, 80), codes, scales, lv, 16, 28)
    with pytest.raises((ValueError, RuntimeError), match="2-D|float"):
        ops.matmul(torch.randn(96), codes, scales, lv, 16, 28)


def test_corrupt_codes_raise() -> None:
    codes, scales, lv = _packed(7, 96, 16, 28, 6)
    codes = torch.full_like(codes, -1)  # every code 2^51 - 1: no such (level, index)
    with pytest.raises((ValueError, RuntimeError), match="corrupt"):
        ops.decode(codes, scales, lv, 16, 28, 96)
    with pytest.raises((ValueError, RuntimeError), match="corrupt"):
        ops.matmul(torch.randn(2, 96), codes, scales, lv, 16, 28)


def test_ops_pass_the_torch_library_checks() -> None:
    """Schema, fake (meta) implementation and autograd registration agree with the kernel
    (the AOT-dispatch checks are left out: they compile and take most of a minute on 2 cores)."""
    codes, scales, lv = _packed(7, 96, 16, 28, 6)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(
        torch.ops.quantlab.pvq_decode.default,
        (codes, scales, lv, 16, 28, 96, torch.float32),
        test_utils=checks,
    )
    torch.library.opcheck(
        torch.ops.quantlab.pvq_mm.default,
        (torch.randn(3, 96), codes, scales, lv, 16, 28),
        test_utils=checks,
    )


# ---- CUDA (run on a GPU machine; skipped elsewhere) -----------------------------------------


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize(CASE_NAMES, CASES)
def test_cuda_decode_is_exact(n: int, k: int, dim: int, pulses: int, levels: int) -> None:
    codes, scales, lv = _packed(n, k, dim, pulses, levels)
    ref = _reference_weight(n, k, dim, pulses, levels)
    args = (codes.cuda(), scales.cuda(), lv.cuda(), dim, pulses, k)
    assert torch.equal(ops.decode(*args).cpu(), ref)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(ops.decode(*args, dtype).cpu(), ref.to(dtype))


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize(CASE_NAMES, CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_mm_matches_oracle(
    n: int, k: int, dim: int, pulses: int, levels: int, dtype: torch.dtype
) -> None:
    """Batches 1-8 take the warp-per-row decode-GEMV kernel, larger ones decode + cuBLAS."""
    codes, scales, lv = _packed(n, k, dim, pulses, levels)
    w = _reference_weight(n, k, dim, pulses, levels)
    dev = (codes.cuda(), scales.cuda(), lv.cuda())
    for m in M_VALUES:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        y = ops.matmul(x.cuda(), *dev, dim, pulses).cpu()
        assert y.dtype == dtype and y.shape == (m, n)
        oracle = x.double() @ w.double().t()
        err = (y.double() - oracle).abs()
        if dtype == torch.float32:
            assert bool((err <= fp32_dot_bound(x, w)).all()), m
        else:
            same_dtype = (x.cuda() @ w.to(dtype).cuda().t()).double().cpu()
            limit = 2 * float((same_dtype - oracle).abs().max()) + LOW_PRECISION_SLACK
            assert float(err.max()) <= limit, m
