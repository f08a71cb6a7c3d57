"""The ternary format: ``W = s * t`` with trits ``t`` in ``{-1, 0, +1}`` and one scale per tensor,
per output row, or per group of input columns (BitNet b1.58 weights; ternary PTQ of any model).

On-disk layout, version 1 (per quantized linear ``<name>``; byte-level details in docs/formats.md
and :mod:`quantlab.formats.ternary_packing`):

* ``<name>.qweight``: uint8, ``[N, ceil(K / 4)]`` for packing ``"i2"`` (2 bits per trit, code
  ``t + 1``, column ``k`` at bits ``2 (k % 4)`` of byte ``k // 4``) or ``[N, ceil(K / 5)]`` for
  ``"tq1"`` (5 trits per byte in base 3, 1.6 bits per trit).
* ``<name>.scales``: float16 / bfloat16 / float32, ``[1, 1]`` (per tensor), ``[N, 1]`` (per row)
  or ``[N, K / group_size]``.
* ``<name>.bias``: optional, in the model's dtype.

Dequantization: ``w[n, k] = s[n or 0, k // g or 0] * t[n, k]``.

The format also owns what a solver hands it: the unpacked :class:`TernaryResult` and the
granularities it can store (:func:`check_ternary_group_size`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from quantlab.formats import tensor_layout
from quantlab.formats.tensor_layout import SCALE_DTYPES, dtype_from_name
from quantlab.formats.ternary_packing import (
    PACKINGS,
    PER_ROW,
    PER_TENSOR,
    pack_i2,
    pack_tq1,
    packed_row_bytes,
    scale_shape,
    unpack_trits,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GROUP_SIZES",
    "PACKINGS",
    "PER_ROW",
    "PER_TENSOR",
    "SCALE_DTYPES",
    "PackedTernary",
    "TernaryMeta",
    "TernaryResult",
    "check_ternary_group_size",
    "dtype_from_name",
    "expand_scales",
    "granularity_name",
    "pack",
    "unpack",
]

FORMAT_NAME = "ternary"
FORMAT_VERSION = 1
# Group sizes the kernels take: multiples of 8 columns (two quads) that keep a group's integer
# sums inside the CPU kernel's int16 range.
GROUP_SIZES = (32, 64, 128)


@dataclass
class TernaryResult:
    """An unpacked ternary weight, as a solver produces it.

    Attributes:
        t: int8 ``[N, K]`` in ``{-1, 0, 1}``.
        scales: fp32 ``[1, 1]`` (per tensor), ``[N, 1]`` (per row) or ``[N, K / group_size]``;
            values are already representable in the storage dtype.
        group_size: ``PER_TENSOR``, ``PER_ROW`` or columns per scale.
        loss: the solver's output-error estimate (GPTQ's proxy loss) or ``None``.
    """

    t: torch.Tensor
    scales: torch.Tensor
    group_size: int
    loss: float | None = None

    @property
    def out_features(self) -> int:
        return self.t.shape[0]

    @property
    def in_features(self) -> int:
        return self.t.shape[1]

    def column_scales(self) -> torch.Tensor:
        """fp32 ``[N, K]`` scale of every weight."""
        n, k = self.t.shape
        return expand_scales(self.scales, n, k)

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[N, K]`` weight ``s * t``."""
        return self.t.to(torch.float32) * self.column_scales()

    @property
    def zero_fraction(self) -> float:
        return float((self.t == 0).float().mean())


def check_ternary_group_size(group_size: int, in_features: int, name: str = "weight") -> None:
    """Raise ``ValueError`` naming the layer unless ``group_size`` is a granularity it can take."""
    if group_size in (PER_TENSOR, PER_ROW):
        return
    if group_size not in GROUP_SIZES:
        raise ValueError(
            f"{name}: ternary group_size must be {PER_TENSOR} (per tensor), {PER_ROW} (per row) or "
            f"one of {GROUP_SIZES}, got {group_size}"
        )
    if in_features % group_size != 0:
        working = [PER_TENSOR, PER_ROW] + [g for g in GROUP_SIZES if in_features % g == 0]
        raise ValueError(
            f"{name}: group_size {group_size} does not divide in_features {in_features}; "
            f"granularities that work for this layer: {working}"
        )


