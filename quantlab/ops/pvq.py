"""``torch.ops.quantlab.pvq_*``: compiled kernels where built, the PyTorch reference elsewhere.

* ``pvq_decode(codes, row_scales, levels, dim, pulses, in_features, out_dtype)`` -> the dense
  rotated weight ``W' [N, in_features]``.
* ``pvq_mm(x, codes, row_scales, levels, dim, pulses)`` -> ``x @ W'^T`` (``x`` already rotated).

Same pattern as :mod:`quantlab.ops.groupwise_int`: the schemas come from ``quantlab._C_pvq`` when
it is built (else they are defined here), the reference of :mod:`quantlab.ops.pvq_reference` is
registered for every device without a compiled kernel, and fake impls make the ops traceable.
"""

from __future__ import annotations

import torch

from quantlab.ops import pvq_reference as reference
from quantlab.ops._extension import compiled_kernel, register_ops
from quantlab.ops.kernel_policy import decide, use_kernel

__all__ = ["FAMILY", "backend", "compiled", "cpu_path", "decode", "matmul"]

FAMILY = "pvq"
_SCHEMAS = {
    "pvq_decode": (
        "pvq_decode(Tensor codes, Tensor row_scales, Tensor levels, int dim, int pulses, "
        "int in_features, ScalarType out_dtype) -> Tensor"
    ),
    "pvq_mm": (
        "pvq_mm(Tensor x, Tensor codes, Tensor row_scales, Tensor levels, int dim, int pulses) "
        "-> Tensor"
    ),
}
_REFERENCES = {"pvq_decode": reference.pvq_decode, "pvq_mm": reference.pvq_mm}
_KERNELS: dict[tuple[str, str], bool] = {}


def _register() -> None:
    _KERNELS.update(register_ops(FAMILY, _SCHEMAS, _REFERENCES))

    @torch.library.register_fake("quantlab::pvq_decode")
    def _decode_fake(
        codes: torch.Tensor,
        row_scales: torch.Tensor,
        levels: torch.Tensor,
        dim: int,
        pulses: int,
        in_features: int,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        return codes.new_empty((row_scales.shape[0], in_features), dtype=out_dtype)

    @torch.library.register_fake("quantlab::pvq_mm")
    def _mm_fake(
        x: torch.Tensor,
        codes: torch.Tensor,
        row_scales: torch.Tensor,
        levels: torch.Tensor,
        dim: int,
        pulses: int,
    ) -> torch.Tensor:
        return x.new_empty((x.shape[0], row_scales.shape[0]))


_register()


def compiled(device_type: str) -> bool:
    """Whether this build has a compiled kernel of ``pvq_mm`` for ``device_type`` (whether the ops
    *use* it is :func:`backend`'s answer)."""
    return compiled_kernel(_KERNELS, "pvq_mm", device_type)


def backend(device_type: str) -> str:
    """Which implementation the ops run on ``device_type`` (:mod:`quantlab.ops.kernel_policy`):
    ``"cpu-kernel"``, ``"cuda-kernel"`` or ``"torch"``."""
    return decide(FAMILY, device_type, compiled(device_type)).backend


def cpu_path() -> str:
    """The CPU kernel's dot-product path (``"avx2"`` or ``"scalar"``), ``"reference"`` when the
    kernel is not built."""
    if not _KERNELS.get(("pvq_mm", "CPU")):
        return "reference"
    return torch.ops.quantlab.pvq_cpu_path()


def decode(
    codes: torch.Tensor,
    row_scales: torch.Tensor,
    levels: torch.Tensor,
    dim: int,
    pulses: int,
    in_features: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense rotated weight ``[N, in_features]``; layout in :mod:`quantlab.formats.pvq`, decode in
    :mod:`quantlab.ops.pvq_reference`."""
    device = codes.device.type
    if not use_kernel(FAMILY, device, compiled(device)):
        return reference.pvq_decode(codes, row_scales, levels, dim, pulses, in_features, out_dtype)
    return torch.ops.quantlab.pvq_decode(
        codes, row_scales, levels, dim, pulses, in_features, out_dtype
    )


def matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    row_scales: torch.Tensor,
    levels: torch.Tensor,
    dim: int,
    pulses: int,
) -> torch.Tensor:
    """``x [M, K] @ W'^T`` -> ``[M, N]`` in ``x.dtype`` (``x`` in the rotated space)."""
    device = x.device.type
    if not use_kernel(FAMILY, device, compiled(device)):
        return reference.pvq_mm(x, codes, row_scales, levels, dim, pulses)
    return torch.ops.quantlab.pvq_mm(x, codes, row_scales, levels, dim, pulses)
