"""The ternary packings: how trits and their scales are laid out in bytes (docs/formats.md,
section "Ternary", describes the same layouts in prose; the reference of the ops on them is
``ops/ternary_reference.py``).

A ternary weight is ``W[n, k] = s * t[n, k]`` with ``t`` in ``{-1, 0, +1}`` (int8 here) and ``s``
one float per tensor, per output row, or per group of ``group_size`` input columns
(:func:`scale_shape`).

Layouts:

* **i2** (2 bits/trit): row-major, ``[N, ceil(K / 4)]`` uint8. Code ``c = t + 1`` in ``{0, 1, 2}``;
  column ``k`` sits in byte ``k // 4`` at bits ``2 * (k % 4)`` (least significant first). Columns
  past ``K`` hold code 1 (``t = 0``); code 3 is invalid. (The bit order of
  :mod:`quantlab.formats.bitstream`, but in uint8 bytes with every row starting on a byte, as the
  format stores it: a different word type, so its own packer.)
* **tq1** (1.6 bits/trit): ``[N, ceil(K / 5)]`` uint8, 5 trits per byte. With digits
  ``c_i = t[n, 5j + i] + 1`` the value ``v = sum_i c_i * 3**(4 - i)`` (first column most
  significant, ``v <= 242``) is stored as ``q = ceil(256 * v / 243)``, so digit ``i`` decodes with
  one multiply and a shift: ``c_i = (((q * 3**i) mod 256) * 3) >> 8``. Padding digits are 1.
* **lut** (the CPU kernel's layout, built at load time, never stored): see :func:`lut_pack`, and
  :func:`lut_pack_scales` for its scales.
"""

from __future__ import annotations

import torch

__all__ = [
    "LUT_TILE_ROWS",
    "PACKINGS",
    "PER_ROW",
    "PER_TENSOR",
    "TQ1_POWERS",
    "check_trits",
    "i2_row_bytes",
    "lut_pack",
    "lut_pack_scales",
    "lut_scale_shape",
    "lut_shape",
    "lut_unpack",
    "lut_unpack_scales",
    "pack_i2",
    "pack_tq1",
    "packed_row_bytes",
    "scale_shape",
    "tq1_row_bytes",
    "unpack_i2",
    "unpack_tq1",
    "unpack_trits",
]

PACKINGS = ("i2", "tq1")
# Scale granularities, as the ``group_size`` argument of every op: one scale per output row, one
# for the whole tensor, or (any positive value) one per group of that many input columns.
PER_ROW = -1
PER_TENSOR = 0
# 3**i: multiplying a tq1 byte by 3**i (mod 256) brings digit i to the top (see the docstring).
TQ1_POWERS = (1, 3, 9, 27, 81)
# Output rows per tile of the CPU LUT layout: 16 rows x 2 sign planes are the 32 bytes (one AVX2
# load) the kernel looks up per pair of quads.
LUT_TILE_ROWS = 16


def i2_row_bytes(in_features: int) -> int:
    return (in_features + 3) // 4


def tq1_row_bytes(in_features: int) -> int:
    return (in_features + 4) // 5


def packed_row_bytes(packing: str, in_features: int) -> int:
    """Bytes per output row of ``packing`` (``"i2"`` or ``"tq1"``) for ``in_features`` columns."""
    if packing == "i2":
        return i2_row_bytes(in_features)
    if packing == "tq1":
        return tq1_row_bytes(in_features)
    raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")


def scale_shape(out_features: int, in_features: int, group_size: int) -> tuple[int, int]:
    """Shape of the scales for a granularity: ``[1, 1]``, ``[N, 1]`` or ``[N, K / group_size]``."""
    if group_size == PER_TENSOR:
        return (1, 1)
    if group_size == PER_ROW:
        return (out_features, 1)
    if group_size < 0 or in_features % group_size != 0:
        raise ValueError(
            f"group_size must be {PER_ROW} (per row), {PER_TENSOR} (per tensor) or a positive "
            f"divisor of in_features {in_features}, got {group_size}"
        )
    return (out_features, in_features // group_size)


def check_trits(t: torch.Tensor, name: str = "trits") -> None:
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < -1 or int(t.max()) > 1):
        raise ValueError(
            f"{name} must hold values in {{-1, 0, 1}}, got range [{int(t.min())}, {int(t.max())}]"
        )


