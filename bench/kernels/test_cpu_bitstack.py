"""CPU BitStack matmul (sign-LUT kernel) vs dense fp32 and groupwise W4, in the same process.

Shapes (N, K): SmolLM2's q/o (576 x 576), gate/up (1536 x 576), down (576 x 1536) and a Llama-3-8B
q/o (4096 x 4096); rank 2 (quantlab's default for SmolLM2) and 16 (the paper's); 1, 2, 4 and 8
loaded blocks; batch M = 1 (decode), and M = 16 for the tiled rebuild + GEMM path.

Bytes one call reads: per block N * ceil(K / 8) signs + 2 r (N + K) fp16 factors (~1.0-1.9 bits
per weight and block), against 4 N K for dense fp32 and ~N K / 2 for W4 g64. The kernel is
ALU-bound rather than bandwidth-bound: one r-wide table add per 4 weights and block (see
csrc/bitstack/cpu_kernels.cpp), so its time grows linearly with the blocks and (above the vector
width) with r. Read ratios within one pytest-benchmark group (shape, M); the dense fp32 and W4
baselines are timed in the same run. Nothing here asserts a speed.

Run: ``pytest bench/kernels/test_cpu_bitstack.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

from quantlab.formats.bitstack import pack
from quantlab.formats.groupwise_int import pack as pack_int
from quantlab.ops import bitstack as ops
from quantlab.ops import groupwise_int as int_ops
from quantlab.solvers.rtn import rtn_quantize

LAYERS = {
    "smollm2-qo-576x576": (576, 576),
    "smollm2-up-1536x576": (1536, 576),
    "smollm2-down-576x1536": (576, 1536),
    "llama3-qo-4096x4096": (4096, 4096),
}
RANKS = (2, 16)
BLOCKS = (1, 2, 4, 8)
BATCHES = (1, 16)


@pytest.fixture(scope="module", params=list(LAYERS))
def layer(request: pytest.FixtureRequest) -> dict[str, object]:
    n, k = LAYERS[request.param]
    torch.manual_seed(0)
    return {"name": request.param, "n": n, "k": k, "dense": torch.randn(n, k)}


def _stack(n: int, k: int, rank: int, blocks: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    p = pack(torch.rand(blocks, n, k, generator=g) > 0.5, torch.randn(blocks, n, rank, generator=g),
             torch.randn(blocks, rank, k, generator=g))  # fmt: skip
    return p.signs, p.u, p.v


def _label(benchmark, layer: dict[str, object], m: int, variant: str) -> None:  # noqa: ANN001
    benchmark.group = f"{layer['name']} M={m}"
    benchmark.extra_info["variant"] = variant


@pytest.mark.parametrize("m", BATCHES)
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("rank", RANKS)
def test_bitstack(benchmark, layer: dict[str, object], rank: int, blocks: int, m: int) -> None:  # noqa: ANN001
    n, k = layer["n"], layer["k"]
    signs, u, v = _stack(n, k, rank, blocks)
    x = torch.randn(m, k)
    _label(benchmark, layer, m, f"bitstack r{rank} x{blocks}")
    benchmark.extra_info["path"] = ops.cpu_path(m, rank)
    benchmark(ops.matmul, x, signs, u, v)
    nbytes = sum(t.numel() * t.element_size() for t in (signs, u, v))
    benchmark.extra_info["weight MB"] = nbytes / 1e6
    benchmark.extra_info["bits/weight"] = 8 * nbytes / (n * k)


@pytest.mark.parametrize("m", BATCHES)
def test_dense_fp32(benchmark, layer: dict[str, object], m: int) -> None:  # noqa: ANN001
    dense, k = layer["dense"], layer["k"]
    x = torch.randn(m, k)
    _label(benchmark, layer, m, "dense fp32")
    benchmark(lambda: x @ dense.t())


@pytest.mark.parametrize("m", BATCHES)
def test_groupwise_w4(benchmark, layer: dict[str, object], m: int) -> None:  # noqa: ANN001
    p = pack_int(rtn_quantize(layer["dense"], 4, 64))
    x = torch.randn(m, layer["k"])
    _label(benchmark, layer, m, "groupwise W4 g64")
    benchmark(int_ops.matmul, x, p.qweight, p.scales, p.qzeros, 4, 64)
