"""Ternary weights ``W ~= s * t``, ``t`` in ``{-1, 0, +1}``: BitNet b1.58's absmean rule, the
L2-optimal scale, and GPTQ-style error feedback over the ternary grid.

Scale granularity (``group_size``): :data:`PER_TENSOR` (0, BitNet's choice), :data:`PER_ROW` (-1),
or a positive number of input columns per scale. Given a scale, the trit of every weight is the
nearest grid point, ``t = clamp(round(w / s), -1, 1)`` (ties to even), in every solver here; they
differ only in how ``s`` is chosen and in what ``w`` is when it is rounded.

* :func:`absmean_ternarize` - BitNet: ``s = mean |W|`` over the granule, computed as BitNet does
  (``inv = 1 / max(mean |W|, 1e-5)``, ``t = clamp(round(W * inv))``, ``s = 1 / inv``), so a
  BitNet b1.58 master weight ternarizes to exactly the trits the model was trained with.
* :func:`mse_ternarize` - the scale minimising ``||w - s t||^2`` (optionally weighted per input
  column by the Hessian diagonal). For a fixed support the best scale is the (weighted) mean
  ``|w|`` over it, and the best support of a given size is the largest ``|w|``; so the exact
  optimum is found by sorting ``|w|`` and scanning the prefix sums (``max_k c_k^2 / d_k``).
* :func:`gptq_ternarize` - fixed scales (from either rule above), then GPTQ's column loop: each
  column is rounded and its error pushed onto the later columns through the inverse Hessian's
  Cholesky factor; afterwards the scales are refitted by least squares on the layer's output error
  ``tr((W - S.T) H (W - S.T)^T)`` with the trits held fixed, and the loop can be repeated on the
  refitted scales.

Everything runs in fp32 on the weight's device; nothing is packed here.
"""

from __future__ import annotations

import math

import torch

from quantlab.formats.ternary import TernaryResult, check_ternary_group_size, expand_scales
from quantlab.formats.ternary_packing import PER_ROW, PER_TENSOR, scale_shape
from quantlab.solvers.hessian import (
    check_hessian,
    check_weight,
    error_feedback_columns,
    inverse_cholesky,
    proxy_loss,
)

__all__ = [
    "PER_ROW",
    "PER_TENSOR",
    "SCALE_RULES",
    "absmean_ternarize",
    "gptq_ternarize",
    "mse_ternarize",
    "refit_scales",
    "round_to_trits",
]

SCALE_RULES = ("absmean", "mse")
# BitNet's clamp of mean |W| (transformers' WeightQuant, BitNet gpu/convert_checkpoint.py).
_ABSMEAN_MIN = 1e-5