def expand_scales(scales: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """fp32 ``[N, K]`` scale of every weight from the stored scales (any granularity)."""
    g = k // scales.shape[1]
    return scales.to(torch.float32).repeat_interleave(g, dim=1).expand(n, k)


def granularity_name(group_size: int) -> str:
    """``"tensor"``, ``"row"`` or ``"g<size>"`` for summaries."""
    if group_size == PER_TENSOR:
        return "tensor"
    if group_size == PER_ROW:
        return "row"
    return f"g{group_size}"


@dataclass(frozen=True)
class TernaryMeta:
    """Shape and encoding of one packed ternary weight.

    Attributes:
        in_features, out_features: ``K`` and ``N``.
        packing: ``"i2"`` or ``"tq1"``.
        group_size: ``PER_TENSOR`` (0), ``PER_ROW`` (-1), or input columns per scale.
        scale_dtype: storage dtype of the scales.
    """

    in_features: int
    out_features: int
    packing: str = "i2"
    group_size: int = PER_TENSOR
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"invalid weight shape [{self.out_features}, {self.in_features}]")
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {self.packing!r}")
        check_ternary_group_size(self.group_size, self.in_features)
        dtype_from_name(self.scale_dtype)

    @property
    def row_bytes(self) -> int:
        return packed_row_bytes(self.packing, self.in_features)

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Expected ``{suffix: (shape, dtype)}`` of the packed tensors (bias excluded)."""
        return {
            "qweight": ((self.out_features, self.row_bytes), torch.uint8),
            "scales": (
                scale_shape(self.out_features, self.in_features, self.group_size),
                dtype_from_name(self.scale_dtype),
            ),
        }

    def storage_bits(self) -> int:
        """Bits the packed tensors occupy on disk."""
        return tensor_layout.storage_bits(self.tensor_shapes())

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


@dataclass
class PackedTernary:
    qweight: torch.Tensor
    scales: torch.Tensor
    meta: TernaryMeta

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales}

    def validate(self, name: str = "weight") -> None:
        """Raise ``ValueError`` naming the tensor if a packed tensor has the wrong shape/dtype, and
        on scales that are not finite and positive."""
        tensor_layout.check_tensors(self.tensors(), self.meta.tensor_shapes(), name)
        if not bool(torch.isfinite(self.scales).all()) or bool((self.scales < 0).any()):
            raise ValueError(f"{name}.scales: ternary scales must be finite and >= 0")


def pack(result: TernaryResult, packing: str = "i2", scale_dtype: str = "float16") -> PackedTernary:
    """Pack a solver's unpacked result (exact: :func:`unpack` returns the same trits and scales
    as long as the scales are representable in ``scale_dtype``, which the solvers ensure)."""
    n, k = result.t.shape
    meta = TernaryMeta(
        in_features=k,
        out_features=n,
        packing=packing,
        group_size=result.group_size,
        scale_dtype=scale_dtype,
    )
    want = scale_shape(n, k, result.group_size)
    if tuple(result.scales.shape) != want:
        raise ValueError(f"scales shape {tuple(result.scales.shape)} != {want}")
    scales = result.scales.to(dtype_from_name(scale_dtype))
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"ternary scales overflow {scale_dtype}; use scale_dtype float32")
    qweight = pack_i2(result.t) if packing == "i2" else pack_tq1(result.t)
    return PackedTernary(qweight=qweight, scales=scales.contiguous(), meta=meta)


def unpack(packed: PackedTernary) -> TernaryResult:
    """Exact inverse of :func:`pack` (scales come back as fp32). Raises ``ValueError`` on corrupt
    codes."""
    m = packed.meta
    return TernaryResult(
        t=unpack_trits(packed.qweight, m.packing, m.in_features),
        scales=packed.scales.to(torch.float32),
        group_size=m.group_size,
    )
