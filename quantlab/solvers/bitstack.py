"""BitStack's math on one weight: activation scales and the iterative absolute-value
decomposition (AVD) into ~1-bit residual blocks.

Scales (once, before decomposing): ``s_j`` is input channel ``j``'s root-mean-square activation
(from the layer's Hessian diagonal, ``H_jj = 2 mean_t x_tj^2``), raised to ``alpha``. The caller
folds ``s`` output-preservingly (``W[:, j] * s_j``, the op feeding the layer divided by ``s``), so
the decomposition spends its accuracy where the inputs are large.

Decomposition (fp32), residual ``R_0 = W``; for each block ``b``:

1. ``S_b = sign(R_b)`` with ``0 -> +1``;
2. rank-``r`` SVD of ``|R_b| ≈ U Σ V^T``; ``u_b = U sqrt(Σ)``, ``v_b = sqrt(Σ) V^T``, rounded to
   fp16 (the storage precision);
3. ``R_{b+1} = R_b - S_b ⊙ (u_b v_b)`` with the *rounded* factors, so later blocks also absorb
   the fp16 rounding of earlier ones (BitStack's reference code subtracts the unrounded product).

For a fixed sign pattern the best magnitude in Frobenius norm is the best rank-``r`` fit of
``|R_b|`` (``S ⊙ S = 1``), so step 2 is optimal given step 1.

With ``error_feedback`` (quantlab's default in the method) step 1 comes after step 2: the signs are
chosen against the magnitude by GPTQ's column loop on the layer's Hessian, so each block minimises
the calibration output error rather than the weight error, and each row's magnitude is then
rescaled by its least-squares gain under ``H``.
"""

from __future__ import annotations

import time

import torch

from quantlab.formats.bitstack import FACTOR_DTYPE, BitStackResult
from quantlab.solvers.hessian import check_weight, error_feedback_columns, inverse_cholesky

__all__ = [
    "SVD_METHODS",
    "activation_scales",
    "decompose",
    "output_error",
    "stage_major_order",
]

SVD_METHODS = ("lowrank", "full")


def activation_scales(
    hessian: torch.Tensor, alpha: float = 1.0, floor: float = 1e-3
) -> torch.Tensor:
    """Per-input-channel scales ``s`` ``[K]`` (positive, geometric mean 1) from a Hessian (or its
    diagonal ``[K]``, all it reads).

    ``s_j = max(rms_j, floor * mean(rms))^alpha`` with ``rms_j = sqrt(H_jj / 2)``. The floor
    keeps channels that never fire from getting a zero scale (BitStack adds 1e-3 for the same
    reason); the normalisation only keeps the folded tensors near their original range (the
    decomposition is equivariant to a global scale).
    """
    if hessian.dim() == 1:
        diag = hessian.to(torch.float32)
    elif hessian.dim() == 2 and hessian.shape[0] == hessian.shape[1]:
        diag = torch.diagonal(hessian).to(torch.float32)
    else:
        raise ValueError(
            f"hessian must be square [K, K] or its diagonal [K], got {tuple(hessian.shape)}"
        )
    if not bool(torch.isfinite(diag).all()):
        raise ValueError("hessian has NaN/Inf on its diagonal (non-finite calibration activations)")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    rms = (diag.clamp_min(0) / 2).sqrt()
    mean = float(rms.mean())
    if mean <= 0:
        raise ValueError("every input channel is zero on the calibration data; no scales")
    s = rms.clamp_min(floor * mean).pow(alpha)
    return s / s.log().mean().exp()


