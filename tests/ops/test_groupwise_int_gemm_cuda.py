"""The fused tensor-core GEMM of the groupwise-int CUDA kernels (csrc/groupwise_int/cuda_gemm.cu),
which ``groupwise_int_mm`` runs for fp16/bf16 batches of 9-255 rows, against the PyTorch reference.

``torch.ops.quantlab.groupwise_int_gemm_cuda`` runs that kernel alone with split-K forced
(``split_k >= 1``) or chosen by the SM-count heuristic (``split_k == 0``), so every configuration
is reachable whatever the batch size. Everything here needs a CUDA device (sm_80+) and a CUDA
build of the extension; it is skipped otherwise.

Assertions (the same as the CPU emulation's, tests/emulation/test_groupwise_int_emulation.py):
integer-valued data (codes, zero points, power-of-two scales, small integer activations) make
every product and partial sum exact in fp32 in any order, so the kernel's output must equal the
fp64 oracle rounded once to the output dtype, bit for bit; one wrong weight changes an output.
Only the dequantize + cuBLAS path (batches from 256), which may reduce in the activation dtype,
is held to a rounding bound instead.
"""

from __future__ import annotations

import pytest
import torch

from quantlab.formats import bitstream
from quantlab.ops import groupwise_int as ops
from quantlab.ops import groupwise_int_reference as reference
from quantlab.ops._extension import extension_error
from tests.tolerances import LOW_PRECISION_SLACK, fp32_dot_bound


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if not ops.compiled("cuda"):
        return f"CUDA GEMM kernel not built: {extension_error() or 'the extension has no CUDA'}"
    if torch.cuda.get_device_capability()[0] < 8:
        return "the tensor-core GEMM needs sm_80+"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

DTYPES = (torch.float16, torch.bfloat16)
# split_k 1: one pass over K, result written directly; 3: three K ranges reduced from an fp32
# workspace (K tiles are 64 wide, so K = 64 leaves one split and K = 192 gets exactly three).
SPLITS = (1, 3)


def _gemm(x, qw, s, qz, bits: int, group: int, split_k: int) -> torch.Tensor:  # noqa: ANN001
    return torch.ops.quantlab.groupwise_int_gemm_cuda(x, qw, s, qz, bits, group, split_k)


def _weight(
    n: int, k: int, bits: int, group: int, sym: bool, scale_dtype: torch.dtype = torch.float16
) -> tuple:
    """Random codes over the full range (3-bit values straddling words included), random zero
    points, power-of-two scales (exact in every scale dtype, and (q - z) * s exact); the dense
    weight is the reference dequantization (the format's specification)."""
    gen = torch.Generator(device="cuda").manual_seed(n * 7919 + k * 31 + bits * 3 + int(sym))
    groups = 1 if group == -1 else k // group
    q = torch.randint(0, 2**bits, (n, k), device="cuda", generator=gen)
    qw = bitstream.pack_bitstream(q, bits)
    s = 2.0 ** torch.randint(-3, 1, (n, groups), device="cuda", generator=gen).float()
    s = s.to(scale_dtype)
    qz = None
    if not sym:
        z = torch.randint(0, 2**bits, (n, groups), device="cuda", generator=gen)
        qz = bitstream.pack_bitstream(z, bits)
    dense = reference.groupwise_int_dequant(qw, s, qz, bits, group, k, torch.float32)
    return qw, s, qz, dense


