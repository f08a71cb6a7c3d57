"""Fair-GPTQ's group-bias term (Proskurina et al., 2025): the closed-form debiasing shift.

Fair-GPTQ quantizes a linear ``W [N, K]`` against

    ||W X - Q X||^2 + alpha ||Q (X0 - X1)||^2

where ``X0``/``X1`` are the layer's inputs at aligned positions of the two sentences of
stereotype / anti-stereotype pairs. With ``H = 2 X X^T / n`` and ``D = 2 (X0 - X1)(X0 - X1)^T / m``
(each normalised by its own token count), the unquantized minimiser is

    V = W H (H + alpha D)^-1 = W - W (alpha D) (H + alpha D)^-1,

which shrinks the layer's response to the directions in which the paired inputs differ while
keeping its product with ordinary inputs. As in the reference implementation (fair-gptq's
``gptq.py``), the shift is applied to ``W`` before GPTQ's column loop, which then rounds ``V`` with
the ordinary ``H`` for error feedback and act-order (:func:`fair_gptq_quantize`: the shift, then
:func:`quantlab.solvers.gptq.gptq_quantize` on ``V`` with the loss measured against ``W``).
``sum_hessians=False`` is the reference's first-order variant, ``V = W - W (alpha D) H^-1``.

GPTQ knows nothing of the term: this module builds on :mod:`quantlab.solvers.gptq` and
:mod:`quantlab.solvers.hessian`, never the other way round.
"""

from __future__ import annotations

import math

import torch

from quantlab.formats.groupwise_int import GroupwiseIntResult
from quantlab.solvers.gptq import check_gptq_arguments, check_static_groups, gptq_quantize
from quantlab.solvers.hessian import damped_factor, inverse_cholesky

__all__ = [
    "bias_subspace",
    "check_fair_alpha",
    "debias_shift",
    "fair_gptq_quantize",
    "group_bias_term",
]


def check_fair_alpha(alpha: float, name: str = "weight") -> None:
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0.0):
        raise ValueError(f"{name}: fair_alpha must be a finite number >= 0, got {alpha!r}")


def _check_fair_hessian(fair_hessian: torch.Tensor, k: int, name: str) -> None:
    if fair_hessian.dim() != 2 or tuple(fair_hessian.shape) != (k, k):
        raise ValueError(
            f"{name}: fair_hessian must be [K, K] = [{k}, {k}] for a weight with K={k} input "
            f"columns, got {tuple(fair_hessian.shape)}"
        )
    if not fair_hessian.dtype.is_floating_point:
        raise TypeError(f"{name}: fair_hessian must be floating point, got {fair_hessian.dtype}")
    if not bool(torch.isfinite(fair_hessian).all()):
        raise ValueError(f"{name}: fair_hessian has NaN/Inf entries; refusing to quantize")


def debias_shift(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fair_hessian: torch.Tensor,
    alpha: float,
    damp_percent: float = 0.01,
    sum_hessians: bool = True,
    name: str = "weight",
    max_damp_retries: int = 5,
) -> torch.Tensor:
    """The debiased target ``V`` that GPTQ then rounds.

    Args:
        weight: float ``[N, K]``.
        hessian: float ``[K, K]`` ordinary ``H = 2 X X^T / n`` (undamped).
        fair_hessian: float ``[K, K]`` ``D = 2 (X0 - X1)(X0 - X1)^T / m``.
        alpha: weight of the group-bias term (``0`` returns ``weight`` unchanged).
        damp_percent: the inverted matrix (``H + alpha D``, or ``H``) gets
            ``damp_percent * mean(diag)`` on its diagonal, as GPTQ damps ``H``.
        sum_hessians: exact minimiser (invert ``H + alpha D``) or the first-order one (invert
            ``H``).

    Returns:
        fp32 ``[N, K]`` on ``weight``'s device.
    """
    check_fair_alpha(alpha, name)
    w = weight.detach().to(torch.float32)
    k = w.shape[1]
    _check_fair_hessian(fair_hessian, k, name)
    if alpha == 0.0:
        return w.clone()
    d = fair_hessian.detach().to(device=w.device, dtype=torch.float32) * alpha
    h = hessian.detach().to(device=w.device, dtype=torch.float32)
    base = h + d if sum_hessians else h.clone()
    dead = torch.diagonal(base) == 0
    if bool(dead.any()):
        base[dead, dead] = 1.0
    u = inverse_cholesky(base, damp_percent, max_damp_retries, name)
    # (base + damp)^-1 = U^T U, so W D (base + damp)^-1 = ((W D) U^T) U.
    return w - ((w @ d) @ u.t()) @ u


