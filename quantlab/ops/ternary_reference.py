"""Pure-PyTorch reference of the ternary ops: the specification the kernels are tested against.

The layouts they read (i2, tq1, and the CPU kernel's LUT layout of weights and scales) are
:mod:`quantlab.formats.ternary_packing` (docs/formats.md, section "Ternary", describes the same
layouts in prose). A ternary weight is ``W[n, k] = s * t[n, k]`` with ``t`` in ``{-1, 0, +1}``
and ``s`` one float per tensor, per output row, or per group of ``group_size`` input columns.

Activations are quantized per token to int8 exactly as BitNet b1.58 does (W1.58A8): ``inv = 127 /
max(max_k |x[m, k]|, 1e-5)``, ``xq = clamp(round(x * inv), -128, 127)`` (round half to even, fp32;
``inv`` is evaluated as PyTorch evaluates BitNet's ``127 / amax``: ``fp32(1 / amax) * 127``, two
roundings, so the int8 activations match transformers' BitNet layers bit for bit).
The matmul then is, with exact integer group sums ``acc[m, n, g] = sum_{k in g} t[n, k] xq[m, k]``,

    ``y[m, n] = (sum_g acc[m, n, g] * s[n, g]) / inv[m]``.

Every function here computes that in float64 from the exact integers, so it is also the oracle.
"""

from __future__ import annotations

import torch

from quantlab.formats.ternary_packing import (
    lut_unpack,
    lut_unpack_scales,
    scale_shape,
    unpack_trits,
)

__all__ = [
    "ACT_CLAMP_MIN",
    "quantize_activations",
    "ternary_dequant",
    "ternary_lut_mm",
    "ternary_mm",
]

# BitNet's clamp of the activation absmax (transformers' BitLinear / ActQuant, bitnet.cpp).
ACT_CLAMP_MIN = 1e-5


def _expand_scales(
    scales: torch.Tensor, out_features: int, in_features: int, group_size: int
) -> torch.Tensor:
    """Scales ``[1|N, 1|G]`` -> per-weight float64 ``[N, K]`` (checked against the granularity)."""
    want = scale_shape(out_features, in_features, group_size)
    if tuple(scales.shape) != want:
        raise ValueError(
            f"scales must be {list(want)} for a [{out_features}, {in_features}] weight with "
            f"group_size {group_size}, got {list(scales.shape)}"
        )
    s = scales.to(torch.float64)
    g = in_features // s.shape[1]
    return s.repeat_interleave(g, dim=1).expand(out_features, in_features)


def ternary_dequant(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    packing: str,
    in_features: int,
    group_size: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense ``[N, K]`` weight ``s * t`` in ``out_dtype`` (exact in fp32: ``t`` is a sign or 0)."""
    t = unpack_trits(qweight, packing, in_features)
    s = _expand_scales(scales, t.shape[0], in_features, group_size)
    return (t.to(torch.float64) * s).to(out_dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet's per-token int8 absmax quantization.

    Args:
        x: float ``[M, K]``.

    Returns:
        ``xq`` int8 ``[M, K]`` and ``inv`` fp32 ``[M]`` with ``x ~= xq / inv``.
    """
    x32 = x.to(torch.float32)
    # reciprocal() * 127 is how torch evaluates ``127 / amax`` (transformers' BitLinear).
    inv = x32.abs().amax(dim=-1).clamp(min=ACT_CLAMP_MIN).reciprocal() * 127.0
    xq = torch.round(x32 * inv.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return xq, inv


def _grouped_matmul(
    x: torch.Tensor, t: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``y = (sum_g acc_g * s_g) / inv`` in float64 from exact integer group sums."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    n, k = t.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns, the weight {k}")
    want = scale_shape(n, k, group_size)
    if tuple(scales.shape) != want:
        raise ValueError(
            f"scales must be {list(want)} for a [{n}, {k}] weight with group_size {group_size}, "
            f"got {list(scales.shape)}"
        )
    xq, inv = quantize_activations(x)
    groups = want[1]
    g = k // groups
    # Integer sums up to K * 127 are exact in float64.
    xg = xq.to(torch.float64).view(x.shape[0], groups, g).transpose(0, 1)  # [G, M, g]
    tg = t.to(torch.float64).view(n, groups, g).permute(1, 2, 0)  # [G, g, N]
    acc = torch.bmm(xg, tg)  # [G, M, N]
    s = scales.to(torch.float64).t().unsqueeze(1)  # [G, 1, 1|N]
    y = (acc * s).sum(0) / inv.to(torch.float64).unsqueeze(-1)
    return y.to(x.dtype)


def ternary_mm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    packing: str,
    in_features: int,
    group_size: int,
) -> torch.Tensor:
    """``A8(x) @ W.T`` -> ``[M, N]`` in ``x.dtype`` (the formula in the module docstring).

    Args:
        x: ``[M, K]`` fp32/fp16/bf16 activations.
        qweight: ``[N, row_bytes]`` uint8 in ``packing`` (i2 rows may be padded with more bytes).
        scales: ``[1, 1]``, ``[N, 1]`` or ``[N, K / group_size]`` float.
        group_size: ``PER_TENSOR`` (0), ``PER_ROW`` (-1) or the columns per scale group.
    """
    t = unpack_trits(qweight, packing, in_features)
    return _grouped_matmul(x, t, scales, group_size)


def ternary_lut_mm(
    x: torch.Tensor,
    lut: torch.Tensor,
    lut_scales: torch.Tensor,
    out_features: int,
    in_features: int,
    group_size: int,
) -> torch.Tensor:
    """:func:`ternary_mm` on the LUT layouts of the weight and scales: ``[M, N]`` in ``x.dtype``."""
    t = lut_unpack(lut, out_features, in_features)
    s = lut_unpack_scales(lut_scales, out_features, in_features, group_size)
    return _grouped_matmul(x, t, s, group_size)
