"""What every groupwise-integer solver returns, and the input checks they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "GroupwiseIntResult",
    "check_bits",
    "check_group_size",
    "check_weight",
]

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
        w = (self.q.to(torch.float32).view(n, k // g, g) - z.unsqueeze(-1)) * self.scales.unsqueeze(
            -1
        )
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


def check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if weight.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}"
        )
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point weight, got {weight.dtype}")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name}: weight has {bad} NaN/Inf entries; refusing to quantize it")
