"""GPTQ: second-order error compensation for groupwise integer weights (Frantar et al., 2022).

Each row of ``W [N, K]`` is quantized column by column; after a column is rounded, its rounding
error is pushed onto the not-yet-quantized columns through the inverse Hessian, so later columns
absorb it. All rows share one Hessian ``H = 2 X X^T / n`` (``X`` the layer input ``[K, n]``), so a
column step is one rank-1 update of an ``[N, cols]`` slab, done for all rows at once.

This module is a pure function of ``(W, H)``: no hooks, no I/O. Internally it works on ``W^T``
(``[K, N]``, one contiguous row per input column) so the per-column reads and rank-1 updates touch
contiguous memory.

Differences from the IST-DASLab reference ``fasterquant``, all deliberate:

- Dynamic group parameters are fitted on the group's *fully* error-updated values. The reference
  reads them from the matrix that has not yet received the lazy updates of the current block, so
  for ``group_size < block_size`` it fits a grid to slightly stale values. To make the fully
  updated values available, the block size is rounded to a multiple of ``group_size``.
- A failed Cholesky factorisation is retried with more damping (with a warning) instead of
  crashing; GPTQModel does the same with a different schedule.
- ``loss`` is computed exactly at the end (see :func:`quantlab.solvers.hessian.proxy_loss`)
  rather than accumulated.
"""

from __future__ import annotations

import functools
import math

import torch

from quantlab.formats.groupwise_int import GroupwiseIntResult, check_bits, check_group_size
from quantlab.solvers.hessian import (
    check_hessian,
    check_weight,
    error_feedback_columns,
    inverse_cholesky,
    proxy_loss,
)
from quantlab.solvers.rtn import group_params

__all__ = ["check_gptq_arguments", "check_static_groups", "gptq_quantize"]


def check_gptq_arguments(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    block_size: int,
    damp_percent: float,
    max_damp_retries: int,
    name: str,
) -> None:
    """:func:`gptq_quantize`'s checks of the weight, the Hessian and the numeric options, in its
    order (raises ``ValueError``/``TypeError`` naming the layer)."""
    check_weight(weight, name)
    check_bits(bits)
    k = weight.shape[1]
    check_group_size(group_size, k, name)
    check_hessian(hessian, k, name)
    if block_size < 1:
        raise ValueError(f"{name}: block_size must be >= 1, got {block_size}")
    if not (damp_percent >= 0.0 and math.isfinite(damp_percent)):
        raise ValueError(f"{name}: damp_percent must be finite and >= 0, got {damp_percent}")
    if max_damp_retries < 0:
        raise ValueError(f"{name}: max_damp_retries must be >= 0, got {max_damp_retries}")


