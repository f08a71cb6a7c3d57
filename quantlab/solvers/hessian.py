"""The Hessian algebra every second-order solver shares.

GPTQ, Fair-GPTQ, ternary GPTQ, PVQ and BitStack's error feedback all work with the same objects:
a weight ``W [N, K]`` and the layer Hessian ``H = 2 X X^T / n`` (``X`` the layer input
``[K, n]``). This module owns what they do with them the same way, so that each is written once
and no solver reaches into another for it:

- the input checks (:func:`check_weight`, :func:`check_hessian`);
- GPTQ's damping with retries (:func:`damped_factor`) and the upper Cholesky factor of the damped
  inverse Hessian (:func:`inverse_cholesky`);
- GPTQ's proxy loss ``tr((W - Q) H (W - Q)^T) / 2`` (:func:`proxy_loss`);
- the error-feedback column loop (:func:`error_feedback_columns`), parameterised by how one column
  is rounded (:data:`ColumnQuantizer`): the grid is the solver's, the feedback is shared.

Everything here is a pure function of tensors: no hooks, no I/O, no quantization format.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

__all__ = [
    "ColumnQuantizer",
    "check_hessian",
    "check_weight",
    "damped_factor",
    "error_feedback_columns",
    "inverse_cholesky",
    "proxy_loss",
]


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if weight.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}"
        )
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point weight, got {weight.dtype}")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name}: weight has {bad} NaN/Inf entries; refusing to quantize it")


def check_hessian(hessian: torch.Tensor, k: int, name: str) -> None:
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


def damped_factor(
    h: torch.Tensor,
    damp_percent: float,
    max_damp_retries: int,
    name: str,
    factor: Callable[[torch.Tensor], torch.Tensor | None],
    stacklevel: int = 3,
    overwrite: bool = False,
) -> torch.Tensor:
    """``factor(H + damp * mean(diag H) * I)``, GPTQ's damping with retries.

    ``factor`` returns ``None`` when the damped matrix is not usable (a failed Cholesky); the
    damping is then raised tenfold (at least to 0.01) and ``factor`` tried again. A retry warns,
    at ``stacklevel`` (3: the caller of the function that called this one).

    ``overwrite``: damp ``h``'s own diagonal instead of a copy (the caller no longer needs ``h``;
    its diagonal is left damped). Saves a ``K x K`` copy, which for a 28672-wide MLP projection is
    3.3 GB; each retry starts again from the original diagonal, so the values are the same.
    """
    mean_diag = float(torch.diagonal(h).mean())
    original = torch.diagonal(h).clone() if overwrite else None
    damp = damp_percent
    tried: list[float] = []
    for attempt in range(max_damp_retries + 1):
        tried.append(damp)
        if original is not None:
            hd = h
            hd.diagonal().copy_(original)
        else:
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
    inverse = torch.cholesky_inverse(chol)
    del chol  # two K x K matrices alive at a time besides hd, not three
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
    if int(info) != 0 or not bool(torch.isfinite(upper).all()):
        return None
    return upper


def inverse_cholesky(
    h: torch.Tensor,
    damp_percent: float,
    max_damp_retries: int,
    name: str,
    overwrite: bool = False,
) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U = H^-1``),
    with :func:`damped_factor`'s retries (``overwrite``: damp ``h`` in place, see there).

    A retry warns at the caller of the solver that called this function (stacklevel 4: this
    function, then the solver, then its caller)."""
    return damped_factor(
        h, damp_percent, max_damp_retries, name, _upper_of_inverse, stacklevel=4,
        overwrite=overwrite,
    )  # fmt: skip


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
