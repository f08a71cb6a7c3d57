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

# The same fp32 forward pass on one unpadded sentence and on a right-padded batch of them: the
# GEMMs have other shapes, so other blockings and summation orders (relative differences ~1e-6 in
# activations); D and H are products of two activations summed over a few dozen tokens.
FP32_BATCHING_RTOL = 1e-4
FP32_BATCHING_ATOL = 1e-6

# A Gram matrix of m rows accumulated in fp32 (as a running average) against fp64: each entry is an
# m-term sum, so its rounding error is at most about m * eps32 times the sum of |terms| (not of the
# entry, which may cancel); 1e-5 of that sum covers m <= 80 (the tests use m = 30).
FP32_GRAM_RTOL = 1e-5

# Fair-GPTQ's debiasing shift (fp32: two Cholesky factorisations, an inverse and two products with
# the damped K x K matrix) against its fp64 closed form, as the Frobenius error relative to the
# size of the shift: the 1% damping keeps the condition number below ~1e4 on the test problems,
# so fp32's ~1e-7 relative precision loses at most ~1e-3.
FAIR_SHIFT_RTOL = 1e-3


def bitstack_bound(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Worst-case fp32 error of a BitStack matmul ``x @ (sum_b S_b ⊙ (u_b v_b))^T``: every output
    sums B * r * K products ``x_j S u_r v_rj`` along chains of at most K + r + B additions, so
    (K + r + B) * eps32 * sum_b (|x| @ (|u_b| |v_b|)^T) (signs do not change magnitudes)."""
    b, _, r = u.shape
    k = x.shape[-1]
    mag = torch.einsum("bnr,brk->nk", u.abs().double(), v.abs().double())
    return (k + r + b) * EPS32 * (x.abs().double() @ mag.t())


# Ternary kernels (quantlab/ops/ternary_reference.py defines their arithmetic). Activations are
# quantized per token to int8 exactly as the reference does (same fp32 multiply, same rounding),
# and the table lookups are exact integers (16-bit tables, int16 sums proven in range), so the
# only rounding left is the fp32 epilogue: a sum of `adds` terms acc_g * s_g (each an exact
# product rounded once when added), one multiply and one division. Its classic worst-case bound
# is (adds + 2) * eps32 * sum_g |acc_g s_g| / inv, and sum_g |acc_g s_g| <= sum_k |xq_k t_k s_k|.
# The bound is below one integer step s / inv for the shapes tested, so a wrong trit or a wrong
# int8 activation anywhere in a row exceeds it.
def ternary_epilogue_bound(abs_dot: torch.Tensor, adds: int) -> torch.Tensor:
    """fp32 epilogue error of a ternary matmul: (adds + 2) * eps32 * abs_dot, where abs_dot =
    (|xq| @ |s t|.T) / inv in fp64 and adds is the number of fp32 additions per output."""
    return (adds + 2) * EPS32 * abs_dot


# Against the unquantized fp32 matmul x @ W.T, BitNet's per-token int8 activations add at most half
# a quantization step per activation: |y_A8 - y| <= (0.5 / inv) * sum_k |W[n, k]|.
def a8_activation_bound(w: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """[M, N] bound of the activation-quantization error of A8(x) @ W.T against x @ W.T."""
    return (0.5 / inv.double()).unsqueeze(1) * w.double().abs().sum(1).unsqueeze(0)
