"""The PVQ codebook: the pyramid of integer directions, its enumeration, and the encoding.

A vector of ``D`` weights is coded as a point ``y`` of the pyramid
``P(D, K) = {y in Z^D : sum |y_i| = K}`` (``K`` "pulses"), stored as its enumeration index in
``[0, N(D, K))``, together with one of ``L`` amplitude levels; :class:`PVQParams` is that
encoding and :func:`reconstruct` its decode arithmetic. The PVQ solver, the packed format
(:mod:`quantlab.formats.pvq`) and the reference decode (:mod:`quantlab.ops.pvq_reference`) all
use them; none of them is needed here.

**Enumeration.** ``N(D, K)`` obeys ``N(D, K) = N(D-1, K) + N(D-1, K-1) + N(D, K-1)`` with
``N(D, 0) = 1`` and ``N(0, K > 0) = 0``. Points are ordered by their first coordinate ``v`` in
the order ``0, +1, -1, +2, -2, ..., +K, -K``, then recursively by the rest (a point of
``P(D-1, K - |v|)``); so the rank of ``y`` is ``sum over the values v' before y_0 of N(D-1, K -
|v'|)`` plus the rank of ``y[1:]``. With ``T(n, k, m)`` = the number of points of ``P(n, k)`` whose
first coordinate has magnitude ``< m`` (``T(n, k, 0) = 0``, ``T(n, k, 1) = N(n-1, k)``,
``T(n, k, m+1) = T(n, k, m) + 2 N(n-1, k-m)``)::

    rank(y) = sum_j  T(D-j, k_j, |y_j|) + [y_j < 0] * N(D-j-1, k_j - |y_j|),
    k_0 = K, k_{j+1} = k_j - |y_j|.

Unranking walks the coordinates the same way (the decode kernels scan magnitudes ``0, 1, ...``
with the count table ``N``). The exact functions here use Python integers (any size); the batched
ones use int64 and need ``N(D, K) < 2^63``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

import torch

__all__ = [
    "MAX_CODE_BITS",
    "PVQParams",
    "code_bits",
    "count_table",
    "cumulative_table",
    "pyramid_points",
    "pyramid_size",
    "rank",
    "rank_batch",
    "reconstruct",
    "unrank",
    "unrank_batch",
]

# Codes (index and amplitude level in one integer, see PVQParams) must fit a signed 64-bit
# integer, so that batched enumeration runs in torch int64 and the kernels in uint64.
MAX_CODE_BITS = 63


# ---------------------------------------------------------------------------------------------
# Counting and enumeration


@cache
def _count(dim: int, pulses: int) -> int:
    if pulses == 0:
        return 1
    if dim == 0:
        return 0
    # Iterative over k to keep the recursion depth at dim.
    row_prev = [_count(dim - 1, k) for k in range(pulses + 1)]
    value = 1  # N(dim, 0)
    for k in range(1, pulses + 1):
        value = row_prev[k] + row_prev[k - 1] + value
    return value


def pyramid_size(dim: int, pulses: int) -> int:
    """``N(D, K)``: how many integer points of dimension ``D`` have ``sum |y_i| = K`` (exact)."""
    if dim < 0 or pulses < 0:
        raise ValueError(f"dim and pulses must be >= 0, got dim={dim}, pulses={pulses}")
    return _count(dim, pulses)


def count_table(dim: int, pulses: int) -> list[list[int]]:
    """``N(n, k)`` for ``0 <= n <= dim``, ``0 <= k <= pulses`` as nested Python-int lists."""
    return [[pyramid_size(n, k) for k in range(pulses + 1)] for n in range(dim + 1)]


def code_bits(dim: int, pulses: int, levels: int = 1) -> int:
    """Bits of a code holding one of ``N(D, K) * levels`` values: ``ceil(log2(N * levels))``."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    return (pyramid_size(dim, pulses) * levels - 1).bit_length()


def _check_point(y: list[int], pulses: int | None) -> int:
    total = sum(abs(v) for v in y)
    if pulses is not None and total != pulses:
        raise ValueError(f"point {y} has {total} pulses, expected {pulses}")
    return total


def rank(y: list[int] | tuple[int, ...], pulses: int | None = None) -> int:
    """The enumeration index of pyramid point ``y`` (exact, any size; see the module doc)."""
    y = [int(v) for v in y]
    k = _check_point(y, pulses)
    d = len(y)
    index = 0
    for j, v in enumerate(y):
        n = d - j
        m = abs(v)
        if m:
            # Points whose coordinate j has a smaller magnitude come first, and +m before -m.
            index += pyramid_size(n - 1, k)
            index += 2 * sum(pyramid_size(n - 1, k - mag) for mag in range(1, m))
            if v < 0:
                index += pyramid_size(n - 1, k - m)
        k -= m
    return index


