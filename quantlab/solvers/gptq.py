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
- ``loss`` is computed exactly at the end (see :func:`proxy_loss`) rather than accumulated.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from quantlab.solvers.base import GroupwiseIntResult, check_bits, check_group_size, check_weight
from quantlab.solvers.rtn import group_params

__all__ = ["gptq_quantize", "proxy_loss"]


def proxy_loss(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """GPTQ's layer objective ``tr((W - Q) H (W - Q)^T) / 2``.

    With ``H = 2 X X^T / n`` this is ``||(W - Q) X||_F^2 / n``: the squared output error of the
    layer summed over output channels and averaged over the ``n`` calibration tokens. The factor
    ``1/2`` makes it the same number as the reference implementation's accumulated
    ``sum((w - q)^2 / Hinv_ii^2) / 2`` (which equals this trace, taken with the damped Hessian).

    Args:
        weight: float ``[N, K]`` original weight.
        dequantized: float ``[N, K]`` quantized-then-dequantized weight.
        hessian: float ``[K, K]`` symmetric ``H`` as accumulated (undamped).

    Returns:
        The loss as a Python float (computed in fp32, summed in fp64).
    """
    if weight.shape != dequantized.shape:
        raise ValueError(
            f"weight {tuple(weight.shape)} and dequantized {tuple(dequantized.shape)} differ"
        )
    k = weight.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise ValueError(
            f"hessian must be [{k}, {k}] for a weight with {k} columns, got {tuple(hessian.shape)}"
        )
    err = weight.detach().to(torch.float32) - dequantized.detach().to(
        device=weight.device, dtype=torch.float32
    )
    h = hessian.detach().to(device=weight.device, dtype=torch.float32)
    return float(((err @ h) * err).sum(dtype=torch.float64)) / 2.0


def _check_hessian(hessian: torch.Tensor, k: int, name: str) -> None:
    if hessian.dim() != 2 or tuple(hessian.shape) != (k, k):
        raise ValueError(
            f"{name}: hessian must be [K, K] = [{k}, {k}] for a weight with K={k} input columns, "
            f"got {tuple(hessian.shape)}"
        )
    if not hessian.dtype.is_floating_point:
        raise TypeError(f"{name}: hessian must be floating point, got {hessian.dtype}")
    finite = torch.isfinite(hessian)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{name}: hessian has {bad} NaN/Inf entries (overflowed or corrupted calibration "
            "activations?); refusing to quantize"
        )


def damped_factor(
    h: torch.Tensor,
    damp_percent: float,
    max_damp_retries: int,
    name: str,
    factor: Callable[[torch.Tensor], torch.Tensor | None],
    stacklevel: int = 3,
) -> torch.Tensor:
    """``factor(H + damp * mean(diag H) * I)``, GPTQ's damping with retries.

    ``factor`` returns ``None`` when the damped matrix is not usable (a failed Cholesky); the
    damping is then raised tenfold (at least to 0.01) and ``factor`` tried again. A retry warns,
    at ``stacklevel`` (3: the caller of the function that called this one).
    """
    mean_diag = float(torch.diagonal(h).mean())
    damp = damp_percent
    tried: list[float] = []
    for attempt in range(max_damp_retries + 1):
        tried.append(damp)
        hd = h.clone()
        hd.diagonal().add_(damp * mean_diag)
        result = factor(hd)
        if result is not None:
            if attempt > 0:
                warnings.warn(
                    f"{name}: Hessian was not positive definite with damp_percent="
                    f"{damp_percent}; quantized with damp_percent={damp:g} instead",
                    RuntimeWarning,
                    stacklevel=stacklevel,
                )
            return result
        damp = max(damp * 10.0, 0.01)
    raise ValueError(
        f"{name}: Hessian is singular / not positive definite; Cholesky failed with damp_percent "
        f"in {[float(f'{d:g}') for d in tried]}. Collect more (or more varied) calibration "
        "tokens for this layer, raise damp_percent or max_damp_retries, or fall back to RTN for it."
    )


def _upper_of_inverse(hd: torch.Tensor) -> torch.Tensor | None:
    chol, info = torch.linalg.cholesky_ex(hd)
    if int(info) != 0:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if int(info) != 0 or not bool(torch.isfinite(upper).all()):
        return None
    return upper


def _inverse_cholesky(
    h: torch.Tensor, damp_percent: float, max_damp_retries: int, name: str
) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U = H^-1``),
    with :func:`damped_factor`'s retries."""
    return damped_factor(h, damp_percent, max_damp_retries, name, _upper_of_inverse, stacklevel=4)


