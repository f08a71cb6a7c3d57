"""The host launchers refuse what their kernels cannot take, with the CUDA error a caller sees,
before anything is launched (the bindings check most of this earlier; these are the kernels' own
last line). Run on the plain emulation runner with ``p.expect_error``: the runner prints the
error instead of stopping, and fails if the launcher accepted the call."""

from __future__ import annotations

import pytest
import torch

from tests.emulation.cases import integer_weight, small_integer_x
from tests.emulation.emulator import DTYPE_CODE, Call, Emulator
from tests.emulation.test_groupwise_int_mma_emulation import mma_call

pytestmark = pytest.mark.emulation


def _groupwise(op: str, m: int, dtype: torch.dtype, **params: int) -> Call:
    qw, s, qz, _ = integer_weight(24, 64, 4, 32, False)
    inputs = {
        "qweight": qw,
        "scales": s,
        "qzeros": qz,
        "x": small_integer_x(max(m, 1), 64, dtype, 1),
    }
    base = {"n": 24, "k": 64, "bits": 4, "group_size": 32, "m": m, "dtype": DTYPE_CODE[dtype]}
    return Call(op, base | params, inputs, {"y": (dtype, (max(m, 1), 24))})


def test_refusals_name_the_cuda_error(plain_emulator: Emulator) -> None:
    misaligned = mma_call(
        small_integer_x(3, 64, torch.float16, 2),
        *integer_weight(64, 64, 4, 32, False, torch.float16)[:3],
        4,
        32,
        64,
        64,
        1,
    )
    misaligned.offsets["x"] = 2
    calls = [
        _groupwise("groupwise_int_gemv", 9, torch.float16),  # the GEMV takes 1..8 rows
        _groupwise("groupwise_int_gemv", 0, torch.float32),
        _groupwise("groupwise_int_gemm", 9, torch.float32, splits=1),  # fp16/bf16 only
        misaligned,  # cp.async reads x 16 bytes at a time
    ]
    for call in calls:
        call.params["expect_error"] = 1
    plain_emulator.run(calls)
    errors = [line for line in plain_emulator.last_stdout.splitlines() if line.startswith("error")]
    assert errors == ["error invalid argument"] * 3 + ["error misaligned address"]
