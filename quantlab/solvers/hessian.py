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
    "non_finite_count",
    "proxy_loss",
]


def non_finite_count(tensor: torch.Tensor, slice_elements: int = 1 << 18) -> int:
    """How many NaN/Inf entries ``tensor`` has, counted in slices: ``torch.isfinite`` of the
    whole tensor allocates an fp32 ``abs`` and two masks of its size (1.5 times a K x K Hessian at
    its peak)."""
    flat = tensor.detach().reshape(-1)  # a view for the contiguous tensors the solvers pass
    bad = 0
    for part in flat.split(slice_elements):
        bad += int(torch.count_nonzero(torch.isfinite(part).logical_not_()))
    return bad


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if weight.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}"
        )
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point weight, got {weight.dtype}")
    bad = non_finite_count(weight)
    if bad:
        raise ValueError(f"{name}: weight has {bad} NaN/Inf entries; refusing to quantize it")


def check_hessian(hessian: torch.Tensor, k: int, name: str) -> None:
    if hessian.dim() != 2 or tuple(hessian.shape) != (k, k):
        raise ValueError(
            f"{name}: hessian must be [K, K] = [{k}, {k}] for a weight with K={k} input columns, "
            f"got {tuple(hessian.shape)}"
        )
    if not hessian.dtype.is_floating_point:
        raise TypeError(f"{name}: hessian must be floating point, got {hessian.dtype}")
    bad = non_finite_count(hessian)
    if bad:
        raise ValueError(
            f"{name}: hessian has {bad} NaN/Inf entries (overflowed or corrupted calibration "
            "activations?); refusing to quantize"
        )


def proxy_loss(
    weight: torch.Tensor,
    dequantized: torch.Tensor,
    hessian: torch.Tensor,
    rows_per_slice: int = 512,
) -> float:
    """GPTQ's layer objective ``tr((W - Q) H (W - Q)^T) / 2``.

    With ``H = 2 X X^T / n`` this is ``||(W - Q) X||_F^2 / n``: the squared output error of the
    layer summed over output channels and averaged over the ``n`` calibration tokens. The factor
    ``1/2`` makes it the same number as the reference implementation's accumulated
    ``sum((w - q)^2 / Hinv_ii^2) / 2`` (which equals this trace, taken with the damped Hessian).

    Args:
        weight: float ``[N, K]`` original weight.
        dequantized: float ``[N, K]`` quantized-then-dequantized weight.
        hessian: float ``[K, K]`` symmetric ``H`` as accumulated (undamped).
        rows_per_slice: output rows whose error is formed at a time (memory, not the value).

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
    h = hessian.detach().to(device=weight.device, dtype=torch.float32)
    # In slices of output rows, so that the error and its products are a few rows at a time and
    # not copies of the weight (at a 28672 x 8192 projection each is 0.94 GB in fp32).
    total = 0.0
    for start in range(0, weight.shape[0], rows_per_slice):
        rows = slice(start, start + rows_per_slice)
        err = weight[rows].detach().to(torch.float32) - dequantized[rows].detach().to(
            device=weight.device, dtype=torch.float32
        )
        total += float(((err @ h) * err).sum(dtype=torch.float64))
    return total / 2.0


def damped_factor(
    h: torch.Tensor | Callable[[], torch.Tensor],
    damp_percent: float,
    max_damp_retries: int,
    name: str,
    factor: Callable[[torch.Tensor], torch.Tensor | None],
    stacklevel: int = 3,
) -> torch.Tensor:
    """``factor(H + damp * mean(diag H) * I)``, GPTQ's damping with retries.

    ``h`` is either ``H`` itself, left untouched (each attempt damps a copy), or a function that
    returns a fresh undamped copy of ``H`` which the attempt owns: the caller then holds no copy
    of its own, and ``factor`` works in that one matrix (at a 28672-wide MLP projection each
    ``K x K`` fp32 matrix is 3.3 GB). ``factor`` may overwrite its argument and return it.

    ``factor`` returns ``None`` when the damped matrix is not usable (a failed Cholesky); the
    damping is then raised tenfold (at least to 0.01) and ``factor`` tried again on a new copy. A
    retry warns, at ``stacklevel`` (3: the caller of the function that called this one).
    """
    fresh_copy = h if callable(h) else h.clone
    mean_diag: float | None = None
    damp = damp_percent
    tried: list[float] = []
    for attempt in range(max_damp_retries + 1):
        tried.append(damp)
        hd = fresh_copy()
        if mean_diag is None:
            mean_diag = float(torch.diagonal(hd).mean())
        hd.diagonal().add_(damp * mean_diag)
        result = factor(hd)
        del hd  # a failed attempt's matrix is gone before the next copy is made
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
    """The upper Cholesky factor of ``hd^-1``, computed in ``hd``'s own storage: no second
    ``K x K`` matrix.

    LAPACK works in place on column-major matrices; torch gives it an ``out=`` tensor without a
    temporary only when that tensor is already column-major. ``hd`` is symmetric, so its
    transposed view is the same matrix with column-major strides: the three steps run on that
    view (the same LAPACK calls as with separate outputs, so the same values), and the factor is
    transposed back to row-major in place at the end.
    """
    info = torch.empty((), dtype=torch.int32, device=hd.device)
    column_major = hd.mT
    torch.linalg.cholesky_ex(column_major, out=(column_major, info))
    if int(info) != 0:
        return None
    torch.cholesky_inverse(column_major, out=column_major)
    torch.linalg.cholesky_ex(column_major, upper=True, out=(column_major, info))
    if int(info) != 0:
        return None
    _transpose_square_in_place(hd)
    if non_finite_count(hd):
        return None
    return hd


def _transpose_square_in_place(matrix: torch.Tensor, tile: int = 512) -> None:
    """``matrix = matrix^T`` for a square row-major matrix, tile pair by tile pair (one tile of
    scratch instead of a second matrix)."""
    k = matrix.shape[0]
    for i in range(0, k, tile):
        diagonal = matrix[i : i + tile, i : i + tile]
        diagonal.copy_(diagonal.t().clone())
        for j in range(i + tile, k, tile):
            upper = matrix[i : i + tile, j : j + tile]
            lower = matrix[j : j + tile, i : i + tile]
            scratch = upper.clone()
            upper.copy_(lower.t())
            lower.copy_(scratch.t())


def inverse_cholesky(
    h: torch.Tensor | Callable[[], torch.Tensor],
    damp_percent: float,
    max_damp_retries: int,
    name: str,
) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U = H^-1``),
    with :func:`damped_factor`'s retries; ``h`` is ``H`` or a function making fresh copies of it
    (see there). The factor is computed in place, in the one copy.

    A retry warns at the caller of the solver that called this function (stacklevel 4: this
    function, then the solver, then its caller)."""
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
