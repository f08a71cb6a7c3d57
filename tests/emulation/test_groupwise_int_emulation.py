"""The groupwise-int CUDA kernels on the exported layout (csrc/groupwise_int/cuda_kernels.cu:
dequant and the warp-per-row GEMV; cuda_gemm.cu: the wmma GEMM with split-K) on the CPU
emulation, under ASan + UBSan and under TSan.

Integer-valued data make every product and partial sum exact in fp32, so each output must equal
the fp64 oracle rounded once to the output dtype, bit for bit; the binding's preparation (scales
converted to fp32) is done here as the binding does it.
"""

from __future__ import annotations

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
