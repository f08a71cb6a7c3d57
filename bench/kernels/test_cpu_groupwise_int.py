"""CPU groupwise-int matmul: kernel vs dequantize-then-matmul vs dense fp32, same process.

Bytes moved by the kernel per call: N*K*bits/8 (codes) + N*G*2 (fp16 scales) + N*G*bits/8 (zeros)
+ 4*M*K (x) + 4*M*N (y); the dense fp32 baseline reads 4*N*K. At batch 1-8 both are bound by
memory or by the unpack work, so the ratio to dense fp32 is what to read. Each benchmark reports
its time; `extra_info` carries the effective GB/s. Run: `make bench` (pytest-benchmark).
"""

from __future__ import annotations

import pytest
import torch

from quantlab.formats.groupwise_int import pack
from quantlab.ops import groupwise_int as ops
from quantlab.solvers.rtn import rtn_quantize

SHAPES = {
    "smollm2-mlp-1536x576": (1536, 576),
    "llama3-qo-4096x4096": (4096, 4096),
    "llama3-up-14336x4096": (14336, 4096),
}
BATCHES = (1, 4, 8)


@pytest.fixture(scope="module", params=list(SHAPES))
def layer(request: pytest.FixtureRequest) -> dict:
    n, k = SHAPES[request.param]
    torch.manual_seed(0)
    w = torch.randn(n, k)
    packed = pack(rtn_quantize(w, 4, 64))
    return {"name": request.param, "n": n, "k": k, "dense": w, "packed": packed}


def _weight_bytes(n: int, k: int) -> int:
    return n * k // 2 + n * (k // 64) * 2 + n * (k // 64) // 2


@pytest.mark.parametrize("m", BATCHES)
def test_kernel(benchmark, layer: dict, m: int) -> None:  # noqa: ANN001
    p, k, n = layer["packed"], layer["k"], layer["n"]
    x = torch.randn(m, k)
    benchmark.group = f"{layer['name']} M={m}"
    benchmark.extra_info["backend"] = ops.backend("cpu")
    benchmark(ops.matmul, x, p.qweight, p.scales, p.qzeros, 4, 64)
    benchmark.extra_info["GB/s"] = _weight_bytes(n, k) / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("m", BATCHES)
def test_dequant_then_matmul(benchmark, layer: dict, m: int) -> None:  # noqa: ANN001
    p, k = layer["packed"], layer["k"]
    x = torch.randn(m, k)
    benchmark.group = f"{layer['name']} M={m}"
    benchmark(lambda: x @ ops.dequant(p.qweight, p.scales, p.qzeros, 4, 64, k).t())


@pytest.mark.parametrize("m", BATCHES)
def test_dense_fp32(benchmark, layer: dict, m: int) -> None:  # noqa: ANN001
    w, k = layer["dense"], layer["k"]
    x = torch.randn(m, k)
    benchmark.group = f"{layer['name']} M={m}"
    benchmark(lambda: x @ w.t())
    benchmark.extra_info["GB/s"] = 4 * w.numel() / benchmark.stats.stats.median / 1e9
