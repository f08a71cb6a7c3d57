"""Output-preserving folding of per-input-channel scales into the op that feeds a set of linears.

For linears ``L_j`` that all read ``h = prev(x)``: ``L_j(h) = (W_j diag(s)) (diag(s)^-1 h)``. The
``diag(s)^-1`` is folded into ``prev`` (a norm's weight and bias, or a linear's output rows and
bias) and ``diag(s)`` into every ``W_j``'s input columns, so the block computes the same function
while the weights the quantizer sees are rescaled. AWQ searches ``s``; BitStack derives it from
activation norms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quantlab.models.arch import SmoothMap

__all__ = ["fold_input_scales", "fold_smooth_map", "smooth_map_applies"]


def _output_width(prev: nn.Module) -> int | None:
    if isinstance(prev, nn.Linear):
        return prev.out_features
    weight = getattr(prev, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]
    return None


def smooth_map_applies(block: nn.Module, smooth: SmoothMap) -> bool:
    """Whether ``smooth`` can fold in this block (e.g. v_proj -> o_proj needs equal widths; with
    grouped-query attention they differ and the map is skipped)."""
    prev = block.get_submodule(smooth.prev)
    width = _output_width(prev)
    if width is None or (smooth.prev_slices > 1 and not isinstance(prev, nn.Linear)):
        return False
    return all(
        block.get_submodule(name).in_features * smooth.prev_slices == width
        for name in smooth.linears
    )


def fold_smooth_map(
    block: nn.Module, smooth: SmoothMap, scales: torch.Tensor, norm_weight_offset: float = 0.0
) -> None:
    """Fold ``scales`` along one of an architecture's smoothing maps inside ``block`` (its
    ``also`` readers, a router, take the scales too)."""
    fold_input_scales(
        block.get_submodule(smooth.prev),
        [block.get_submodule(name) for name in smooth.linears + smooth.also],
        scales,
        norm_weight_offset,
        smooth.prev_slices,
    )


@torch.no_grad()
def fold_input_scales(
    prev: nn.Module,
    linears: Sequence[nn.Module],
    scales: torch.Tensor,
    norm_weight_offset: float = 0.0,
    prev_slices: int = 1,
) -> None:
    """Scale the linears' input columns by ``scales`` and ``prev``'s output by ``1 / scales``.

    Args:
        prev: an ``nn.Linear`` or a norm with a 1-D ``weight`` (and optional ``bias``) producing
            the linears' input; norms computing ``x * (weight + offset)`` pass that offset.
        linears: the linears reading ``prev``'s output (or any module with an ``[out, K]``
            ``weight`` reading it, such as a mixture's router); ``K == len(scales)``.
        scales: positive finite ``[K]``.
        norm_weight_offset: see ``prev``.
        prev_slices: ``prev`` (a linear) produces this many equal slices and the linears read the
            last one; only those rows are divided.
    """
    if scales.dim() != 1:
        raise ValueError(f"scales must be 1-D [K], got shape {tuple(scales.shape)}")
    s = scales.detach().to(torch.float32)
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError("scales must be finite and positive")
    k = s.shape[0]
    width = _output_width(prev)
    if prev_slices < 1 or (prev_slices > 1 and not isinstance(prev, nn.Linear)):
        raise ValueError(f"prev_slices={prev_slices} needs prev to be an nn.Linear")
    if width != k * prev_slices:
        raise ValueError(
            f"{type(prev).__name__} produces {width} channels, scales have {k}"
            + (f" x {prev_slices} slices" if prev_slices > 1 else "")
        )
    for lin in linears:
        # A router is not always an nn.Linear; any [out, in] weight reading the input will do.
        if lin.weight.dim() != 2 or lin.weight.shape[1] != k:
            raise ValueError(
                f"{type(lin).__name__} with weight {list(lin.weight.shape)} cannot take {k} scales"
            )

    def update(t: torch.Tensor, new: torch.Tensor) -> None:
        t.copy_(new.to(t.dtype))

    if isinstance(prev, nn.Linear):
        rows = slice(width - k, width)
        weight = prev.weight[rows]
        update(weight, weight.float() / s.to(weight.device).unsqueeze(1))
        if prev.bias is not None:
            bias = prev.bias[rows]
            update(bias, bias.float() / s.to(bias.device))
    else:
        weight = prev.weight
        sw = s.to(weight.device)
        update(weight, (weight.float() + norm_weight_offset) / sw - norm_weight_offset)
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            update(bias, bias.float() / sw)
    for lin in linears:
        update(lin.weight, lin.weight.float() * s.to(lin.weight.device).unsqueeze(0))