def output_error(residual: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(R H R^T)``: the summed squared output error of weight error ``R`` on the calibration
    inputs (``H = 2 X^T X / n``)."""
    return float(((residual @ hessian) * residual).sum())


def _low_rank_svd(
    a: torch.Tensor,
    rank: int,
    generator: torch.Generator,
    oversample: int = 8,
    power_iters: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized range finder (Halko et al.) with power iterations: ``U [m, r], S [r], Vh [r, n]``.

    Its own seeded generator makes the decomposition reproducible (torch.svd_lowrank draws from
    the global generator).
    """
    m, n = a.shape
    q = min(rank + oversample, m, n)
    omega = torch.randn(n, q, generator=generator, device="cpu").to(a.device)
    y = a @ omega
    for _ in range(power_iters):
        y, _ = torch.linalg.qr(y)
        y = a @ (a.t() @ y)
    basis, _ = torch.linalg.qr(y)
    small = basis.t() @ a  # [q, n]
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    return (basis @ ub)[:, :rank], s[:rank], vh[:rank]


def _feedback_signs(
    target: torch.Tensor, magnitude: torch.Tensor, upper: torch.Tensor, block_size: int = 128
) -> torch.Tensor:
    """Signs of ``S ⊙ magnitude ≈ target`` chosen column by column with GPTQ's error feedback.

    ``upper`` is the upper Cholesky factor of the damped inverse Hessian (columns already in the
    processing order). Each column takes the sign that brings ``±m`` closest to its *updated*
    value, and its rounding error is pushed onto the later columns, so the block minimises the
    calibration output error ``tr(E H E^T)`` instead of the weight error. Returns the bool mask
    ``S == +1``.
    """
    magnitude_t = magnitude.t().contiguous()

    def choose_signs(col: int, wcol: torch.Tensor, qcol: torch.Tensor, deq: torch.Tensor) -> None:
        m = magnitude_t[col]
        pos = (wcol >= 0) == (m >= 0)
        qcol.copy_(pos)
        torch.where(pos, m, -m, out=deq)

    signs_t = error_feedback_columns(target.t().contiguous(), upper, block_size, choose_signs)
    return signs_t.t().to(torch.bool).contiguous()


def _row_gains(target: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row ``c`` minimising ``(r - c q) H (r - c q)^T``: ``c = r H q^T / q H q^T``."""
    qh = q @ hessian
    den = (qh * q).sum(1)
    num = (qh * target).sum(1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 1.0)


@torch.no_grad()
def decompose(
    weight: torch.Tensor,
    n_blocks: int,
    rank: int,
    hessian: torch.Tensor | None = None,
    svd: str = "lowrank",
    seed: int = 0,
    name: str = "weight",
    error_feedback: bool = False,
    damp_percent: float = 0.01,
) -> BitStackResult:
    """Decompose ``weight`` ``[N, K]`` into ``n_blocks`` sign x rank-``rank`` residual blocks.

    Args:
        weight: the (already scaled) weight; any float dtype, computed in fp32 on its device.
        n_blocks: blocks to produce (>= 1).
        rank: rank of each block's magnitude (1 <= rank <= min(N, K)).
        hessian: optional ``[K, K]`` input Hessian (of the scaled inputs); when given, the output
            error after every block is recorded in ``errors``.
        svd: ``"lowrank"`` (randomized, 3 power iterations; the default, ~10x faster here) or
            ``"full"`` (``torch.linalg.svd``).
        seed: seed of the randomized SVD.
        name: the layer's name, for error messages.
        error_feedback: Hessian-aware blocks (needs ``hessian``): each block's signs are chosen
            column by column with GPTQ's error feedback (act-order, lazy batches of 128), and its
            magnitude's rows are rescaled to the least-squares optimum under ``H``. Every prefix
            of blocks then approximates the weight in calibration-output error, not in weight
            error; the format is unchanged.
        damp_percent: damping of the Hessian for the feedback, relative to its mean diagonal.
    Raises:
        ValueError: bad shape, rank, block count, SVD method, NaN/Inf weights or Hessian.
    """
    check_weight(weight, name)
    n, k = weight.shape
    if n_blocks < 1:
        raise ValueError(f"{name}: n_blocks must be >= 1, got {n_blocks}")
    if not 1 <= rank <= min(n, k):
        raise ValueError(
            f"{name}: rank must be in [1, {min(n, k)}] for a [{n}, {k}] weight, got {rank}"
        )
    if svd not in SVD_METHODS:
        raise ValueError(f"{name}: svd must be one of {SVD_METHODS}, got {svd!r}")
    if hessian is not None:
        if tuple(hessian.shape) != (k, k):
            raise ValueError(f"{name}: hessian must be [{k}, {k}], got {tuple(hessian.shape)}")
        if not bool(torch.isfinite(hessian).all()):
            raise ValueError(f"{name}: hessian has NaN/Inf entries")
        hessian = hessian.to(device=weight.device, dtype=torch.float32)
    if error_feedback and hessian is None:
        raise ValueError(f"{name}: error_feedback needs the layer's hessian")
    start = time.perf_counter()
    upper = perm = inverse = None
    if error_feedback:
        assert hessian is not None
        h = hessian.clone()
        dead = torch.diagonal(h) <= 0
        h[dead, dead] = 1.0
        perm = torch.argsort(torch.diagonal(h), descending=True)
        inverse = torch.argsort(perm)
        upper = inverse_cholesky(h[perm][:, perm], damp_percent, 3, name)
    svd_seconds = 0.0
    generator = torch.Generator().manual_seed(seed)
    residual = weight.detach().to(torch.float32).clone()
    positive = torch.empty(n_blocks, n, k, dtype=torch.bool, device=weight.device)
    us = torch.empty(n_blocks, n, rank, dtype=torch.float32, device=weight.device)
    vs = torch.empty(n_blocks, rank, k, dtype=torch.float32, device=weight.device)
    errors = [output_error(residual, hessian)] if hessian is not None else []

    def magnitude_of(target: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal svd_seconds
        t0 = time.perf_counter()
        if svd == "full":
            uf, s, vh = torch.linalg.svd(target.abs(), full_matrices=False)
            uf, s, vh = uf[:, :rank], s[:rank], vh[:rank]
        else:
            uf, s, vh = _low_rank_svd(target.abs(), rank, generator)
        svd_seconds += time.perf_counter() - t0
        root = s.clamp_min(0).sqrt()
        u = (uf * root).to(FACTOR_DTYPE).to(torch.float32)
        v = (root.unsqueeze(1) * vh).to(FACTOR_DTYPE).to(torch.float32)
        if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(v).all())):
            raise ValueError(f"{name}: block {b} factors overflow float16; the weight is too large")
        return u, v

    def scaled(u: torch.Tensor, gains: torch.Tensor, b: int) -> torch.Tensor:
        out = (u * gains.unsqueeze(1)).to(FACTOR_DTYPE).to(torch.float32)
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"{name}: block {b} factors overflow float16 after the refit")
        return out

    def record(b: int, pos: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
        residual.sub_(torch.where(pos, 1.0, -1.0) * (u @ v))
        positive[b], us[b], vs[b] = pos, u, v
        if hessian is not None:
            errors.append(output_error(residual, hessian))

    b = 0
    while b < n_blocks:
        u, v = magnitude_of(residual, b)
        if upper is not None:
            assert hessian is not None and perm is not None and inverse is not None
            magnitude = u @ v
            pos = _feedback_signs(residual[:, perm], magnitude[:, perm], upper)[:, inverse]
            gains = _row_gains(residual, torch.where(pos, magnitude, -magnitude), hessian)
            u = scaled(u, gains, b)
        else:
            pos = residual >= 0
        record(b, pos, u, v)
        b += 1
    return BitStackResult(
        positive, us, vs, errors, seconds=time.perf_counter() - start, svd_seconds=svd_seconds
    )


def stage_major_order(scores: dict[str, list[float]]) -> list[tuple[str, int]]:
    """The global loading order of every layer's blocks beyond its first, stage by stage.

    ``scores[name][b - 1]`` rates adding block ``b`` (0-based, ``b >= 1``) to layer ``name``
    (higher = loaded earlier). Stage ``b`` holds block ``b`` of every layer that has one, sorted by
    score (ties: by name), and stages follow each other, so at every prefix of the order each
    layer holds ``b`` or ``b + 1`` blocks for some ``b``.

    Returns:
        ``[(name, block), ...]`` with ``block >= 1``.
    """
    for name, values in scores.items():
        bad = [v for v in values if v != v]  # NaN
        if bad:
            raise ValueError(f"{name}: NaN block score")
    depth = max((len(v) for v in scores.values()), default=0)
    order: list[tuple[str, int]] = []
    for stage in range(1, depth + 1):
        candidates = [(name, v[stage - 1]) for name, v in scores.items() if len(v) >= stage]
        candidates.sort(key=lambda item: (-item[1], item[0]))
        order.extend((name, stage) for name, _ in candidates)
    return order
