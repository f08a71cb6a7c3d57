"""The BitStack format: a weight as a stack of ~1-bit residual blocks.

A weight ``W`` ``[N, K]`` (out, in; activation scales already folded into its columns) is
approximated by ``Ŵ = sum_{b < B} S_b ⊙ (u_b v_b)``: block ``b`` is a ±1 sign matrix ``S_b``
``[N, K]`` times a rank-``r`` magnitude ``u_b v_b`` (``u_b`` ``[N, r]``, ``v_b`` ``[r, K]``).
Any prefix of the stack is a valid (coarser) weight, which is what budgeted loading relies on.

On-disk layout, version 1 (per decomposed linear ``<name>``; docs/formats.md, section BitStack):

* ``<name>.signs``: uint8 ``[B, N, ceil(K / 8)]``. Row ``n`` of block ``b`` packs its ``K`` signs
  8 per byte, **MSB first**: column ``8 t + i`` is bit ``7 - i`` of byte ``t``; bit 1 means +1 and
  bit 0 means -1 (a zero residual counts as +1). Each row starts on a byte boundary (unused low bits
  of a row's last byte are 0). For ``K % 8 == 0`` these bytes equal BitStack's own row-major
  flattened packing.
* ``<name>.u``: float16 ``[B, N, r]``;  ``<name>.v``: float16 ``[B, r, K]``.
* ``<name>.bias``: optional, in the model's dtype.

Block ``b`` of every tensor is the contiguous byte range ``[b * size / B, (b + 1) * size / B)``
of it, so reading the first ``b`` blocks reads a prefix of each tensor.

The format also owns what the solver hands it: the unpacked :class:`BitStackResult`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from quantlab.formats import tensor_layout

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "BitStackMeta",
    "BitStackResult",
    "PackedBitStack",
    "block_bytes",
    "pack",
    "pack_signs",
    "sign_bytes_per_row",
    "unpack",
    "unpack_signs",
]

FORMAT_NAME = "bitstack"
FORMAT_VERSION = 1
FACTOR_DTYPE = torch.float16

# Bit i (counting from the most significant) of a byte holds column 8 t + i. A different layout
# from quantlab.formats.bitstream's (LSB-first int32 words): MSB-first uint8 bytes, each row
# byte-aligned, are the bytes BitStack's own checkpoints store.
_MSB_FIRST = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


@dataclass
class BitStackResult:
    """Unpacked residual blocks of one weight.

    Attributes:
        positive: bool ``[B, N, K]``, ``True`` where block ``b``'s sign is +1.
        u: fp32 ``[B, N, r]`` and ``v``: fp32 ``[B, r, K]``; every value is exactly
            representable in fp16.
        errors: with a Hessian, ``errors[b] = tr(R_b H R_b^T)`` -- the calibration output error
            (summed over output channels) of the first ``b`` blocks, ``b = 0 .. B``
            (``errors[0]`` is the weight's own output energy); empty without one.
        seconds: time spent in the decomposition (SVDs included).
        svd_seconds: time spent in the SVDs alone.
    """

    positive: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    errors: list[float] = field(default_factory=list)
    seconds: float = 0.0
    svd_seconds: float = 0.0

    @property
    def n_blocks(self) -> int:
        return self.positive.shape[0]

    @property
    def rank(self) -> int:
        return self.u.shape[-1]

    def dequantize(self, n_blocks: int | None = None) -> torch.Tensor:
        """fp32 ``[N, K]`` weight of the first ``n_blocks`` blocks (default all)."""
        b = self.n_blocks if n_blocks is None else n_blocks
        w = torch.zeros(self.positive.shape[1:], dtype=torch.float32, device=self.u.device)
        for i in range(b):
            w += torch.where(self.positive[i], 1.0, -1.0) * (self.u[i] @ self.v[i])
        return w


def sign_bytes_per_row(in_features: int) -> int:
    return (in_features + 7) // 8


def block_bytes(out_features: int, in_features: int, rank: int) -> int:
    """Exact bytes of one residual block: packed signs plus fp16 ``u`` and ``v``."""
    return out_features * sign_bytes_per_row(in_features) + 2 * rank * (out_features + in_features)


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """Pack a boolean sign matrix (``True`` = +1) along its last dim, MSB first.

    Args:
        positive: bool ``[..., K]``.

    Returns:
        uint8 ``[..., ceil(K / 8)]``.
    """
    if positive.dtype != torch.bool:
        raise TypeError(f"pack_signs expects a bool tensor (True = +1), got {positive.dtype}")
    k = positive.shape[-1]
    pad = sign_bytes_per_row(k) * 8 - k
    bits = torch.nn.functional.pad(positive.to(torch.uint8), (0, pad))
    bits = bits.reshape(*positive.shape[:-1], -1, 8)
    weights = _MSB_FIRST.to(positive.device)
    return (bits * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: uint8 ``[..., ceil(K / 8)]`` -> bool ``[..., K]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed signs must be uint8, got {packed.dtype}")
    if packed.shape[-1] != sign_bytes_per_row(in_features):
        raise ValueError(
            f"packed signs have {packed.shape[-1]} bytes per row, expected "
            f"{sign_bytes_per_row(in_features)} for in_features {in_features}"
        )
    weights = _MSB_FIRST.to(packed.device)
    bits = (packed.unsqueeze(-1) & weights) != 0
    return bits.reshape(*packed.shape[:-1], -1)[..., :in_features]


@dataclass(frozen=True)
class BitStackMeta:
    """Shape of one packed BitStack weight (everything needed to read its tensors)."""

    in_features: int
    out_features: int
    rank: int
    n_blocks: int

    def __post_init__(self) -> None:
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"invalid weight shape [{self.out_features}, {self.in_features}]")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.rank > min(self.in_features, self.out_features):
            raise ValueError(
                f"rank {self.rank} exceeds min(out, in) = "
                f"{min(self.in_features, self.out_features)} of a [{self.out_features}, "
                f"{self.in_features}] weight"
            )
        if self.n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {self.n_blocks}")

    def tensor_shapes(
        self, n_blocks: int | None = None
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Expected ``{suffix: (shape, dtype)}`` of the packed tensors with ``n_blocks`` blocks
        (default: all)."""
        b = self.n_blocks if n_blocks is None else n_blocks
        n, k, r = self.out_features, self.in_features, self.rank
        return {
            "signs": ((b, n, sign_bytes_per_row(k)), torch.uint8),
            "u": ((b, n, r), FACTOR_DTYPE),
            "v": ((b, r, k), FACTOR_DTYPE),
        }

    @property
    def block_bytes(self) -> int:
        return block_bytes(self.out_features, self.in_features, self.rank)

    def storage_bits(self, n_blocks: int | None = None) -> int:
        b = self.n_blocks if n_blocks is None else n_blocks
        return 8 * b * self.block_bytes

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class PackedBitStack:
    """Packed tensors of one weight (layout in the module docstring)."""

    signs: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    meta: BitStackMeta

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"signs": self.signs, "u": self.u, "v": self.v}

    def validate(self, name: str = "weight") -> None:
        """Raise ``ValueError`` naming the tensor if any has the wrong shape or dtype, or a factor
        is NaN/Inf."""
        tensor_layout.check_tensors(self.tensors(), self.meta.tensor_shapes(), name)
        for suffix in ("u", "v"):
            if not bool(torch.isfinite(getattr(self, suffix)).all()):
                raise ValueError(f"{name}.{suffix} has NaN/Inf entries")


