"""BitStack kernels (CPU, and CUDA where present) against the PyTorch reference and a dense fp64
oracle. The reference itself is checked against the oracle too: it is the specification."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

from quantlab.formats.bitstack import pack
from quantlab.ops import bitstack as ops
from quantlab.ops import bitstack_reference as reference
from quantlab.ops._extension import extension_error
from quantlab.ops.kernel_policy import KernelPathWarning
from tests.shapes import M_VALUES
from tests.tolerances import LOW_PRECISION_SLACK, bitstack_bound

needs_cpu_kernel = pytest.mark.skipif(
    not ops.compiled("cpu"),
    reason=f"BitStack CPU kernel not built: {extension_error('bitstack')}",
)

# (N, K, rank, blocks): SmolLM2's shapes at the default rank and the paper's, plus odd ones
# (rows not a multiple of the 4-row tile, K not a multiple of 8 or 32, rank 1, ranks that are not
# a multiple of the vector width, rank > 16 on the AVX2 path).
SHAPES = (
    (576, 576, 2, 3),
    (192, 576, 16, 2),
    (1536, 576, 4, 2),
    (576, 1536, 2, 2),
    (7, 96, 3, 2),
    (33, 160, 5, 3),
    (5, 100, 2, 2),
    (1, 8, 1, 1),
    (64, 200, 20, 2),
)


@functools.cache
def _case(n: int, k: int, r: int, b: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """Packed random blocks and their dense fp64 weight (cached: tests never modify them)."""
    g = torch.Generator().manual_seed(n * 131 + k * 7 + r * 3 + b)
    positive = torch.rand(b, n, k, generator=g) > 0.5
    packed = pack(positive, torch.randn(b, n, r, generator=g), torch.randn(b, r, k, generator=g))
    dense = torch.zeros(n, k, dtype=torch.float64)
    for i in range(b):  # the dense oracle, in fp64, straight from the definition
        sign = torch.where(positive[i], 1.0, -1.0).double()
        dense += sign * (packed.u[i].double() @ packed.v[i].double())
    return (*(t.to(device) for t in (packed.signs, packed.u, packed.v)), dense.to(device))


@pytest.mark.parametrize(("n", "k", "r", "b"), SHAPES)
@pytest.mark.parametrize("m", [1, 3, 9])  # both reference paths (sign GEMV <= 8 rows, tiles above)
def test_reference_matches_dense_oracle(m: int, n: int, k: int, r: int, b: int) -> None:
    signs, u, v, dense = _case(n, k, r, b)
    x = torch.randn(m, k)
    y = reference.bitstack_mm(x, signs, u, v)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert bool(((y.double() - x.double() @ dense.t()).abs() <= bitstack_bound(x, u, v)).all())
    w = reference.bitstack_dequant(signs, u, v, k)
    assert torch.allclose(w.double(), dense, atol=1e-4, rtol=1e-5)


@needs_cpu_kernel
@pytest.mark.parametrize(("n", "k", "r", "b"), SHAPES)
@pytest.mark.parametrize("m", M_VALUES)
def test_cpu_matmul_matches_dense_oracle(m: int, n: int, k: int, r: int, b: int) -> None:
    signs, u, v, dense = _case(n, k, r, b)
    x = torch.randn(m, k)
    y = ops.matmul(x, signs, u, v)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert bool(((y.double() - x.double() @ dense.t()).abs() <= bitstack_bound(x, u, v)).all())


@needs_cpu_kernel
@pytest.mark.parametrize(("n", "k", "r", "b"), SHAPES)
def test_cpu_dequant_matches_oracle(n: int, k: int, r: int, b: int) -> None:
    signs, u, v, dense = _case(n, k, r, b)
    w = ops.dequant(signs, u, v, k, torch.float32)
    # Each weight sums B * r products in fp32: (r + B) * eps relative to sum |u| |v|.
    mag = torch.einsum("bnr,brk->nk", u.abs().double(), v.abs().double())
    assert bool(((w.double() - dense).abs() <= (r + b) * 1.2e-7 * mag).all())
    assert ops.dequant(signs, u, v, k, torch.bfloat16).dtype == torch.bfloat16


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 9])
def test_cpu_matmul_low_precision_activations(dtype: torch.dtype, m: int) -> None:
    signs, u, v, dense = _case(96, 576, 2, 3)
    x = torch.randn(m, 576).to(dtype)
    y = ops.matmul(x, signs, u, v)
    assert y.dtype == dtype
    oracle = x.double() @ dense.t()
    torch_err = ((x.float() @ dense.float().t()).to(dtype).double() - oracle).abs().max()
    assert float((y.double() - oracle).abs().max()) <= 2 * float(torch_err) + LOW_PRECISION_SLACK


_ISA_SCRIPT = r"""
import torch
from quantlab.ops import bitstack as ops
from tests.ops.test_bitstack_ops import SHAPES, _case
from tests.tolerances import bitstack_bound
print(ops.cpu_path(1, 2), ops.cpu_path(1, 16))
for n, k, r, b in SHAPES[4:] + SHAPES[:1]:
    signs, u, v, dense = _case(n, k, r, b)
    for m in (1, 2, 4):
        x = torch.randn(m, k)
        y = ops.matmul(x, signs, u, v)
        assert bool(((y.double() - x.double() @ dense.t()).abs() <= bitstack_bound(x, u, v)).all())
