"""CUDA BitStack matmul (tensor-core sign GEMV) vs dense cuBLAS fp16, in the same process.

The issue's bar: faster than dense fp16 for k <= 8 loaded blocks at batch 1. Shapes (N, K) of
Llama-3-8B (q/o 4096 x 4096, gate/up 14336 x 4096, down 4096 x 14336) and SmolLM2 (1536 x 576);
rank 16 (the paper's) and 2; 1, 2, 4, 8 blocks; M = 1 and 4; fp16 activations.

Both variants rotate over enough weight copies that one rotation reads at least 2 x L2 bytes (a
<= 1.1-bit Llama block fits any L2 several times over), and each rotation is captured in a CUDA
graph so batch-1 timing measures the kernels, not Python launches. ``extra_info``: ``time_us``
(median per call from CUDA events), ``weight_GB/s`` = bytes read / time, and ``speedup_vs_fp16``
once the fp16 case of the same shape and M has run. Nothing here asserts a speed.

Run: ``pytest bench/kernels/test_gpu_bitstack.py --benchmark-only``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import pytest
import torch

from quantlab.formats.bitstack import pack
from quantlab.ops import bitstack as ops

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need a CUDA device", allow_module_level=True)

SHAPES = {
    "llama3-qo-4096x4096": (4096, 4096),
    "llama3-gate-14336x4096": (14336, 4096),
    "llama3-down-4096x14336": (4096, 14336),
    "smollm2-up-1536x576": (1536, 576),
}
RANKS = (16, 2)
BLOCKS = (1, 2, 4, 8)
BATCHES = (1, 4)
ROUNDS = 20
_FP16_US: dict[tuple[str, int], float] = {}


def _l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))


def _time_us(fn: Callable[[int], object], copies: int) -> float:
    """Median microseconds per call over ROUNDS graph-captured rotations of ``copies`` calls."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(copies):  # warm-up outside the graph (allocations, lazy init)
            fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(copies):
            fn(i)
    times = []
    for _ in range(ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    return statistics.median(times)


def _copies(nbytes: int) -> int:
    return max(2, -(-2 * _l2_bytes() // max(nbytes, 1)))


@pytest.mark.parametrize("m", BATCHES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cublas_fp16(benchmark, shape: str, m: int) -> None:  # noqa: ANN001
    n, k = SHAPES[shape]
    copies = _copies(2 * n * k)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    us = benchmark.pedantic(lambda: _time_us(lambda i: x @ ws[i].t(), copies), rounds=1)
    _FP16_US[(shape, m)] = us
    benchmark.group = f"{shape} M={m}"
    benchmark.extra_info.update(variant="cublas fp16", time_us=us,
                                weight_GBps=2 * n * k / us / 1e3)  # fmt: skip


@pytest.mark.parametrize("m", BATCHES)
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bitstack(benchmark, shape: str, rank: int, blocks: int, m: int) -> None:  # noqa: ANN001
    n, k = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    p = pack(torch.rand(blocks, n, k, generator=g) > 0.5,
             torch.randn(blocks, n, rank, generator=g) * 0.1,
             torch.randn(blocks, rank, k, generator=g) * 0.1)  # fmt: skip
    nbytes = sum(t.numel() * t.element_size() for t in p.tensors().values())
    copies = _copies(nbytes)
    stacks = [tuple(t.cuda() for t in (p.signs, p.u, p.v)) for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    us = benchmark.pedantic(lambda: _time_us(lambda i: ops.matmul(x, *stacks[i]), copies), rounds=1)
    benchmark.group = f"{shape} M={m}"
    benchmark.extra_info.update(
        variant=f"bitstack r{rank} x{blocks}",
        path=torch.ops.quantlab.bitstack_cuda_path(m, k, rank, torch.float16)
        if hasattr(torch.ops.quantlab, "bitstack_cuda_path")
        else ops.backend("cuda"),
        time_us=us,
        weight_GBps=nbytes / us / 1e3,
    )
    if (shape, m) in _FP16_US:
        benchmark.extra_info["speedup_vs_fp16"] = _FP16_US[(shape, m)] / us
