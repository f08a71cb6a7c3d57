"""CPU groupwise-int matmul: kernel vs dequantize-then-matmul vs dense fp32, in the same process.

Shapes are (N, K) = (out_features, in_features): SmolLM2's gate/up (1536 x 576, group 64 only:
576 is not a multiple of 128), a Llama-3-8B q/o projection (4096 x 4096) and its down projection
(4096 x 14336); 4-bit, groups of 64 and 128, batch M = 1, 2, 4, 8 (M <= 2 and M >= 3 are the
kernel's two tile kernels).

Every variant rotates over enough copies of its weight that one rotation reads at least twice
the last-level cache (``/sys/devices/system/cpu/cpu0/cache``, 32 MB where it is not listed), so no
call finds its weight in cache: a 4-bit 4096 x 4096 weight is 8.6 MB, and repeated calls on one
copy would measure L3, not memory, as a decode through a whole model does not.

Bytes the kernel reads per call: N*K/2 (codes) + N*G*2 (fp16 scales) + N*G/2 (zeros) + 4*M*K (x);
the dense fp32 baseline reads 4*N*K, 7-8x more. At batch 1-8 every variant is bound by memory or by
the unpack work, so read the ratios within one pytest-benchmark group (one shape, group size and
M). `extra_info["weight GB/s"]` gives the effective read bandwidth. Nothing here asserts a speed.

Run: `pytest bench/kernels/test_cpu_groupwise_int.py --benchmark-only` (or `make bench`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import pytest
import torch

from quantlab.formats.groupwise_int import pack
from quantlab.ops import groupwise_int as ops
from quantlab.solvers.rtn import rtn_quantize

BITS = 4
BATCHES = (1, 2, 4, 8)
FALLBACK_LLC_BYTES = 32 * 2**20
LLC_FACTOR = 2
LAYERS = {
    "smollm2-up-1536x576-g64": (1536, 576, 64),
    "llama3-qo-4096x4096-g64": (4096, 4096, 64),
    "llama3-qo-4096x4096-g128": (4096, 4096, 128),
    "llama3-down-4096x14336-g64": (4096, 14336, 64),
    "llama3-down-4096x14336-g128": (4096, 14336, 128),
}


@cache
def _llc_bytes() -> int:
    """Size of the largest cache cpu0 lists (its L3 on current x86 parts)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=FALLBACK_LLC_BYTES)


def _copies(bytes_per_copy: int) -> int:
    return max(1, math.ceil(LLC_FACTOR * _llc_bytes() / bytes_per_copy))


def _rotating(calls: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One call of the next copy's closure per invocation."""
    state = {"i": 0}

    def run() -> object:
        i = state["i"]
        state["i"] = (i + 1) % len(calls)
        return calls[i]()

    return run


@pytest.fixture(scope="module", params=list(LAYERS))
def layer(request: pytest.FixtureRequest) -> dict[str, object]:
    n, k, group = LAYERS[request.param]
    torch.manual_seed(0)
    dense = torch.randn(n, k)
    one = pack(rtn_quantize(dense, BITS, group))
    packed = [one] + [
        dataclasses.replace(
            one, qweight=one.qweight.clone(), scales=one.scales.clone(), qzeros=one.qzeros.clone()
        )
        for _ in range(_copies(_packed_bytes(n, k, group)) - 1)
    ]
    dense_copies = [dense] + [dense.clone() for _ in range(_copies(4 * n * k) - 1)]
    return {
        "name": request.param,
        "n": n,
        "k": k,
        "group": group,
        "dense": dense_copies,
        "packed": packed,
    }


def _packed_bytes(n: int, k: int, group: int) -> int:
    groups = k // group
    return n * k * BITS // 8 + n * groups * 2 + n * groups * BITS // 8


def _label(benchmark, layer: dict[str, object], m: int, variant: str) -> None:  # noqa: ANN001
    benchmark.group = f"{layer['name']} M={m}"
    benchmark.extra_info["variant"] = variant
    copies = layer["dense" if variant == "dense fp32" else "packed"]
    benchmark.extra_info["weight copies"] = len(copies)


@pytest.mark.parametrize("m", BATCHES)
def test_kernel(benchmark, layer: dict[str, object], m: int) -> None:  # noqa: ANN001
    n, k, group = layer["n"], layer["k"], layer["group"]
    x = torch.randn(m, k)
    _label(benchmark, layer, m, "kernel")
    backend = ops.backend("cpu")
    if backend == "cpu-kernel":
        backend += f" ({torch.ops.quantlab.groupwise_int_cpu_path(BITS, group, k)})"
    benchmark.extra_info["backend"] = backend
    calls = [
        lambda p=p: ops.matmul(x, p.qweight, p.scales, p.qzeros, BITS, group)
        for p in layer["packed"]
    ]
    benchmark(_rotating(calls))
    seconds = benchmark.stats.stats.min
    benchmark.extra_info["weight GB/s"] = _packed_bytes(n, k, group) / seconds / 1e9


@pytest.mark.parametrize("m", BATCHES)
def test_dequant_then_matmul(benchmark, layer: dict[str, object], m: int) -> None:  # noqa: ANN001
    k, group = layer["k"], layer["group"]
    x = torch.randn(m, k)
    _label(benchmark, layer, m, "dequant+matmul")
    calls = [
        lambda p=p: x @ ops.dequant(p.qweight, p.scales, p.qzeros, BITS, group, k).t()
        for p in layer["packed"]
    ]
    benchmark(_rotating(calls))


@pytest.mark.parametrize("m", BATCHES)
def test_dense_fp32(benchmark, layer: dict[str, object], m: int) -> None:  # noqa: ANN001
    k = layer["k"]
    x = torch.randn(m, k)
    _label(benchmark, layer, m, "dense fp32")
    benchmark(_rotating([lambda w=w: x @ w.t() for w in layer["dense"]]))
    numel = layer["n"] * k
    benchmark.extra_info["weight GB/s"] = 4 * numel / benchmark.stats.stats.min / 1e9
