"""Integer-valued groupwise test data shared by the emulation tests: every product and partial
sum is exact in fp32, whatever the summation order, so a kernel's output is the fp64 oracle
rounded once to the output dtype, bit for bit."""

from __future__ import annotations

import torch

from quantlab.formats import bitstream
from quantlab.ops import groupwise_int_reference as reference


def integer_weight(  # noqa: ANN201
    n: int,
    k: int,
    bits: int,
    group: int,
    sym: bool,
    scale_dtype: torch.dtype = torch.float32,
    max_scale_exp: int = 0,
):
    """Codes over the whole range, random zero points, power-of-two scales in
    ``[2**-3, 2**max_scale_exp]`` (exact in fp16 and bf16); returns the exported tensors
    ``(qweight, scales, qzeros)`` and the exact dense weight in fp64."""
    gen = torch.Generator().manual_seed(n * 7919 + k * 31 + bits * 3 + int(sym) + group)
    groups = 1 if group == -1 else k // group
    q = torch.randint(0, 2**bits, (n, k), generator=gen)
    exps = torch.randint(-3, max_scale_exp + 1, (n, groups), generator=gen)
    s = (2.0**exps).to(scale_dtype)
    qz = None
    if not sym:
        qz = bitstream.pack_bitstream(torch.randint(0, 2**bits, (n, groups), generator=gen), bits)
    qw = bitstream.pack_bitstream(q, bits)
    dense = reference.groupwise_int_dequant(qw, s, qz, bits, group, k, torch.float64)
    return qw, s, qz, dense


def small_integer_x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Activations in {-2, ..., 2}."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (m, k), generator=gen).to(dtype)


def one_hot_x(k: int, columns: range, dtype: torch.dtype) -> torch.Tensor:
    """Row i is the unit vector of column ``columns[i]``: ``x @ W.T`` reads W's columns back."""
    x = torch.zeros(len(columns), k, dtype=dtype)
    x[torch.arange(len(columns)), torch.tensor(list(columns))] = 1
    return x
