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
    "explicit_zeros",
    "packed_int32_tensors",
    "scales_to_store",
    "zeros_to_store",
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


def packed_int32_tensors(
    tensors: Mapping[str, torch.Tensor], layout: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(qweight, qzeros, scales)`` of one linear in another tool's groupwise layout (``layout``
    names it in errors: "GPTQ", "AWQ"): all three present, the two packed ones 2-D int32 (their
    shapes are the layout's to check)."""
    missing = [key for key in ("qweight", "qzeros", "scales") if key not in tensors]
    if missing:
        raise ValueError(f"{layout} tensors are missing {missing} (have {sorted(tensors)})")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    for key, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dim() != 2 or t.dtype != torch.int32:
            raise ValueError(f"{key} must be a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    return qweight, qzeros, scales


def explicit_zeros(zeros: torch.Tensor, bits: int, sym: bool) -> torch.Tensor | None:
    """The zero points a layout stores even for symmetric weights: ``zeros`` as they are, or with
    ``sym`` ``None`` once every one is checked to be the midpoint ``2**(bits-1)``."""
    if not sym:
        return zeros
    mid = 1 << (bits - 1)
    if not bool((zeros == mid).all()):
        raise ValueError(f"sym=True but some zero points differ from {mid}")
    return None


def scales_to_store(
    scales: torch.Tensor, n: int, g: int, dtype: torch.dtype, layout: str, hint: str = ""
) -> torch.Tensor:
    """Float ``[N, G]`` scales as another tool's groupwise layout stores them: ``dtype``
    ``[G, N]``, contiguous, refused when they overflow ``dtype`` (the error names ``layout`` and
    ends with ``hint``, what the caller can change)."""
    if tuple(scales.shape) != (n, g) or not scales.dtype.is_floating_point:
        raise ValueError(
            f"scales must be a float [N, G] = [{n}, {g}] tensor, got {scales.dtype} "
            f"{tuple(scales.shape)}"
        )
    stored = scales.t().to(dtype).contiguous()
    if not bool(torch.isfinite(stored).all()):
        raise ValueError(f"scales overflow {dtype}, which the {layout} layout stores{hint}")
    return stored


def zeros_to_store(
    zeros: torch.Tensor | None, n: int, g: int, bits: int, device: torch.device
) -> torch.Tensor:
    """Integer ``[N, G]`` zero points in ``[0, 2**bits)`` as int64, or for symmetric weights
    (``None``) the midpoint ``2**(bits-1)`` written explicitly, as GPTQ and AWQ checkpoints
    always carry zeros."""
    if zeros is None:
        return torch.full((n, g), 1 << (bits - 1), dtype=torch.int64, device=device)
    if tuple(zeros.shape) != (n, g) or zeros.dtype.is_floating_point or zeros.dtype == torch.bool:
        raise ValueError(
            f"zeros must be an integer [N, G] = [{n}, {g}] tensor or None, got {zeros.dtype} "
            f"{tuple(zeros.shape)}"
        )
    maxq = (1 << bits) - 1
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > maxq):
        raise ValueError(
            f"zeros must lie in [0, {maxq}] for {bits}-bit, got "
            f"[{int(zeros.min())}, {int(zeros.max())}]"
        )
    return zeros.to(torch.int64)
