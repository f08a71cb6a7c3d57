"""Round-to-nearest (RTN): the groupwise min/max quantizer every other integer method builds on."""

from __future__ import annotations

import torch

from quantlab.solvers.base import GroupwiseIntResult, check_bits, check_group_size, check_weight

__all__ = ["group_params", "quantize_to_grid", "rtn_quantize"]


def group_params(
    w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of each row of ``w`` from its min/max.

    The range always includes 0 (so an exact zero weight stays representable), as in GPTQ's
    quantizer. Symmetric uses the zero point ``2**(bits-1)``. The scale is rounded to
    ``scale_dtype`` before the zero point is derived, so what is stored is exactly what was used.

    Args:
        w: fp32 ``[R, C]``; each row is one group.

    Returns:
        ``(scale fp32 [R], zero int32 [R])``.
    """
    maxq = (1 << bits) - 1
    xmin = torch.clamp(w.min(dim=1).values, max=0.0)
    xmax = torch.clamp(w.max(dim=1).values, min=0.0)
    if sym:
        amax = torch.maximum(-xmin, xmax)
        xmin, xmax = -amax, amax
    empty = (xmax - xmin) == 0
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = ((xmax - xmin) / maxq).to(scale_dtype).to(torch.float32)
    # A range below the storage dtype's resolution would round the scale to 0.
    tiny = torch.finfo(scale_dtype).tiny
    scale = torch.clamp(scale, min=tiny)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(
            f"weight range {float((xmax - xmin).max()):.4g} overflows {scale_dtype} scales; "
            "use scale_dtype float32"
        )
    if sym:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero.to(torch.int32)


def quantize_to_grid(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Integers ``clamp(round(w / s) + z, 0, 2**bits - 1)`` (broadcasting ``scale``/``zero``)."""
    maxq = (1 << bits) - 1
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq).to(torch.int32)


def rtn_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    name: str = "weight",
) -> GroupwiseIntResult:
    """Round every group of ``weight`` ``[N, K]`` to its own min/max grid."""
    check_weight(weight, name)
    check_bits(bits)
    n, k = weight.shape
    check_group_size(group_size, k, name)
    g = k if group_size == -1 else group_size
    w = weight.detach().to(torch.float32).reshape(n * (k // g), g)
    scale, zero = group_params(w, bits, sym, scale_dtype)
    q = quantize_to_grid(w, scale.unsqueeze(1), zero.unsqueeze(1), bits)
    return GroupwiseIntResult(
        q=q.view(n, k),
        scales=scale.view(n, k // g),
        zeros=None if sym else zero.view(n, k // g),
        bits=bits,
        group_size=group_size,
    )
