"""The groupwise integer format: RTN, GPTQ, AWQ and Fair-GPTQ all produce it.

On-disk layout, version 1 (per quantized linear ``<name>``; byte-level details in docs/formats.md):

* ``<name>.qweight``: int32 ``[N, ceil(K * bits / 32)]``, each output row's ``K`` integers as one
  little-endian bitstream (see :mod:`quantlab.ops.reference`).
* ``<name>.scales``: float16 / bfloat16 / float32 ``[N, G]``, ``G = K / group_size`` (1 per row for
  ``group_size = -1``).
* ``<name>.qzeros``: int32 ``[N, ceil(G * bits / 32)]``, the integer zero points as a bitstream per
  row; absent for symmetric quantization (zero point ``2**(bits - 1)``).
* ``<name>.bias``: optional, in the model's dtype.

Dequantization: ``w[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from quantlab.formats import tensor_layout
from quantlab.ops.reference import pack_bitstream, packed_words, unpack_bitstream
from quantlab.solvers.base import GroupwiseIntResult, check_bits, check_group_size

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SCALE_DTYPES",
    "GroupwiseIntMeta",
    "PackedGroupwiseInt",
    "dtype_from_name",
    "pack",
    "unpack",
]

FORMAT_NAME = "groupwise_int"
FORMAT_VERSION = 1
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_from_name(name: str) -> torch.dtype:
    if name not in SCALE_DTYPES:
        raise ValueError(f"scale dtype must be one of {sorted(SCALE_DTYPES)}, got {name!r}")
    return SCALE_DTYPES[name]


@dataclass(frozen=True)
class GroupwiseIntMeta:
    """Shape and encoding of one packed weight (everything needed to read its tensors)."""

    in_features: int
    out_features: int
    bits: int
    group_size: int
    sym: bool
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size, self.in_features)
        dtype_from_name(self.scale_dtype)
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"invalid weight shape [{self.out_features}, {self.in_features}]")

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size == -1 else self.in_features // self.group_size

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Expected ``{suffix: (shape, dtype)}`` of the packed tensors (bias excluded)."""
        shapes = {
            "qweight": (
                (self.out_features, packed_words(self.in_features, self.bits)),
                torch.int32,
            ),
            "scales": ((self.out_features, self.n_groups), dtype_from_name(self.scale_dtype)),
        }
        if not self.sym:
            shapes["qzeros"] = (
                (self.out_features, packed_words(self.n_groups, self.bits)),
                torch.int32,
            )
        return shapes

    def storage_bits(self) -> int:
        """Bits the packed tensors occupy on disk."""
        return tensor_layout.storage_bits(self.tensor_shapes())

    def to_dict(self) -> dict[str, int | bool | str]:
        return asdict(self)


@dataclass
class PackedGroupwiseInt:
    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    meta: GroupwiseIntMeta

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            out["qzeros"] = self.qzeros
        return out

    def validate(self, name: str = "weight") -> None:
        """Raise ``ValueError`` naming the tensor if any packed tensor has the wrong shape/dtype,
        or a scale is not finite and positive (every solver clamps scales to > 0; a zero,
        negative or NaN scale is a damaged file)."""
        tensor_layout.check_tensors(self.tensors(), self.meta.tensor_shapes(), name)
        if self.meta.sym and self.qzeros is not None:
            raise ValueError(f"{name}: symmetric weights carry no qzeros tensor")
        tensor_layout.check_positive(self.scales, f"{name}.scales")


def pack(result: GroupwiseIntResult, scale_dtype: str = "float16") -> PackedGroupwiseInt:
    """Pack a solver's unpacked result into the version-1 layout."""
    n, k = result.q.shape
    meta = GroupwiseIntMeta(
        in_features=k,
        out_features=n,
        bits=result.bits,
        group_size=result.group_size,
        sym=result.zeros is None,
        scale_dtype=scale_dtype,
    )
    if tuple(result.scales.shape) != (n, meta.n_groups):
        raise ValueError(f"scales shape {tuple(result.scales.shape)} != {(n, meta.n_groups)}")
    if not bool(torch.isfinite(result.scales).all()):
        raise ValueError("scales hold NaN or Inf values")
    scales = result.scales.to(dtype_from_name(scale_dtype))
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"scales overflow {scale_dtype}; use scale_dtype float32")
    packed = PackedGroupwiseInt(
        qweight=pack_bitstream(result.q, result.bits),
        scales=scales.contiguous(),
        qzeros=None if result.zeros is None else pack_bitstream(result.zeros, result.bits),
        meta=meta,
    )
    return packed


def unpack(packed: PackedGroupwiseInt) -> GroupwiseIntResult:
    """Exact inverse of :func:`pack` (scales come back as fp32)."""
    m = packed.meta
    return GroupwiseIntResult(
        q=unpack_bitstream(packed.qweight, m.bits, m.in_features),
        scales=packed.scales.to(torch.float32),
        zeros=None
        if packed.qzeros is None
        else unpack_bitstream(packed.qzeros, m.bits, m.n_groups),
        bits=m.bits,
        group_size=m.group_size,
    )
