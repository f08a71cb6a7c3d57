"""The CPU emulation's fp16 / bf16 / math headers (csrc/emulation/include: cuda_fp16.h,
cuda_bf16.h, quantlab_emu_math.h, quantlab_emu_vector_types.h).

csrc/emulation/tests/half_conversions.cpp checks them against references it writes itself
(exhaustive over the 16-bit patterns, millions of float inputs, the arithmetic intrinsics against
exact integer arithmetic); these tests build and run it, and compare its conversions with numpy's
float16 and torch's bfloat16, bit for bit (NaNs: both NaN).
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = ROOT / "csrc" / "emulation" / "include"
SOURCE = ROOT / "csrc" / "emulation" / "tests" / "half_conversions.cpp"
FLAGS = ["-std=c++20", "-O1", "-ffp-contract=off"]


def _build(out_dir: Path, flags: list[str]) -> Path:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: the emulation headers' checks compile a C++ program")
    exe = out_dir / "half_conversions"
    cmd = [gxx, *flags, "-I", str(INCLUDE), str(SOURCE), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
    return exe


def _run(exe: Path, *args: object) -> str:
    done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{exe.name} {args} exited {done.returncode}:\n{done.stdout}"
    return done.stdout


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("half_conversions"), FLAGS)


def _assert_same_bits(got: np.ndarray, expected: np.ndarray, inputs: np.ndarray, what: str) -> None:
    """Equal bit patterns, except that a NaN only has to meet a NaN."""
    assert got.shape == expected.shape
    got_nan, expected_nan = np.isnan(got), np.isnan(expected)
    bits = {2: np.uint16, 4: np.uint32}[got.itemsize]
    differ = (got.view(bits) != expected.view(bits)) & ~(got_nan & expected_nan)
    differ |= got_nan != expected_nan
    if differ.any():
        i = int(np.flatnonzero(differ)[0])
        raise AssertionError(
            f"{what}: {int(differ.sum())} mismatches; first: input {inputs[i]!r} "
            f"-> 0x{int(got.view(bits)[i]):x}, expected 0x{int(expected.view(bits)[i]):x}"
        )


def _float_inputs() -> np.ndarray:
    """Random float32 bit patterns, every fp16 / bf16 rounding boundary, and special values."""
    rng = np.random.default_rng(20240517)
    parts = [rng.integers(0, 2**32, size=400_000, dtype=np.uint64).astype(np.uint32)]
    # fp16: every finite value, the midpoints to the next value (ties) and their neighbours.
    f16 = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    upper = np.append(f16[1:], 65536.0)
    mid = ((f16 + upper) / 2).astype(np.float32)  # exact: 12 significant bits at most
    for v in (f16.astype(np.float32), mid):
        parts += [v.view(np.uint32), v.view(np.uint32) + 1, v.view(np.uint32) - 1]
    # bf16: a value's low 16 bits 0x8000 is the midpoint to the next value.
    bf16 = np.arange(0x7F80, dtype=np.uint32) << 16
    parts += [bf16, bf16 | 0x7FFF, bf16 | 0x8000, bf16 | 0x8001]
    specials = [0x7F800000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0x7F7FFFFF, 0x477FF000, 0x33000000]
    parts.append(np.array(specials, dtype=np.uint32))
    bits = np.concatenate([p.astype(np.uint32) for p in parts])
    bits = np.concatenate([bits, bits ^ np.uint32(0x80000000)])  # both signs
    return bits.view(np.float32)


def test_header_self_checks(program: Path) -> None:
    assert _run(program).strip() == "ok"


def test_half_to_float_matches_numpy_for_every_pattern(program: Path, tmp_path: Path) -> None:
    out = tmp_path / "half2float.bin"
    _run(program, "--dump-half2float", out)
    got = np.fromfile(out, dtype=np.float32)
    patterns = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    expected = patterns.view(np.float16).astype(np.float32)
    _assert_same_bits(got, expected, patterns, "__half2float vs numpy")


def test_bfloat16_to_float_matches_torch_for_every_pattern(program: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf162float.bin"
    _run(program, "--dump-bf162float", out)
    got = np.fromfile(out, dtype=np.float32)
    patterns = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    expected = torch.from_numpy(patterns.view(np.int16)).view(torch.bfloat16).float().numpy()
    _assert_same_bits(got, expected, patterns, "__bfloat162float vs torch")


def test_float_to_half_matches_numpy(program: Path, tmp_path: Path) -> None:
    x = _float_inputs()
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    x.tofile(src)
    _run(program, "--float2half", src, out)
    got = np.fromfile(out, dtype=np.uint16).view(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = x.astype(np.float16)  # round to nearest even, subnormals, overflow to inf
    _assert_same_bits(got, expected, x, "__float2half_rn vs numpy")


def test_float_to_bfloat16_matches_torch(program: Path, tmp_path: Path) -> None:
    x = _float_inputs()
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    x.tofile(src)
    _run(program, "--float2bf16", src, out)
    got = np.fromfile(out, dtype=np.uint16)
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    # Compared as float32 (the bf16 bits in the high half), so that NaN only has to meet NaN.
    got32 = (got.astype(np.uint32) << 16).view(np.float32)
    expected32 = (expected.astype(np.uint32) << 16).view(np.float32)
    _assert_same_bits(got32, expected32, x, "__float2bfloat16_rn vs torch")


def _cpu_has_fma() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\bfma\b", cpuinfo, re.MULTILINE) is not None


@pytest.mark.slow
@pytest.mark.skipif(
    platform.machine() != "x86_64" or not _cpu_has_fma(), reason="needs an x86-64 CPU with FMA"
)
def test_self_checks_pass_where_the_compiler_may_fuse(tmp_path: Path) -> None:
    """With contraction allowed and FMA instructions available, __fmul_rn / __fadd_rn /
    __fsub_rn still round separately (their empty-asm barriers), and the rest still holds."""
    exe = _build(tmp_path, ["-std=c++20", "-O2", "-ffp-contract=fast", "-mfma"])
    assert _run(exe).strip() == "ok"