def _granules(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``weight`` ``[N, K]`` as rows of values sharing one scale: ``[1, N*K]``, ``[N, K]`` or
    ``[N*G, g]``."""
    n, k = weight.shape
    if group_size == PER_TENSOR:
        return weight.reshape(1, n * k)
    if group_size == PER_ROW:
        return weight
    return weight.reshape(n * (k // group_size), group_size)


def _to_scale_dtype(s: torch.Tensor, scale_dtype: torch.dtype, name: str) -> torch.Tensor:
    stored = s.to(scale_dtype)
    if not bool(torch.isfinite(stored).all()):
        raise ValueError(f"{name}: ternary scales overflow {scale_dtype}; use scale_dtype float32")
    # A scale that underflows to 0 in the storage dtype would erase its group; the smallest normal
    # value keeps the trits meaningful (such groups are ~0 anyway).
    tiny = torch.finfo(scale_dtype).tiny
    return stored.to(torch.float32).clamp(min=tiny)


def round_to_trits(weight: torch.Tensor, column_scales: torch.Tensor) -> torch.Tensor:
    """Nearest trit of every weight for the given per-weight scales: int8 ``[N, K]``."""
    return torch.round(weight / column_scales).clamp(-1, 1).to(torch.int8)


def _result(
    weight: torch.Tensor, scales: torch.Tensor, group_size: int, t: torch.Tensor | None = None
) -> TernaryResult:
    n, k = weight.shape
    if t is None:
        t = round_to_trits(weight, expand_scales(scales, n, k))
    return TernaryResult(t=t.contiguous(), scales=scales.contiguous(), group_size=group_size)


def absmean_ternarize(
    weight: torch.Tensor,
    group_size: int = PER_TENSOR,
    scale_dtype: torch.dtype = torch.float16,
    name: str = "weight",
) -> TernaryResult:
    """BitNet b1.58's absmean ternarization.

    Args:
        weight: float ``[N, K]``; not modified.
        group_size: ``PER_TENSOR`` (BitNet), ``PER_ROW`` or columns per scale.
        scale_dtype: storage dtype the scales are rounded to.

    Returns:
        :class:`TernaryResult` with ``t = clamp(round(W / s))`` for ``s = mean |W|`` per granule.
        With ``scale_dtype=torch.float32`` the trits and ``s`` equal BitNet's
        ``round(W * inv).clamp(-1, 1)`` and ``1 / inv`` bit for bit.
    """
    check_weight(weight, name)
    n, k = weight.shape
    check_ternary_group_size(group_size, k, name)
    w = weight.detach().to(torch.float32)
    inv = 1.0 / _granules(w, group_size).abs().mean(dim=1).clamp(min=_ABSMEAN_MIN)
    # Trits from W * inv as BitNet computes them (not W / s, which rounds differently at ties).
    t = (
        torch.round(_granules(w, group_size) * inv.unsqueeze(1))
        .clamp(-1, 1)
        .to(torch.int8)
        .reshape(n, k)
    )
    scales = _to_scale_dtype(1.0 / inv, scale_dtype, name).reshape(scale_shape(n, k, group_size))
    if scale_dtype != torch.float32:
        # A rounded scale moves the rounding thresholds; keep t the nearest grid point of s.
        return _result(w, scales, group_size)
    return _result(w, scales, group_size, t)


def _best_prefix_scale(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per row of ``values`` ``[R, L]``: the scale of the L2-optimal ternary approximation.

    Sorting ``|v|`` descending, the support of size ``k`` leaves the (weighted) error
    ``sum h v^2 - c_k^2 / d_k`` with ``c_k = sum_{i<k} h_i |v_i|`` and ``d_k = sum_{i<k} h_i``; the
    optimum maximises ``c_k^2 / d_k`` and its scale is ``c_k / d_k``.
    """
    mag = values.abs()
    order = torch.argsort(mag, dim=1, descending=True)
    sorted_mag = torch.gather(mag, 1, order)
    if weights is None:
        c = sorted_mag.cumsum(1, dtype=torch.float64)
        d = torch.arange(1, mag.shape[1] + 1, device=mag.device, dtype=torch.float64).expand_as(c)
    else:
        h = torch.gather(weights.expand_as(values), 1, order).to(torch.float64)
        c = (sorted_mag.to(torch.float64) * h).cumsum(1)
        d = h.cumsum(1)
    gain = torch.where(d > 0, c * c / d.clamp(min=1e-300), torch.zeros_like(c))
    best = gain.argmax(dim=1, keepdim=True)
    c_best = torch.gather(c, 1, best).squeeze(1)
    d_best = torch.gather(d, 1, best).squeeze(1)
    scale = torch.where(d_best > 0, c_best / d_best.clamp(min=1e-300), torch.zeros_like(c_best))
    # An all-zero granule: any scale is optimal; take the absmean floor so it stays finite.
    return scale.to(torch.float32).clamp(min=_ABSMEAN_MIN)


def mse_ternarize(
    weight: torch.Tensor,
    group_size: int = PER_TENSOR,
    scale_dtype: torch.dtype = torch.float16,
    column_weights: torch.Tensor | None = None,
    name: str = "weight",
) -> TernaryResult:
    """The ternary approximation with the least (optionally weighted) squared error per granule.

    Args:
        weight: float ``[N, K]``; not modified.
        group_size: ``PER_TENSOR``, ``PER_ROW`` or columns per scale.
        scale_dtype: storage dtype the scales are rounded to (the trits are then re-rounded to the
            nearest grid point of the stored scale).
        column_weights: optional non-negative ``[K]`` importance of each input column (the
            Hessian diagonal ``E[x_k^2]``): the error minimised is ``sum_k h_k (w_k - s t_k)^2``.
    """
    check_weight(weight, name)
    n, k = weight.shape
    check_ternary_group_size(group_size, k, name)
    w = weight.detach().to(torch.float32)
    weights = None
    if column_weights is not None:
        if column_weights.shape != (k,):
            raise ValueError(
                f"{name}: column_weights must be [{k}], got {tuple(column_weights.shape)}"
            )
        h = column_weights.detach().to(device=w.device, dtype=torch.float32).clamp(min=0)
        weights = _granules(h.expand(n, k), group_size)
    s = _best_prefix_scale(_granules(w, group_size), weights)
    scales = _to_scale_dtype(s, scale_dtype, name).reshape(scale_shape(n, k, group_size))
    return _result(w, scales, group_size)


def refit_scales(
    weight: torch.Tensor,
    t: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    fallback: torch.Tensor,
    scale_dtype: torch.dtype = torch.float16,
    name: str = "weight",
) -> torch.Tensor:
    """Least-squares scales for fixed trits: ``argmin_s tr((W - S.T) H (W - S.T)^T)``.

    Per row ``n`` (per-group or per-row scales) this is the ``G x G`` system
    ``(A^T H A) s = A^T H w`` where column ``g`` of ``A`` is row ``n``'s trits restricted to group
    ``g``; per tensor the rows share one scalar. Scales of all-zero groups (whose value does not
    matter) and any non-positive or non-finite solution keep ``fallback``'s value.

    Args:
        weight: float ``[N, K]`` target.
        t: int8 ``[N, K]`` trits.
        hessian: float ``[K, K]`` (damped or not).
        group_size: granularity of ``fallback``.
        fallback: fp32 scales ``scale_shape(N, K, group_size)``.

    Returns:
        fp32 scales of ``fallback``'s shape, rounded to ``scale_dtype``.
    """
    n, k = weight.shape
    w = weight.detach().to(torch.float32)
    tf = t.to(torch.float32)
    h = hessian.detach().to(device=w.device, dtype=torch.float32)
    th = tf @ h  # [N, K]
    if group_size == PER_TENSOR:
        num = float((th * w).sum(dtype=torch.float64))
        den = float((th * tf).sum(dtype=torch.float64))
        s = torch.tensor([[num / den]], device=w.device) if den > 0 else fallback.clone()
    elif group_size == PER_ROW:
        num = (th * w).sum(1, dtype=torch.float64)
        den = (th * tf).sum(1, dtype=torch.float64)
        s = torch.where(den > 0, num / den.clamp(min=1e-300), fallback[:, 0].double())
        s = s.to(torch.float32).unsqueeze(1)
    else:
        groups = k // group_size
        # rhs[n, g] = sum_{k in g} t[n, k] (w_n H)[k]; gram[n, g, g'] = t_{n,g}^T H_{g,g'} t_{n,g'}.
        rhs = (tf * (w @ h)).view(n, groups, group_size).sum(2)
        tg = tf.view(n, groups, group_size)
        hb = h.view(groups, group_size, groups, group_size)
        gram = torch.empty(n, groups, groups, device=w.device, dtype=torch.float32)
        for g2 in range(groups):
            # z[n, k] = sum_{k' in g2} H[k, k'] t[n, k']
            z = (tg[:, g2, :] @ hb[:, :, g2, :].reshape(k, group_size).t()).view(
                n, groups, group_size
            )
            gram[:, :, g2] = (z * tg).sum(2)
        empty = (tg != 0).sum(2) == 0  # [N, G]
        diag = torch.diagonal(gram, dim1=1, dim2=2)
        ridge = 1e-6 * diag.abs().mean(1, keepdim=True).clamp(min=1e-30)
        # Empty groups: make their row/column of the system the identity with the fallback value.
        keep = (~empty).float()
        gram = gram * keep.unsqueeze(2) * keep.unsqueeze(1)
        gram = gram + torch.diag_embed(empty.float() + ridge.expand(n, groups))
        rhs = torch.where(empty, fallback, rhs)
        solved = torch.linalg.solve(gram.double(), rhs.double().unsqueeze(2)).squeeze(2)
        s = torch.where(empty, fallback, solved.to(torch.float32))
    bad = ~torch.isfinite(s) | (s <= 0)
    s = torch.where(bad, fallback, s)
    return _to_scale_dtype(s, scale_dtype, name)


def _gptq_pass(
    w: torch.Tensor,
    u: torch.Tensor,
    col_scales: torch.Tensor,
    perm: torch.Tensor | None,
    block_size: int,
) -> torch.Tensor:
    """GPTQ's column loop over the ternary grid with fixed per-column scales.

    Args:
        w: fp32 ``[N, K]`` weight in quantization order (permuted when ``perm`` is given).
        u: upper Cholesky factor ``[K, K]`` of ``H^-1`` in the same order.
        col_scales: fp32 ``[K, N]``: the scale of every weight, one row per column, same order.

    Returns:
        int8 trits ``[N, K]`` in the original column order.
    """
    wt = w.t().contiguous()  # row i = input column i

    def quantize_column(
        col: int, wcol: torch.Tensor, qcol: torch.Tensor, deq: torch.Tensor
    ) -> None:
        scale = col_scales[col]
        torch.div(wcol, scale, out=qcol)
        qcol.round_().clamp_(-1.0, 1.0)
        torch.mul(qcol, scale, out=deq)

    qt = error_feedback_columns(wt, u, block_size, quantize_column)
    q = qt.t()
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q.to(torch.int8).contiguous()


def gptq_ternarize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = 64,
    scale_dtype: torch.dtype = torch.float16,
    scale_rule: str = "mse",
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    refit_rounds: int = 1,
    name: str = "weight",
    max_damp_retries: int = 5,
) -> TernaryResult:
    """Ternary weights with GPTQ error feedback and least-squares scale refits.

    Args:
        weight: float ``[N, K]``; not modified.
        hessian: float ``[K, K]``, ``H = 2 X X^T / n`` of the layer's calibration inputs.
        group_size: ``PER_TENSOR``, ``PER_ROW`` or columns per scale.
        scale_dtype: storage dtype of the scales.
        scale_rule: initial scales: ``"absmean"`` (BitNet) or ``"mse"`` (L2-optimal, each column
            weighted by the Hessian diagonal).
        damp_percent: ``H_ii += damp_percent * mean(diag H)`` before inverting.
        block_size: columns per lazy-update block.
        act_order: quantize columns by descending ``H_ii`` (free here: scales are fixed before
            the loop, so the layout needs no permutation).
        refit_rounds: after the loop, refit the scales by least squares on the output error and,
            while rounds remain, rerun the loop on the refitted scales (0: no refit).
        name: layer name used in warnings and errors.

    Returns:
        :class:`TernaryResult` whose ``loss`` is GPTQ's proxy loss
        ``tr((W - Q) H (W - Q)^T) / 2`` against the undamped ``hessian``.
    """
    check_weight(weight, name)
    n, k = weight.shape
    check_ternary_group_size(group_size, k, name)
    check_hessian(hessian, k, name)
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"{name}: scale_rule must be one of {SCALE_RULES}, got {scale_rule!r}")
    if block_size < 1:
        raise ValueError(f"{name}: block_size must be >= 1, got {block_size}")
    if not (damp_percent >= 0.0 and math.isfinite(damp_percent)):
        raise ValueError(f"{name}: damp_percent must be finite and >= 0, got {damp_percent}")
    if refit_rounds < 0:
        raise ValueError(f"{name}: refit_rounds must be >= 0, got {refit_rounds}")

    w = weight.detach().to(torch.float32, copy=True)  # one copy, also from bf16
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    dead = torch.diagonal(h) == 0
    if bool(dead.any()):
        # A column that never saw a nonzero input cannot change the output: zero it, and give it a
        # unit Hessian entry so the factorisation stays defined.
        h[dead, dead] = 1.0
        w[:, dead] = 0.0

    if scale_rule == "absmean":
        scales = absmean_ternarize(w, group_size, scale_dtype, name).scales
    else:
        scales = mse_ternarize(w, group_size, scale_dtype, torch.diagonal(h), name).scales

    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    hp = h if perm is None else h[perm][:, perm]
    u = inverse_cholesky(hp, damp_percent, max_damp_retries, name)
    del hp
    wp = w if perm is None else w[:, perm]

    def run_pass(scales: torch.Tensor) -> torch.Tensor:
        cs = expand_scales(scales, n, k)
        cs_t = (cs if perm is None else cs[:, perm]).t().contiguous()
        return _gptq_pass(wp, u, cs_t, perm, block_size)

    def loss_of(t: torch.Tensor, scales: torch.Tensor) -> float:
        return proxy_loss(w, t.to(torch.float32) * expand_scales(scales, n, k), h)

    # Each refit is the least-squares optimum for the trits it was fitted to, so it never raises
    # the loss; a new pass on refitted scales usually lowers it further but need not, so the best
    # (trits, scales) pair seen is kept.
    t = run_pass(scales)
    best = (loss_of(t, scales), t, scales)
    for round_ in range(refit_rounds):
        scales = refit_scales(w, t, h, group_size, scales, scale_dtype, name)
        candidate = loss_of(t, scales)
        if candidate < best[0]:
            best = (candidate, t, scales)
        if round_ + 1 < refit_rounds:
            t = run_pass(scales)
            candidate = loss_of(t, scales)
            if candidate < best[0]:
                best = (candidate, t, scales)
    _, t, scales = best
    result = TernaryResult(t=t, scales=scales.contiguous(), group_size=group_size)
    result.loss = proxy_loss(weight, result.dequantize(), hessian)
    return result
