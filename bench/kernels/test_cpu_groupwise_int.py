"""CPU groupwise-int matmul: kernel vs dequantize-then-matmul vs dense fp32, in the same process.

Shapes are (N, K) = (out_features, in_features): SmolLM2's gate/up (1536 x 576, group 64 only:
576 is not a multiple of 128), a Llama-3-8B q/o projection (4096 x 4096) and its down projection
(4096 x 14336); 4-bit, groups of 64 and 128, batch M = 1, 4, 8.

Bytes the kernel reads per call: N*K/2 (codes) + N*G*2 (fp16 scales) + N*G/2 (zeros) + 4*M*K (x);
the dense fp32 baseline reads 4*N*K, 7-8x more. At batch 1-8 every variant is bound by memory or by
the unpack work, so read the ratios within one pytest-benchmark group (one shape, group size and
M). `extra_info["weight GB/s"]` gives the effective read bandwidth. Nothing here asserts a speed.

Run: `pytest bench/kernels/test_cpu_groupwise_int.py --benchmark-only` (or `make bench`).
"""

from __future__ import annotations

import pytest
import torch

from quantlab.formats.groupwise_int import pack
from quantlab.ops import groupwise_int as ops
from quantlab.solvers.rtn import rtn_quantize

BITS = 4
BATCHES = (1, 4, 8)
LAYERS = {
    "smollm2-up-1536x576-g64": (1536, 576, 64),
    "llama3-qo-4096x4096-g64": (4096, 4096, 64),
    "llama3-qo-4096x4096-g128": (4096, 4096, 128),
    "llama3-down-4096x14336-g64": (4096, 14336, 64),
    "llama3-down-4096x14336-g128": (4096, 14336, 128),
}


@pytest.fixture(scope="module", params=list(LAYERS))
def layer(request: pytest.FixtureRequest) -> dict[str, object]:
    n, k, group = LAYERS[request.param]
    torch.manual_seed(0)
    dense = torch.randn(n, k)
    packed = pack(rtn_quantize(dense, BITS, group))
    return {"name": request.param, "n": n, "k": k, "group": group, "dense": dense, "packed": packed}


def _packed_bytes(n: int, k: int, group: int) -> int:
    groups = k // group
    return n * k * BITS // 8 + n * groups * 2 + n * groups * BITS // 8


def _label(benchmark, layer: dict[str, object], m: int, variant: str) -> None:  # noqa: ANN001
    benchmark.group = f"{layer['name']} M={m}"
    benchmark.extra_info["variant"] = variant


@pytest.mark.parametrize("m", BATCHES)
def test_kernel(benchmark, layer: dict[str, object], m: int) -> None:  # noqa: ANN001
    p, n, k, group = layer["packed"], layer["n"], layer["k"], layer["group"]
    x = torch.randn(m, k)
    _label(benchmark, layer, m, "kernel")
    benchmark.extra_info["backend"] = ops.backend("cpu")
    benchmark(ops.matmul, x, p.qweight, p.scales, p.qzeros, BITS, group)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info["weight GB/s"] = _packed_bytes(n, k, group) / seconds / 1e9


@pytest.mark.parametrize("m", BATCHES)
def test_dequant_then_matmul(benchmark, layer: dict[str, object], m: int) -> None:  # noqa: ANN001
    p, k, group = layer["packed"], layer["k"], layer["group"]
    x = torch.randn(m, k)
    _label(benchmark, layer, m, "dequant+matmul")
    benchmark(lambda: x @ ops.dequant(p.qweight, p.scales, p.qzeros, BITS, group, k).t())


@pytest.mark.parametrize("m", BATCHES)
def test_dense_fp32(benchmark, layer: dict[str, object], m: int) -> None:  # noqa: ANN001
    dense, k = layer["dense"], layer["k"]
    x = torch.randn(m, k)
    _label(benchmark, layer, m, "dense fp32")
    benchmark(lambda: x @ dense.t())
    benchmark.extra_info["weight GB/s"] = 4 * dense.numel() / benchmark.stats.stats.min / 1e9
