"""Pure-PyTorch reference of the PVQ ops: the specification of the decode on the packed layout.

Layout (docs/formats.md, "PVQ"; owned by :mod:`quantlab.formats.pvq`): a weight ``W' [N, K]``
(rotated space) is ``N * K / D`` vectors of ``D`` consecutive columns, vector ``v`` of row ``n``
being number ``j = n * (K / D) + v``. Its ``F``-bit code ``c_j`` (``F = ceil(log2(N(D, P) * L))``,
``P`` pulses, ``L`` amplitude levels) occupies bits ``[j * F, (j + 1) * F)`` of one little-endian
bitstream over the whole layer (:mod:`quantlab.formats.bitstream`): stream bit ``t`` is bit
``t mod 32`` of int32 word ``t div 32`` (the bit pattern counts, not the sign). Unused high bits
of the last word are zero.

Decoding code ``c`` of row ``n``::

    level = c div N(D, P),  index = c mod N(D, P)
    y     = unrank(index)                       # pyramid point, sum |y| = P (formats.pvq_codebook)
    g     = f32(row_scales[n]) * f32(levels[level])
    r     = g / sqrt(f32(sum y^2))              # fp32 multiply, sqrt and division, IEEE
    w'    = f32(y) * r

(the arithmetic is :func:`quantlab.formats.pvq_codebook.reconstruct`, shared with the solver, so
a packed layer reproduces the solver's weight exactly).

Kernels reproduce this decode bit for bit (same fp32 operations in the same order); their
matmuls differ from :func:`pvq_mm` only by accumulation order.
"""

from __future__ import annotations

import torch

from quantlab.formats.bitstream import field_words
from quantlab.formats.pvq import decode_codes
from quantlab.formats.pvq_codebook import (
    MAX_CODE_BITS,
    PVQParams,
    pyramid_size,
    reconstruct,
)

__all__ = [
    "pvq_decode",
    "pvq_mm",
]


def _check_packed(
    codes: torch.Tensor,
    row_scales: torch.Tensor,
    levels: torch.Tensor,
    dim: int,
    pulses: int,
    in_features: int,
) -> tuple[int, int, int]:
    """Validate the packed tensors; return ``(out_features, vectors per row, code bits)``."""
    if dim < 1 or pulses < 1 or in_features < 1 or in_features % dim:
        raise ValueError(
            f"pvq: dim {dim} must divide in_features {in_features} (pulses {pulses} >= 1)"
        )
    if row_scales.dim() != 1 or not row_scales.dtype.is_floating_point:
        raise ValueError(
            f"pvq: row_scales must be a float [N] tensor, got {tuple(row_scales.shape)}"
        )
    if levels.dim() != 1 or levels.numel() < 1 or not levels.dtype.is_floating_point:
        raise ValueError(f"pvq: levels must be a float [L] tensor, got {tuple(levels.shape)}")
    size = pyramid_size(dim, pulses)
    bits = (size * levels.numel() - 1).bit_length()
    if bits > MAX_CODE_BITS:
        raise ValueError(f"pvq: codes of {bits} bits exceed the {MAX_CODE_BITS}-bit limit")
    n = row_scales.shape[0]
    per_row = in_features // dim
    need = field_words(n * per_row, bits)
    if codes.dtype != torch.int32 or codes.dim() != 1 or codes.numel() != need:
        raise ValueError(
            f"pvq: codes must be int32 [{need}] for {n} x {per_row} {bits}-bit codes, got "
            f"{codes.dtype} {tuple(codes.shape)}"
        )
    return n, per_row, bits


def pvq_decode(
    codes: torch.Tensor,
    row_scales: torch.Tensor,
    levels: torch.Tensor,
    dim: int,
    pulses: int,
    in_features: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense rotated weight ``W' [N, in_features]`` in ``out_dtype`` (decode of the module
    doc, in fp32, then cast)."""
    n, per_row, _ = _check_packed(codes, row_scales, levels, dim, pulses, in_features)
    y, level = decode_codes(codes.cpu(), n * per_row, dim, pulses, levels.numel())
    w = reconstruct(
        y.view(n, in_features),
        level.view(n, per_row),
        row_scales.detach().cpu(),
        levels.detach().cpu(),
        PVQParams(dim, pulses, levels.numel()),
    )
    return w.to(device=codes.device, dtype=out_dtype)


def pvq_mm(
    x: torch.Tensor,
    codes: torch.Tensor,
    row_scales: torch.Tensor,
    levels: torch.Tensor,
    dim: int,
    pulses: int,
) -> torch.Tensor:
    """``x [M, K] @ W'^T`` -> ``[M, N]`` in ``x``'s dtype (fp32 accumulation).

    ``x`` must already be in the rotated space (``quantlab.transforms.rotation.rotate``).
    """
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"pvq_mm: x must be a float [M, K] tensor, got {x.dtype} {tuple(x.shape)}")
    w = pvq_decode(codes, row_scales, levels, dim, pulses, x.shape[1]).to(x.device)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)