def check_static_groups(group_size: int, act_order: bool, static_groups: bool, name: str) -> None:
    """Raise ``ValueError`` for act-order with dynamic groups, which the format cannot store."""
    grouped = group_size != -1
    if act_order and grouped and not static_groups:
        raise ValueError(
            f"{name}: act_order with static_groups=False gives each column a group by its position "
            "in the quantization order, which needs a per-column g_idx that quantlab's groupwise "
            "format does not store; use static_groups=True (same inference layout as no act-order)"
        )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    name: str = "weight",
    max_damp_retries: int = 5,
    clip_search: bool = False,
    *,
    loss_weight: torch.Tensor | None = None,
) -> GroupwiseIntResult:
    """Quantize one linear weight with GPTQ.

    Args:
        weight: float ``[N, K]`` (``[out, in]``); not modified.
        hessian: float ``[K, K]``, ``H = 2 X X^T / n`` accumulated over calibration tokens; not
            modified. Moved to ``weight``'s device; all math is fp32 there (CPU or CUDA).
        bits: 2, 3, 4 or 8.
        group_size: input columns per scale/zero group, or ``-1`` for one group per row.
        sym: symmetric grid (zero fixed at ``2**(bits-1)``, ``zeros`` returned as ``None``).
        damp_percent: ``H_ii += damp_percent * mean(diag H)`` before inverting.
        block_size: columns per lazy-update block; rounded down to a multiple of ``group_size``
            (but at least one group) so every dynamic group lies inside one block.
        act_order: quantize columns in order of descending ``H_ii`` (``desc_act``).
        static_groups: with ``act_order``, fit every group's grid up front on the weight before
            any update (dead columns already zeroed), so column ``c`` keeps group
            ``c // group_size`` and no ``g_idx`` is needed.
            Ignored without ``act_order`` (groups are then fitted dynamically).
        scale_dtype: storage dtype the scales are rounded to before use.
        name: layer name used in warnings and errors.
        max_damp_retries: how often to retry a failed Cholesky with tenfold damping.
        clip_search: fit each group's grid with the range-shrink search of
            :func:`quantlab.solvers.rtn.group_params` instead of plain min/max.
        loss_weight: float ``[N, K]``, the weight ``loss`` is measured against (default
            ``weight``). A caller that rounds a target moved away from the layer's weight (e.g.
            :func:`quantlab.solvers.fair_gptq.fair_gptq_quantize`) passes the original weight, so
            that the move counts as error too.

    Returns:
        :class:`GroupwiseIntResult` with ``q`` int32 ``[N, K]``, ``scales`` fp32 ``[N, G]``,
        ``zeros`` int32 ``[N, G]`` (``None`` if ``sym``) and ``loss`` =
        :func:`quantlab.solvers.hessian.proxy_loss` of the result against the undamped
        ``hessian`` and ``loss_weight``.
    """
    check_gptq_arguments(
        weight, hessian, bits, group_size, block_size, damp_percent, max_damp_retries, name
    )
    check_static_groups(group_size, act_order, static_groups, name)
    if loss_weight is not None and loss_weight.shape != weight.shape:
        raise ValueError(
            f"{name}: loss_weight {tuple(loss_weight.shape)} and weight {tuple(weight.shape)} "
            "differ"
        )
    n, k = weight.shape
    grouped = group_size != -1

    device = weight.device
    maxq = float((1 << bits) - 1)
    g = group_size if grouped else k
    n_groups = k // g

    w = weight.detach().to(torch.float32, copy=True)  # one copy, also from bf16
    source = hessian.detach().to(device=device, dtype=torch.float32)

    # A column that never saw a nonzero input cannot influence the output: pin it to 0 and give
    # it a unit Hessian entry so the factorisation stays defined.
    diagonal = torch.diagonal(source).clone()
    dead = diagonal == 0
    if bool(dead.any()):
        diagonal[dead] = 1.0
        w[:, dead] = 0.0

    # Precomputed grids: per-channel (one group of K) or static groups. None = dynamic groups.
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None
    if not grouped or act_order:
        s, z = group_params(w.reshape(n * n_groups, g), bits, sym, scale_dtype, clip_search)
        fixed = (s.view(n, n_groups), z.view(n, n_groups))

    # The solver's own copy of H, permuted in one gather (no intermediate K x K copy), damped and
    # factored in place: at a 28672-wide input every K x K matrix is 3.3 GB, and this is the only
    # one besides the caller's (a retry after a failed Cholesky gathers a new one).
    perm: torch.Tensor | None = None
    if act_order:
        perm = torch.argsort(diagonal, descending=True, stable=True)
        w = w[:, perm]
        dead = dead[perm]

    working_copy = functools.partial(_working_hessian, source, perm, dead)
    u = inverse_cholesky(working_copy, damp_percent, max_damp_retries, name)
    del working_copy
    del source

    # Transposed working copy: row i of wt is input column i (in quantization order).
    wt = w.t().contiguous()
    del w

    # Per-group scale/zero rows ([G, N]) and each column's group in quantization order, for the
    # fixed-grid cases (indexed per column: a [K, N] row per column would be two weight copies).
    group_scale: torch.Tensor | None = None
    group_zero: torch.Tensor | None = None
    group_of_column: list[int] = []
    if fixed is not None:
        col_group = torch.arange(k, device=device) // g
        if perm is not None:
            col_group = col_group[perm]
        group_of_column = col_group.tolist()
        group_scale = fixed[0].t().contiguous()
        group_zero = fixed[1].t().to(torch.float32).contiguous()

    dyn_scales: list[torch.Tensor] = []
    dyn_zeros: list[torch.Tensor] = []
    # Dynamic groups need whole groups inside a block (the group's grid is fitted on its columns
    # once the earlier columns' errors have reached them).
    bsz = max(g, (block_size // g) * g) if grouped and fixed is None else block_size
    grid: list[torch.Tensor] = []  # the current (scale, zero) of a dynamic group

    def quantize_column(
        col: int, wcol: torch.Tensor, qcol: torch.Tensor, deq: torch.Tensor
    ) -> None:
        if fixed is None:
            if col % g == 0:
                s, z = group_params(wt[col : col + g].t(), bits, sym, scale_dtype, clip_search)
                dyn_scales.append(s)
                dyn_zeros.append(z)
                grid[:] = [s, z.to(torch.float32)]
            scale, zero = grid
        else:
            assert group_scale is not None and group_zero is not None
            group = group_of_column[col]
            scale, zero = group_scale[group], group_zero[group]
        torch.div(wcol, scale, out=qcol)
        qcol.round_().add_(zero).clamp_(0.0, maxq)
        torch.sub(qcol, zero, out=deq)
        deq.mul_(scale)

    qt = error_feedback_columns(wt, u, bsz, quantize_column)
    # The factor and the error-corrected copy are done with: free them before the codes are
    # reordered and the loss is taken (quantize_column still names wt, so empty its storage).
    del u
    wt.set_()

    codes = qt.to(torch.int32)
    del qt
    if perm is not None:
        codes = codes[torch.argsort(perm)]
    q = codes.t().contiguous()
    del codes

    if fixed is not None:
        scales, zeros = fixed
    else:
        scales = torch.stack(dyn_scales, dim=1)
        zeros = torch.stack(dyn_zeros, dim=1)
    result = GroupwiseIntResult(
        q=q,
        scales=scales.contiguous(),
        zeros=None if sym else zeros.contiguous(),
        bits=bits,
        group_size=group_size,
    )
    result.loss = proxy_loss(
        weight if loss_weight is None else loss_weight, result.dequantize(), hessian
    )
    return result


def _working_hessian(
    source: torch.Tensor, perm: torch.Tensor | None, dead: torch.Tensor
) -> torch.Tensor:
    """A fresh copy of ``source`` in quantization order (``perm``, one gather), with a unit
    diagonal at the ``dead`` columns (in that order) so that the factorisation stays defined."""
    h = source.clone() if perm is None else source[perm.unsqueeze(1), perm.unsqueeze(0)]
    if bool(dead.any()):
        h[dead, dead] = 1.0
    return h
