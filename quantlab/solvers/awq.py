"""AWQ's two searches: per-input-channel scales and per-group clipping thresholds.

Both work on float weights and leave rounding to a groupwise solver (RTN or GPTQ) afterwards.

Scale search (AWQ paper Eq. 4-5, AutoAWQ's ``duo_scaling``): for linears sharing one input ``x``,
try ``s = mean|x|^a`` (plain) or ``s = mean|x|^a / mean_w^(1-a)`` (weight-aware, "duo"), for
``a`` on a grid in ``[0, 1)``, normalised so ``sqrt(max(s) min(s)) = 1``. Each candidate
replaces every ``W`` by ``Q(W diag(s)) diag(s)^-1`` (what the model computes once ``s`` is folded
into the previous op) and is scored by the MSE of an *inspected* module's output (the whole
attention or MLP where that is exact) against the float output.

Clip search (llm-awq ``auto_clip``): per output row and group, shrink the symmetric range
``[-m, m]`` by ``1 - i/n_grid`` and keep the one minimising the error of that group's partial dot
products, ``E_t[(x_g . (w_g - q(w_g)))^2]``. That error is a quadratic form in ``w_g - q(w_g)``
with the group's input Gram matrix ``C_g = X_g^T X_g / T``, so it is evaluated on ``C_g``
(``gs^2`` work per weight instead of ``T``), which also lets every calibration token count rather
than llm-awq's 512-token subsample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantlab.formats.groupwise_int import check_bits, check_group_size

__all__ = [
    "ScaleSearchResult",
    "apply_clip",
    "fake_quantize",
    "linear_output_mse",
    "linear_output_sse",
    "output_mse",
    "output_sse",
    "scale_candidates",
    "search_clip",
    "search_scales",
    "weight_channel_mean",
]


def fake_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """``weight`` ``[N, K]`` rounded to its groupwise min/max grid, in fp32.

    The same grid as :func:`quantlab.solvers.rtn.rtn_quantize` without clip search (the tests
    check equality), computed in place in fp32 without the integer round trip: the searches call
    this thousands of times.
    """
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    maxq = float((1 << bits) - 1)
    w = weight.detach().to(torch.float32).reshape(-1, g)
    lo, hi = torch.aminmax(w, dim=1)
    lo = lo.clamp_(max=0.0)
    hi = hi.clamp_(min=0.0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = hi == lo
    lo = torch.where(empty, -1.0, lo)
    hi = torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / maxq).to(scale_dtype).to(torch.float32)
    scale = scale.clamp_(min=torch.finfo(scale_dtype).tiny).unsqueeze(1)
    if sym:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = torch.round(-lo.unsqueeze(1) / scale).clamp_(0.0, maxq)
    out = w / scale
    out.round_().add_(zero).clamp_(0.0, maxq).sub_(zero).mul_(scale)
    return out.view(n, k)


def weight_channel_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per-input-channel mean of ``|w| / max|w|`` (max taken within each group), over all rows of
    the concatenated ``weights``: how large each input channel's weights are relative to their
    group, the ``s_W`` of AutoAWQ's weight-aware scaling."""
    w = torch.cat([t.detach().to(torch.float32) for t in weights], dim=0)
    n, k = w.shape
    g = k if group_size == -1 else group_size
    grouped = w.abs().view(n, k // g, g)
    rel = grouped / (grouped.amax(dim=2, keepdim=True) + 1e-6)
    return rel.view(n, k).mean(dim=0)


def scale_candidates(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """One grid point of the scale search (``w_mean=None``: plain activation scaling)."""
    x = x_mean.to(torch.float32)
    if w_mean is None:
        s = x.pow(alpha).clamp(min=1e-4)
    else:
        s = (x.pow(alpha) / (w_mean.to(torch.float32).pow(1.0 - alpha) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    # A channel that is never active (x_mean = 0) or an overflow must not poison the fold.
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s


@dataclass
class ScaleSearchResult:
    """Outcome of :func:`search_scales`.

    Attributes:
        scales: fp32 ``[K]`` to fold (all ones when no candidate beat the unscaled weights).
        alpha: the grid point chosen (``None``: unscaled was best).
        duo: whether the weight-aware form won.
        loss: the MSE of the chosen candidate.
        base_loss: the MSE with unscaled rounded weights (``alpha = 0``, plain form).
    """

    scales: torch.Tensor
    alpha: float | None
    duo: bool
    loss: float
    base_loss: float


def output_mse(
    run_inspected: Callable[[], torch.Tensor], reference_output: torch.Tensor
) -> Callable[[], float]:
    """A scale-search loss: MSE of the inspected module's output against its float output.

    ``run_inspected`` runs the module on the cached (unscaled) input with the linears' current
    weights.
    """
    if not bool(torch.isfinite(reference_output).all()):
        raise ValueError("the inspected module's float output has NaN/Inf; cannot score scales")
    reference = reference_output.to(torch.float32)

    @torch.no_grad()
    def loss() -> float:
        return float((run_inspected().to(torch.float32) - reference).pow(2).mean())

    return loss


def linear_output_mse(linear: nn.Linear, inputs: torch.Tensor) -> Callable[[], float]:
    """The same loss as :func:`output_mse` for a linear inspected alone, computed from the input
    Gram matrix: ``mean ((W' - W) x)^2 = sum_n d_n C d_n^T / N`` with ``C = X^T X / T``. That costs
    ``N K^2`` per candidate instead of ``T N K``."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the inspected linear's input has NaN/Inf; cannot score scales")
    gram = x.t() @ x / max(x.shape[0], 1)
    original = linear.weight.detach().to(torch.float32).clone()

    @torch.no_grad()
    def loss() -> float:
        d = linear.weight.to(torch.float32) - original
        return float((d @ gram * d).sum() / d.shape[0])

    return loss


def output_sse(
    run_inspected: Callable[[], torch.Tensor], reference_output: torch.Tensor
) -> Callable[[], tuple[float, int]]:
    """:func:`output_mse`'s error as its parts: the sum of squared errors and the number of
    elements summed. Several ranks, each scoring its own sequences, add their parts to get the
    mean over all of them (the mean of per-rank means would weight ranks, not elements)."""
    if not bool(torch.isfinite(reference_output).all()):
        raise ValueError("the inspected module's float output has NaN/Inf; cannot score scales")
    reference = reference_output.to(torch.float32)

    @torch.no_grad()
    def loss() -> tuple[float, int]:
        residual = run_inspected().to(torch.float32) - reference
        return float(residual.pow(2).sum()), residual.numel()

    return loss


def linear_output_sse(linear: nn.Linear, inputs: torch.Tensor) -> Callable[[], tuple[float, int]]:
    """:func:`linear_output_mse`'s error as its parts (see :func:`output_sse`): ``sum_n d_n X^T X
    d_n^T`` over the ``T`` input rows and ``N`` outputs, and ``T N``."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the inspected linear's input has NaN/Inf; cannot score scales")
    gram = x.t() @ x
    original = linear.weight.detach().to(torch.float32).clone()
    count = x.shape[0] * original.shape[0]

    @torch.no_grad()
    def loss() -> tuple[float, int]:
        d = linear.weight.to(torch.float32) - original
        return float((d @ gram * d).sum()), count

    return loss


@torch.no_grad()
def search_scales(
    linears: Sequence[nn.Linear],
    loss_fn: Callable[[], float],
    x_mean: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = False,
    n_grid: int = 20,
    modes: Sequence[str] = ("duo",),
    scale_dtype: torch.dtype = torch.float16,
    coarse_to_fine: bool = False,
) -> ScaleSearchResult:
    """Grid-search the input scales of ``linears`` (which all read one input).

    Args:
        linears: the linears to scale; their weights are modified during the search and restored.
        loss_fn: the error of the linears' current weights (:func:`output_mse` or
            :func:`linear_output_mse`; on several ranks, the mean over all ranks of
            :func:`output_sse` or :func:`linear_output_sse`, the same number on every rank).
        x_mean: fp32 ``[K]`` mean ``|x|`` per input channel over the calibration tokens.
        bits, group_size, sym, scale_dtype: the grid the weights will be rounded to.
        n_grid: grid points ``alpha = i / n_grid``, ``i < n_grid`` (as AWQ: 1 is not tried).
        modes: ``"plain"`` (``s = x^a``) and/or ``"duo"`` (``s = x^a / w^(1-a)``).
        coarse_to_fine: score every other grid point, then the two neighbours of the best one
            (about 55 % of the candidates; the same choice whenever the loss is unimodal in ``a``).

    Raises:
        ValueError: unknown mode, shapes that disagree, or every candidate non-finite.
    """
    check_bits(bits)
    if not linears:
        raise ValueError("search_scales needs at least one linear")
    k = linears[0].in_features
    for lin in linears:
        if lin.in_features != k:
            raise ValueError(f"linears read different widths ({lin.in_features} vs {k})")
        check_group_size(group_size, k)
    if tuple(x_mean.shape) != (k,):
        raise ValueError(f"x_mean must be [{k}], got {tuple(x_mean.shape)}")
    unknown = set(modes) - {"plain", "duo"}
    if unknown or not modes:
        raise ValueError(f"modes must be a non-empty subset of ('plain', 'duo'), got {modes}")
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1, got {n_grid}")
    originals = [lin.weight.detach().clone() for lin in linears]
    w_mean = weight_channel_mean(originals, group_size) if "duo" in modes else None

    def score(s: torch.Tensor | None) -> float:
        for lin, w in zip(linears, originals, strict=True):
            w32 = w.to(torch.float32)
            if s is None:
                new = fake_quantize(w32, bits, group_size, sym, scale_dtype)
            else:
                sv = s.to(w.device).unsqueeze(0)
                new = fake_quantize(w32 * sv, bits, group_size, sym, scale_dtype) / sv
            lin.weight.copy_(new.to(w.dtype))
        return loss_fn()

    try:
        base_loss = score(None)
        best = ScaleSearchResult(torch.ones(k), None, False, base_loss, base_loss)
        for mode in modes:
            tried: dict[int, float] = {}

            def consider(i: int, mode: str = mode, tried: dict[int, float] = tried) -> None:
                nonlocal best
                if i in tried or not 0 <= i < n_grid:
                    return
                alpha = i / n_grid
                if mode == "plain" and i == 0:
                    tried[i] = base_loss  # x^0 = 1: the unscaled weights, already scored
                    return
                s = scale_candidates(x_mean, w_mean if mode == "duo" else None, alpha)
                tried[i] = loss = score(s)
                if loss < best.loss:
                    best = ScaleSearchResult(s.cpu(), alpha, mode == "duo", loss, base_loss)

            step = 2 if coarse_to_fine else 1
            for i in range(0, n_grid, step):
                consider(i)
            if coarse_to_fine:
                centre = min(tried, key=tried.__getitem__)
                consider(centre - 1)
                consider(centre + 1)
    finally:
        for lin, w in zip(linears, originals, strict=True):
            lin.weight.copy_(w)
    if not torch.isfinite(torch.tensor(best.loss)):
        raise ValueError(
            "every scale candidate gave a NaN/Inf output; the block's weights or activations "
            "overflow the computation dtype"
        )
    return best


@torch.no_grad()
def search_clip(
    weight: torch.Tensor,
    gram: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = False,
    max_shrink: float = 0.5,
    n_grid: int = 20,
    scale_dtype: torch.dtype = torch.float16,
    rows_per_chunk: int = 256,
) -> torch.Tensor:
    """Best symmetric clip threshold per output row and group.

    Args:
        weight: ``[N, K]`` (already scaled, if scales were folded).
        gram: ``[G, gs, gs]`` Gram matrices of the linear's (scaled) input per group,
            :class:`quantlab.calib.stats.ChannelStatsAccumulator`'s ``gram``.
        max_shrink: thresholds ``m (1 - i/n_grid)`` are tried for ``i < max_shrink * n_grid``.

    Returns:
        fp32 ``[N, G]`` thresholds; ``apply_clip`` clamps the weight to ``+-`` them.
    """
    check_bits(bits)
    n, k = weight.shape
    check_group_size(group_size, k)
    g = k if group_size == -1 else group_size
    n_groups = k // g
    if tuple(gram.shape) != (n_groups, g, g):
        raise ValueError(f"gram must be [{n_groups}, {g}, {g}], got {tuple(gram.shape)}")
    if not 0.0 < max_shrink < 1.0:
        raise ValueError(f"max_shrink must be in (0, 1), got {max_shrink}")
    steps = max(1, int(max_shrink * n_grid))
    c = gram.to(device=weight.device, dtype=torch.float32)
    best_all = torch.empty(n, n_groups, dtype=torch.float32, device=weight.device)
    for r0 in range(0, n, rows_per_chunk):
        w = weight[r0 : r0 + rows_per_chunk].detach().to(torch.float32).view(-1, n_groups, g)
        org_max = w.abs().amax(dim=2)  # [r, G]
        best_err = torch.full_like(org_max, float("inf"))
        best_max = org_max.clone()
        for i in range(steps):
            max_val = org_max * (1.0 - i / n_grid)
            clipped = torch.maximum(torch.minimum(w, max_val.unsqueeze(2)), -max_val.unsqueeze(2))
            q = fake_quantize(clipped.view(-1, k), bits, group_size, sym, scale_dtype)
            d = (q.view_as(w) - w).transpose(0, 1)  # [G, r, gs]
            err = (torch.bmm(d, c) * d).sum(dim=2).transpose(0, 1)  # [r, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, max_val, best_max)
        best_all[r0 : r0 + rows_per_chunk] = best_max
    return best_all


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: torch.Tensor) -> None:
    """Clamp each group of ``linear.weight`` to ``[-max_val, max_val]`` (``max_val`` ``[N, G]``)."""
    n, k = linear.weight.shape
    n_groups = max_val.shape[1]
    if max_val.shape[0] != n or k % n_groups != 0:
        raise ValueError(f"max_val {tuple(max_val.shape)} does not fit weight {(n, k)}")
    w = linear.weight.view(n, n_groups, k // n_groups)
    m = max_val.to(device=w.device, dtype=w.dtype).unsqueeze(2)
    w.copy_(torch.maximum(torch.minimum(w, m), -m))
