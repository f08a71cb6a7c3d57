"""Ternary ops: the compiled CPU kernels against the PyTorch reference (the layouts'
specification) and an fp64 oracle of the W1.58A8 arithmetic."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from quantlab.formats import ternary_packing as tp
from quantlab.ops import ternary as ops
from quantlab.ops import ternary_reference as ref
from quantlab.ops._extension import extension_error
from tests.shapes import M_VALUES, NK_SHAPES
from tests.tolerances import a8_activation_bound, ternary_epilogue_bound

needs_cpu_kernel = pytest.mark.skipif(
    ops.backend("cpu") != "cpu-kernel",
    reason=f"CPU kernel not built: {extension_error(ops.FAMILY)}",
)

GRANULARITIES = (0, -1, 32, 64, 128)
# The shared shapes plus ones that are awkward for the LUT layout: N not a multiple of 16, K not
# a multiple of 8 (per-tensor / per-row only), K = 4.
SHAPES = (*NK_SHAPES, (17, 4), (40, 1000), (1, 8))


def _case(n: int, k: int, group_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 7919 * n + 31 * k + group_size)
    t = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    # Scales within 3x of each other, as in real layers (group scales of a row vary that much).
    s = (0.5 + torch.rand(tp.scale_shape(n, k, group_size), generator=g)).half().float()
    return t, s


def _oracle(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """y in fp64 and the epilogue's |sum| from the exact integer formula."""
    xq, inv = ref.quantize_activations(x)
    n, k = t.shape
    w = t.double() * s.double().repeat_interleave(k // s.shape[1], dim=1).expand(n, k)
    inv64 = inv.double().unsqueeze(1)
    return (xq.double() @ w.t()) / inv64, (xq.double().abs() @ w.abs().t()) / inv64


def _cpu_adds(k: int, group_size: int, m: int = 1) -> int:
    """fp32 additions per output of the CPU op: one per segment of <= 32 quads in the LUT kernel;
    batches past 16 rows run a GEMM over the K products (exact with per-tensor / per-row scales,
    whose integer sums stay below 2^24)."""
    if m > 16 and group_size > 0:
        return k
    quads = -(-k // 8) * 2
    seg = min(group_size // 4, 32) if group_size > 0 else 32
    return -(-quads // seg)


def _valid(k: int, group_size: int) -> bool:
    return group_size <= 0 or k % group_size == 0


CASES = [(n, k, g) for n, k in SHAPES for g in GRANULARITIES if _valid(k, g)]


@needs_cpu_kernel
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("packing", ["i2", "tq1"])
def test_cpu_lut_pack_matches_reference(n: int, k: int, packing: str) -> None:
    t, _ = _case(n, k, 0)
    q = tp.pack_i2(t) if packing == "i2" else tp.pack_tq1(t)
    assert torch.equal(ops.lut_pack(q, packing, n, k), tp.lut_pack(t))


@needs_cpu_kernel
def test_cpu_lut_pack_accepts_padded_i2_rows_and_rejects_corrupt_codes() -> None:
    t, _ = _case(9, 20, 0)
    q = torch.nn.functional.pad(tp.pack_i2(t), (0, 11), value=0xFF)  # 5 -> 16 bytes per row
    assert torch.equal(ops.lut_pack(q, "i2", 9, 20), tp.lut_pack(t))
    bad = tp.pack_i2(t)
    bad[3, 2] = 0xFF
    with pytest.raises(ValueError, match="corrupt i2 weights: 4 entries"):
        ops.lut_pack(bad, "i2", 9, 20)
    bad = tp.pack_tq1(t)
    bad[0, 0] = 1  # ceil(256 v / 243) skips 1: no 5 trits encode to it
    with pytest.raises(ValueError, match="corrupt tq1 weights"):
        ops.lut_pack(bad, "tq1", 9, 20)


@needs_cpu_kernel
@pytest.mark.parametrize(("n", "k", "group_size"), CASES)
@pytest.mark.parametrize("m", M_VALUES)
def test_cpu_lut_mm_matches_fp64_oracle(m: int, n: int, k: int, group_size: int) -> None:
    t, s = _case(n, k, group_size)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = ops.lut_mm(x, tp.lut_pack(t), ops.lut_scales(s, n, k, group_size), n, k, group_size)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    oracle, abs_dot = _oracle(x, t, s, group_size)
    bound = ternary_epilogue_bound(abs_dot, _cpu_adds(k, group_size, m))
    assert bool(((y.double() - oracle).abs() <= bound).all())


@needs_cpu_kernel
@pytest.mark.parametrize("group_size", [0, -1, 64])
def test_cpu_lut_mm_integer_arithmetic_is_exact(group_size: int) -> None:
    """Rows of x with max |x| = 127 and integer entries give inv = 1 and xq = x; power-of-two
    scales make every product and sum exact in fp32: the kernel must equal the oracle exactly."""
    n, k = 70, 576
    t, _ = _case(n, k, group_size, seed=5)
    g = torch.Generator().manual_seed(9)
    s = 2.0 ** torch.randint(-3, 3, tp.scale_shape(n, k, group_size), generator=g).float()
    x = torch.randint(-127, 128, (5, k), generator=g).float()
    x[:, 0] = 127.0
    y = ops.lut_mm(x, tp.lut_pack(t), ops.lut_scales(s, n, k, group_size), n, k, group_size)
    oracle, _ = _oracle(x, t, s, group_size)
    assert torch.equal(y.double(), oracle)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8, 17])
def test_cpu_lut_mm_low_precision_activations(dtype: torch.dtype, m: int) -> None:
    n, k, group_size = 96, 576, 64
    t, s = _case(n, k, group_size)
    x = torch.randn(m, k).to(dtype)
    y = ops.lut_mm(x, tp.lut_pack(t), ops.lut_scales(s, n, k, group_size), n, k, group_size)
    assert y.dtype == dtype and y.shape == (m, n)
    # The int8 activations come from the exact fp32 value of x, so the only extra error is the
    # final rounding to the output dtype.
    oracle, abs_dot = _oracle(x.float(), t, s, group_size)
    eps = torch.finfo(dtype).eps
    bound = ternary_epilogue_bound(abs_dot, _cpu_adds(k, group_size, m)) + eps * oracle.abs()
    assert bool(((y.double() - oracle).abs() <= bound).all())


@needs_cpu_kernel
def test_cpu_lut_mm_against_the_unquantized_matmul() -> None:
    """What the int8 activations cost, against x @ W.T in fp64: at most half a step per input."""
    n, k, group_size = 64, 1536, 32
    t, s = _case(n, k, group_size)
    x = torch.randn(4, k)
    y = ops.lut_mm(x, tp.lut_pack(t), ops.lut_scales(s, n, k, group_size), n, k, group_size)
    w = ref.ternary_dequant(tp.pack_i2(t), s, "i2", k, group_size, torch.float64)
    _, inv = ref.quantize_activations(x)
    _, abs_dot = _oracle(x, t, s, group_size)
    bound = a8_activation_bound(w, inv) + ternary_epilogue_bound(abs_dot, _cpu_adds(k, 32))
    assert bool(((y.double() - x.double() @ w.t()).abs() <= bound).all())


def test_activation_quantization_matches_transformers_bitlinear() -> None:
    # transformers' BitLinear.activation_quant, written out: Qp / max|x|, round, clamp.
    x = torch.randn(64, 300) * torch.rand(64, 1) * 10
    scale = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    expected = (x * scale).round().clamp(-128, 127).to(torch.int8)
    xq, inv = ref.quantize_activations(x)
    assert torch.equal(xq, expected) and torch.equal(inv, scale.squeeze(1))


def test_stored_layout_and_lut_layout_references_agree() -> None:
    n, k, group_size = 33, 160, 32
    t, s = _case(n, k, group_size)
    x = torch.randn(3, k)
    lut = ops.lut_scales(s, n, k, group_size)
    by_lut = ref.ternary_lut_mm(x, tp.lut_pack(t), lut, n, k, group_size)
    for q, packing in ((tp.pack_i2(t), "i2"), (tp.pack_tq1(t), "tq1")):
        assert torch.equal(ref.ternary_mm(x, q, s, packing, k, group_size), by_lut)


@needs_cpu_kernel
def test_cpu_path_choice() -> None:
    isa = ops.cpu_path(1, 64, 64, 0)
    assert isa in ("lut-avx2", "lut-scalar")
    assert ops.cpu_path(16, 64, 64, 0) == isa
    assert ops.cpu_path(17, 64, 64, 0) == "dequant-matmul"


@needs_cpu_kernel
def test_cpu_lut_mm_empty_batch_and_non_finite_rows() -> None:
    n, k = 24, 64
    t, s = _case(n, k, -1)
    lut, ls = tp.lut_pack(t), ops.lut_scales(s, n, k, -1)
    assert ops.lut_mm(torch.empty(0, k), lut, ls, n, k, -1).shape == (0, n)
    x = torch.randn(3, k)
    x[1, 7] = float("nan")
    x[2, 3] = float("inf")
    y = ops.lut_mm(x, lut, ls, n, k, -1)
    assert bool(torch.isfinite(y[0]).all())
    assert bool(torch.isnan(y[1]).all()) and bool(torch.isnan(y[2]).all())


@needs_cpu_kernel
def test_cpu_lut_mm_bad_arguments_are_named() -> None:
    n, k = 24, 64
    t, s = _case(n, k, 32)
    lut, ls = tp.lut_pack(t), ops.lut_scales(s, n, k, 32)
    x = torch.randn(2, k)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        ops.lut_mm(torch.randn(2, 65), lut, ls, n, k, 32)
    with pytest.raises(ValueError, match=r"lut must be \[2, 8, 32\]"):
        ops.lut_mm(x, lut[:1], ls, n, k, 32)
    with pytest.raises(ValueError, match=r"lut_scales must be \[2, 2, 16\]"):
        ops.lut_mm(x, lut, s, n, k, 32)
    with pytest.raises(ValueError, match="group_size must be"):
        ops.lut_mm(x, lut, ls, n, k, 12)
    with pytest.raises(ValueError, match="lut must be uint8"):
        ops.lut_mm(x, lut.to(torch.int32), ls, n, k, 32)


def test_reference_bad_arguments_are_named() -> None:
    t, s = _case(8, 64, 32)
    with pytest.raises(ValueError, match=r"scales must be \[8, 2\]"):
        ref.ternary_mm(torch.randn(2, 64), tp.pack_i2(t), s[:, :1], "i2", 64, 32)
    with pytest.raises(ValueError, match="packing must be one of"):
        ref.ternary_mm(torch.randn(2, 64), tp.pack_i2(t), s, "i3", 64, 32)
    with pytest.raises(ValueError, match="positive divisor"):
        tp.scale_shape(8, 64, 48)


def test_dequant_op_is_exact() -> None:
    t, s = _case(33, 160, 32)
    for q, packing in ((tp.pack_i2(t), "i2"), (tp.pack_tq1(t), "tq1")):
        dense = ops.dequant(q, s, packing, 160, 32, torch.float32)
        assert torch.equal(dense, t.float() * s.repeat_interleave(32, dim=1))


_SCALAR_SCRIPT = """
import hashlib, sys, torch
from quantlab.formats import ternary_packing as tp
from quantlab.ops import ternary as ops
sys.path.insert(0, {root!r})
from tests.ops.test_ternary_ops import _scalar_cases
assert ops.cpu_path(1, 64, 64, 0) == "lut-scalar", ops.cpu_path(1, 64, 64, 0)
h = hashlib.sha256()
for x, lut, ls, n, k, g, t in _scalar_cases():
    q = tp.pack_i2(t)
    assert torch.equal(ops.lut_pack(q, "i2", n, k), lut)
    h.update(ops.lut_mm(x, lut, ls, n, k, g).numpy().tobytes())
print("digest", h.hexdigest())
"""


def _scalar_cases() -> list[tuple]:
    cases = []
    for n, k, g in ((33, 160, 32), (64, 576, 64), (5, 100, -1), (17, 1536, 0), (40, 256, 128)):
        t, s = _case(n, k, g, seed=11)
        for m in (1, 5):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k))
            cases.append((x, tp.lut_pack(t), ops.lut_scales(s, n, k, g), n, k, g, t))
    return cases


