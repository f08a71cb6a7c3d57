"""scripts/bench_report.py on synthetic pytest-benchmark JSON (real schema, made-up times)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_report.py"
GPU = "NVIDIA H100 80GB HBM3"
CPU = "AMD EPYC 9B14"
CASE = "llama3-8b-qo-4096x4096-w4g128"
W4_BYTES = 4096 * 4096 // 2 + 4096 * 32 * 2 + 4096 * 4 * 4  # codes + fp16 scales + zeros


@pytest.fixture(scope="module")
def report_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is being built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _gpu(variant: str, m: int, dtype: str, seconds: float, weight_bytes: int) -> dict[str, Any]:
    info = {
        "suite": "gpu_groupwise_int",
        "case": CASE,
        "layer": "llama3-8b-qo-4096x4096",
        "n": 4096,
        "k": 4096,
        "bits": 4,
        "group": 128,
        "m": m,
        "dtype": dtype,
        "variant": variant,
        "device": GPU,
        "capability": "sm_90",
        "torch": "2.14.1+cu130",
        "cuda": "13.0",
        "commit": "abc1234",
        "l2_bytes": 50 * 2**20,
        "timing": "cuda-graph",
        "time_s": seconds,
        "weight_bytes": weight_bytes,
    }
    if variant == "quantlab":
        info["path"] = "gemv" if m <= 8 else "gemm"
    return {
        "group": f"{CASE} {dtype} M={m}",
        "name": f"test_matmul[{CASE}-{dtype}-M{m}-{variant}]",
        "fullname": "bench/kernels/test_gpu_groupwise_int.py::test_matmul",
        "params": {"weights": ["llama3-8b-qo-4096x4096", 4, 128], "m": m, "variant": variant},
        "extra_info": info,
        # Wall time of a whole round: the report must prefer extra_info["time_s"].
        "stats": {"median": seconds * 1000, "min": seconds * 900},
    }


def _cpu(variant: str, m: int, seconds: float) -> dict[str, Any]:
    layer = "llama3-qo-4096x4096-g128"
    test = {"kernel": "test_kernel", "dense fp32": "test_dense_fp32"}[variant]
    info: dict[str, Any] = {"variant": variant}
    if variant == "kernel":
        info["weight GB/s"] = W4_BYTES / (seconds * 0.9) / 1e9
    return {
        "group": f"{layer} M={m}",
        "name": f"{test}[{layer}-{m}]",
        "fullname": f"bench/kernels/test_cpu_groupwise_int.py::{test}[{layer}-{m}]",
        "params": {"layer": layer, "m": m},
        "extra_info": info,
        "stats": {"median": seconds, "min": seconds * 0.9},
    }


def _decode(variant: str, tokens_per_s: float) -> dict[str, Any]:
    seconds = 32 / tokens_per_s
    return {
        "group": "decode SmolLM2 cpu float32 batch=1",
        "name": f"test_decode[1-{variant}]",
        "fullname": f"bench/e2e/test_decode_tokens_per_s.py::test_decode[1-{variant}]",
        "params": {"batch": 1, "variant": variant},
        "extra_info": {
            "suite": "decode",
            "model": "SmolLM2-135M",
            "variant": variant,
            "batch": 1,
            "new_tokens": 32,
            "device": CPU,
            "device_type": "cpu",
            "dtype": "float32",
            "torch": "2.13.0+cpu",
            "commit": "abc1234",
            "time_s": seconds,
            "prefill_ms": 100.0,
            "tokens/s": tokens_per_s,
        },
        "stats": {"median": seconds, "min": seconds},
    }


def _run_json(benchmarks: list[dict[str, Any]], date: str) -> dict[str, Any]:
    return {
        "machine_info": {"node": "box", "machine": "x86_64", "cpu": {"brand_raw": CPU, "count": 2}},
        "commit_info": {"id": "abc1234def5678", "dirty": False, "branch": "main"},
        "benchmarks": benchmarks,
        "datetime": date,
        "version": "5.3.1",
    }


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _row(markdown: str, *lead: str) -> list[str]:
    """Cells of the one table row whose first cells are ``lead``."""
    prefix = "| " + " | ".join(lead) + " |"
    rows = [line for line in markdown.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


@pytest.fixture
def bench_json(tmp_path: Path) -> Path:
    dense_bytes = 4096 * 4096 * 2
    benchmarks = [
        _gpu("cublas", 1, "bf16", 30e-6, dense_bytes),
        _gpu("int4pack", 1, "bf16", 20e-6, W4_BYTES),
        _gpu("quantlab", 1, "bf16", 10e-6, W4_BYTES),
        # fp16: no int4pack baseline, as in the real suite.
        _gpu("cublas", 16, "fp16", 36e-6, dense_bytes),
        _gpu("quantlab", 16, "fp16", 12e-6, W4_BYTES),
        _cpu("kernel", 1, 1e-3),
        _cpu("dense fp32", 1, 4e-3),
        _decode("float", 20.0),
        _decode("w4g64", 40.0),
        {
            "group": "quantize",
            "name": "test_quantize_default_model[rtn]",
            "fullname": "bench/e2e/test_quantize_time.py::test_quantize_default_model[rtn]",
            "params": {"method": "rtn"},
            "extra_info": {},
            "stats": {"median": 3.2},
        },
        # A benchmark that failed before it was timed has no stats: skipped, not a crash.
        {"group": None, "name": "test_broken", "fullname": "x::test_broken", "extra_info": {}},
    ]
    return _write(tmp_path / "bench.json", _run_json(benchmarks, "2026-11-24T10:00:00+00:00"))


def test_markdown_tables(report_module: ModuleType, bench_json: Path, tmp_path: Path) -> None:
    out = tmp_path / "docs" / "generated.md"
    assert report_module.main([str(bench_json), "--out", str(out), "--no-plot"]) == 0
    md = out.read_text(encoding="utf-8")

    assert f"## GPU kernel: {GPU}" in md
    assert "2.14.1+cu130" in md and "abc1234" in md and "2026-11-24 10:00 UTC" in md
    assert "sm_90" in md and "50 MiB" in md

    row = _row(md, "llama3-8b-qo-4096x4096", "W4 g128", "1", "bf16")
    # quantlab, cuBLAS, int4pack us; speedups; quantlab and cuBLAS TB/s; TFLOP/s; path
    assert row[4:9] == ["10.0", "30.0", "20.0", "3.00x", "2.00x"]
    assert row[9] == f"{W4_BYTES / 10e-6 / 1e12:.3g}"
    assert row[10] == f"{4096 * 4096 * 2 / 30e-6 / 1e12:.2f}"
    assert row[11] == f"{2 * 4096 * 4096 / 10e-6 / 1e12:.2f}"
    assert row[12] == "gemv"

    row = _row(md, "llama3-8b-qo-4096x4096", "W4 g128", "16", "fp16")
    assert row[4:9] == ["12.0", "36.0", "–", "3.00x", "–"]

    assert f"## CPU kernel: {CPU} (2 CPUs)" in md
    row = _row(md, "llama3-qo-4096x4096-g128", "1")
    # kernel, dequant + mm (did not run), dense; speedups; GB/s from the median
    assert row[2:7] == ["1.00", "–", "4.00", "4.00x", "–"]
    assert row[7] == f"{W4_BYTES / 1e-3 / 1e9:.2f}"

    assert f"## End-to-end decode: {CPU} (2 CPUs)" in md
    row = _row(md, "SmolLM2-135M", "float32", "1")
    assert row[3:7] == ["32", "20.0", "40.0", "2.00x"]

    assert "## Other benchmarks" in md
    assert "test_quantize_default_model[rtn]" in md and "3.20 s" in md
    assert "test_broken" not in md


def test_newest_run_wins(report_module: ModuleType, bench_json: Path, tmp_path: Path) -> None:
    newer = _write(
        tmp_path / "newer.json",
        _run_json([_gpu("quantlab", 1, "bf16", 15e-6, W4_BYTES)], "2026-11-25T10:00:00+00:00"),
    )
    # Newer file first on the command line: the order of the dates decides, not of the arguments.
    report = report_module.build_report([newer, bench_json])
    md = report_module.render_markdown(report)
    row = _row(md, "llama3-8b-qo-4096x4096", "W4 g128", "1", "bf16")
    assert row[4:8] == ["15.0", "30.0", "20.0", "2.00x"]


def test_empty_input(report_module: ModuleType, tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.json", _run_json([], "2026-11-24T10:00:00+00:00"))
    out = tmp_path / "out.md"
    plot = tmp_path / "plot.png"
    assert report_module.main([str(empty), "--out", str(out), "--plot", str(plot)]) == 0
    assert "No benchmarks found" in out.read_text(encoding="utf-8")
    assert not plot.exists()


def test_plot_written(report_module: ModuleType, bench_json: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "docs" / "generated.md"
    plot = tmp_path / "docs" / "img" / "speedup.png"
    assert report_module.main([str(bench_json), "--out", str(out), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](img/speedup.png)" in out.read_text(encoding="utf-8")


def test_copy_bandwidth_and_previous_kernels(report_module: ModuleType, tmp_path: Path) -> None:
    """The same run's copy-bandwidth probe gives the "% of copy" column; quantlab-v1 (the
    previous kernels) its own time and speedup column."""
    probe = {
        "group": "copy bandwidth",
        "name": "test_copy_bandwidth",
        "fullname": "bench/kernels/test_gpu_groupwise_int.py::test_copy_bandwidth",
        "params": {},
        "extra_info": {"suite": "gpu_bandwidth", "device": GPU, "time_s": 1e-3, "TB/s": 4.0},
        "stats": {"median": 1e-3},
    }
    benchmarks = [
        _gpu("quantlab", 1, "bf16", 10e-6, W4_BYTES),
        _gpu("quantlab-v1", 1, "bf16", 25e-6, W4_BYTES),
        probe,
    ]
    path = _write(tmp_path / "gpu.json", _run_json(benchmarks, "2026-11-24T10:00:00+00:00"))
    md = report_module.render_markdown(report_module.build_report([path]))
    assert "copy bandwidth measured in the same run: 4.00 TB/s" in md
    row = _row(md, "llama3-8b-qo-4096x4096", "W4 g128", "1", "bf16")
    assert row[13] == f"{100 * W4_BYTES / 10e-6 / 1e12 / 4.0:.0f}%"
    assert row[14:16] == ["25.0", "2.50x"]
    assert "## Other benchmarks" not in md  # the probe is not an unknown benchmark
