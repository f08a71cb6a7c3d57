"""CPU PVQ matmul: decode-GEMV kernel vs decode-then-matmul vs dense fp32, in the same process.

Shapes are (N, K) = (out_features, in_features): SmolLM2's q/o (576 x 576), gate/up (1536 x 576)
and down (576 x 1536), and a Llama-3-8B q/o projection (4096 x 4096); the 3.25-bit encoding the
method picks for SmolLM2 (D = 16, 28 pulses, 6 levels: 51-bit codes, 3.19 bits per weight of
codes); batch M = 1, 4, 8. Codes are drawn uniformly over the whole code space, so every pyramid
point is as likely as in real weights (decode work depends on the point only through its pulse
layout, which is the same for every point: D + P table steps per vector at most).

Bytes the kernel reads per call: N*K/D*F/8 (codes) + 2N (fp16 row scales) + 4*M*K (x); the dense
fp32 baseline reads 4*N*K, ~10x more. Unlike groupwise integers, PVQ decode is compute-bound on
a CPU (a data-dependent walk of the count table per vector), so expect the kernel to be slower
than dense fp32 at batch 1: read the ratios within one pytest-benchmark group (one shape and M).
`extra_info["weights/s"]` is the decode throughput. The layer also rotates its input
(quantlab.transforms.rotation, ~73 multiply-adds per input column and token), timed as "rotate"
here.
Nothing here asserts a speed.

Run: `pytest bench/kernels/test_cpu_pvq.py --benchmark-only` (or `make bench`).
"""

from __future__ import annotations

import pytest
import torch

from quantlab.formats.bitstream import pack_fields
from quantlab.formats.pvq_codebook import PVQParams
from quantlab.ops import pvq as ops
from quantlab.transforms.rotation import random_signs, rotate

PARAMS = PVQParams(16, 28, 6)
BATCHES = (1, 4, 8)
LAYERS = {
    "smollm2-qo-576x576": (576, 576),
    "smollm2-up-1536x576": (1536, 576),
    "smollm2-down-576x1536": (576, 1536),
    "llama3-qo-4096x4096": (4096, 4096),
}


@pytest.fixture(scope="module", params=list(LAYERS))
def layer(request: pytest.FixtureRequest) -> dict[str, object]:
    n, k = LAYERS[request.param]
    gen = torch.Generator().manual_seed(0)
    n_codes = n * (k // PARAMS.dim)
    total = PARAMS.size * PARAMS.levels
    codes = (torch.rand(n_codes, generator=gen, dtype=torch.float64) * total).long()
    words = pack_fields(codes.clamp_(0, total - 1), PARAMS.code_bits)
    scales = (torch.rand(n, generator=gen) + 0.5).half()
    levels = torch.sort(torch.rand(PARAMS.levels, generator=gen) + 0.5).values.half()
    dense = ops.decode(words, scales, levels, PARAMS.dim, PARAMS.pulses, k)
    return {
        "name": request.param,
        "n": n,
        "k": k,
        "packed": (words, scales, levels),
        "dense": dense,
        "bytes": words.numel() * 4 + n * 2,
    }


def _label(benchmark, layer: dict[str, object], m: int, variant: str) -> None:  # noqa: ANN001
    benchmark.group = f"pvq {layer['name']} M={m}"
    benchmark.extra_info["variant"] = variant


@pytest.mark.parametrize("m", BATCHES)
def test_kernel(benchmark, layer: dict[str, object], m: int) -> None:  # noqa: ANN001
    words, scales, levels = layer["packed"]
    x = torch.randn(m, layer["k"])
    _label(benchmark, layer, m, "kernel")
    benchmark.extra_info["backend"] = ops.backend("cpu")
    benchmark.extra_info["cpu path"] = ops.cpu_path()
    benchmark(ops.matmul, x, words, scales, levels, PARAMS.dim, PARAMS.pulses)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info["weights/s"] = layer["n"] * layer["k"] / seconds
    benchmark.extra_info["weight GB/s"] = layer["bytes"] / seconds / 1e9


@pytest.mark.parametrize("m", BATCHES)
def test_decode_then_matmul(benchmark, layer: dict[str, object], m: int) -> None:  # noqa: ANN001
    words, scales, levels = layer["packed"]
    k = layer["k"]
    x = torch.randn(m, k)
    _label(benchmark, layer, m, "decode+matmul")
    benchmark(lambda: x @ ops.decode(words, scales, levels, PARAMS.dim, PARAMS.pulses, k).t())


@pytest.mark.parametrize("m", BATCHES)
def test_dense_fp32(benchmark, layer: dict[str, object], m: int) -> None:  # noqa: ANN001
    dense = layer["dense"]
    x = torch.randn(m, layer["k"])
    _label(benchmark, layer, m, "dense fp32")
    benchmark(lambda: x @ dense.t())
    benchmark.extra_info["weight GB/s"] = 4 * dense.numel() / benchmark.stats.stats.min / 1e9


@pytest.mark.parametrize("m", BATCHES)
def test_rotate_input(benchmark, layer: dict[str, object], m: int) -> None:  # noqa: ANN001
    k = layer["k"]
    x = torch.randn(m, k)
    signs = random_signs(k, 0)
    _label(benchmark, layer, m, "rotate")
    benchmark(rotate, x, signs)
