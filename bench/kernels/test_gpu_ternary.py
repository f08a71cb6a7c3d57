"""CUDA ternary matmul (2-bit decode + dp4a GEMV on BitNet's int8 activations) vs cuBLAS bf16, in
the same process.

Shapes (N, K): Llama-3-8B (q/o 4096 x 4096, k/v 1024 x 4096, gate/up 14336 x 4096, down
4096 x 14336), BitNet b1.58 2B-4T (q/o 2560 x 2560, gate/up 6912 x 2560, down 2560 x 6912) and the
20480 x 3200 shape of BitNet's own GPU kernel table. Batch M = 1, 2, 4, 8 (the fused GEMV) and
16, 64 (dequantize + cuBLAS); bf16 activations; scales per tensor (BitNet) and per 64 columns.
Variants:

* ``ternary``: ``TernaryLinear(x)`` on the GPU (i2 rows, 2 bits per weight);
* ``cublas``: dense ``x @ W.T`` in bf16.

Every variant rotates over enough weight copies that one rotation reads at least 2x the L2 size
(an H100's 50 MB or an H200's 60 MB hold every ternary matrix here, and the bf16 4096 x 4096
one), and a rotation is captured in a CUDA graph (``QUANTLAB_BENCH_GRAPHS=0`` times it eagerly):
at batch 1 the kernel runs in microseconds, below Python's launch rate. Times come from CUDA
events around whole rotations: ``extra_info["time_s"]`` is seconds per call, ``TB/s`` the
weight bytes over that time, and the ``ternary`` benchmarks carry ``speedup_vs_cublas`` once both
have run. Nothing here asserts a speed.

Run: ``pytest bench/kernels/test_gpu_ternary.py --benchmark-only
--benchmark-json=out/bench/gpu_ternary.json``; ``QUANTLAB_BENCH_QUICK=1`` keeps three shapes and
batches 1, 8 and 64.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from bench.timing import cuda_rotation
from quantlab.formats.ternary import pack
from quantlab.nn.ternary_linear import TernaryLinear
from quantlab.solvers.ternary import mse_ternarize

if not torch.cuda.is_available():
    pytest.skip(
        "GPU kernel benchmarks need a CUDA device (torch.cuda.is_available() is False)",
        allow_module_level=True,
    )

QUICK = os.environ.get("QUANTLAB_BENCH_QUICK", "0") == "1"
USE_GRAPHS = os.environ.get("QUANTLAB_BENCH_GRAPHS", "1") != "0"
ROUNDS = 5 if QUICK else 10
REPS = 20  # rotations per timed round
FALLBACK_L2 = 80 * 2**20

LAYERS = {
    "llama3-8b-qo-4096x4096": (4096, 4096),
    "llama3-8b-kv-1024x4096": (1024, 4096),
    "llama3-8b-gate_up-14336x4096": (14336, 4096),
    "llama3-8b-down-4096x14336": (4096, 14336),
    "bitnet-2b-qo-2560x2560": (2560, 2560),
    "bitnet-2b-gate_up-6912x2560": (6912, 2560),
    "bitnet-2b-down-2560x6912": (2560, 6912),
    "bitnet-kernel-20480x3200": (20480, 3200),
}
BATCHES = (1, 2, 4, 8, 16, 64)
GRANULARITIES = {"tensor": 0, "g64": 64}
if QUICK:
    LAYERS = {
        k: LAYERS[k]
        for k in ("llama3-8b-qo-4096x4096", "llama3-8b-down-4096x14336", "bitnet-2b-qo-2560x2560")
    }
    BATCHES = (1, 8, 64)
VARIANTS = ("cublas", "ternary")


def _l2() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or FALLBACK_L2)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _copies(nbytes: int) -> int:
    return max(1, math.ceil(2 * _l2() / nbytes))


_CACHE: dict[tuple[str, str], dict[str, object]] = {}


def _weights(layer: str, granularity: str) -> dict[str, object]:
    key = (layer, granularity)
    if key not in _CACHE:
        _CACHE.clear()  # one case's copies at a time
        torch.cuda.empty_cache()
        n, k = LAYERS[layer]
        torch.manual_seed(0)
        dense = torch.randn(n, k) * 0.02
        result = mse_ternarize(dense, GRANULARITIES[granularity], torch.float16)
        packed = pack(result, "i2")
        first = TernaryLinear.from_packed(packed).cuda()
        layers = [first] + [
            TernaryLinear.from_packed(packed).cuda()
            for _ in range(_copies(_nbytes(first.qweight, first.scales)) - 1)
        ]
        bf16 = result.dequantize().to(device="cuda", dtype=torch.bfloat16)
        dense_copies = [bf16] + [bf16.clone() for _ in range(_copies(_nbytes(bf16)) - 1)]
        _CACHE[key] = {"k": k, "layers": layers, "dense": dense_copies}
    return _CACHE[key]


_TIMES: dict[tuple[str, str, int], dict[str, float]] = {}
_INFOS: dict[tuple[str, str, int], dict[str, object]] = {}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", BATCHES, ids=[f"M{m}" for m in BATCHES])
@pytest.mark.parametrize("granularity", list(GRANULARITIES))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_gpu_ternary(benchmark, layer: str, granularity: str, m: int, variant: str) -> None:  # noqa: ANN001
    w = _weights(layer, granularity)
    x = torch.randn(m, w["k"], device="cuda", dtype=torch.bfloat16)
    if variant == "cublas":
        copies = w["dense"]
        calls = [lambda d=d: x @ d.t() for d in copies]
        nbytes = _nbytes(copies[0])
    else:
        copies = w["layers"]
        calls = [lambda layer_=layer_: layer_(x) for layer_ in copies]
        first = copies[0]
        first.prepare()
        nbytes = _nbytes(first._kernel_weight, first._kernel_scales)
    run, _ = cuda_rotation(calls, USE_GRAPHS)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed() -> None:
        start.record()
        for _ in range(REPS):
            run()
        end.record()
        end.synchronize()

    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1)
    seconds = start.elapsed_time(end) * 1e-3 / (REPS * len(calls))
    key = (layer, granularity, m)
    benchmark.group = f"{layer}-{granularity} M={m}"
    benchmark.extra_info.update(
        {
            "suite": "gpu_ternary",
            "device": torch.cuda.get_device_name(0),
            "variant": variant,
            "time_s": seconds,
            "TB/s": nbytes / seconds / 1e12,
            "copies": len(calls),
            "graphs": USE_GRAPHS,
        }
    )
    _TIMES.setdefault(key, {})[variant] = seconds
    if variant == "ternary":
        _INFOS[key] = benchmark.extra_info
    if key in _INFOS and "cublas" in _TIMES[key] and "ternary" in _TIMES[key]:
        _INFOS[key]["speedup_vs_cublas"] = _TIMES[key]["cublas"] / _TIMES[key]["ternary"]
