"""``torch.ops.quantlab.ternary_*``: compiled kernels where built, the PyTorch reference elsewhere.

* ``ternary_dequant``: packed (i2 / tq1) -> dense ``s * t``.
* ``ternary_mm``: ``A8(x) @ W.T`` on the stored layout (i2 / tq1); the CUDA kernel reads i2 rows
  directly (2-bit decode + ``dp4a`` on int8 activations).
* ``ternary_lut_pack`` / ``ternary_lut_mm``: the CPU kernel's layout
  (:mod:`quantlab.formats.ternary_packing`, built once per layer, with
  :func:`lut_scales` for the scales) and the table-lookup matmul on it (T-MAC-style ``pshufb``
  lookups on AVX2).

All matmuls share one definition (``A8`` = BitNet's per-token int8 absmax activations, exact
integer sums per scale group): :mod:`quantlab.ops.ternary_reference`. The library
``quantlab._C_ternary`` defines the schemas when built; otherwise they are defined here, and the
reference is registered for every device without a compiled kernel. Fake impls make the ops
traceable by ``torch.compile``.
"""

from __future__ import annotations

import torch

from quantlab.formats import ternary_packing
from quantlab.ops import ternary_reference as reference
from quantlab.ops._extension import compiled_kernel, register_ops
from quantlab.ops.kernel_policy import decide, use_kernel

__all__ = [
    "FAMILY",
    "backend",
    "compiled",
    "cpu_path",
    "dequant",
    "lut_mm",
    "lut_pack",
    "lut_scales",
    "matmul",
]

FAMILY = "ternary"
_SCHEMAS = {
    "ternary_dequant": (
        "ternary_dequant(Tensor qweight, Tensor scales, str packing, int in_features, "
        "int group_size, ScalarType out_dtype) -> Tensor"
    ),
    "ternary_mm": (
        "ternary_mm(Tensor x, Tensor qweight, Tensor scales, str packing, int in_features, "
        "int group_size) -> Tensor"
    ),
    "ternary_lut_pack": (
        "ternary_lut_pack(Tensor qweight, str packing, int out_features, int in_features) -> Tensor"
    ),
    "ternary_lut_mm": (
        "ternary_lut_mm(Tensor x, Tensor lut, Tensor lut_scales, int out_features, "
        "int in_features, int group_size) -> Tensor"
    ),
}


def _lut_pack_reference(
    qweight: torch.Tensor, packing: str, out_features: int, in_features: int
) -> torch.Tensor:
    t = ternary_packing.unpack_trits(qweight, packing, in_features)
    if t.shape[0] != out_features:
        raise ValueError(f"qweight has {t.shape[0]} rows, out_features is {out_features}")
    return ternary_packing.lut_pack(t)


_REFERENCES = {
    "ternary_dequant": reference.ternary_dequant,
    "ternary_mm": reference.ternary_mm,
    "ternary_lut_pack": _lut_pack_reference,
    "ternary_lut_mm": reference.ternary_lut_mm,
}
_KERNELS: dict[tuple[str, str], bool] = {}


