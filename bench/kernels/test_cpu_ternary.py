"""CPU ternary matmul (T-MAC-style LUT kernel) vs dense fp32 and bf16 ``F.linear``, in the same
process and with the same thread count (torch's; the kernel's OpenMP runtime is torch's libgomp).

Shapes (N, K) = (out_features, in_features): Llama-3-8B's q/o projection 4096 x 4096 (the issue's
target: >= 3x fp32 at batch 1) and its down projection 4096 x 14336, and SmolLM2-135M's four
linear shapes. Scales per output row and per 64 columns; batch M = 1, 2, 4, 8. Variants:

* ``ternary``: ``TernaryLinear(x)``, i.e. the whole op: per-token int8 quantization of x, table
  construction, lookups, epilogue; weights in the LUT layout built at load time;
* ``ternary cold`` (Llama shapes): the same, rotating over enough weight copies that one
  rotation reads 2x the L3 size, so no call finds its weights in L3 (a 4096 x 4096 ternary
  weight is 4 MB and fits the 32 MB L3 of the machine these figures come from; a fp32 one, 64 MB,
  never does);
* ``dense fp32`` / ``dense bf16``: ``F.linear`` on the dense weight.

Bytes read per call: N * K / 4 (trits at 2 bits) + the fp32 scales (4 N or 4 N K / 64) + 4 M K (x);
dense fp32 reads 4 N K, 16x more. ``extra_info["weight GB/s"]`` is the effective weight bandwidth;
the ``ternary`` benchmarks carry ``speedup_vs_fp32`` / ``speedup_vs_bf16`` (median times of the
same run) once their baselines have run. Nothing here asserts a speed.

Run: ``pytest bench/kernels/test_cpu_ternary.py --benchmark-only`` (``-k 4096x4096`` for the
target shape alone).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from quantlab.formats.ternary import pack
from quantlab.nn.ternary_linear import TernaryLinear
from quantlab.ops import ternary as ops
from quantlab.solvers.ternary import mse_ternarize

BATCHES = (1, 2, 4, 8)
LAYERS = {
    "llama3-qo-4096x4096": (4096, 4096),
    "llama3-down-4096x14336": (4096, 14336),
    "smollm2-qo-576x576": (576, 576),
    "smollm2-kv-192x576": (192, 576),
    "smollm2-up-1536x576": (1536, 576),
    "smollm2-down-576x1536": (576, 1536),
}
GRANULARITIES = {"row": -1, "g64": 64}
VARIANTS = ("dense fp32", "dense bf16", "ternary", "ternary cold")
FALLBACK_L3 = 32 * 2**20


def _l3_bytes() -> int:
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip().upper()
                return int(size[:-1]) * (2**20 if size.endswith("M") else 2**10)
        except (OSError, ValueError):
            continue
    return FALLBACK_L3


def _layer_bytes(layer: TernaryLinear) -> int:
    layer.prepare()
    assert layer._kernel_weight is not None and layer._kernel_scales is not None
    return sum(t.numel() * t.element_size() for t in (layer._kernel_weight, layer._kernel_scales))


@pytest.fixture(
    scope="module",
    params=[(a, b) for a in LAYERS for b in GRANULARITIES],
    ids=[f"{a}-{b}" for a in LAYERS for b in GRANULARITIES],
)
def layer(request: pytest.FixtureRequest) -> dict[str, object]:
    name, granularity = request.param
    n, k = LAYERS[name]
    torch.manual_seed(0)
    dense = torch.randn(n, k) * 0.02
    result = mse_ternarize(dense, GRANULARITIES[granularity], torch.float16)
    one = TernaryLinear.from_packed(pack(result, "i2"))
    return {
        "name": f"{name}-{granularity}",
        "n": n,
        "k": k,
        "dense": dense,
        "bf16": dense.to(torch.bfloat16),
        "layer": one,
        "copies": None,
    }


def _cold_layers(layer: dict[str, object]) -> list[TernaryLinear]:
    if layer["copies"] is None:
        one = layer["layer"]
        assert isinstance(one, TernaryLinear)
        count = max(2, math.ceil(2 * _l3_bytes() / _layer_bytes(one)))
        copies = [one]
        for _ in range(count - 1):
            twin = TernaryLinear.from_packed(one.packed())
            twin.qweight = one.qweight.clone()
            twin.prepare()
            copies.append(twin)
        layer["copies"] = copies
    copies = layer["copies"]
    assert isinstance(copies, list)
    return copies


# (layer, M) -> {variant: median seconds}, and the extra_info of each ternary benchmark: those
# dicts are serialized at the end of the session, so speedups can be added whichever side runs last.
_TIMES: dict[tuple[str, int], dict[str, float]] = {}
_INFOS: dict[tuple[tuple[str, int], str], dict[str, object]] = {}


def _record(key: tuple[str, int], variant: str, seconds: float, info: dict[str, object]) -> None:
    times = _TIMES.setdefault(key, {})
    times[variant] = seconds
    if variant.startswith("ternary"):
        _INFOS[(key, variant)] = info
    for (case, ternary_variant), ternary_info in _INFOS.items():
        if case != key:
            continue
        for base in ("dense fp32", "dense bf16"):
            if base in times:
                speedup = times[base] / times[ternary_variant]
                ternary_info[f"speedup_vs_{base.split()[1]}"] = speedup


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m", BATCHES, ids=[f"M{m}" for m in BATCHES])
def test_cpu_ternary(benchmark, layer: dict[str, object], m: int, variant: str) -> None:  # noqa: ANN001
    name, n, k = layer["name"], layer["n"], layer["k"]
    if variant == "ternary cold" and not str(name).startswith("llama3"):
        pytest.skip("the SmolLM2 shapes' dense fp32 weights fit in L3 too")
    x = torch.randn(m, k)
    benchmark.group = f"{name} M={m}"
    benchmark.extra_info.update(
        {
            "suite": "cpu_ternary",
            "variant": variant,
            "threads": torch.get_num_threads(),
            "path": ops.cpu_path(m, n, k, 0),
        }
    )
    if variant == "dense fp32":
        dense = layer["dense"]
        benchmark(torch.nn.functional.linear, x, dense)
        nbytes = 4 * n * k
    elif variant == "dense bf16":
        xb = x.to(torch.bfloat16)
        benchmark(torch.nn.functional.linear, xb, layer["bf16"])
        nbytes = 2 * n * k
    elif variant == "ternary":
        one = layer["layer"]
        one(x)
        benchmark(one, x)
        nbytes = _layer_bytes(one)
    else:
        copies = _cold_layers(layer)
        state = {"i": 0}

        def rotate() -> torch.Tensor:
            state["i"] = (state["i"] + 1) % len(copies)
            return copies[state["i"]](x)

        benchmark(rotate)
        nbytes = _layer_bytes(copies[0])
        benchmark.extra_info["copies"] = len(copies)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["weight GB/s"] = nbytes / seconds / 1e9
    _record((str(name), m), variant, seconds, benchmark.extra_info)