def _padded_codes(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Codes ``t + 1`` as int32 ``[N, ceil(K / multiple) * multiple]``, padded with code 1."""
    n, k = t.shape
    kp = -(-k // multiple) * multiple
    codes = torch.ones(n, kp, dtype=torch.int32, device=t.device)
    codes[:, :k] = t.to(torch.int32) + 1
    return codes


def pack_i2(t: torch.Tensor) -> torch.Tensor:
    """Trits ``[N, K]`` -> i2 bytes ``[N, ceil(K / 4)]`` (uint8)."""
    check_trits(t)
    codes = _padded_codes(t, 4).view(t.shape[0], -1, 4)
    shifts = torch.arange(4, device=t.device, dtype=torch.int32) * 2
    return (codes << shifts).sum(-1).to(torch.uint8)


def unpack_i2(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """i2 bytes ``[N, >= ceil(K / 4)]`` -> trits int8 ``[N, K]``; extra bytes per row are ignored.

    Raises ``ValueError`` on the invalid code 3 within the first ``K`` columns.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"i2 weights must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] < i2_row_bytes(in_features):
        raise ValueError(
            f"i2 weights need {i2_row_bytes(in_features)} bytes per row for {in_features} "
            f"columns, got {packed.shape[1]}"
        )
    b = packed[:, : i2_row_bytes(in_features)].to(torch.int32)
    shifts = torch.arange(4, device=packed.device, dtype=torch.int32) * 2
    codes = ((b.unsqueeze(-1) >> shifts) & 3).reshape(packed.shape[0], -1)[:, :in_features]
    if codes.numel() and bool((codes == 3).any()):
        bad = int((codes == 3).sum())
        raise ValueError(f"corrupt i2 weights: {bad} entries hold the invalid code 3")
    return (codes - 1).to(torch.int8)


def pack_tq1(t: torch.Tensor) -> torch.Tensor:
    """Trits ``[N, K]`` -> tq1 bytes ``[N, ceil(K / 5)]`` (uint8)."""
    check_trits(t)
    digits = _padded_codes(t, 5).view(t.shape[0], -1, 5)
    weights = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32, device=t.device)  # 3**(4 - i)
    v = (digits * weights).sum(-1)
    return ((v * 256 + 242) // 243).to(torch.uint8)  # ceil(256 v / 243)


def _tq1_digits(packed: torch.Tensor) -> torch.Tensor:
    q = packed.to(torch.int32).unsqueeze(-1)
    powers = torch.tensor(TQ1_POWERS, dtype=torch.int32, device=packed.device)
    return (((q * powers) & 0xFF) * 3) >> 8


def unpack_tq1(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """tq1 bytes ``[N, ceil(K / 5)]`` -> trits int8 ``[N, K]``.

    Raises ``ValueError`` on a byte that is not the canonical encoding of its digits (corruption:
    every canonical byte re-encodes to itself).
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"tq1 weights must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != tq1_row_bytes(in_features):
        raise ValueError(
            f"tq1 weights need {tq1_row_bytes(in_features)} bytes per row for {in_features} "
            f"columns, got {packed.shape[1]}"
        )
    digits = _tq1_digits(packed)
    weights = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32, device=packed.device)
    canonical = ((digits * weights).sum(-1) * 256 + 242) // 243
    bad = canonical != packed.to(torch.int32)
    if bad.numel() and bool(bad.any()):
        raise ValueError(f"corrupt tq1 weights: {int(bad.sum())} bytes are not valid trit codes")
    return (digits.reshape(packed.shape[0], -1)[:, :in_features] - 1).to(torch.int8)


def unpack_trits(qweight: torch.Tensor, packing: str, in_features: int) -> torch.Tensor:
    """Trits int8 ``[N, K]`` of a packed weight."""
    if packing == "i2":
        return unpack_i2(qweight, in_features)
    if packing == "tq1":
        return unpack_tq1(qweight, in_features)
    raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")


# ---------------------------------------------------------------------------------------------
# The CPU LUT kernel's layout.


def lut_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    """``[ceil(N / 16), ceil(K / 8), 32]``: 16-row tiles, 8-column pairs of quads, 32 bytes."""
    return (-(-out_features // LUT_TILE_ROWS), -(-in_features // 8), 32)


def lut_pack(t: torch.Tensor) -> torch.Tensor:
    """Trits ``[N, K]`` -> the CPU LUT kernel's layout, uint8 ``lut_shape(N, K)``.

    Each trit is split into two sign planes, ``t = (b1 + b0) / 2`` with ``b1 = +1`` iff ``t >= 0``
    and ``b0 = +1`` iff ``t > 0``. A *quad* is 4 consecutive columns ``4j .. 4j+3``; a plane's
    4-bit index over a quad has bit ``i`` set when the plane is ``+1`` at column ``4j + i``. The
    kernel looks both indices up in one 16-entry table of the quad's activations,
    ``T[p] = sum_i (bit_i(p) ? a_i : -a_i)``, and ``t . a = (T[p1] + T[p0]) / 2``.

    Byte ``b`` of the 32 bytes at ``[tile, pair]`` holds, for tile row ``i = b // 2`` (output row
    ``16 * tile + i``) and plane ``b % 2`` (0: ``b1``, 1: ``b0``), the index of quad ``2 * pair``
    in its low nibble and of quad ``2 * pair + 1`` in its high nibble. Rows past ``N`` and
    columns past ``K`` are ``t = 0`` (their activations are zero, so they add nothing).
    """
    check_trits(t)
    n, k = t.shape
    tiles, pairs, _ = lut_shape(n, k)
    full = torch.zeros(tiles * LUT_TILE_ROWS, pairs * 8, dtype=torch.int32, device=t.device)
    full[:n, :k] = t.to(torch.int32)
    b1 = (full >= 0).to(torch.int32)
    b0 = (full > 0).to(torch.int32)
    bitw = torch.tensor([1, 2, 4, 8], dtype=torch.int32, device=t.device)
    planes = torch.stack([b1, b0], dim=-1)  # [Np, Kp, 2]
    idx = (planes.view(tiles * LUT_TILE_ROWS, pairs * 2, 4, 2) * bitw.view(1, 1, 4, 1)).sum(2)
    idx = idx.view(tiles, LUT_TILE_ROWS, pairs, 2, 2)  # [tile, row, pair, quad-in-pair, plane]
    byte = idx[:, :, :, 0, :] | (idx[:, :, :, 1, :] << 4)  # [tile, row, pair, plane]
    return byte.permute(0, 2, 1, 3).reshape(tiles, pairs, 32).to(torch.uint8).contiguous()


def lut_unpack(lut: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`lut_pack`: trits int8 ``[N, K]``.

    Raises ``ValueError`` where the planes encode no trit (``b1 = -1`` with ``b0 = +1``).
    """
    want = lut_shape(out_features, in_features)
    if lut.dtype != torch.uint8 or tuple(lut.shape) != want:
        raise ValueError(
            f"LUT weights must be uint8 {list(want)}, got {lut.dtype} {list(lut.shape)}"
        )
    tiles, pairs, _ = want
    byte = lut.to(torch.int32).view(tiles, pairs, LUT_TILE_ROWS, 2).permute(0, 2, 1, 3)
    quads = torch.stack([byte & 0xF, byte >> 4], dim=3)  # [tile, row, pair, quad, plane]
    bits = (quads.unsqueeze(-1) >> torch.arange(4, device=lut.device)) & 1  # [..., plane, col]
    b1, b0 = bits[..., 0, :], bits[..., 1, :]
    if bool((b0 > b1).any()):
        raise ValueError("corrupt LUT weights: a plane pair encodes no trit")
    t = (b1 + b0 - 1).reshape(tiles * LUT_TILE_ROWS, pairs * 8)
    return t[:out_features, :in_features].to(torch.int8).contiguous()


def lut_scale_shape(out_features: int, in_features: int, group_size: int) -> tuple[int, int, int]:
    """Shape of the LUT kernel's scales: ``[1, 1, 1]`` per tensor, else ``[tiles, G, 16]``."""
    scale_shape(out_features, in_features, group_size)  # validates the granularity
    if group_size == PER_TENSOR:
        return (1, 1, 1)
    groups = 1 if group_size == PER_ROW else in_features // group_size
    return (-(-out_features // LUT_TILE_ROWS), groups, LUT_TILE_ROWS)


def lut_pack_scales(
    scales: torch.Tensor, out_features: int, in_features: int, group_size: int
) -> torch.Tensor:
    """Scales ``[1, 1]`` / ``[N, 1]`` / ``[N, G]`` -> the LUT kernel's fp32 layout
    (:func:`lut_scale_shape`): per 16-row tile, each group's 16 row scales contiguous, so a tile's
    sweep along K reads its scales sequentially. Rows past ``N`` get scale 0."""
    want = scale_shape(out_features, in_features, group_size)
    if tuple(scales.shape) != want:
        raise ValueError(f"scales must be {list(want)}, got {list(scales.shape)}")
    s = scales.to(torch.float32)
    if group_size == PER_TENSOR:
        return s.reshape(1, 1, 1).contiguous()
    tiles, groups, _ = lut_scale_shape(out_features, in_features, group_size)
    full = torch.zeros(tiles * LUT_TILE_ROWS, groups, dtype=torch.float32, device=s.device)
    full[:out_features] = s
    return full.view(tiles, LUT_TILE_ROWS, groups).transpose(1, 2).contiguous()


def lut_unpack_scales(
    lut_scales: torch.Tensor, out_features: int, in_features: int, group_size: int
) -> torch.Tensor:
    """Inverse of :func:`lut_pack_scales`: fp32 scales in the standard shape."""
    want = lut_scale_shape(out_features, in_features, group_size)
    if tuple(lut_scales.shape) != want:
        raise ValueError(f"LUT scales must be {list(want)}, got {list(lut_scales.shape)}")
    if group_size == PER_TENSOR:
        return lut_scales.reshape(1, 1).to(torch.float32)
    tiles, groups, _ = want
    rows = lut_scales.transpose(1, 2).reshape(tiles * LUT_TILE_ROWS, groups)
    return rows[:out_features].to(torch.float32).contiguous()
