"""Pyramid vector quantization (PVQ) of linear weights, plain and Hessian-aware.

A weight row (in the rotated space of :mod:`quantlab.transforms.rotation`) is cut into vectors
of ``D`` consecutive columns. Each vector ``w`` becomes ``q = g * y / ||y||_2`` with

* ``y`` a point of the pyramid ``P(D, K) = {y in Z^D : sum |y_i| = K}`` (the direction; ``K`` is
  the number of "pulses"), found by the greedy pulse search of Fischer (1986) / Opus-CELT, and
  stored as its enumeration index in ``[0, N(D, K))``;
* ``g = s_row * level[c]`` its amplitude: a per-row scale times one of ``L`` shared levels, the
  levels fitted per layer by Lloyd-Max to the layer's optimal amplitudes ``<w, y/||y||>``.

The pyramid, its enumeration (``y`` <-> index) and the encoding :class:`PVQParams` are the
codebook's, :mod:`quantlab.formats.pvq_codebook`; the unpacked :class:`PVQResult` is the format's,
:mod:`quantlab.formats.pvq`. This module searches the codebook.

**Hessian-aware quantization** (:func:`pvq_quantize` with a Hessian) is GPTQ at vector
granularity: the ``D`` columns of one vector position are quantized for all rows at once, and
their error is pushed onto the not-yet-quantized columns through the upper Cholesky factor ``U``
of ``H^-1`` (``H`` rotated with the weight): for a block ``B`` of columns and the remaining
columns ``R``, ``W_R -= (W_B - Q_B) U_BB^-1 U_BR``, which is the optimal update of ``W_R`` for a
fixed ``Q_B``. The error that remains is ``||(W_B - Q_B) U_BB^-1||^2`` per row, i.e. the vector's
own metric is ``M = (U_BB^T U_BB)^-1``; amplitudes are chosen under that metric, and with
``hessian_search`` the pulse positions too (local pulse moves from the Euclidean solution).
"""

from __future__ import annotations

import math

import torch

from quantlab.formats.pvq import PVQResult
from quantlab.formats.pvq_codebook import PVQParams
from quantlab.solvers.hessian import check_hessian, check_weight, inverse_cholesky, proxy_loss
from quantlab.transforms.rotation import rotate, rotate_hessian

__all__ = [
    "fit_levels",
    "pulse_moves",
    "pvq_quantize",
    "pyramid_search",
    "quantize_gains",
]


# ---------------------------------------------------------------------------------------------
# Search