def fair_gptq_quantize(
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
    """Quantize one linear weight with Fair-GPTQ: the debiasing shift, then GPTQ.

    The weight is first moved to the minimiser ``V`` of ``||W X - V X||^2 + fair_alpha ||V (X0 -
    X1)||^2`` (:func:`debias_shift`, on the weight with its dead columns already zeroed) and
    :func:`quantlab.solvers.gptq.gptq_quantize` rounds that target with the ordinary ``hessian``;
    grids (static groups included) are fitted on it, and ``loss`` is measured against the
    original weight, so the intended shift counts as error too. Input columns that never saw a
    nonzero input (``diag(H) == 0``) stay 0, as in GPTQ.

    Args:
        weight, hessian, bits, group_size, sym, damp_percent, block_size, act_order,
            static_groups, scale_dtype, name, max_damp_retries, clip_search: as for
            :func:`quantlab.solvers.gptq.gptq_quantize` (``damp_percent`` and
            ``max_damp_retries`` also damp the shift's inverse).
        fair_hessian: Fair-GPTQ's group-bias matrix ``D = 2 (X0 - X1)(X0 - X1)^T / m`` ``[K, K]``
            (:class:`quantlab.calib.stats.PairDifferenceAccumulator`). ``None`` or
            ``fair_alpha=0`` is plain GPTQ, bit for bit.
        fair_alpha: weight of the group-bias term (finite, >= 0; nonzero needs ``fair_hessian``).
        sum_hessians: invert ``H + fair_alpha D`` for the shift (exact); ``False`` inverts ``H``
            (the reference's first-order variant).

    Returns:
        :class:`quantlab.formats.groupwise_int.GroupwiseIntResult`, as GPTQ returns it.
    """
    # GPTQ's own checks come first, in its order, as when the term was one of its options.
    check_gptq_arguments(
        weight, hessian, bits, group_size, block_size, damp_percent, max_damp_retries, name
    )
    if fair_hessian is None and fair_alpha != 0.0:
        raise ValueError(f"{name}: fair_alpha={fair_alpha} needs a fair_hessian")
    check_static_groups(group_size, act_order, static_groups, name)
    target = weight
    loss_weight: torch.Tensor | None = None
    if fair_hessian is not None and fair_alpha != 0.0:
        # GPTQ pins a column that never saw a nonzero input to 0: so does the shift's input (it
        # starts from the weight GPTQ would round) and its output (the shift may move the column).
        w = weight.detach().to(torch.float32, copy=True)  # one copy, also from bf16
        dead = torch.diagonal(hessian.detach().to(device=weight.device, dtype=torch.float32)) == 0
        if bool(dead.any()):
            w[:, dead] = 0.0
        target = debias_shift(
            w, hessian, fair_hessian, fair_alpha, damp_percent, sum_hessians, name, max_damp_retries
        )
        target[:, dead] = 0.0
        loss_weight = weight
    return gptq_quantize(
        target,
        hessian,
        bits,
        group_size,
        sym,
        damp_percent,
        block_size,
        act_order,
        static_groups,
        scale_dtype,
        name,
        max_damp_retries,
        clip_search,
        loss_weight=loss_weight,
    )


def bias_subspace(
    fair_hessian: torch.Tensor,
    hessian: torch.Tensor,
    rank: int,
    damp_percent: float = 0.01,
    name: str = "weight",
    max_damp_retries: int = 5,
) -> torch.Tensor:
    """``D`` restricted to its ``rank`` leading directions *relative to* ``H``.

    The generalised eigenvectors of ``D v = mu (H + lambda I) v`` (``lambda`` = GPTQ's damping,
    with its retries)
    with the largest ``mu`` are the input directions where the paired sentences differ most for
    the least energy in ordinary text: removing the layer's response there debiases at the
    smallest cost in ``||W X - V X||^2``. The trailing directions of a full ``D`` are mostly
    how two *words* differ (one occupation against another), not how the stereotype differs,
    and shifting them costs perplexity. With ``H + lambda I = L L^T`` and
    ``L^-1 D L^-T = Q diag(mu) Q^T``, the result is ``L Q_r diag(mu_r) Q_r^T L^T`` (fp64).

    Returns:
        fp32 ``[K, K]`` on ``fair_hessian``'s device.
    """
    k = fair_hessian.shape[0]
    _check_fair_hessian(fair_hessian, k, name)
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"{name}: hessian must be [{k}, {k}], got {tuple(hessian.shape)}")
    if not 1 <= rank <= k:
        raise ValueError(f"{name}: fair rank must be in [1, {k}], got {rank}")

    def lower_factor(hd: torch.Tensor) -> torch.Tensor | None:
        lower, info = torch.linalg.cholesky_ex(hd)
        return lower if int(info) == 0 else None

    d = fair_hessian.detach().to(torch.float64)
    h = hessian.detach().to(device=d.device, dtype=torch.float64)
    lower = damped_factor(h, damp_percent, max_damp_retries, name, lower_factor)
    m = torch.linalg.solve_triangular(lower, d, upper=False)
    m = torch.linalg.solve_triangular(lower, m.t(), upper=False)
    mu, q = torch.linalg.eigh((m + m.t()) / 2)
    top = torch.argsort(mu, descending=True)[:rank]
    basis = lower @ q[:, top]
    return ((basis * mu[top].clamp_min(0)) @ basis.t()).to(torch.float32)


def group_bias_term(weight: torch.Tensor, fair_hessian: torch.Tensor) -> float:
    """``||W (X0 - X1)||_F^2 / m = tr(W D W^T) / 2``: the output difference of the layer between
    the paired inputs, on the same scale as :func:`quantlab.solvers.hessian.proxy_loss`."""
    w = weight.detach().to(torch.float32)
    d = fair_hessian.detach().to(device=w.device, dtype=torch.float32)
    return float(((w @ d) * w).sum(dtype=torch.float64)) / 2.0
