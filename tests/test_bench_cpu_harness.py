"""The CPU timing harness behind docs/benchmarks.md's 2026-12-02 tables
(bench/harness/gemv_cpu_timing.cpp, scripts/bench_cpu_gemv.sh, scripts/bench_cpu_dequant_gemm.py):
it builds against the current kernel, prints parsable lines, and exits 1 when the kernel's output
disagrees with its reference."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "bench" / "harness" / "gemv_cpu_timing.cpp"
CXX = os.environ.get("CXX", "g++")
PATHS = {"avx512", "avx2", "scalar"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a C++ compiler ({CXX})")

# A kernel that computes the right weight except, with STUB_FLAW set, code [0, 0] one too high.
STUB_KERNEL = r"""
#include "groupwise_int/cpu_kernels.h"

#include <cstdlib>

#include "common/bitstream.h"

namespace quantlab::groupwise_int {
namespace {
float weight(const CpuParams& p, int64_t n, int64_t k) {
  const int64_t groups = p.k / p.group_size, g = k / p.group_size;
  int q = extract_value(p.qweight + n * packed_words(p.k, p.bits), k, p.bits);
  if (n == 0 && k == 0 && std::getenv("STUB_FLAW") != nullptr) q += 1;
  const int z = extract_value(p.qzeros + n * packed_words(groups, p.bits), g, p.bits);
  return static_cast<float>(q - z) * p.scales[n * groups + g];
}
}  // namespace

void dequant_cpu(const CpuParams& p, float* out) {
  for (int64_t n = 0; n < p.n; ++n)
    for (int64_t k = 0; k < p.k; ++k) out[n * p.k + k] = weight(p, n, k);
}

void gemv_cpu(const CpuParams& p, const float* x, int64_t m, float* y) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t n = 0; n < p.n; ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < p.k; ++k) acc += double{weight(p, n, k)} * x[i * p.k + k];
      y[i * p.n + n] = static_cast<float>(acc);
    }
}

const char* gemv_cpu_path(const CpuParams&) { return "scalar"; }
}  // namespace quantlab::groupwise_int
"""


def _build(src_root: Path, out: Path) -> Path:
    # -O1: the benchmark script builds with -O3, which takes twice as long to compile.
    kernel = src_root / "groupwise_int" / "cpu_kernels.cpp"
    cmd = [CXX, "-O1", "-std=c++20", "-fopenmp", f"-I{src_root}", str(HARNESS), str(kernel)]
    subprocess.run([*cmd, "-o", str(out)], check=True)
    return out


def _fields(line: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in line.split()]
    assert all(len(p) == 2 and p[0] and p[1] for p in pairs), line
    return dict(pairs)


def _run(binary: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *args], capture_output=True, text=True, env={**ENV, **env}, timeout=60
    )


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(ROOT / "csrc", tmp_path_factory.mktemp("harness") / "gemv_cpu_timing")


@pytest.fixture(scope="module")
def stub_harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("stub")
    for name in ("groupwise_int/cpu_kernels.h", "common/bitstream.h"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "csrc" / name, src / name)
    (src / "groupwise_int" / "cpu_kernels.cpp").write_text(STUB_KERNEL)
    return _build(src, src / "gemv_cpu_timing")


def test_harness_times_the_current_kernel(harness: Path) -> None:
    res = _run(harness, "64", "128", "64", "4", "1,9", "--copies", "1", "--reps", "2")
    assert res.returncode == 0, res.stderr
    lines = [_fields(line) for line in res.stdout.splitlines()]
    assert [f["m"] for f in lines] == ["1", "9"]
    for f in lines:
        assert (f["n"], f["k"], f["group"], f["bits"], f["op"]) == ("64", "128", "64", "4", "gemv")
        assert (f["copies"], f["reps"]) == ("1", "2")
        assert 0 < float(f["best_us"]) <= float(f["median_us"])
        assert 0 <= float(f["check"]) <= 1e-6
        assert f["path"] in PATHS


def test_harness_isa_and_dequant(harness: Path) -> None:
    res = _run(harness, "64", "128", "64", "3", "2", "--reps", "1", QUANTLAB_CPU_ISA="scalar")
    assert res.returncode == 0, res.stderr
    assert _fields(res.stdout)["path"] == "scalar"
    res = _run(harness, "64", "128", "64", "3", "--dequant", "--copies", "2", "--reps", "1")
    assert res.returncode == 0, res.stderr
    f = _fields(res.stdout)
    assert (f["op"], f["check"], f["path"]) == ("dequant", "0", "-")
    assert float(f["best_us"]) > 0


def test_harness_rejects_bad_arguments(harness: Path) -> None:
    for args in (["64", "128", "60", "4", "1"], ["64", "128", "64", "5", "1"], ["64", "128"]):
        res = _run(harness, *args)
        assert res.returncode == 2 and "usage" in res.stderr, args


@pytest.mark.parametrize("mode", [["1,9"], ["--dequant"]])
def test_harness_exits_1_on_a_wrong_kernel(stub_harness: Path, mode: list[str]) -> None:
    args = ["64", "128", "64", "4", *mode, "--copies", "1", "--reps", "1"]
    good = _run(stub_harness, *args)
    assert good.returncode == 0, good.stderr
    bad = _run(stub_harness, *args, STUB_FLAW="1")
    assert bad.returncode == 1
    assert "MISMATCH" in bad.stderr and bad.stdout == ""


def test_bench_script_parses() -> None:
    script = ROOT / "scripts" / "bench_cpu_gemv.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    res = subprocess.run(["bash", str(script), "--no-such-option"], capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr


def test_dequant_gemm_companion_line() -> None:
    path = ROOT / "scripts" / "bench_cpu_dequant_gemm.py"
    spec = importlib.util.spec_from_file_location("bench_cpu_dequant_gemm", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import quantlab.ops.groupwise_int  # noqa: F401  (registers the ops)

    args = argparse.Namespace(bits=4, reps=2, seed=0, mm=False)
    f = _fields(module.time_case(64, 128, 64, 9, args))
    assert (f["n"], f["k"], f["group"], f["m"]) == ("64", "128", "64", "9")
    assert f["op"] == "dequant+matmul"
    assert 0 < float(f["best_us"]) <= float(f["median_us"])