def unrank(index: int, dim: int, pulses: int) -> list[int]:
    """The pyramid point of enumeration index ``index`` in ``P(dim, pulses)`` (exact)."""
    total = pyramid_size(dim, pulses)
    if not 0 <= index < total:
        raise ValueError(f"index {index} out of range [0, {total}) for P({dim}, {pulses})")
    y = []
    k = pulses
    for j in range(dim):
        n = dim - j
        c = pyramid_size(n - 1, k)
        if index < c:
            y.append(0)
            continue
        index -= c
        m = 1
        while True:
            c = pyramid_size(n - 1, k - m)
            if index < 2 * c:
                break
            index -= 2 * c
            m += 1
        if index < c:
            y.append(m)
        else:
            y.append(-m)
            index -= c
        k -= m
    return y


def pyramid_points(dim: int, pulses: int) -> list[list[int]]:
    """Every point of ``P(dim, pulses)`` by brute force, sorted in enumeration order (small only:
    the tests' oracle)."""
    if pyramid_size(dim, pulses) > 1_000_000:
        raise ValueError(f"P({dim}, {pulses}) is too large to list")

    def order(v: int) -> int:  # 0, +1, -1, +2, -2, ...
        return 2 * abs(v) - (1 if v > 0 else 0) if v else 0

    points: list[list[int]] = []

    def extend(prefix: list[int], left: int, k: int) -> None:
        if left == 0:
            if k == 0:
                points.append(list(prefix))
            return
        for v in sorted(range(-k, k + 1), key=order):
            extend([*prefix, v], left - 1, k - abs(v))

    extend([], dim, pulses)
    return points


def _int64_table(dim: int, pulses: int) -> torch.Tensor:
    table = count_table(dim, pulses)
    if table[dim][pulses] >= 1 << MAX_CODE_BITS:
        raise ValueError(
            f"N({dim}, {pulses}) = {table[dim][pulses]} does not fit int64; batched enumeration "
            f"needs N < 2^{MAX_CODE_BITS} (use the exact rank/unrank for larger pyramids)"
        )
    return torch.tensor(table, dtype=torch.int64)


@lru_cache(maxsize=64)
def cumulative_table(dim: int, pulses: int) -> torch.Tensor:
    """int64 ``[dim + 1, pulses + 1, pulses + 2]``: ``T(n, k, m)`` of the module doc (``m`` up to
    ``k + 1``; entries past ``k + 1`` repeat ``N(n, k)``)."""
    counts = _int64_table(dim, pulses)
    t = torch.zeros(dim + 1, pulses + 1, pulses + 2, dtype=torch.int64)
    for n in range(1, dim + 1):
        for k in range(pulses + 1):
            acc = counts[n - 1, k].item()
            t[n, k, 1] = acc
            for m in range(1, pulses + 1):
                if m <= k:
                    acc += 2 * counts[n - 1, k - m].item()
                t[n, k, m + 1] = acc
    return t


def rank_batch(y: torch.Tensor, pulses: int) -> torch.Tensor:
    """Enumeration indices of points ``y`` (integer ``[B, D]``, each row with ``sum |y| = pulses``)
    as int64 ``[B]`` (needs ``N(D, K) < 2^63``)."""
    if y.dim() != 2 or y.dtype.is_floating_point:
        raise ValueError(f"y must be an integer [B, D] tensor, got {y.dtype} {tuple(y.shape)}")
    b, d = y.shape
    yl = y.to(torch.int64).cpu()
    if b and not bool((yl.abs().sum(1) == pulses).all()):
        raise ValueError(f"every point must have exactly {pulses} pulses")
    t = cumulative_table(d, pulses)
    counts = _int64_table(d, pulses)
    index = torch.zeros(b, dtype=torch.int64)
    k = torch.full((b,), pulses, dtype=torch.int64)
    for j in range(d):
        n = d - j
        m = yl[:, j].abs()
        index += t[n][k, m]
        neg = yl[:, j] < 0
        index += torch.where(neg, counts[n - 1][k - m], torch.zeros_like(index))
        k -= m
    return index.to(y.device)