def _x(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(m * 131 + k)
    return torch.randint(-2, 3, (m, k), device="cuda", generator=gen).to(dtype)


def _assert_exact(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> None:
    """The fp64 oracle rounded once to the output dtype, bit for bit (module docstring)."""
    assert y.dtype == x.dtype and y.shape == (x.shape[0], dense.shape[0])
    want = (x.double() @ dense.double().t()).to(x.dtype)
    bad = (y.view(torch.int16) != want.view(torch.int16)).nonzero()
    assert bad.numel() == 0, f"{len(bad)} outputs differ, first at {bad[0].tolist()}"


def _assert_low_precision_close(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> None:
    """tests/tolerances.py's rule for fp16/bf16 activations: the max error against the fp64 oracle
    is at most 2x that of PyTorch's own dense matmul in the same dtype (x @ W.to(dtype).T, cuBLAS,
    fp32 accumulation) plus LOW_PRECISION_SLACK. The kernel multiplies the same dtype-rounded x and
    W (its dequantized tile is bit-identical to W.to(dtype)), accumulates the exact products in
    fp32 and rounds once to the dtype, so its per-output error equals cuBLAS's up to the fp32
    summation order (relative 1e-7 against a dtype rounding of 1e-3 to 1e-2): 2x is ample, and a
    single misplaced or mis-decoded weight (error ~|x_k w_k| ~ 1) is far outside it."""
    dtype = x.dtype
    assert y.dtype == dtype and y.shape == (x.shape[0], dense.shape[0])
    oracle = x.double() @ dense.double().t()
    torch_err = float(((x @ dense.to(dtype).t()).double() - oracle).abs().max())
    err = float((y.double() - oracle).abs().max())
    assert err <= 2 * torch_err + LOW_PRECISION_SLACK, (err, torch_err)


# Every (M, N, K) of the sweep: batches just past the GEMV, at tile edges (16/32/64 rows) and just
# below the cuBLAS cut-off; N and K from one tile to real layer sizes, with N not a multiple of 64.
SHAPE_CASES = [
    (m, n, k)
    for m in (9, 17, 33, 100, 255)
    for n in (8, 24, 100, 4096)
    for k in (64, 192, 576, 4096)
]


@pytest.mark.parametrize("split_k", SPLITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SHAPE_CASES)
def test_gemm_shapes_match_reference(
    m: int, n: int, k: int, dtype: torch.dtype, split_k: int
) -> None:
    qw, s, qz, dense = _weight(n, k, 4, 64, sym=False)
    x = _x(m, k, dtype)
    _assert_exact(_gemm(x, qw, s, qz, 4, 64, split_k), x, dense)


FORMAT_CASES = [
    (m, n, k, bits, group, sym)
    for m, n, k in ((33, 100, 576), (17, 24, 4096), (255, 8, 192))
    for bits in (2, 3, 4, 8)
    for group in (32, 64, 128, -1)
    for sym in (False, True)
    if group == -1 or k % group == 0
]


@pytest.mark.parametrize("split_k", SPLITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k", "bits", "group", "sym"), FORMAT_CASES)
def test_gemm_every_format_matches_reference(
    m: int, n: int, k: int, bits: int, group: int, sym: bool, dtype: torch.dtype, split_k: int
) -> None:
    qw, s, qz, dense = _weight(n, k, bits, group, sym, scale_dtype=torch.bfloat16)
    x = _x(m, k, dtype)
    _assert_exact(_gemm(x, qw, s, qz, bits, group, split_k), x, dense)


@pytest.mark.parametrize("split_k", SPLITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("m", "n", "k"), [(9, 24, 100), (40, 70, 36), (20, 5, 4), (64, 65, 1004)])
def test_gemm_per_channel_k_not_multiple_of_8(
    m: int, n: int, k: int, bits: int, sym: bool, dtype: torch.dtype, split_k: int
) -> None:
    """Per-channel rows whose K is not a multiple of 8: the last dequant chunk is partial (and may
    end inside the row's last word), and x is read element by element."""
    qw, s, qz, dense = _weight(n, k, bits, -1, sym)
    x = _x(m, k, dtype)
    _assert_exact(_gemm(x, qw, s, qz, bits, -1, split_k), x, dense)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "n", "k", "bits", "group"),
    [(9, 8, 4096, 4, 128), (33, 100, 4096, 3, 64), (100, 4096, 576, 8, 32), (17, 24, 1000, 2, -1)],
)
def test_split_k_agrees_with_no_split(
    m: int, n: int, k: int, bits: int, group: int, dtype: torch.dtype
) -> None:
    """Every split count (0 = the heuristic) against one pass: on integer-valued data every
    order of the fp32 sums is exact, so all agree bit for bit with the oracle; on real-valued
    activations each split stays within the operands' fp32 rounding bound of the exact sum."""
    qw, s, qz, dense = _weight(n, k, bits, group, sym=False)
    x = _x(m, k, dtype)
    one = _gemm(x, qw, s, qz, bits, group, 1)
    _assert_exact(one, x, dense)
    for split_k in (0, 2, 3, 5, 16, 64):
        assert torch.equal(_gemm(x, qw, s, qz, bits, group, split_k), one), split_k
    xr = torch.randn(m, k, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    xr = xr.to(dtype)
    w_dt = dense.to(dtype)
    oracle = xr.double() @ w_dt.double().t()
    bound = fp32_dot_bound(xr, w_dt) + torch.finfo(dtype).eps * oracle.abs() + 2.0**-24
    for split_k in (1, 16):
        err = (_gemm(xr, qw, s, qz, bits, group, split_k).double() - oracle).abs()
        assert bool((err <= bound).all()), split_k


def test_mm_routes_mid_size_batches_to_the_gemm() -> None:
    path = torch.ops.quantlab.groupwise_int_cuda_path
    for dtype in DTYPES:
        assert path(8, 576, 576, 4, 64, dtype) == "gemv"
        for m in (9, 100, 255):
            assert path(m, 576, 576, 4, 64, dtype) == "gemm"
            assert path(m, 100, 100, 3, -1, dtype) == "gemm"
        assert path(256, 576, 576, 4, 64, dtype) == "dequant-matmul"  # compute-bound: cuBLAS
        assert path(100, 96, 96, 4, 12, dtype) == "dequant-matmul"  # group not a multiple of 8
    assert path(100, 576, 576, 4, 64, torch.float32) == "dequant-matmul"
    # groupwise_int_mm runs that very kernel: deterministic, so bit-equal to the op run alone with
    # the same (heuristic) split count.
    for m, n, k in ((9, 8, 4096), (100, 4096, 576), (255, 100, 192)):
        qw, s, qz, _ = _weight(n, k, 4, 64, sym=False)
        for dtype in DTYPES:
            x = _x(m, k, dtype)
            assert torch.equal(ops.matmul(x, qw, s, qz, 4, 64), _gemm(x, qw, s, qz, 4, 64, 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mm_batches_around_the_cutoffs_match_reference(dtype: torch.dtype) -> None:
    qw, s, qz, dense = _weight(300, 576, 4, 64, sym=True)
    for m in (8, 9, 255, 256):
        x = _x(m, 576, dtype)
        y = ops.matmul(x, qw, s, qz, 4, 64)
        if m < 256:  # the GEMV and the fused GEMM: exact
            _assert_exact(y, x, dense)
        else:  # dequantize + cuBLAS
            _assert_low_precision_close(y, x, dense)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_unaligned_and_strided_x(dtype: torch.dtype) -> None:
    """x starting 2 bytes past a 16-byte boundary takes the element-wise load path and a strided x
    is made contiguous; both give exactly the aligned result."""
    m, n, k = 33, 100, 576
    qw, s, qz, _ = _weight(n, k, 4, 64, sym=False)
    x = _x(m, k, dtype)
    want = _gemm(x, qw, s, qz, 4, 64, 1)
    flat = torch.empty(m * k + 1, device="cuda", dtype=dtype)
    flat[1:] = x.reshape(-1)
    shifted = flat[1:].view(m, k)
    assert shifted.data_ptr() % 16 != 0
    assert torch.equal(_gemm(shifted, qw, s, qz, 4, 64, 1), want)
    wide = torch.zeros(m, 2 * k, device="cuda", dtype=dtype)
    wide[:, ::2] = x
    assert torch.equal(_gemm(wide[:, ::2], qw, s, qz, 4, 64, 1), want)


def test_gemm_bad_arguments_are_named() -> None:
    qw, s, qz, _ = _weight(16, 96, 4, 32, sym=False)
    with pytest.raises(RuntimeError, match="x must be fp16 or bf16"):
        _gemm(torch.randn(9, 96, device="cuda"), qw, s, qz, 4, 32, 0)
    with pytest.raises(RuntimeError, match="split_k must be >= 0"):
        _gemm(_x(9, 96, torch.float16), qw, s, qz, 4, 32, -1)
    qw12, s12, qz12, _ = _weight(16, 96, 4, 12, sym=False)
    with pytest.raises(RuntimeError, match="group size that is a multiple of 8"):
        _gemm(_x(9, 96, torch.float16), qw12, s12, qz12, 4, 12, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mm_with_no_rows_returns_an_empty_result_like_the_cpu_op(dtype: torch.dtype) -> None:
    qw, s, qz, _ = _weight(48, 96, 4, 32, sym=False)
    y = ops.matmul(torch.empty(0, 96, device="cuda", dtype=dtype), qw, s, qz, 4, 32)
    cpu = ops.matmul(torch.empty(0, 96, dtype=dtype), qw.cpu(), s.cpu(), qz.cpu(), 4, 32)
    assert y.shape == cpu.shape == (0, 48) and y.dtype == cpu.dtype == dtype
