"""The groupwise integer format: RTN, GPTQ, AWQ and Fair-GPTQ all produce it.

On-disk layout, version 1 (per quantized linear ``<name>``; byte-level details in docs/formats.md):

* ``<name>.qweight``: int32 ``[N, ceil(K * bits / 32)]``, each output row's ``K`` integers as one
  little-endian bitstream (see :mod:`quantlab.formats.bitstream`).
* ``<name>.scales``: float16 / bfloat16 / float32 ``[N, G]``, ``G = K / group_size`` (1 per row for
  ``group_size = -1``).
* ``<name>.qzeros``: int32 ``[N, ceil(G * bits / 32)]``, the integer zero points as a bitstream per
  row; absent for symmetric quantization (zero point ``2**(bits - 1)``).
* ``<name>.bias``: optional, in the model's dtype.

Dequantization: ``w[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]``.

The format also owns what a solver hands it: the unpacked :class:`GroupwiseIntResult`, and the
bit widths and group sizes it can store (:func:`check_bits`, :func:`check_group_size`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from quantlab.formats import tensor_layout
from quantlab.formats.bitstream import pack_bitstream, packed_words, unpack_bitstream
from quantlab.formats.tensor_layout import SCALE_DTYPES, dtype_from_name

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SCALE_DTYPES",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "GroupwiseIntMeta",
    "GroupwiseIntResult",
    "PackedGroupwiseInt",
    "check_bits",
    "check_group_size",
    "dtype_from_name",
    "pack",
    "unpack",
]

FORMAT_NAME = "groupwise_int"
FORMAT_VERSION = 1

SUPPORTED_BITS = (2, 3, 4, 8)
# -1 means one group per output row (per-channel).
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)


@dataclass
class GroupwiseIntResult:
    """An unpacked groupwise integer weight, as a solver produces it.

    Attributes:
        q: int32 ``[N, K]`` integers in ``[0, 2**bits)``.
        scales: fp32 ``[N, G]``; values are already representable in the storage dtype.
        zeros: int32 ``[N, G]`` in ``[0, 2**bits)``, or ``None`` for symmetric weights
            (zero point ``2**(bits-1)``).
        bits: bit width.
        group_size: columns per group, ``-1`` for per-channel.
        loss: the solver's estimate of ``||W X - Q X||^2`` (``None`` when it has none).
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    loss: float | None = None

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[N, K]`` weight ``(q - z) * s``."""
        n, k = self.q.shape
        g = k if self.group_size == -1 else self.group_size
        z = (
            torch.full_like(self.scales, float(1 << (self.bits - 1)))
            if self.zeros is None
            else self.zeros.to(torch.float32)
        )
        # In place on the one fp32 copy: a 28672 x 8192 projection is 0.94 GB per copy.
        w = self.q.to(torch.float32).view(n, k // g, g)
        w.sub_(z.unsqueeze(-1)).mul_(self.scales.unsqueeze(-1))
        return w.view(n, k)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def check_group_size(group_size: int, in_features: int, name: str = "weight") -> None:
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group_size must be one of {SUPPORTED_GROUP_SIZES} (-1 = per-channel), got "
            f"{group_size}"
        )
    if group_size != -1 and in_features % group_size != 0:
        divisors = [g for g in SUPPORTED_GROUP_SIZES if g == -1 or in_features % g == 0]
        raise ValueError(
            f"group_size {group_size} does not divide in_features {in_features} of {name}; "
            f"group sizes that work for this layer: {divisors}"
        )


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
