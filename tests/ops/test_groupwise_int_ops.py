"""Compiled groupwise-int kernels against the PyTorch reference (the layout's specification)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantlab.formats.groupwise_int import pack
from quantlab.ops import groupwise_int as ops
from quantlab.ops import groupwise_int_reference as reference
from quantlab.ops._extension import extension_error
from quantlab.ops.kernel_policy import KernelPathWarning
from quantlab.solvers.rtn import rtn_quantize
from tests.shapes import M_VALUES, NK_SHAPES
from tests.tolerances import LOW_PRECISION_SLACK, fp32_dot_bound

ROOT = Path(__file__).resolve().parents[2]

needs_cpu_kernel = pytest.mark.skipif(
    not ops.compiled("cpu"), reason=f"CPU kernel not built: {extension_error()}"
)


def _case(n: int, k: int, bits: int, group: int, sym: bool, device: str = "cpu") -> tuple:
    torch.manual_seed(n * 7919 + k * 31 + bits)
    r = rtn_quantize(torch.randn(n, k), bits, group, sym)
    p = pack(r)
    to = {"device": device}
    qz = None if p.qzeros is None else p.qzeros.to(**to)
    return p.qweight.to(**to), p.scales.to(**to), qz, r.dequantize().to(**to)


# Every (N, K, bits, group, sym) whose group size divides K.
CASES = [
    (n, k, bits, group, sym)
    for n, k in NK_SHAPES
    for bits in (2, 3, 4, 8)
    for group in (32, 64, 128, -1)
    for sym in (False, True)
    if group == -1 or k % group == 0
]
CASE_NAMES = ("n", "k", "bits", "group", "sym")


@needs_cpu_kernel
@pytest.mark.parametrize(CASE_NAMES, CASES)
def test_cpu_dequant_is_exact(n: int, k: int, bits: int, group: int, sym: bool) -> None:
    qw, s, qz, dense = _case(n, k, bits, group, sym)
    out = ops.dequant(qw, s, qz, bits, group, k, torch.float32)
    ref = reference.groupwise_int_dequant(qw, s, qz, bits, group, k, torch.float32)
    assert torch.equal(out, ref)
    assert torch.equal(out, dense)


@needs_cpu_kernel
@pytest.mark.parametrize(CASE_NAMES, CASES)
@pytest.mark.parametrize("m", M_VALUES)
def test_cpu_matmul_matches_fp64_oracle(
    m: int, n: int, k: int, bits: int, group: int, sym: bool
) -> None:
    qw, s, qz, dense = _case(n, k, bits, group, sym)
    x = torch.randn(m, k)
    y = ops.matmul(x, qw, s, qz, bits, group)
    oracle = x.double() @ dense.double().t()
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert bool(((y.double() - oracle).abs() <= fp32_dot_bound(x, dense)).all())


@needs_cpu_kernel
@pytest.mark.parametrize(
    ("n", "k", "bits", "group"),
    [(7, 96, 4, 32), (13, 256, 2, 64), (33, 576, 4, 64), (10, 384, 4, 128), (11, 160, 4, -1)],
)
def test_cpu_matmul_every_small_batch(n: int, k: int, bits: int, group: int) -> None:
    """Batches 1-8 each pick their own tile height (1-4 output rows, by ISA and M); N leaves a
    partial tile for each of them."""
    qw, s, qz, dense = _case(n, k, bits, group, False)
    for m in range(1, 9):
        x = torch.randn(m, k)
        y = ops.matmul(x, qw, s, qz, bits, group)
        oracle = x.double() @ dense.double().t()
        assert bool(((y.double() - oracle).abs() <= fp32_dot_bound(x, dense)).all()), m


@needs_cpu_kernel
@pytest.mark.parametrize(("bits", "group"), [(4, 128), (3, 64)])
def test_cpu_matmul_chunked_batches_of_a_large_weight(bits: int, group: int) -> None:
    """Weights of >= 2^22 entries take the GEMV kernel in chunks of 8 rows up to 32 rows (9, 20:
    a partial chunk; 32: the last such batch), dequantize + GEMM above (33)."""
    qw, s, qz, dense = _case(1024, 4096, bits, group, False)
    for m in (9, 20, 32, 33):
        x = torch.randn(m, 4096)
        y = ops.matmul(x, qw, s, qz, bits, group)
        oracle = x.double() @ dense.double().t()
        assert bool(((y.double() - oracle).abs() <= fp32_dot_bound(x, dense)).all()), m


LOW_PRECISION_CASES = [
    (n, k, bits, group, sym)
    for n, k, group in ((96, 576, 64), (33, 160, 32), (7, 96, -1))
    for bits in (2, 3, 4, 8)
    for sym in (False, True)
]


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8, 17])
@pytest.mark.parametrize(CASE_NAMES, LOW_PRECISION_CASES)
def test_cpu_matmul_low_precision_activations(
    dtype: torch.dtype, m: int, n: int, k: int, bits: int, group: int, sym: bool
) -> None:
    qw, s, qz, dense = _case(n, k, bits, group, sym)
    x = torch.randn(m, k).to(dtype)
    y = ops.matmul(x, qw, s, qz, bits, group)
    assert y.dtype == dtype and y.shape == (m, n)
    oracle = x.double() @ dense.double().t()
    torch_err = ((x @ dense.to(dtype).t()).double() - oracle).abs().max()
    assert float((y.double() - oracle).abs().max()) <= 2 * float(torch_err) + LOW_PRECISION_SLACK


@needs_cpu_kernel
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cpu_kernels_accept_every_scale_dtype(scale_dtype: torch.dtype) -> None:
    qw, s, qz, _ = _case(40, 192, 4, 64, False)
    s = s.to(scale_dtype)
    dense = reference.groupwise_int_dequant(qw, s, qz, 4, 64, 192, torch.float32)
    assert torch.equal(ops.dequant(qw, s, qz, 4, 64, 192, torch.float32), dense)
    assert torch.equal(ops.dequant(qw, s, qz, 4, 64, 192, torch.bfloat16), dense.to(torch.bfloat16))
    x = torch.randn(3, 192)
    y = ops.matmul(x, qw, s, qz, 4, 64)
    oracle = x.double() @ dense.double().t()
    assert bool(((y.double() - oracle).abs() <= fp32_dot_bound(x, dense)).all())


_FORCED_ISA_SCRIPT = """
import os
import torch
from quantlab.ops import groupwise_int as ops, groupwise_int_reference as reference
from quantlab.formats.bitstream import pack_bitstream
assert torch.ops.quantlab.groupwise_int_cpu_path(4, 64, 576) == os.environ["QUANTLAB_CPU_ISA"]
torch.manual_seed(0)
for bits in (2, 3, 4, 8):
    for n, k, g in ((33, 160, 32), (64, 576, 64), (5, 100, -1)):
        for sym in (False, True):
            groups = 1 if g == -1 else k // g
            qw = pack_bitstream(torch.randint(0, 2**bits, (n, k)), bits)
            s = torch.rand(n, groups) + 0.01
            qz = None if sym else pack_bitstream(torch.randint(0, 2**bits, (n, groups)), bits)
            dense = reference.groupwise_int_dequant(qw, s, qz, bits, g, k, torch.float32)
            assert torch.equal(ops.dequant(qw, s, qz, bits, g, k, torch.float32), dense)
            for m in (1, 2, 3, 4, 5, 8, 11):
                x = torch.randn(m, k)
                y = torch.ops.quantlab.groupwise_int_mm(x, qw, s, qz, bits, g)
                bound = k * 1.2e-7 * (x.abs().double() @ dense.abs().double().t())
                assert bool(((y.double() - x.double() @ dense.double().t()).abs() <= bound).all())