def unrank_batch(index: torch.Tensor, dim: int, pulses: int) -> torch.Tensor:
    """Pyramid points of int64 indices ``[B]`` as int16 ``[B, dim]`` (inverse of
    :func:`rank_batch`). Indices outside ``[0, N(dim, pulses))`` raise ``ValueError``."""
    if index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(f"index must be int64 [B], got {index.dtype} {tuple(index.shape)}")
    t = cumulative_table(dim, pulses).to(index.device)
    counts = _int64_table(dim, pulses).to(index.device)
    total = int(counts[dim, pulses])
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= total):
        raise ValueError(
            f"indices must lie in [0, {total}) for P({dim}, {pulses}), got "
            f"[{int(index.min())}, {int(index.max())}]"
        )
    b = index.shape[0]
    i = index.clone()
    k = torch.full((b,), pulses, dtype=torch.int64, device=index.device)
    y = torch.empty(b, dim, dtype=torch.int16, device=index.device)
    mags = torch.arange(1, pulses + 1, device=index.device)
    for j in range(dim):
        n = dim - j
        rows = t[n][k]  # [B, pulses + 2]: T(n, k, m) for m = 0 .. pulses + 1
        # Magnitude = how many of the thresholds T(n, k, 1..k) lie at or below the index.
        below = (rows[:, 1 : pulses + 1] <= i.unsqueeze(1)) & (mags.unsqueeze(0) <= k.unsqueeze(1))
        m = below.sum(1)
        i = i - rows.gather(1, m.unsqueeze(1)).squeeze(1)
        c = counts[n - 1][k - m]
        neg = (m > 0) & (i >= c)
        i = torch.where(neg, i - c, i)
        y[:, j] = torch.where(neg, -m, m).to(torch.int16)
        k = k - m
    return y


# ---------------------------------------------------------------------------------------------
# The encoding


@dataclass(frozen=True)
class PVQParams:
    """One PVQ encoding.

    Attributes:
        dim: ``D``, weights per vector (consecutive input columns of a row; must divide ``K``).
        pulses: ``K``, pulses per vector.
        levels: ``L``, amplitude levels shared by the layer.

    A vector's code is ``c = level * N(D, K) + index`` in ``ceil(log2(N(D, K) * L))`` bits
    (:attr:`code_bits`): the direction index and the amplitude share one field, so the fraction of
    a bit that ``ceil(log2 N)`` would waste pays for more amplitude levels.
    """

    dim: int
    pulses: int
    levels: int

    def __post_init__(self) -> None:
        if not 2 <= self.dim <= 64:
            raise ValueError(f"dim must be in [2, 64], got {self.dim}")
        if not 1 <= self.pulses <= 255:
            raise ValueError(f"pulses must be in [1, 255], got {self.pulses}")
        if not 1 <= self.levels <= 1 << 16:
            raise ValueError(f"levels must be in [1, 65536], got {self.levels}")
        if self.code_bits > MAX_CODE_BITS:
            raise ValueError(
                f"PVQ(D={self.dim}, K={self.pulses}, L={self.levels}) needs {self.code_bits}-bit "
                f"codes; at most {MAX_CODE_BITS} are supported (use a smaller D or K)"
            )

    @property
    def size(self) -> int:
        """``N(D, K)``."""
        return pyramid_size(self.dim, self.pulses)

    @property
    def code_bits(self) -> int:
        return code_bits(self.dim, self.pulses, self.levels)

    @classmethod
    def max_levels(cls, dim: int, pulses: int, bits: int) -> int:
        """The most levels a ``bits``-bit code holds beside the direction index (0 if none)."""
        return min((1 << bits) // pyramid_size(dim, pulses), 1 << 16)


def reconstruct(
    points: torch.Tensor,
    gain_codes: torch.Tensor,
    row_scales: torch.Tensor,
    levels: torch.Tensor,
    params: PVQParams,
) -> torch.Tensor:
    """fp32 ``[N, K]`` rotated weight from its parts (layout of
    :class:`quantlab.formats.pvq.PVQResult`)."""
    n, k = points.shape
    d = params.dim
    y = points.to(torch.float32).view(n, k // d, d)
    # The decode arithmetic of the packed format, which the kernels reproduce bit for bit: fp32
    # multiply and division, and a correctly rounded fp32 square root (torch's fp32 sqrt on CPU
    # can be an ulp off; the fp64 root rounded to fp32 is exact).
    g = row_scales.to(torch.float32).view(n, 1) * levels.to(torch.float32)[gain_codes]
    r = g / torch.sqrt((y * y).sum(-1).to(torch.float64)).to(torch.float32)
    return (y * r.unsqueeze(-1)).view(n, k)
