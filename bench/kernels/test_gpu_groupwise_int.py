"""CUDA groupwise-int matmul: quantlab vs dense cuBLAS vs torch's int4 kernel, in the same process.

Shapes are (N, K) = (out_features, in_features) of Llama-3-8B (q/o 4096 x 4096, k/v 1024 x 4096,
gate/up 14336 x 4096, down 4096 x 14336) and Llama-3-70B (q/o 8192 x 8192, gate/up 28672 x 8192,
down 8192 x 28672); W4 g128 asymmetric everywhere, W8 g128 on the 8B gate/up; batch M = 1 ... 4096;
bf16 and fp16 activations. Per (shape, M, dtype) three variants are timed:

* ``quantlab``: what a user's ``QuantLinear`` runs on the GPU (``layer(x)``): the tensor-core
  mma kernel on the weight repacked once at load (batches up to 255; scales in the activation
  dtype, the kernel's half-precision dequant; asymmetric zero points), ``groupwise_int_mm``
  (dequantize + cuBLAS) above that;
* ``quantlab-v1`` (full runs only): ``torch.ops.quantlab.groupwise_int_mm`` on the exported
  layout (the warp-per-row GEMV / wmma GEMM), to see what the repack buys;
* ``cublas``: dense ``x @ W.T`` in the activation dtype;
* ``int4pack``: ``torch.ops.aten._weight_int4pack_mm`` (tinygemm) on the same integer codes
  (bf16 activations and W4 only: that is all it accepts).

``test_copy_bandwidth`` measures the device-to-device copy bandwidth in the same run (bytes read
plus written over time), the ceiling the report compares the kernels' TB/s with.

Every variant rotates over enough copies of its weight that one rotation reads at least
``2 x L2`` bytes, so no call finds its weight in L2 (every <= 4-bit Llama-8B matrix fits in the
50 MB L2 of an H100; repeated calls on one copy would measure L2, not HBM). A rotation is captured
in a CUDA graph (``QUANTLAB_BENCH_GRAPHS=0`` times it eagerly): at batch 1 a kernel runs in a few
microseconds, less than Python needs to launch it, so eager timing measures the launch rate.
Times come from CUDA events around whole rotations; pytest-benchmark's own stats are the wall time
of one round (several rotations), so read ``extra_info["time_s"]`` (median seconds per call).

``extra_info`` also holds the weight bytes one call reads (packed codes + scales + zeros for the
quantized variants; for ``quantlab`` on the mma path, the repacked tensors, padding included),
the effective weight bandwidth ``TB/s`` = bytes / time, ``TFLOP/s`` = 2 M N K / time, and the
speedups ``t_baseline / t_quantlab`` once both sides of a case have run.
``scripts/bench_report.py`` recomputes the speedups from the JSON. Nothing here asserts a speed.

Run: ``pytest bench/kernels/test_gpu_groupwise_int.py --benchmark-only
--benchmark-json=out/bench/gpu.json`` (or ``make bench-gpu``); ``QUANTLAB_BENCH_QUICK=1`` keeps
three shapes and five batch sizes, ``QUANTLAB_BENCH_ROUNDS`` sets the timed rounds (default 10).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

import pytest
import torch

from bench.timing import cuda_rotation, git_commit
from quantlab.formats.groupwise_int import GroupwiseIntMeta, PackedGroupwiseInt, pack
from quantlab.nn import QuantLinear
from quantlab.ops import groupwise_int as ops
from quantlab.solvers.rtn import rtn_quantize

if TYPE_CHECKING:
    from pytest_benchmark.fixture import BenchmarkFixture

if not torch.cuda.is_available():
    pytest.skip(
        "GPU kernel benchmarks need a CUDA device (torch.cuda.is_available() is False)",
        allow_module_level=True,
    )


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


QUICK = _env_flag("QUANTLAB_BENCH_QUICK", False)
USE_GRAPHS = _env_flag("QUANTLAB_BENCH_GRAPHS", True)
ROUNDS = int(os.environ.get("QUANTLAB_BENCH_ROUNDS", "5" if QUICK else "10"))
# GPU time per timed round: long enough that graph-replay launch gaps and event resolution
# (~0.5 us) vanish, short enough that ~470 cases fit in a few minutes.
ROUND_TARGET_S = 5e-3
# Rotate over at least this many L2 sizes of weight bytes per variant.
L2_FACTOR = 2
# When the driver does not report the L2 size: above H100 (50 MB) and H200 (60 MB).
FALLBACK_L2_BYTES = 80 * 2**20
# gpt-fast's choice (16-byte weight loads); it makes tinygemm need K % (8 * 16) == 0.
INT4PACK_INNER_K_TILES = 8

LAYERS: dict[str, tuple[int, int]] = {
    "llama3-8b-qo-4096x4096": (4096, 4096),
    "llama3-8b-kv-1024x4096": (1024, 4096),
    "llama3-8b-gate_up-14336x4096": (14336, 4096),
    "llama3-8b-down-4096x14336": (4096, 14336),
    "llama3-70b-qo-8192x8192": (8192, 8192),
    "llama3-70b-gate_up-28672x8192": (28672, 8192),
    "llama3-70b-down-8192x28672": (8192, 28672),
}
# (layer, bits, group_size); W8 on one shape only, to see what 8-bit costs over 4-bit.
CASES: list[tuple[str, int, int]] = [(name, 4, 128) for name in LAYERS] + [
    ("llama3-8b-gate_up-14336x4096", 8, 128)
]
BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
if QUICK:
    # One small, one 8B MLP and one 70B MLP shape; batches that reach each CUDA path
    # (gemv <= 8 rows, fused gemm < 256, dequantize + cuBLAS above).
    CASES = [
        ("llama3-8b-qo-4096x4096", 4, 128),
        ("llama3-8b-gate_up-14336x4096", 4, 128),
        ("llama3-70b-gate_up-28672x8192", 4, 128),
    ]
    BATCHES = (1, 8, 32, 128, 512)
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS: tuple[str, ...] = ("cublas", "int4pack", "quantlab") + (() if QUICK else ("quantlab-v1",))
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Device-to-device copy for the bandwidth probe: far above any L2.
COPY_BYTES = 2 * 2**30


def _case_id(layer: str, bits: int, group: int) -> str:
    return f"{layer}-w{bits}g{group}"


def _variant_applies(bits: int, dtype_name: str, variant: str, m: int) -> bool:
    if variant == "quantlab-v1":
        return m < 256  # above, v1 and the current path are the same dequantize + cuBLAS
    # tinygemm takes 4-bit codes and bf16 activations only.
    return variant != "int4pack" or (bits == 4 and dtype_name == "bf16")


PARAMS = [
    pytest.param(
        (layer, bits, group),
        m,
        dtype_name,
        variant,
        id=f"{_case_id(layer, bits, group)}-{dtype_name}-M{m}-{variant}",
    )
    for layer, bits, group in CASES
    for dtype_name in DTYPES
    for m in BATCHES
    for variant in VARIANTS
    if _variant_applies(bits, dtype_name, variant, m)
]


@cache
def _l2_bytes() -> int:
    reported = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 0
    return int(reported) if reported > 0 else FALLBACK_L2_BYTES


def _copies(bytes_per_copy: int) -> int:
    return max(1, math.ceil(L2_FACTOR * _l2_bytes() / bytes_per_copy))


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class Weights:
    """One case's weights on the GPU, each variant as enough copies to defeat L2."""

    case: str
    n: int
    k: int
    bits: int
    group: int
    # (qweight, scales, qzeros) per copy.
    packed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    # (tinygemm weight, scales_and_zeros [K/g, N, 2] bf16) per copy; None where unsupported.
    int4pack: list[tuple[torch.Tensor, torch.Tensor]] | None
    int4pack_error: str | None
    # The fp32 weight the codes were rounded from; cuBLAS copies are made per dtype on first use.
    dense_fp32: torch.Tensor | None
    dense: dict[torch.dtype, list[torch.Tensor]] = field(default_factory=dict)
    layers: dict[torch.dtype, list[QuantLinear]] = field(default_factory=dict)

    def dense_copies(self, dtype: torch.dtype) -> list[torch.Tensor]:
        if dtype not in self.dense:
            assert self.dense_fp32 is not None, "weights already released"
            one = self.dense_fp32.to(dtype)
            self.dense[dtype] = [one] + [one.clone() for _ in range(_copies(_nbytes(one)) - 1)]
        return self.dense[dtype]

    def quantlab_layers(self, dtype: torch.dtype) -> list[QuantLinear]:
        """QuantLinear copies with scales in ``dtype`` (repacked for the mma kernel on load)."""
        if dtype not in self.layers:
            meta = GroupwiseIntMeta(
                self.k, self.n, self.bits, self.group, False, DTYPE_NAMES[dtype]
            )
            one = [
                QuantLinear.from_packed(PackedGroupwiseInt(qw, s.to(dtype), z, meta))
                for qw, s, z in self.packed[:1]
            ]
            copies = _copies(_layer_bytes(one[0]))
            qw, s, z = self.packed[0]
            self.layers[dtype] = one + [
                QuantLinear.from_packed(
                    PackedGroupwiseInt(
                        qw.clone(), s.to(dtype), None if z is None else z.clone(), meta
                    )
                )
                for _ in range(copies - 1)
            ]
        return self.layers[dtype]

    def release(self) -> None:
        self.packed.clear()
        self.int4pack = None
        self.dense.clear()
        self.layers.clear()
        self.dense_fp32 = None