print("isa-ok")
"""


@needs_cpu_kernel
@pytest.mark.parametrize(("isa", "path"), [("scalar", "lut-scalar"), ("avx2", "lut-avx2")])
def test_cpu_forced_paths_match_the_oracle(isa: str, path: str) -> None:
    """QUANTLAB_CPU_ISA is read once per process, so each forced path runs in a subprocess."""
    if isa == "avx2" and not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("CPU without AVX2")
    env = {**os.environ, "QUANTLAB_CPU_ISA": isa}
    done = subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "isa-ok" in done.stdout and done.stdout.split()[:2] == [path, path]


@needs_cpu_kernel
def test_cpu_paths() -> None:
    assert ops.cpu_path(5, 2) == "tiled-gemm"
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert ops.cpu_path(1, 16) == "lut-avx512" and ops.cpu_path(1, 2) == "lut-avx2"


def test_every_device_has_an_implementation(fresh_kernel_policy: object) -> None:
    for name in ("bitstack_mm", "bitstack_dequant"):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"quantlab::{name}", key)
    if torch.version.cuda is None:
        assert not ops.compiled("cuda")
        with pytest.warns(KernelPathWarning, match="no CUDA kernels for bitstack"):
            assert ops.backend("cuda") == "torch"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.update(signs=a["signs"].to(torch.int32)), "signs must be uint8"),
        (lambda a: a.update(signs=a["signs"][:, :, :-1]), r"signs .*(\[2, 16, 72\]|needs 72)"),
        (lambda a: a.update(u=a["u"][:1]), r"u must be \[2, 16, r\]"),
        (lambda a: a.update(v=a["v"][:, :1]), r"v must be \[2, 2, 576\]"),
        (lambda a: a.update(x=torch.randn(2, 512)), "for in_features 512|in_features 512 needs"),
        (lambda a: a.update(x=torch.randn(2, 3, 576)), "x must be (a )?2-D"),
    ],
)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_bad_arguments_are_named(mutate, message: str, impl: str) -> None:  # noqa: ANN001
    signs, u, v, _ = _case(16, 576, 2, 2)
    args = {"x": torch.randn(2, 576), "signs": signs, "u": u, "v": v}
    mutate(args)
    fn = ops.matmul if impl == "op" else reference.bitstack_mm
    with pytest.raises((RuntimeError, ValueError), match=message):
        fn(args["x"], args["signs"], args["u"], args["v"])


def test_compile_traces_the_op() -> None:
    signs, u, v, _ = _case(24, 128, 2, 2)
    fn = torch.compile(lambda x: ops.matmul(x, signs, u, v) * 2, fullgraph=True)
    x = torch.randn(3, 128)
    torch.testing.assert_close(fn(x), 2 * ops.matmul(x, signs, u, v))


# -- CUDA (skipped without a device; tests/conftest.py) -------------------------------------------

CUDA_SHAPES = ((576, 576, 2, 3), (192, 576, 16, 2), (1536, 576, 4, 2), (33, 160, 5, 3),
               (7, 96, 3, 2), (40, 4096, 16, 8))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "k", "r", "b"), CUDA_SHAPES)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_matmul_matches_oracle(
    m: int, n: int, k: int, r: int, b: int, dtype: torch.dtype
) -> None:
    signs, u, v, dense = _case(n, k, r, b, "cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)
    y = ops.matmul(x, signs, u, v)
    assert y.dtype == dtype and y.shape == (m, n)
    oracle = x.double() @ dense.t()
    if dtype == torch.float32:
        assert bool(((y.double() - oracle).abs() <= bitstack_bound(x, u, v)).all())
    else:
        torch_err = ((x @ dense.to(dtype).t()).double() - oracle).abs().max()
        err = float((y.double() - oracle).abs().max())
        assert err <= 2 * float(torch_err) + LOW_PRECISION_SLACK * float(oracle.abs().max()), err


@pytest.mark.gpu
def test_cuda_paths_and_dequant() -> None:
    if not ops.compiled("cuda"):
        pytest.skip(f"BitStack CUDA kernels not built: {extension_error('bitstack')}")
    path = torch.ops.quantlab.bitstack_cuda_path
    assert path(1, 576, 2, torch.float16) == "tensor-core-gemv"
    assert path(1, 576, 2, torch.float32) == "tiled-gemm"
    assert path(16, 576, 2, torch.float16) == "tiled-gemm"
    assert path(1, 100, 2, torch.float16) == "tiled-gemm"  # K % 32 != 0
    signs, u, v, dense = _case(33, 160, 5, 3, "cuda")
    w = ops.dequant(signs, u, v, 160, torch.float32)
    mag = torch.einsum("bnr,brk->nk", u.abs().double(), v.abs().double())
    assert bool(((w.double() - dense).abs() <= 8 * 1.2e-7 * mag).all())