# Quantizes one column in place: (column index in quantization order, its error-corrected values
# [N], where to write its codes [N], where to write its dequantized values [N]).
ColumnQuantizer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def error_feedback_columns(
    wt: torch.Tensor, u: torch.Tensor, block_size: int, quantize_column: ColumnQuantizer
) -> torch.Tensor:
    """GPTQ's column loop: quantize the input columns in order, each after the rounding errors of
    the earlier ones have been pushed into it through the inverse Hessian.

    Args:
        wt: fp32 ``[K, N]``, row ``i`` = input column ``i`` in quantization order; updated in
            place (it ends as the error-corrected values each column was quantized from).
        u: upper Cholesky factor ``[K, K]`` of ``H^-1`` in the same order.
        block_size: columns whose errors reach the later blocks in one matmul (lazy batch
            updates; the result does not depend on it beyond rounding).
        quantize_column: writes a column's codes and dequantized values (see ``ColumnQuantizer``).

    Returns:
        ``[K, N]`` fp32 codes, row per column, in quantization order.
    """
    k, n = wt.shape
    qt = torch.empty_like(wt)
    deq = torch.empty(n, dtype=torch.float32, device=wt.device)
    u_diag = torch.diagonal(u).tolist()
    err_block = torch.empty_like(wt[: min(block_size, k)])
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        wb = wt[i1:i2]
        ub = u[i1:i2, i1:i2]
        eb = err_block[: i2 - i1]
        for i in range(i2 - i1):
            col = i1 + i
            quantize_column(col, wb[i], qt[col], deq)
            ecol = eb[i]
            torch.sub(wb[i], deq, out=ecol)
            ecol.div_(u_diag[col])
            if i + 1 < i2 - i1:
                wb[i + 1 :].addr_(ub[i, i + 1 :], ecol, alpha=-1.0)
        if i2 < k:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), eb, alpha=-1.0)
    return qt


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
    fair_hessian: torch.Tensor | None = None,
    fair_alpha: float = 0.0,
    sum_hessians: bool = True,
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
        fair_hessian: Fair-GPTQ's group-bias matrix ``D = 2 (X0 - X1)(X0 - X1)^T / m`` ``[K, K]``
            (:class:`quantlab.calib.stats.PairDifferenceAccumulator`). With ``fair_alpha > 0`` the
            weight is first moved to the minimiser of ``||W X - V X||^2 + fair_alpha ||V (X0 -
            X1)||^2`` (:func:`quantlab.solvers.fair_gptq.debias_shift`) and GPTQ rounds that
            target; grids (static groups included) are fitted on it. ``None`` or
            ``fair_alpha=0`` is plain GPTQ, bit for bit.
        fair_alpha: weight of the group-bias term.
        sum_hessians: invert ``H + fair_alpha D`` for the shift (exact); ``False`` inverts ``H``
            (the reference's first-order variant).

    Returns:
        :class:`GroupwiseIntResult` with ``q`` int32 ``[N, K]``, ``scales`` fp32 ``[N, G]``,
        ``zeros`` int32 ``[N, G]`` (``None`` if ``sym``) and ``loss`` =
        :func:`proxy_loss` of the result against the undamped ``hessian`` and the original weight
        (with a fairness term, the intended shift counts as error too).
    """
    check_weight(weight, name)
    check_bits(bits)
    n, k = weight.shape
    check_group_size(group_size, k, name)
    _check_hessian(hessian, k, name)
    if block_size < 1:
        raise ValueError(f"{name}: block_size must be >= 1, got {block_size}")
    if not (damp_percent >= 0.0 and math.isfinite(damp_percent)):
        raise ValueError(f"{name}: damp_percent must be finite and >= 0, got {damp_percent}")
    if max_damp_retries < 0:
        raise ValueError(f"{name}: max_damp_retries must be >= 0, got {max_damp_retries}")
    fair = fair_hessian is not None and fair_alpha != 0.0
    if fair_hessian is None and fair_alpha != 0.0:
        raise ValueError(f"{name}: fair_alpha={fair_alpha} needs a fair_hessian")
    grouped = group_size != -1
    if act_order and grouped and not static_groups:
        raise ValueError(
            f"{name}: act_order with static_groups=False gives each column a group by its position "
            "in the quantization order, which needs a per-column g_idx that quantlab's groupwise "
            "format does not store; use static_groups=True (same inference layout as no act-order)"
        )

    device = weight.device
    maxq = float((1 << bits) - 1)
    g = group_size if grouped else k
    n_groups = k // g

    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=device, dtype=torch.float32).clone()

    # A column that never saw a nonzero input cannot influence the output: pin it to 0 and give
    # it a unit Hessian entry so the factorisation stays defined.
    dead = torch.diagonal(h) == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    if fair:
        # Imported here: fair_gptq reuses this module's damped inverse.
        from quantlab.solvers.fair_gptq import debias_shift

        assert fair_hessian is not None
        w = debias_shift(
            w, hessian, fair_hessian, fair_alpha, damp_percent, sum_hessians, name, max_damp_retries
        )
        w[:, dead] = 0.0

    # Precomputed grids: per-channel (one group of K) or static groups. None = dynamic groups.
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None
    if not grouped or act_order:
        s, z = group_params(w.reshape(n * n_groups, g), bits, sym, scale_dtype, clip_search)
        fixed = (s.view(n, n_groups), z.view(n, n_groups))

    perm: torch.Tensor | None = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]

    u = _inverse_cholesky(h, damp_percent, max_damp_retries, name)
    del h

    # Transposed working copy: row i of wt is input column i (in quantization order).
    wt = w.t().contiguous()
    del w

    # Per-column scale/zero rows in quantization order for the fixed-grid cases.
    col_scale: torch.Tensor | None = None
    col_zero: torch.Tensor | None = None
    if fixed is not None:
        col_group = torch.arange(k, device=device) // g
        if perm is not None:
            col_group = col_group[perm]
        col_scale = fixed[0].t()[col_group].contiguous()
        col_zero = fixed[1].t()[col_group].to(torch.float32).contiguous()

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
            assert col_scale is not None and col_zero is not None
            scale, zero = col_scale[col], col_zero[col]
        torch.div(wcol, scale, out=qcol)
        qcol.round_().add_(zero).clamp_(0.0, maxq)
        torch.sub(qcol, zero, out=deq)
        deq.mul_(scale)

    qt = error_feedback_columns(wt, u, bsz, quantize_column)

    q = qt.t()
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    q = q.to(torch.int32).contiguous()

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
    result.loss = proxy_loss(weight, result.dequantize(), hessian)
    return result
