"""Pure-PyTorch reference implementations of the groupwise integer ops.

These functions are the specification of the ops on the packed layout (docs/formats.md; the
layout itself, one little-endian int32 bitstream per output row for ``qweight`` and ``qzeros``,
is :mod:`quantlab.formats.bitstream`). They are written for reading, compute in fp32, and serve
three roles: the CPU/CUDA fallback when the compiled extension is absent, the oracle that kernel
tests compare against, and the documentation of the arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch

from quantlab.formats.bitstream import unpack_bitstream
from quantlab.formats.groupwise_int import check_bits

__all__ = [
    "groupwise_int_dequant",
    "groupwise_int_grouped_mm",
    "groupwise_int_mm",
    "per_expert",
]


def _group_count(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


def groupwise_int_dequant(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dequantize a groupwise integer weight.

    Args:
        qweight: int32 ``[N, packed_words(K, bits)]``, one bitstream per output row.
        scales: float ``[N, G]`` with ``G = K // group_size`` (``1`` when ``group_size == -1``).
        qzeros: int32 ``[N, packed_words(G, bits)]``, or ``None`` for symmetric weights
            (zero point ``2**(bits-1)``).
        bits: weight bit width.
        group_size: input columns per group, or ``-1`` for one group per row.
        in_features: ``K``.
        out_dtype: dtype of the result (default ``scales.dtype``).

    Returns:
        ``[N, K]`` tensor ``(q - z) * s`` computed in fp32 and cast to ``out_dtype``.
    """
    n_groups = _group_count(in_features, group_size)
    gsize = in_features if group_size == -1 else group_size
    check_bits(bits)  # the format's widths (the bitstream itself takes any width up to 32)
    q = unpack_bitstream(qweight, bits, in_features).to(torch.float32)
    if qzeros is None:
        z = torch.full((q.shape[0], n_groups), float(1 << (bits - 1)), device=q.device)
    else:
        z = unpack_bitstream(qzeros, bits, n_groups).to(torch.float32)
    s = scales.to(torch.float32)
    w = (q.view(q.shape[0], n_groups, gsize) - z.unsqueeze(-1)) * s.unsqueeze(-1)
    return w.reshape(q.shape[0], in_features).to(out_dtype or scales.dtype)


def groupwise_int_mm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x @ dequant(W).T`` with fp32 accumulation.

    Args:
        x: ``[M, K]`` activations (fp32, fp16 or bf16).
        qweight, scales, qzeros, bits, group_size: as in :func:`groupwise_int_dequant`.

    Returns:
        ``[M, N]`` in ``x.dtype``.
    """
    w = groupwise_int_dequant(qweight, scales, qzeros, bits, group_size, x.shape[-1], torch.float32)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)


def groupwise_int_grouped_mm(
    x: torch.Tensor,
    offsets: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Every expert's rows through its own weight: rows ``offsets[e] .. offsets[e + 1]`` of ``x``
    times expert ``e``'s ``dequant(W).T`` (a mixture's routed tokens, sorted by expert).

    Args:
        x: ``[R, K]`` activations (fp32, fp16 or bf16).
        offsets: int64 ``[E + 1]``, ``offsets[0] = 0``, nondecreasing, ``offsets[E] = R``.
        qweight, scales, qzeros: the E experts' tensors of :func:`groupwise_int_dequant` stacked
            along a first dimension (``[E, N, ...]``; ``qzeros`` ``None`` for symmetric weights).
        bits, group_size: as in :func:`groupwise_int_dequant`, shared by every expert.

    Returns:
        ``[R, N]`` in ``x.dtype``: per expert, :func:`groupwise_int_mm` of its rows.
    """
    return per_expert(
        x, offsets, qweight, scales, qzeros,
        lambda rows, q, sc, z: groupwise_int_mm(rows, q, sc, z, bits, group_size),
    )  # fmt: skip


def per_expert(
    x: torch.Tensor,
    offsets: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    matmul: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """``matmul(rows, qweight[e], scales[e], qzeros[e])`` for each expert ``e`` with rows, written
    into one ``[R, N]`` result in ``x.dtype`` (the loop of :func:`groupwise_int_grouped_mm`, shared
    with the ops' torch path)."""
    out = x.new_empty((x.shape[0], qweight.shape[1]))
    for e, (first, end) in enumerate(pairwise(int(v) for v in offsets.tolist())):
        if end > first:
            zeros = None if qzeros is None else qzeros[e]
            out[first:end] = matmul(x[first:end], qweight[e], scales[e], zeros)
    return out
