"""Every numeric tolerance the tests use, each with its reason."""

from __future__ import annotations

import torch

# Integer paths (pack/unpack, dequant in fp32 of integer codes times an fp32 scale) are exact:
# compared with torch.equal, no tolerance.

# fp32 kernel vs fp64 oracle: each output is a K-term dot product accumulated in fp32, in another
# order than the oracle's. The classic worst-case bound of that rounding error is
# K * eps32 * sum_k |x_k w_k|; we use it as is (typical errors are far smaller, so a kernel bug that
# mixes up even one weight exceeds it).
EPS32 = torch.finfo(torch.float32).eps


def fp32_dot_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case fp32 accumulation error of x @ w.T: K * eps32 * (|x| @ |w|.T)."""
    k = x.shape[-1]
    return k * EPS32 * (x.abs().double() @ w.abs().double().t())


# Low-precision activations (bf16/fp16): the kernel's max error against the fp64 oracle must be at
# most 2x the error of the same dense computation done by PyTorch in that dtype (flash-attention's
# rule), plus this absolute slack for outputs that are exactly representable by both.
LOW_PRECISION_SLACK = 1e-3
