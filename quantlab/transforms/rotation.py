"""Randomized orthogonal rotations of a linear layer's input space ("incoherence processing").

A rotation ``R`` (``[K, K]``, orthogonal) changes nothing a linear layer computes when its weight
becomes ``W' = W R^T`` and its input ``x' = R x``: ``W' x' = W R^T R x = W x``. What it changes is
the weight's statistics: each row of ``W'`` mixes all ``K`` entries of the row of ``W``, so outliers
are spread out and the rows look like i.i.d. Gaussian samples, whose directions are uniform on the
sphere. Vector quantizers of the direction (PVQ) and scale quantizers of the norm both assume that.

The rotation used here, for any width ``K = m * p`` with ``p`` the largest power of two dividing
``K`` and ``m`` odd::

    R = (C_m kron H_p) diag(s)

* ``s`` in {-1, +1}^K: random signs (the only random part; stored with the layer).
* ``H_p``: the Sylvester-Hadamard matrix of order ``p`` (natural order), scaled by ``1 / sqrt(p)``.
  It is applied in its Kronecker-factored form ``H_p = H_p1 kron H_p2 kron ...`` with every factor
  of order at most 64 (Sylvester matrices factor exactly so), i.e. a few small dense matmuls:
  ``O(K (p1 + p2 + ...))`` work, BLAS-friendly, the same result as a fast Walsh-Hadamard
  transform.
* ``C_m``: the orthonormal DCT-II matrix of order ``m``
  (``C[i, j] = sqrt((1 + [i > 0]) / m) * cos(pi * (2j + 1) * i / (2m))``), applied as a dense
  ``m x m`` product in ``O(K m)``; ``m = 1`` for powers of two.

A vector ``v`` of length ``K`` is read as an ``[m, p]`` matrix ``V`` (row-major, ``v[i * p + j] =
V[i, j]``); then ``R v`` is ``C_m (S V) H_p^T``, every output depending on every input.
Per token this costs ``K (m + p1 + p2 + ...)`` multiply-adds: 73 per input for ``K = 576``
(``9 x 64``), 75 for ``1536`` (``3 x 8 x 64``). Every
entry of ``R`` has magnitude at most ``sqrt(2 / K)``, which is what bounds the incoherence of the
rotated weight (a plain block-diagonal Hadamard over the 64-wide blocks that divide 576 would mix
only within blocks).

SmolLM2's widths: 576 = 9 x 64, 1536 = 3 x 512, 192 = 3 x 64.

Everything here works along the last dimension of any tensor, in fp32 or fp64 (the dtype of the
input).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = [
    "dct_matrix",
    "hadamard_factors",
    "hadamard_matrix",
    "random_signs",
    "rotate",
    "rotate_hessian",
    "rotation_factors",
    "rotation_matrix",
    "unrotate",
]


def rotation_factors(width: int) -> tuple[int, int]:
    """``(m, p)`` with ``width = m * p``, ``p`` the largest power of two dividing ``width``."""
    if width < 1:
        raise ValueError(f"rotation width must be >= 1, got {width}")
    p = width & -width
    return width // p, p


def random_signs(width: int, seed: int) -> torch.Tensor:
    """``width`` random signs as int8 ``[width]`` in {-1, +1}, reproducible from ``seed``.

    Drawn with a private CPU generator, so the global RNG state is untouched.
    """
    if width < 1:
        raise ValueError(f"rotation width must be >= 1, got {width}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    bits = torch.randint(0, 2, (width,), generator=gen, dtype=torch.int8)
    return (1 - 2 * bits).to(torch.int8)


def dct_matrix(m: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``[m, m]`` (rows are the basis vectors)."""
    i = torch.arange(m, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(m, dtype=torch.float64).unsqueeze(0)
    c = torch.cos(math.pi * (2 * j + 1) * i / (2 * m)) * math.sqrt(2.0 / m)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


def hadamard_matrix(p: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester-Hadamard matrix of order ``p`` (a power of two), scaled to be orthonormal."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {p}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(p)).to(dtype)


# Largest Hadamard factor applied as one dense matmul.
_MAX_FACTOR = 64


def hadamard_factors(p: int) -> list[int]:
    """Orders of the Kronecker factors of ``H_p`` (powers of two, each at most 64, product ``p``;
    the last factor is the largest)."""
    if p < 1 or p & (p - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {p}")
    factors = []
    while p > _MAX_FACTOR:
        factors.append(_MAX_FACTOR)
        p //= _MAX_FACTOR
    if p > 1 or not factors:
        factors.append(p)
    return factors[::-1]


@lru_cache(maxsize=64)
def _small_matrices(width: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """``[C_m, H_p1, H_p2, ...]``: the Kronecker factors of ``R`` without the signs (most
    significant first), each at most 64 x 64 except ``C_m``; cached per width, dtype, device."""
    m, p = rotation_factors(width)
    mats = [dct_matrix(m, torch.float64)]
    mats += [hadamard_matrix(f, torch.float64) for f in hadamard_factors(p)]
    return [t.to(device=device, dtype=dtype) for t in mats]


def _kron_apply(v: torch.Tensor, mats: list[torch.Tensor], transpose: bool) -> torch.Tensor:
    """``(A_1 kron A_2 kron ... ) v`` (or with every ``A_i^T``) for each row of ``v [B, K]``.

    ``v`` is read as a tensor ``[B, d_1, ..., d_r]`` and each factor is applied along its own
    axis by one matmul on a view ``[B * (d_1 .. d_{i-1}), d_i, d_{i+1} .. d_r]``.
    """
    b, width = v.shape
    before = 1
    after = width
    for a in mats:
        d = a.shape[0]
        after //= d
        if d > 1 and after == 1:
            # The innermost axis: one GEMM over all rows (a batched matmul of matrix-vector
            # products here is an order of magnitude slower).
            v = v.reshape(-1, d) @ (a if transpose else a.t())
        elif d > 1:
            v = torch.matmul(a.t() if transpose else a, v.reshape(b * before, d, after))
        before *= d
    return v.reshape(b, width)


def _check(x: torch.Tensor, signs: torch.Tensor) -> int:
    width = signs.numel()
    if signs.dim() != 1:
        raise ValueError(f"signs must be 1-D [K], got shape {tuple(signs.shape)}")
    if x.shape[-1] != width:
        raise ValueError(
            f"rotation of width {width} applied to a tensor of shape {tuple(x.shape)} "
            f"(last dimension must be {width})"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(f"rotation input must be floating point, got {x.dtype}")
    return width


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``R x`` for every vector ``x`` along the last dimension (``x @ R^T`` for a batch).

    Args:
        x: float ``[..., K]``.
        signs: ``[K]`` in {-1, +1} (any dtype), the random part of ``R``.

    Returns:
        ``[..., K]`` in ``x``'s dtype and device. Applied to the rows of a weight ``W`` it gives
        ``W' = W R^T``; applied to inputs, ``x' = R x``.
    """
    width = _check(x, signs)
    lead = x.shape[:-1]
    v = x.reshape(-1, width) * signs.to(device=x.device, dtype=x.dtype)
    v = _kron_apply(v, _small_matrices(width, x.dtype, x.device), transpose=False)
    return v.reshape(*lead, width)


def unrotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``R^T x`` along the last dimension: the inverse of :func:`rotate` (``W = W' R``)."""
    width = _check(x, signs)
    lead = x.shape[:-1]
    v = _kron_apply(x.reshape(-1, width), _small_matrices(width, x.dtype, x.device), transpose=True)
    return (v * signs.to(device=x.device, dtype=x.dtype)).reshape(*lead, width)


def rotate_hessian(hessian: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``R H R^T`` for a symmetric ``[K, K]`` ``H`` (the Hessian of the rotated inputs)."""
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square [K, K], got shape {tuple(hessian.shape)}")
    half = rotate(hessian, signs)  # H R^T
    return rotate(half.t().contiguous(), signs)  # (R H) R^T


def rotation_matrix(signs: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense ``[K, K]`` matrix ``R`` (tests and docs; :func:`rotate` never builds it)."""
    width = signs.numel()
    m, p = rotation_factors(width)
    kron = torch.kron(dct_matrix(m, torch.float64), hadamard_matrix(p, torch.float64))
    return (kron * signs.to(torch.float64).unsqueeze(0)).to(dtype)
