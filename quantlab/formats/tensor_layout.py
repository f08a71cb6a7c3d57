"""What every packed format checks the same way: its tensors against the ``{suffix: (shape,
dtype)}`` table its meta describes, and the bits they occupy; the names the safetensors
files give the dtypes; and the storage dtypes a format's scales may take, by name."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = [
    "SAFETENSORS_DTYPES",
    "SCALE_DTYPES",
    "TensorShapes",
    "check_positive",
    "check_tensors",
    "dtype_from_name",
    "dtype_name",
    "storage_bits",
]

TensorShapes = dict[str, tuple[tuple[int, ...], torch.dtype]]

# The dtype names of safetensors headers.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

# The storage dtypes of scales (groupwise integer and ternary formats), by their config name.
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_from_name(name: str) -> torch.dtype:
    if name not in SCALE_DTYPES:
        raise ValueError(f"scale dtype must be one of {sorted(SCALE_DTYPES)}, got {name!r}")
    return SCALE_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.int32`` -> ``"I32"``)."""
    return _DTYPE_NAMES.get(dtype, str(dtype))


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


def check_positive(tensor: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` and the count if any entry is NaN, infinite, zero or
    negative."""
    bad = ~(torch.isfinite(tensor) & (tensor > 0))
    if bool(bad.any()):
        raise ValueError(
            f"{name}: {int(bad.sum())} of {tensor.numel()} entries are not finite and positive "
            "(NaN, Inf, zero or negative); the weights are damaged"
        )


def storage_bits(expected: TensorShapes) -> int:
    """Bits the tensors of ``expected`` occupy, unpadded."""
    return sum(
        math.prod(shape) * torch.empty((), dtype=dtype).element_size() * 8
        for shape, dtype in expected.values()
    )
