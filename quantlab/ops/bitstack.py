"""``torch.ops.quantlab.bitstack_*``: compiled kernels where built, the PyTorch reference
elsewhere.

The schemas come from the compiled library ``quantlab._C_bitstack`` when it is present; otherwise
(and for any device the build has no kernel for) :mod:`quantlab.ops.bitstack_reference` is
registered under the same names, so callers always go through one op. Fake (meta) implementations
make the ops traceable by ``torch.compile``.
"""

from __future__ import annotations

import torch

from quantlab.ops import bitstack_reference as reference
from quantlab.ops._extension import compiled_kernel, register_ops
from quantlab.ops.kernel_policy import decide, use_kernel

__all__ = ["FAMILY", "backend", "compiled", "cpu_path", "dequant", "matmul"]

FAMILY = "bitstack"
_SCHEMAS = {
    "bitstack_dequant": (
        "bitstack_dequant(Tensor signs, Tensor u, Tensor v, int in_features, "
        "ScalarType out_dtype) -> Tensor"
    ),
    "bitstack_mm": "bitstack_mm(Tensor x, Tensor signs, Tensor u, Tensor v) -> Tensor",
}
_REFERENCES = {
    "bitstack_dequant": reference.bitstack_dequant,
    "bitstack_mm": reference.bitstack_mm,
}
_KERNELS: dict[tuple[str, str], bool] = {}


def _register() -> None:
    _KERNELS.update(register_ops(FAMILY, _SCHEMAS, _REFERENCES))

    @torch.library.register_fake("quantlab::bitstack_dequant")
    def _dequant_fake(
        signs: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor,
        in_features: int,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        return signs.new_empty((signs.shape[1], in_features), dtype=out_dtype)

    @torch.library.register_fake("quantlab::bitstack_mm")
    def _mm_fake(
        x: torch.Tensor, signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        return x.new_empty((x.shape[0], signs.shape[1]))


_register()


def compiled(device_type: str) -> bool:
    """Whether this build has a compiled ``bitstack_mm`` kernel for ``device_type`` (whether the
    ops *use* it is :func:`backend`'s answer)."""
    return compiled_kernel(_KERNELS, "bitstack_mm", device_type)


def backend(device_type: str) -> str:
    """Which implementation the ops run on ``device_type`` (:mod:`quantlab.ops.kernel_policy`):
    ``"cpu-kernel"``, ``"cuda-kernel"`` or ``"torch"``."""
    return decide(FAMILY, device_type, compiled(device_type)).backend


def cpu_path(m: int, rank: int) -> str:
    """The CPU kernel's path for ``m`` rows at ``rank``: ``"lut-avx512"``, ``"lut-avx2"``,
    ``"lut-scalar"`` or ``"tiled-gemm"``; ``"reference"`` without the compiled library."""
    if not _KERNELS.get(("bitstack_mm", "CPU")):
        return "reference"
    return str(torch.ops.quantlab.bitstack_cpu_path(m, rank))


def dequant(
    signs: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    in_features: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense ``[N, K]`` weight of the stacked blocks (see ``bitstack_reference``)."""
    device = signs.device.type
    if not use_kernel(FAMILY, device, compiled(device)):
        return reference.bitstack_dequant(signs, u, v, in_features, out_dtype)
    return torch.ops.quantlab.bitstack_dequant(signs, u, v, in_features, out_dtype)


def matmul(x: torch.Tensor, signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ Ŵ^T`` -> ``[M, N]`` in ``x.dtype``, without forming ``Ŵ``."""
    device = x.device.type
    if not use_kernel(FAMILY, device, compiled(device)):
        return reference.bitstack_mm(x, signs, u, v)
    return torch.ops.quantlab.bitstack_mm(x, signs, u, v)
