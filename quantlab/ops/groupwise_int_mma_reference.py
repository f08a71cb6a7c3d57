"""The PyTorch reference of the tensor-core ("mma") op ``groupwise_int_mma_mm``: what the kernel
of ``csrc/groupwise_int/cuda_mma_kernel.cuh`` computes on a weight repacked by
:mod:`quantlab.formats.groupwise_int_mma_layout`. It is the op's CPU implementation, its fake's
contract and the oracle of its GPU tests. The kernel itself runs on the CPU through the emulation
of its real source (tests/emulation/, docs/emulation.md), which replaced the hand-written Python
model of its reads that lived in ``groupwise_int_mma_emulation.py``.
"""

from __future__ import annotations

import torch

from quantlab.formats.groupwise_int_mma_layout import (
    _KERNEL_DTYPES,
    RepackedWeight,
    dequant_repacked,
    mma_layout,
)

__all__ = ["mma_mm_reference"]


def mma_mm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
    split_k: int = 0,
) -> torch.Tensor:
    """What ``groupwise_int_mma_mm`` computes: ``x @ W.T`` with ``W`` dequantized and rounded to
    ``x``'s dtype (as the kernel's B fragments are), products summed in fp32, one rounding.
    ``split_k`` changes only the kernel's summation order, so it is ignored here."""
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"groupwise_int_mma_mm: x must be fp16 or bf16, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"groupwise_int_mma_mm: x must be [M, {in_features}], got {list(x.shape)}")
    layout = mma_layout(bits, group_size, in_features, out_features, zeros is None)
    w = dequant_repacked(RepackedWeight(qweight, scales, zeros, layout), torch.float32)
    return (x.to(torch.float32) @ w.to(x.dtype).to(torch.float32).t()).to(x.dtype)