@needs_cpu_kernel
def test_cpu_scalar_path_gives_identical_results() -> None:
    """The portable path (non-AVX2 CPUs), forced with QUANTLAB_CPU_ISA=scalar in a subprocess
    (the choice is made once per process), must produce bit-identical outputs: same integer sums,
    same fp32 epilogue."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "QUANTLAB_CPU_ISA": "scalar", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _SCALAR_SCRIPT.format(root=root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    h = hashlib.sha256()
    for x, lut, ls, n, k, g, _ in _scalar_cases():
        h.update(ops.lut_mm(x, lut, ls, n, k, g).numpy().tobytes())
    assert done.stdout.split()[-1] == h.hexdigest()


def test_tolerance_detects_a_single_integer_error() -> None:
    """The epilogue bound is below one integer step for these shapes, so an off-by-one anywhere
    in a row's integer sum cannot pass the oracle tests."""
    for n, k in NK_SHAPES:
        for g in GRANULARITIES:
            if not _valid(k, g):
                continue
            t, s = _case(n, k, g)
            x = torch.randn(8, k)
            _, inv = ref.quantize_activations(x)
            _, abs_dot = _oracle(x, t, s, g)
            bound = ternary_epilogue_bound(abs_dot, _cpu_adds(k, g))
            # One integer step of output n is (its smallest scale) / inv.
            step = s.min(dim=1).values.double().view(1, -1) / inv.double().unsqueeze(1)
            assert bool((bound < step).all()), (n, k, g)


def test_ops_pass_opcheck() -> None:
    """Schemas, fake (meta) impls and dispatch are consistent, so torch.compile can trace them."""
    n, k = 33, 160
    t, s = _case(n, k, 32)
    x = torch.randn(3, k)
    q = tp.pack_i2(t)
    cases = [
        (
            torch.ops.quantlab.ternary_lut_mm,
            (x, tp.lut_pack(t), ops.lut_scales(s, n, k, 32), n, k, 32),
        ),
        (torch.ops.quantlab.ternary_lut_pack, (q, "i2", n, k)),
        (torch.ops.quantlab.ternary_mm, (x, q, s, "i2", k, 32)),
        (torch.ops.quantlab.ternary_dequant, (q, s, "i2", k, 32, torch.float32)),
    ]
    # test_aot_dispatch_dynamic passes as well but compiles graphs for seconds; left out here.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=checks)
