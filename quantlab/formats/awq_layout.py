"""Conversion between quantlab's unpacked groupwise integers and AutoAWQ "GEMM" tensors.

The layout transformers, vLLM (``quant_method="awq"``, ``version="gemm"``) and AutoAWQ read, per
linear with ``N`` outputs, ``K`` inputs and ``G = K / group_size`` groups (4-bit only):

- ``qweight`` int32 ``[K, N / 8]``: the integer matrix is transposed to ``[K, N]`` and every 8
  consecutive output columns ``c0..c7`` share one word, nibble ``i`` (bits ``4i..4i+3``) holding
  column ``AWQ_ORDER[i]`` with ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (the interleave lets the
  GPU kernel turn a word into fp16 pairs with a few shifts).
- ``qzeros`` int32 ``[G, N / 8]``: the zero points ``[G, N]`` packed the same way, stored as they
  are (no ``- 1`` as in GPTQ v1).
- ``scales`` fp16 ``[G, N]``.
- dequantization: ``w[n, k] = (q[k, n] - z[g, n]) * s[g, n]``, ``g = k // group_size``.

Symmetric weights are written with an explicit zero of 8 and ``zero_point: true``; per-channel
(``group_size = -1``) has no AWQ encoding (its ``group_size`` is global) and is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from quantlab.formats.tensor_layout import (
    explicit_zeros,
    packed_int32_tensors,
    scales_to_store,
    zeros_to_store,
)

__all__ = [
    "AWQ_BITS",
    "AWQ_ORDER",
    "awq_quantization_config",
    "from_awq_tensors",
    "pack_awq_columns",
    "to_awq_tensors",
    "unpack_awq_columns",
]

AWQ_BITS = 4
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_PACK = 32 // AWQ_BITS


def pack_awq_columns(values: torch.Tensor) -> torch.Tensor:
    """Pack int ``[R, C]`` 4-bit values (``C % 8 == 0``) into int32 ``[R, C / 8]`` in AWQ order."""
    r, c = values.shape
    if c % _PACK != 0:
        raise ValueError(f"AWQ packs 8 columns per int32; width {c} is not a multiple of 8")
    v = values.to(torch.int64).view(r, c // _PACK, _PACK)
    word = torch.zeros(r, c // _PACK, dtype=torch.int64, device=values.device)
    for nibble, column in enumerate(AWQ_ORDER):
        word |= v[:, :, column] << (AWQ_BITS * nibble)
    # Reinterpret the unsigned 32-bit pattern as int32 (the top nibble may set the sign bit).
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_awq_columns(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq_columns`: int32 ``[R, W]`` -> int32 ``[R, 8 W]``, values 0..15."""
    r, w = words.shape
    u = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(r, w, _PACK, dtype=torch.int32, device=words.device)
    for nibble, column in enumerate(AWQ_ORDER):
        out[:, :, column] = ((u >> (AWQ_BITS * nibble)) & 0xF).to(torch.int32)
    return out.view(r, w * _PACK)


def _check_encoding(bits: int, group_size: int, in_features: int, out_features: int) -> int:
    if bits != AWQ_BITS:
        raise ValueError(
            f"the AWQ GEMM layout stores only 4-bit weights, got bits={bits}; export {bits}-bit "
            "models in quantlab's own layout (--format quantlab)"
        )
    if group_size == -1:
        raise ValueError(
            "the AWQ layout has no per-channel encoding (group_size -1); use 32, 64 or 128"
        )
    if group_size <= 0 or in_features % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    if out_features % _PACK != 0:
        raise ValueError(
            f"AWQ packs 8 output columns per int32; out_features {out_features} is not a "
            "multiple of 8"
        )
    return in_features // group_size


def to_awq_tensors(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> dict[str, torch.Tensor]:
    """Pack one linear's groupwise integers into AWQ GEMM tensors.

    Args:
        q: int ``[N, K]`` in ``[0, 16)``.
        scales: float ``[N, G]``.
        zeros: int ``[N, G]`` in ``[0, 16)``, or ``None`` for symmetric (written as 8).

    Returns:
        ``{"qweight": int32 [K, N/8], "qzeros": int32 [G, N/8], "scales": fp16 [G, N]}``.
    """
    if q.dim() != 2 or q.dtype.is_floating_point:
        raise ValueError(f"q must be a 2-D integer [N, K] tensor, got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    g = _check_encoding(bits, group_size, k, n)
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"q values must lie in [0, 15], got [{int(q.min())}, {int(q.max())}]")
    stored_scales = scales_to_store(scales, n, g, torch.float16, "AWQ")
    z = zeros_to_store(zeros, n, g, bits, q.device)
    return {
        "qweight": pack_awq_columns(q.t().contiguous()),
        "qzeros": pack_awq_columns(z.t().contiguous()),
        "scales": stored_scales,
    }


def from_awq_tensors(
    tensors: Mapping[str, torch.Tensor], bits: int, group_size: int, *, sym: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unpack one linear's AWQ GEMM tensors (inverse of :func:`to_awq_tensors`).

    Returns:
        ``(q int32 [N, K], scales fp32 [N, G], zeros int32 [N, G] or None)``; ``sym=True``
        checks that every zero is 8 and returns ``None``.
    """
    qweight, qzeros, scales = packed_int32_tensors(tensors, "AWQ")
    k, words = qweight.shape
    n = words * _PACK
    g = _check_encoding(bits, group_size, k, n)
    if tuple(qzeros.shape) != (g, words):
        raise ValueError(f"qzeros must be [G, N/8] = [{g}, {words}], got {tuple(qzeros.shape)}")
    if tuple(scales.shape) != (g, n) or not scales.dtype.is_floating_point:
        raise ValueError(
            f"scales must be float [G, N] = [{g}, {n}], got {scales.dtype} {tuple(scales.shape)}"
        )
    q = unpack_awq_columns(qweight).t().contiguous()
    zeros = explicit_zeros(unpack_awq_columns(qzeros).t().contiguous(), bits, sym)
    return q, scales.t().to(torch.float32).contiguous(), zeros


def awq_quantization_config(
    bits: int, group_size: int, modules_to_not_convert: list[str] | None = None
) -> dict[str, Any]:
    """``quantization_config`` of an AWQ GEMM export (keys of AutoAWQ's ``to_transformers_dict``,
    read by transformers' ``AwqConfig`` and vLLM's ``AWQConfig``)."""
    _check_encoding(bits, group_size, group_size, _PACK)
    return {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": modules_to_not_convert,
    }