def _register() -> None:
    _KERNELS.update(register_ops(FAMILY, _SCHEMAS, _REFERENCES))

    @torch.library.register_fake("quantlab::ternary_dequant")
    def _dequant_fake(
        qweight: torch.Tensor,
        scales: torch.Tensor,
        packing: str,
        in_features: int,
        group_size: int,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        return qweight.new_empty((qweight.shape[0], in_features), dtype=out_dtype)

    @torch.library.register_fake("quantlab::ternary_mm")
    def _mm_fake(
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        packing: str,
        in_features: int,
        group_size: int,
    ) -> torch.Tensor:
        return x.new_empty((x.shape[0], qweight.shape[0]))

    @torch.library.register_fake("quantlab::ternary_lut_pack")
    def _lut_pack_fake(
        qweight: torch.Tensor, packing: str, out_features: int, in_features: int
    ) -> torch.Tensor:
        return qweight.new_empty(ternary_packing.lut_shape(out_features, in_features))

    @torch.library.register_fake("quantlab::ternary_lut_mm")
    def _lut_mm_fake(
        x: torch.Tensor,
        lut: torch.Tensor,
        lut_scales: torch.Tensor,
        out_features: int,
        in_features: int,
        group_size: int,
    ) -> torch.Tensor:
        return x.new_empty((x.shape[0], out_features))


_register()


# The op whose compiled kernel a device's layers run: the LUT kernel on CPU, the i2 GEMV on CUDA.
_LAYER_OP = {"cpu": "ternary_lut_mm", "cuda": "ternary_mm"}


def compiled(device_type: str, op: str | None = None) -> bool:
    """Whether this build has a compiled kernel of ``op`` (default: the one the layers run on
    ``device_type``); whether the ops *use* it is :func:`backend`'s answer."""
    return compiled_kernel(_KERNELS, op or _LAYER_OP.get(device_type, "ternary_mm"), device_type)


def backend(device_type: str) -> str:
    """Which implementation the ops run on ``device_type`` (:mod:`quantlab.ops.kernel_policy`):
    ``"cpu-kernel"``, ``"cuda-kernel"`` or ``"torch"``."""
    return decide(FAMILY, device_type, compiled(device_type)).backend


def cpu_path(m: int, out_features: int, in_features: int, group_size: int) -> str:
    """Which path the CPU ``ternary_lut_mm`` kernel takes for ``m`` rows: ``"lut-avx2"``,
    ``"lut-scalar"`` or ``"dequant-matmul"`` (``"reference"`` without the compiled library)."""
    if not _KERNELS.get(("ternary_lut_mm", "CPU")):
        return "reference"
    return torch.ops.quantlab.ternary_cpu_path(m, out_features, in_features, group_size)


def dequant(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    packing: str,
    in_features: int,
    group_size: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense ``[N, K]`` weight ``s * t``; see :func:`reference_ternary.ternary_dequant`."""
    device = qweight.device.type
    if not use_kernel(FAMILY, device, compiled(device)):
        return reference.ternary_dequant(
            qweight, scales, packing, in_features, group_size, out_dtype
        )
    return torch.ops.quantlab.ternary_dequant(
        qweight, scales, packing, in_features, group_size, out_dtype
    )


def matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    packing: str,
    in_features: int,
    group_size: int,
) -> torch.Tensor:
    """``A8(x) [M, K] @ W.T`` -> ``[M, N]`` in ``x.dtype`` on the stored layout."""
    device = x.device.type
    if not use_kernel(FAMILY, device, compiled(device)):
        return reference.ternary_mm(x, qweight, scales, packing, in_features, group_size)
    return torch.ops.quantlab.ternary_mm(x, qweight, scales, packing, in_features, group_size)


def lut_pack(
    qweight: torch.Tensor, packing: str, out_features: int, in_features: int
) -> torch.Tensor:
    """The CPU LUT layout ``[ceil(N / 16), ceil(K / 8), 32]`` uint8 of a packed weight."""
    return torch.ops.quantlab.ternary_lut_pack(qweight, packing, out_features, in_features)


def lut_scales(
    scales: torch.Tensor, out_features: int, in_features: int, group_size: int
) -> torch.Tensor:
    """The CPU LUT kernel's fp32 scale layout (``[1, 1, 1]`` or ``[tiles, G, 16]``)."""
    return ternary_packing.lut_pack_scales(scales, out_features, in_features, group_size)


def lut_mm(
    x: torch.Tensor,
    lut: torch.Tensor,
    lut_scales: torch.Tensor,
    out_features: int,
    in_features: int,
    group_size: int,
) -> torch.Tensor:
    """``A8(x) [M, K] @ W.T`` -> ``[M, N]`` in ``x.dtype`` on the LUT layouts (:func:`lut_pack`,
    :func:`lut_scales`)."""
    return torch.ops.quantlab.ternary_lut_mm(
        x, lut, lut_scales, out_features, in_features, group_size
    )
