"""Round-to-nearest (RTN): the groupwise min/max quantizer every other integer method builds on."""

from __future__ import annotations

import torch

from quantlab.formats.groupwise_int import GroupwiseIntResult, check_bits, check_group_size
from quantlab.solvers.hessian import check_weight

__all__ = ["group_params", "quantize_to_grid", "rtn_quantize"]


# Range shrink factors tried by the clip search: 1.0 down to 0.75 in steps of 2.5 %.
# Weights quantized per chunk of rows (fp32 temporaries of ~64 MB each).
_RTN_CHUNK_WEIGHTS = 1 << 24
# Weights whose candidate grids the clip search tries at once (fp32 temporaries of ~4 MB each).
_CLIP_SEARCH_CHUNK_WEIGHTS = 1 << 20
CLIP_SHRINKS = tuple(1.0 - 0.025 * i for i in range(11))
# GPTQ's grid search scores candidate ranges by sum |w - q(w)|^2.4 (its quant.py default).
CLIP_NORM = 2.4


def group_params(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype = torch.float16,
    clip_search: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of each row of ``w`` from its min/max.

    The range always includes 0 (so an exact zero weight stays representable), as in GPTQ's
    quantizer. Symmetric uses the zero point ``2**(bits-1)``. The scale is rounded to
    ``scale_dtype`` before the zero point is derived, so what is stored is exactly what was used.
    With ``clip_search`` the range is also shrunk by each factor of ``CLIP_SHRINKS`` and every row
    keeps the grid with the smallest ``sum |w - q(w)|^2.4``: clipping a few outliers buys a finer
    step for all the other weights of the group.

    Args:
        w: fp32 ``[R, C]``; each row is one group.

    Returns:
        ``(scale fp32 [R], zero int32 [R])``.
    """
    xmin = torch.clamp(w.min(dim=1).values, max=0.0)
    xmax = torch.clamp(w.max(dim=1).values, min=0.0)
    if not clip_search:
        return _params_from_range(xmin, xmax, bits, sym, scale_dtype)
    # Rows are independent: search a slice of them at a time, so that the candidate grids'
    # temporaries (four of the slice's size) stay small next to a whole projection's weight.
    rows = max(1, _CLIP_SEARCH_CHUNK_WEIGHTS // max(1, w.shape[1]))
    if w.shape[0] > rows:
        parts = [
            _clip_searched_params(w[i : i + rows], xmin[i : i + rows], xmax[i : i + rows], bits,
                                  sym, scale_dtype)
            for i in range(0, w.shape[0], rows)
        ]  # fmt: skip
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return _clip_searched_params(w, xmin, xmax, bits, sym, scale_dtype)


def _clip_searched_params(
    w: torch.Tensor,
    xmin: torch.Tensor,
    xmax: torch.Tensor,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    best_err = torch.full_like(xmin, float("inf"))
    best_scale = torch.empty_like(xmin)
    best_zero = torch.empty(xmin.shape, dtype=torch.int32, device=w.device)
    for shrink in CLIP_SHRINKS:
        scale, zero = _params_from_range(xmin * shrink, xmax * shrink, bits, sym, scale_dtype)
        q = quantize_to_grid(w, scale.unsqueeze(1), zero.unsqueeze(1), bits)
        err = ((q - zero.unsqueeze(1)).to(w.dtype) * scale.unsqueeze(1) - w).abs_().pow_(CLIP_NORM)
        err = err.sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _params_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = (1 << bits) - 1
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
    clip_search: bool = False,
) -> GroupwiseIntResult:
    """Round every group of ``weight`` ``[N, K]`` to its own min/max grid."""
    check_weight(weight, name)
    check_bits(bits)
    n, k = weight.shape
    check_group_size(group_size, k, name)
    g = k if group_size == -1 else group_size
    groups = k // g
    q = torch.empty(n, k, dtype=torch.int32, device=weight.device)
    scale = torch.empty(n, groups, dtype=torch.float32, device=weight.device)
    zero = torch.empty(n, groups, dtype=torch.int32, device=weight.device)
    # Rows in chunks: every group lies in one row, so the result is the same, and the fp32
    # temporaries stay at ~16M weights instead of a whole layer (a 70B MLP weight is 235M).
    step = max(1, _RTN_CHUNK_WEIGHTS // k)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        w = weight[rows].detach().to(torch.float32).reshape(-1, g)
        s, z = group_params(w, bits, sym, scale_dtype, clip_search)
        q[rows] = quantize_to_grid(w, s.unsqueeze(1), z.unsqueeze(1), bits).view(-1, k)
        scale[rows] = s.view(-1, groups)
        zero[rows] = z.view(-1, groups)
    return GroupwiseIntResult(
        q=q, scales=scale, zeros=None if sym else zero, bits=bits, group_size=group_size
    )