print("forced-ok")
"""


@needs_cpu_kernel
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_cpu_forced_paths_match_reference(isa: str) -> None:
    """The portable path (non-AVX2 CPUs) and the AVX2 one (CPUs without AVX-512) are forced with
    QUANTLAB_CPU_ISA in a subprocess, because the choice is made once per process."""
    if isa == "avx2" and not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("CPU without AVX2")
    env = {**os.environ, "QUANTLAB_CPU_ISA": isa}
    done = subprocess.run(
        [sys.executable, "-c", _FORCED_ISA_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "forced-ok" in done.stdout


@needs_cpu_kernel
def test_cpu_path_is_vectorized_where_expected() -> None:
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX"):
        pytest.skip("CPU without AVX2")
    wide = "avx512" if capability == "AVX512" else "avx2"
    # AVX-512 takes 4- and 2-bit codes in whole 16-byte steps (32 / 64 columns per group).
    assert torch.ops.quantlab.groupwise_int_cpu_path(4, 64, 576) == wide
    assert torch.ops.quantlab.groupwise_int_cpu_path(4, 32, 576) == wide
    assert torch.ops.quantlab.groupwise_int_cpu_path(2, 64, 576) == wide
    assert torch.ops.quantlab.groupwise_int_cpu_path(2, 32, 576) == "avx2"
    for bits in (3, 8):
        assert torch.ops.quantlab.groupwise_int_cpu_path(bits, 64, 576) == "avx2"
    # Groups that are not whole 8-column chunks fall back to the scalar path.
    assert torch.ops.quantlab.groupwise_int_cpu_path(4, -1, 100) == "scalar"


@needs_cpu_kernel
def test_every_device_has_an_implementation(fresh_kernel_policy: object) -> None:
    """CUDA tensors reach the reference when the build has no CUDA kernel, so the op never fails
    with 'no kernel registered'; the CPU layers run the compiled kernel."""
    for name in ("groupwise_int_mm", "groupwise_int_dequant"):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"quantlab::{name}", key)
    assert ops.backend("cpu") == "cpu-kernel"
    if torch.version.cuda is None:  # a CPU torch cannot have built the CUDA kernels
        assert not ops.compiled("cuda") and not ops.has_mma_kernel()
        with pytest.warns(KernelPathWarning, match="no CUDA kernels for groupwise_int"):
            assert ops.backend("cuda") == "torch"


@needs_cpu_kernel
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.update(bits=5), "bits must be 2, 3, 4 or 8"),
        (lambda a: a.update(group=100), "group_size 100 does not divide in_features 576"),
        (lambda a: a.update(qw=a["qw"][:, :-1].contiguous()), r"qweight must be \[N, 72\]"),
        (lambda a: a.update(qw=a["qw"].float()), "qweight must be int32"),
        (lambda a: a.update(s=a["s"][:, :3]), r"scales must be \[16, 9\]"),
        (lambda a: a.update(qz=a["qz"][:1]), r"qzeros must be \[16, 2\]"),
        (lambda a: a.update(qz=a["qz"].long()), "qzeros must be int32"),
        (lambda a: a.update(s=a["s"].to(torch.int32)), "scales must be floating point"),
        (lambda a: a.update(group=0), "group_size must be -1"),
        (
            lambda a: a.update(x=torch.randn(2, 512)),
            r"qweight must be \[N, 64\] for in_features 512",
        ),
        (lambda a: a.update(x=torch.randn(2, 3, 576)), r"x must be 2-D"),
        (lambda a: a.update(x=torch.ones(2, 576, dtype=torch.int32)), "x must be floating point"),
    ],
)
def test_bad_arguments_are_named(mutate, message: str) -> None:  # noqa: ANN001
    qw, s, qz, _ = _case(16, 576, 4, 64, False)
    args = {"x": torch.randn(2, 576), "qw": qw, "s": s, "qz": qz, "bits": 4, "group": 64}
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        ops.matmul(args["x"], args["qw"], args["s"], args["qz"], args["bits"], args["group"])


@needs_cpu_kernel
def test_bad_dequant_arguments_are_named() -> None:
    qw, s, qz, _ = _case(16, 576, 4, 64, False)
    with pytest.raises(RuntimeError, match="bits must be 2, 3, 4 or 8"):
        ops.dequant(qw, s, qz, 6, 64, 576)
    with pytest.raises(RuntimeError, match="in_features must be positive"):
        ops.dequant(qw, s, qz, 4, 64, 0)
    with pytest.raises(RuntimeError, match="group_size 100 does not divide in_features 576"):
        ops.dequant(qw, s, qz, 4, 100, 576)


def test_compile_traces_the_op() -> None:
    qw, s, qz, dense = _case(24, 128, 4, 32, False)
    fn = torch.compile(lambda x: ops.matmul(x, qw, s, qz, 4, 32) * 2, fullgraph=True)
    x = torch.randn(3, 128)
    torch.testing.assert_close(fn(x), 2 * ops.matmul(x, qw, s, qz, 4, 32))


def test_kernels_are_torch_free() -> None:
    """Only csrc/bindings/ may include torch headers; kernels take raw pointers."""
    offenders = []
    for path in (ROOT / "csrc").rglob("*"):
        kernel_source = (
            path.suffix in {".h", ".cuh", ".cpp", ".cu"} and "bindings" not in path.parts
        )
        if kernel_source and re.search(r"#include\s*[<\"](torch|ATen|c10)/", path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


@pytest.mark.gpu
@pytest.mark.parametrize(CASE_NAMES, CASES)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_matmul_matches_oracle(
    m: int, n: int, k: int, bits: int, group: int, sym: bool, dtype: torch.dtype
) -> None:
    qw, s, qz, dense = _case(n, k, bits, group, sym, "cuda")
    x = torch.randn(m, k, device="cuda").to(dtype)
    assert torch.equal(ops.dequant(qw, s, qz, bits, group, k, torch.float32), dense)
    y = ops.matmul(x, qw, s, qz, bits, group)
    oracle = x.double() @ dense.double().t()
    if dtype == torch.float32:
        assert bool(((y.double() - oracle).abs() <= fp32_dot_bound(x, dense)).all())
    else:
        torch_err = ((x @ dense.to(dtype).t()).double() - oracle).abs().max()
        assert (
            float((y.double() - oracle).abs().max()) <= 2 * float(torch_err) + LOW_PRECISION_SLACK
        )
