"""What every packed format checks the same way: its tensors against the ``{suffix: (shape,
dtype)}`` table its meta describes, and the bits they occupy."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["TensorShapes", "check_tensors", "storage_bits"]

TensorShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


def check_tensors(
    tensors: Mapping[str, torch.Tensor | None], expected: TensorShapes, name: str
) -> None:
    """Raise ``ValueError`` naming ``name.suffix`` for a tensor ``expected`` lists that is missing
    or has another shape or dtype."""
    for suffix, (shape, dtype) in expected.items():
        t = tensors.get(suffix)
        if t is None:
            raise ValueError(f"{name}.{suffix} is missing")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(
                f"{name}.{suffix}: expected shape {list(shape)} {dtype}, "
                f"got {list(t.shape)} {t.dtype}"
            )


def storage_bits(expected: TensorShapes) -> int:
    """Bits the tensors of ``expected`` occupy, unpadded."""
    return sum(
        math.prod(shape) * torch.empty((), dtype=dtype).element_size() * 8
        for shape, dtype in expected.values()
    )