def pyramid_search(x: torch.Tensor, pulses: int) -> torch.Tensor:
    """The pyramid point whose direction is closest to each row of ``x`` (greedy, Opus-style).

    Projection ``y = floor(K |x| / ||x||_1)`` first, then the remaining (fewer than ``D``) pulses
    one at a time, each where it most increases ``<|x|, y>^2 / ||y||^2`` (the squared cosine).
    All-zero rows get all pulses on their first coordinate.

    Args:
        x: float ``[B, D]``.
        pulses: ``K >= 1``.

    Returns:
        int16 ``[B, D]`` with ``sum |y| = K`` and ``sign(y) = sign(x)`` where ``y != 0``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [B, D], got shape {tuple(x.shape)}")
    if pulses < 1:
        raise ValueError(f"pulses must be >= 1, got {pulses}")
    # fp32 is exact for the pulse counts (< 2^24) and ample for choosing between candidates.
    a = x.detach().abs().to(torch.float32)
    l1 = a.sum(1, keepdim=True)
    zero = l1.squeeze(1) == 0
    y = torch.floor(pulses * a / torch.where(zero.unsqueeze(1), torch.ones_like(l1), l1))
    # Rounding in the division can (rarely) push the projection over K: restart those rows.
    y[y.sum(1) > pulses] = 0.0
    y[zero] = 0.0
    y[zero, 0] = float(pulses)
    left = pulses - y.sum(1)
    xy = (a * y).sum(1)
    yy = (y * y).sum(1)
    rows = torch.arange(x.shape[0], device=x.device)
    while True:
        active = left > 0
        if not bool(active.any()):
            break
        score = (xy.unsqueeze(1) + a) ** 2 / (yy.unsqueeze(1) + 2 * y + 1)
        best = score.argmax(1)
        step = active.to(y.dtype)
        xy += step * a[rows, best]
        yy += step * (2 * y[rows, best] + 1)
        y[rows, best] += step
        left -= step
    sign = torch.where(x < 0, -1.0, 1.0)
    return (y * sign).to(torch.int16)


def pulse_moves(
    x: torch.Tensor, y: torch.Tensor, metric: torch.Tensor | None = None, max_moves: int = 8
) -> torch.Tensor:
    """Improve pyramid points by moving single pulses (a local search after the greedy one).

    Maximises ``<b, y>^2 / (y^T M y)`` with ``b = M x`` (``M = I`` without ``metric``): the gain
    that the best amplitude for direction ``y`` recovers of ``x``'s energy under ``M``. A move takes
    one pulse off a nonzero coordinate ``i`` and puts it on another coordinate ``j`` (with either
    sign if ``y_j = 0``, else with ``y_j``'s sign); the best improving move per row is applied, up
    to ``max_moves`` times.

    Args:
        x: float ``[B, D]`` targets.
        y: integer ``[B, D]`` starting points (``sum |y| = K``).
        metric: ``[D, D]`` symmetric positive definite ``M``, shared by all rows, or ``None``.

    Returns:
        int16 ``[B, D]`` points with the same pulse count and a score at least as high.
    """
    b_rows, d = x.shape
    xf = x.to(torch.float64)
    yf = y.to(torch.float64).clone()
    m = torch.eye(d, dtype=torch.float64) if metric is None else metric.to(torch.float64)
    m = m.to(x.device)
    bvec = xf @ m  # M symmetric: rows of X M are (M x)^T
    md = torch.diagonal(m)
    sign_opts = torch.tensor([1.0, -1.0], dtype=torch.float64, device=x.device)
    rows = torch.arange(b_rows, device=x.device)
    not_same = ~torch.eye(d, dtype=torch.bool, device=x.device)
    for _ in range(max_moves):
        by = (bvec * yf).sum(1)
        my = yf @ m
        ymy = (yf * my).sum(1)
        current = by**2 / ymy
        si = torch.sign(yf)  # [B, D]: direction of the pulse taken off coordinate i
        # y' = y - si e_i + t e_j:
        #   <b, y'>   = by - si_i b_i + t b_j
        #   y'^T M y' = yMy + M_ii + M_jj - 2 si_i (My)_i + 2 t (My)_j - 2 t si_i M_ij
        num_i = by.unsqueeze(1) - si * bvec  # [B, D]
        den_i = ymy.unsqueeze(1) + md - 2 * si * my  # [B, D]
        t = sign_opts.view(1, 1, 1, 2)
        num = num_i.view(b_rows, d, 1, 1) + t * bvec.view(b_rows, 1, d, 1)
        den = (
            den_i.view(b_rows, d, 1, 1)
            + md.view(1, 1, d, 1)
            + 2 * t * my.view(b_rows, 1, d, 1)
            - 2 * t * si.view(b_rows, d, 1, 1) * m.view(1, d, d, 1)
        )
        score = num**2 / den.clamp_min(1e-300)
        # The pulse must land on an empty coordinate (either sign) or on one of its own sign,
        # so the point keeps K pulses.
        sj = torch.sign(yf).view(b_rows, 1, d, 1)
        lands = (sj == 0) | (sj == t)
        valid = (si != 0).view(b_rows, d, 1, 1) & not_same.view(1, d, d, 1) & lands
        score = torch.where(valid, score, torch.full_like(score, -1.0))
        best, flat = score.view(b_rows, -1).max(1)
        better = best > current * (1 + 1e-12)
        if not bool(better.any()):
            break
        i = flat // (2 * d)
        j = (flat // 2) % d
        sgn = sign_opts[flat % 2]
        step = better.to(torch.float64)
        yf[rows, i] -= step * si[rows, i]
        yf[rows, j] += step * sgn
    return yf.to(torch.int16)


# ---------------------------------------------------------------------------------------------
# Amplitudes


def fit_levels(values: torch.Tensor, n_levels: int, iters: int = 30) -> torch.Tensor:
    """Lloyd-Max levels (fp32 ``[n_levels]``, ascending) minimising the squared error of
    quantizing ``values`` (any shape) to the nearest level."""
    v = values.detach().reshape(-1).to(torch.float64)
    if v.numel() == 0:
        raise ValueError("cannot fit amplitude levels to no values")
    if n_levels < 1:
        raise ValueError(f"n_levels must be >= 1, got {n_levels}")
    probs = (torch.arange(n_levels, dtype=torch.float64) + 0.5) / n_levels
    sample = v if v.numel() <= 1 << 20 else v[torch.randperm(v.numel())[: 1 << 20]]
    levels = torch.quantile(sample, probs.to(sample.device))
    for _ in range(iters):
        code = quantize_gains(v, levels)
        sums = torch.zeros(n_levels, dtype=torch.float64, device=v.device).index_add_(0, code, v)
        cnt = torch.bincount(code, minlength=n_levels).to(torch.float64)
        levels = torch.where(cnt > 0, sums / cnt.clamp_min(1), levels)
        levels, _ = torch.sort(levels)
    return levels.to(torch.float32)


def quantize_gains(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index (int64, ``values``' shape) of the nearest of the ascending ``levels``."""
    lv = levels.to(device=values.device, dtype=values.dtype)
    if lv.numel() == 1:
        return torch.zeros(values.shape, dtype=torch.int64, device=values.device)
    mids = (lv[1:] + lv[:-1]) / 2
    return torch.bucketize(values.contiguous(), mids)


# ---------------------------------------------------------------------------------------------
# Whole-weight quantization


def _fp16_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back (the storage precision of scales and levels), keeping fp32."""
    return t.to(torch.float16).to(torch.float32)


def _directions(points: torch.Tensor) -> torch.Tensor:
    y = points.to(torch.float32)
    return y / torch.sqrt((y * y).sum(-1, keepdim=True))


def _initial_scales(
    w_rot: torch.Tensor, params: PVQParams, search_moves: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row scales and amplitude levels, fitted on a plain PVQ pass over the rotated weight.

    ``s_n`` is the RMS of row ``n``'s vector norms; the levels are Lloyd-Max for the layer's
    optimal amplitudes ``<w, u>`` divided by their row's scale.
    """
    n, k = w_rot.shape
    d = params.dim
    vec = w_rot.reshape(-1, d)
    y = pyramid_search(vec, params.pulses)
    if search_moves:
        y = pulse_moves(vec, y, None, search_moves)
    u = _directions(y)
    amp = (vec * u).sum(-1).view(n, k // d)
    scale = torch.sqrt((w_rot.view(n, k // d, d) ** 2).sum(-1).mean(-1))
    scale = _fp16_exact(scale.clamp_min(torch.finfo(torch.float16).tiny))
    levels = _fp16_exact(fit_levels(amp / scale.unsqueeze(1), params.levels))
    return scale, levels


def pvq_quantize(
    weight: torch.Tensor,
    params: PVQParams,
    signs: torch.Tensor,
    hessian: torch.Tensor | None = None,
    damp_percent: float = 0.01,
    block_size: int = 128,
    search_moves: int = 0,
    hessian_search: bool = False,
    name: str = "weight",
    max_damp_retries: int = 5,
) -> PVQResult:
    """Quantize one linear weight with PVQ in the rotated input space.

    Args:
        weight: float ``[N, K]`` (``[out, in]``); not modified. ``params.dim`` must divide ``K``.
        params: the encoding (``D``, ``K`` pulses, ``L`` levels).
        signs: ``[K]`` rotation signs (:func:`quantlab.transforms.rotation.random_signs`).
        hessian: float ``[K, K]`` ``H = 2 X X^T / n`` of the layer's (unrotated) inputs, or
            ``None`` for plain PVQ (each vector to its nearest code in weight space).
        damp_percent: ``H_ii += damp_percent * mean(diag H)`` before inverting.
        block_size: columns per lazy error-feedback block (rounded to a multiple of ``D``).
        search_moves: rounds of single-pulse moves after the greedy search (:func:`pulse_moves`),
            in weight space (or, with ``hessian_search``, under the vector's Hessian metric).
        hessian_search: score the pulse moves under the vector's metric ``(U_BB^T U_BB)^-1``
            instead of in weight space (needs a Hessian; amplitudes always use the metric when
            a Hessian is given).
        name: layer name for errors.
        max_damp_retries: retries of a failed Cholesky with tenfold damping.

    Returns:
        :class:`PVQResult`; ``loss`` is GPTQ's proxy loss (undamped ``hessian``) or, without a
        Hessian, the squared Frobenius error.
    """
    check_weight(weight, name)
    n, k = weight.shape
    d = params.dim
    if k % d:
        raise ValueError(
            f"{name}: PVQ dim {d} does not divide in_features {k}; dims that do: "
            f"{[v for v in range(2, 65) if k % v == 0]}"
        )
    if signs.dim() != 1 or signs.numel() != k:
        raise ValueError(f"{name}: signs must be [{k}], got {tuple(signs.shape)}")
    if block_size < 1:
        raise ValueError(f"{name}: block_size must be >= 1, got {block_size}")
    if not (damp_percent >= 0.0 and math.isfinite(damp_percent)):
        raise ValueError(f"{name}: damp_percent must be finite and >= 0, got {damp_percent}")
    if search_moves < 0:
        raise ValueError(f"{name}: search_moves must be >= 0, got {search_moves}")
    if hessian_search and hessian is None:
        raise ValueError(f"{name}: hessian_search needs a hessian")
    device = weight.device
    w = weight.detach().to(torch.float32, copy=True)  # one copy, also from bf16
    signs = signs.to(device=device, dtype=torch.int8)

    h_rot = None
    if hessian is not None:
        check_hessian(hessian, k, name)
        h = hessian.detach().to(device=device, dtype=torch.float64).clone()
        # A never-active input column cannot influence the output (as in GPTQ): zero its weights
        # and give it a unit Hessian entry so the factorisation stays defined.
        dead = torch.diagonal(h) == 0
        if bool(dead.any()):
            h[dead, dead] = 1.0
            w[:, dead] = 0.0
        h_rot = rotate_hessian(h, signs).to(torch.float32)
        h_rot = (h_rot + h_rot.t()) / 2

    w_rot = rotate(w, signs)
    scale, levels = _initial_scales(w_rot, params, 0 if hessian_search else search_moves)

    points = torch.empty(n, k, dtype=torch.int16, device=device)
    codes = torch.empty(n, k // d, dtype=torch.int64, device=device)

    def quantize_vector(wv: torch.Tensor, metric: torch.Tensor | None, col: int) -> torch.Tensor:
        y = pyramid_search(wv, params.pulses)
        moves_metric = metric if hessian_search else None
        if search_moves:
            y = pulse_moves(wv, y, moves_metric, search_moves)
        u = _directions(y)
        if metric is None:
            amp = (wv * u).sum(1)
        else:
            mu = u @ metric
            amp = (wv * mu).sum(1) / (u * mu).sum(1)
        code = quantize_gains(amp / scale, levels)
        points[:, col : col + d] = y
        codes[:, col // d] = code
        return (scale * levels[code]).unsqueeze(1) * u

    if h_rot is None:
        for col in range(0, k, d):
            quantize_vector(w_rot[:, col : col + d], None, col)
    else:
        u_chol = inverse_cholesky(h_rot, damp_percent, max_damp_retries, name)
        del h_rot
        bsz = max(d, (block_size // d) * d)
        for i1 in range(0, k, bsz):
            i2 = min(i1 + bsz, k)
            wb = w_rot[:, i1:i2]
            err_block = torch.empty_like(wb)
            for c0 in range(0, i2 - i1, d):
                col = i1 + c0
                u_vv = u_chol[col : col + d, col : col + d]
                u_inv = torch.linalg.solve_triangular(
                    u_vv, torch.eye(d, dtype=u_vv.dtype, device=device), upper=True
                )
                metric = u_inv @ u_inv.t()  # (U_vv^T U_vv)^-1
                wv = wb[:, c0 : c0 + d]
                q = quantize_vector(wv, metric, col)
                err = (wv - q) @ u_inv
                err_block[:, c0 : c0 + d] = err
                if c0 + d < i2 - i1:
                    wb[:, c0 + d :].addmm_(err, u_chol[col : col + d, col + d : i2], alpha=-1.0)
            if i2 < k:
                w_rot[:, i2:].addmm_(err_block, u_chol[i1:i2, i2:], alpha=-1.0)

    result = PVQResult(
        points=points,
        gain_codes=codes,
        row_scales=scale,
        levels=levels,
        signs=signs,
        params=params,
    )
    deq = result.dequantize()
    if hessian is None:
        result.loss = float(
            ((weight.detach().to(torch.float32) - deq) ** 2).sum(dtype=torch.float64)
        )
    else:
        result.loss = proxy_loss(weight, deq, hessian)
    return result