def pack(positive: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> PackedBitStack:
    """Pack unpacked blocks into the version-1 layout.

    Args:
        positive: bool ``[B, N, K]``, ``True`` where the block's sign is +1.
        u: float ``[B, N, r]``;  v: float ``[B, r, K]`` (rounded to fp16 here; a value beyond
            the fp16 range raises).
    """
    if positive.dim() != 3 or u.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"expected 3-D blocks, got signs {tuple(positive.shape)}, u {tuple(u.shape)}, "
            f"v {tuple(v.shape)}"
        )
    b, n, k = positive.shape
    r = u.shape[-1]
    if tuple(u.shape) != (b, n, r) or tuple(v.shape) != (b, r, k):
        raise ValueError(
            f"u must be [{b}, {n}, r] and v [{b}, r, {k}], got {tuple(u.shape)} and "
            f"{tuple(v.shape)}"
        )
    meta = BitStackMeta(in_features=k, out_features=n, rank=r, n_blocks=b)
    u16, v16 = u.to(FACTOR_DTYPE), v.to(FACTOR_DTYPE)
    if not (bool(torch.isfinite(u16).all()) and bool(torch.isfinite(v16).all())):
        raise ValueError("BitStack factors overflow float16 (|value| > 65504)")
    return PackedBitStack(
        pack_signs(positive).contiguous(), u16.contiguous(), v16.contiguous(), meta
    )


def unpack(packed: PackedBitStack) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact inverse of :func:`pack`: ``(positive bool [B, N, K], u fp32, v fp32)``."""
    packed.validate()
    return (
        unpack_signs(packed.signs, packed.meta.in_features),
        packed.u.to(torch.float32),
        packed.v.to(torch.float32),
    )
