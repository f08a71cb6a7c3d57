"""Pure-PyTorch reference of the PVQ ops: the specification of the packed layout.

Layout (docs/formats.md, "PVQ"): a weight ``W' [N, K]`` (rotated space) is ``N * K / D`` vectors
of ``D`` consecutive columns, vector ``v`` of row ``n`` being number ``j = n * (K / D) + v``. Its
``F``-bit code ``c_j`` (``F = ceil(log2(N(D, P) * L))``, ``P`` pulses, ``L`` amplitude levels)
occupies bits ``[j * F, (j + 1) * F)`` of one little-endian bitstream over the whole layer: stream
bit ``t`` is bit ``t mod 32`` of int32 word ``t div 32`` (the bit pattern counts, not the sign).
Unused high bits of the last word are zero.

Decoding code ``c`` of row ``n``::

    level = c div N(D, P),  index = c mod N(D, P)
    y     = unrank(index)                       # pyramid point, sum |y| = P (quantlab.solvers.pvq)
    g     = f32(row_scales[n]) * f32(levels[level])
    r     = g / sqrt(f32(sum y^2))              # fp32 multiply, sqrt and division, IEEE
    w'    = f32(y) * r

(the arithmetic is :func:`quantlab.solvers.pvq.reconstruct`, shared with the solver, so a packed
layer reproduces the solver's weight exactly).

Kernels reproduce this decode bit for bit (same fp32 operations in the same order); their
matmuls differ from :func:`pvq_mm` only by accumulation order.
"""

from __future__ import annotations

import torch

from quantlab.solvers.pvq import (
    MAX_CODE_BITS,
    PVQParams,
    pyramid_size,
    reconstruct,
    unrank_batch,
)

__all__ = [
    "decode_codes",
    "field_words",
    "pack_fields",
    "pvq_decode",
    "pvq_mm",
    "unpack_fields",
]


def field_words(n_fields: int, width: int) -> int:
    """int32 words holding ``n_fields`` fields of ``width`` bits back to back."""
    return (n_fields * width + 31) // 32


def _check_width(width: int) -> None:
    if not 1 <= width <= MAX_CODE_BITS:
        raise ValueError(f"field width must be in [1, {MAX_CODE_BITS}] bits, got {width}")


def pack_fields(values: torch.Tensor, width: int) -> torch.Tensor:
    """Pack non-negative integers (any shape, flattened in order) into one bitstream.

    Args:
        values: integer tensor, entries in ``[0, 2**width)``.
        width: bits per field, 1..63.

    Returns:
        int32 ``[field_words(values.numel(), width)]``.
    """
    _check_width(width)
    if values.dtype.is_floating_point:
        raise TypeError(f"pack_fields expects an integer tensor, got {values.dtype}")
    v = values.reshape(-1).to(torch.int64).cpu()
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << width)):
        raise ValueError(
            f"values out of range for {width}-bit fields: [{int(v.min())}, {int(v.max())}]"
        )
    n_words = field_words(v.numel(), width)
    shifts = torch.arange(width, dtype=torch.int64)
    bits = ((v.unsqueeze(1) >> shifts) & 1).reshape(-1)  # stream bits in order
    stream = torch.zeros(n_words * 32, dtype=torch.int64)
    stream[: bits.numel()] = bits
    words = (stream.view(n_words, 32) << torch.arange(32, dtype=torch.int64)).sum(1)
    # Reinterpret the uint32 bit patterns as int32.
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_fields(words: torch.Tensor, width: int, n_fields: int) -> torch.Tensor:
    """Inverse of :func:`pack_fields`: int64 ``[n_fields]``."""
    _check_width(width)
    if words.dtype != torch.int32 or words.dim() != 1:
        raise TypeError(f"packed fields must be 1-D int32, got {words.dtype} {tuple(words.shape)}")
    need = field_words(n_fields, width)
    if words.numel() != need:
        raise ValueError(
            f"bitstream has {words.numel()} words, expected {need} for {n_fields} "
            f"{width}-bit fields"
        )
    u = words.to(torch.int64) & 0xFFFFFFFF
    bits = ((u.unsqueeze(1) >> torch.arange(32, device=u.device)) & 1).reshape(-1)
    fields = bits[: n_fields * width].view(n_fields, width)
    return (fields << torch.arange(width, device=u.device)).sum(1)


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


def decode_codes(
    codes: torch.Tensor, n_codes: int, dim: int, pulses: int, n_levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack a code stream into (pyramid points int16 ``[n_codes, dim]``, levels int64
    ``[n_codes]``); raises ``ValueError`` on a code that no (level, index) pair has."""
    size = pyramid_size(dim, pulses)
    bits = (size * n_levels - 1).bit_length()
    c = unpack_fields(codes, bits, n_codes)
    if c.numel() and int(c.max()) >= size * n_levels:
        raise ValueError(
            f"pvq: corrupt code {int(c.max())} >= N({dim}, {pulses}) * {n_levels} levels"
        )
    level = torch.div(c, size, rounding_mode="floor")
    return unrank_batch(c - level * size, dim, pulses), level


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

    ``x`` must already be in the rotated space (``quantlab.rotation.rotate``).
    """
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"pvq_mm: x must be a float [M, K] tensor, got {x.dtype} {tuple(x.shape)}")
    w = pvq_decode(codes, row_scales, levels, dim, pulses, x.shape[1]).to(x.device)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)