def _layer_bytes(layer: QuantLinear) -> int:
    """Weight bytes a call of ``layer`` reads on the mma path (the repacked tensors)."""
    if layer.mma_qweight is not None:
        return _nbytes(layer.mma_qweight, layer.mma_scales, layer.mma_zeros)
    return _nbytes(layer.qweight, layer.scales, layer.qzeros)


def _int4pack(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """tinygemm's layout of the same codes.

    tinygemm dequantizes ``(q - 8) * scale + zero``; quantlab stores ``(q - z) * s``, so its
    ``zero`` is ``(8 - z) * s``. The uint8 input packs two codes per byte, even k in the high nibble
    (torch's own ``_group_quantize_tensor`` test helper).
    """
    q8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous()
    weight = torch.ops.aten._convert_weight_to_int4pack(q8, INT4PACK_INNER_K_TILES)
    s = scales.to(torch.float32)
    zero = (8 - zeros.to(torch.float32)) * s
    scales_and_zeros = torch.stack([s, zero], dim=2).transpose(0, 1).contiguous()
    return weight, scales_and_zeros.to(torch.bfloat16)


def _build(layer: str, bits: int, group: int) -> Weights:
    n, k = LAYERS[layer]
    torch.manual_seed(0)
    dense = torch.randn(n, k, device="cuda") * 0.02
    result = rtn_quantize(dense, bits, group)
    p = pack(result)
    qw, s, z = p.qweight, p.scales, p.qzeros
    packed = [(qw, s, z)] + [
        (qw.clone(), s.clone(), None if z is None else z.clone())
        for _ in range(_copies(_nbytes(qw, s, z)) - 1)
    ]
    int4pack = None
    error: str | None = None
    if bits != 4:
        error = "tinygemm is 4-bit only"
    elif k % (INT4PACK_INNER_K_TILES * 16) or group not in (32, 64, 128, 256):
        error = f"tinygemm needs K % {INT4PACK_INNER_K_TILES * 16} == 0 and g in 32..256"
    else:
        try:
            w, sz = _int4pack(result.q, result.scales, result.zeros)
            int4pack = [(w, sz)] + [
                (w.clone(), sz.clone()) for _ in range(_copies(_nbytes(w, sz)) - 1)
            ]
        except (RuntimeError, NotImplementedError) as exc:  # e.g. a GPU below sm_80
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    del result
    return Weights(layer, n, k, bits, group, packed, int4pack, error, dense)


@pytest.fixture(scope="module")
def weights(request: pytest.FixtureRequest) -> Iterator[Weights]:
    layer, bits, group = request.param
    w = _build(layer, bits, group)
    yield w
    # pytest still holds the fixture value here: empty the copies so that their memory goes back
    # before the next case is built (a 70B case holds ~1 GB of dense copies per dtype).
    w.release()
    torch.cuda.empty_cache()


def _event_seconds(run: Callable[[], None], reps: int) -> float:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3


def _calls(
    w: Weights, variant: str, x: torch.Tensor
) -> tuple[list[Callable[[], torch.Tensor]], int]:
    """One closure per weight copy, and the weight bytes one call reads."""
    if variant == "cublas":
        copies = w.dense_copies(x.dtype)
        return [lambda d=d: x @ d.t() for d in copies], _nbytes(copies[0])
    if variant == "int4pack":
        assert w.int4pack is not None
        return [
            lambda wp=wp, sz=sz: torch.ops.aten._weight_int4pack_mm(x, wp, w.group, sz)
            for wp, sz in w.int4pack
        ], _nbytes(*w.int4pack[0])
    if variant == "quantlab-v1":
        return [
            lambda qw=qw, s=s, z=z: ops.matmul(x, qw, s, z, w.bits, w.group)
            for qw, s, z in w.packed
        ], _nbytes(*w.packed[0])
    layers = w.quantlab_layers(x.dtype)
    return [lambda layer=layer: layer(x) for layer in layers], _layer_bytes(layers[0])


def _cuda_path(w: Weights, m: int, dtype: torch.dtype, variant: str) -> str:
    if variant == "quantlab":
        x = torch.empty(m, w.k, device="cuda", dtype=dtype)
        if w.quantlab_layers(dtype)[0].kernel_path(x) == "mma":
            splits = torch.ops.quantlab.groupwise_int_mma_splits(
                m, w.n, w.k, w.bits, w.group, dtype, dtype, 0
            )
            return f"mma (split-K {splits})"
    try:
        op = torch.ops.quantlab.groupwise_int_cuda_path
    except (AttributeError, RuntimeError):  # defined by CUDA builds of the extension only
        return "n/a (no CUDA build)"
    return str(op(m, w.n, w.k, w.bits, w.group, dtype))


# (case, m, dtype) -> {variant: seconds per call} and {variant: that benchmark's extra_info}; the
# extra_info dicts are serialized at the end of the session, so the speedups can be filled in
# whichever variant of a case runs last.
_TIMES: dict[tuple[str, int, str], dict[str, float]] = {}
_INFOS: dict[tuple[str, int, str], dict[str, dict[str, object]]] = {}


def _record_speedups(key: tuple[str, int, str]) -> None:
    times, infos = _TIMES[key], _INFOS[key]
    if "quantlab" not in times:
        return
    for baseline in ("cublas", "int4pack", "quantlab-v1"):
        if baseline in times:
            infos["quantlab"][f"speedup_vs_{baseline}"] = times[baseline] / times["quantlab"]


def _int4pack_error(w: Weights, x: torch.Tensor) -> float:
    """Max |tinygemm - quantlab| / max |quantlab| on this case: a check of the layout conversion."""
    assert w.int4pack is not None
    qw, s, z = w.packed[0]
    ref = ops.matmul(x, qw, s, z, w.bits, w.group).float()
    got = torch.ops.aten._weight_int4pack_mm(x, w.int4pack[0][0], w.group, w.int4pack[0][1])
    return float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize(("weights", "m", "dtype_name", "variant"), PARAMS, indirect=["weights"])
def test_matmul(
    benchmark: BenchmarkFixture, weights: Weights, m: int, dtype_name: str, variant: str
) -> None:
    w, dtype = weights, DTYPES[dtype_name]
    if variant == "int4pack" and w.int4pack is None:
        pytest.skip(f"_weight_int4pack_mm unavailable: {w.int4pack_error}")
    case = _case_id(w.case, w.bits, w.group)
    benchmark.group = f"{case} {dtype_name} M={m}"
    torch.manual_seed(m)
    x = torch.randn(m, w.k, device="cuda", dtype=dtype)
    calls, weight_bytes = _calls(w, variant, x)
    run, mode = cuda_rotation(calls, USE_GRAPHS)
    per_rotation = _event_seconds(run, 1)
    reps = max(1, min(1000, math.ceil(ROUND_TARGET_S / max(per_rotation, 1e-7))))
    samples: list[float] = []

    def timed_round() -> None:
        samples.append(_event_seconds(run, reps) / (reps * len(calls)))

    info = benchmark.extra_info
    info.update(
        suite="gpu_groupwise_int",
        case=case,
        layer=w.case,
        n=w.n,
        k=w.k,
        bits=w.bits,
        group=w.group,
        m=m,
        dtype=dtype_name,
        variant=variant,
        device=torch.cuda.get_device_name(),
        capability="sm_{}{}".format(*torch.cuda.get_device_capability()),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        commit=git_commit(),
        l2_bytes=_l2_bytes(),
        copies=len(calls),
        timing=mode,
        calls_per_round=reps * len(calls),
    )
    if variant.startswith("quantlab"):
        info["backend"] = ops.backend("cuda")
        info["path"] = _cuda_path(w, m, dtype, variant)
        info["scale_dtype"] = DTYPE_NAMES[dtype] if variant == "quantlab" else "float16"
    if variant == "int4pack":
        info["rel_err_vs_quantlab"] = _int4pack_error(w, x)
    benchmark.pedantic(timed_round, rounds=ROUNDS, iterations=1)
    seconds = statistics.median(samples)
    info["time_s"] = seconds
    info["weight_bytes"] = weight_bytes
    info["weight TB/s"] = weight_bytes / seconds / 1e12
    info["TFLOP/s"] = 2 * m * w.n * w.k / seconds / 1e12
    key = (case, m, dtype_name)
    _TIMES.setdefault(key, {})[variant] = seconds
    _INFOS.setdefault(key, {})[variant] = info
    _record_speedups(key)


def test_copy_bandwidth(benchmark: BenchmarkFixture) -> None:
    """Device-to-device copy of COPY_BYTES: the memory ceiling the kernels' TB/s are read
    against (bytes read + bytes written over the median time)."""
    src = torch.empty(COPY_BYTES // 4, device="cuda", dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    benchmark.group = "copy bandwidth"
    samples: list[float] = []

    def run() -> None:
        dst.copy_(src)

    run()
    torch.cuda.synchronize()

    def timed_round() -> None:
        samples.append(_event_seconds(run, 5) / 5)

    benchmark.pedantic(timed_round, rounds=ROUNDS, iterations=1)
    seconds = statistics.median(samples)
    benchmark.extra_info.update(
        suite="gpu_bandwidth",
        device=torch.cuda.get_device_name(),
        capability="sm_{}{}".format(*torch.cuda.get_device_capability()),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        commit=git_commit(),
        bytes=2 * COPY_BYTES,
        time_s=seconds,
        **{"TB/s": 2 * COPY_BYTES / seconds / 1e12},
    )
