"""Pure-PyTorch reference of the BitStack ops: the specification, the fallback, the test oracle.

A decomposed weight is ``Ŵ = sum_b S_b ⊙ (u_b v_b)`` (layout in :mod:`quantlab.formats.bitstack`):
``signs`` uint8 ``[B, N, ceil(K/8)]`` (MSB first, bit 1 = +1), ``u`` ``[B, N, r]``, ``v``
``[B, r, K]``. ``y = x @ Ŵ^T`` is computed without ever forming ``Ŵ``:

* few rows (``M <= SIGN_GEMV_MAX_ROWS``): per block, ``y[m, n] += sum_r u[n, r] * Z[n, r, m]``
  with ``Z = S @ X̃^T`` and ``X̃[(r, m), j] = v[r, j] * x[m, j]`` -- a ±1 matrix times ``r * M``
  right-hand sides, then a rank-``r`` weighted sum. ``r`` multiply-adds per weight per block and
  row, but the weight is read as 1 bit plus its factors;
* many rows: ``ROW_TILE`` output rows at a time, that tile of ``Ŵ`` is rebuilt and multiplied
  (the per-weight rebuild cost ``r * B`` is paid once for all ``M`` rows). Only one tile exists at
  a time, never the whole dense weight.

Everything is computed in fp32; the result is cast to ``x``'s dtype.
"""

from __future__ import annotations

import torch

from quantlab.formats.bitstack import sign_bytes_per_row, unpack_signs

__all__ = [
    "ROW_TILE",
    "SIGN_GEMV_MAX_ROWS",
    "bitstack_dequant",
    "bitstack_mm",
    "check_bitstack",
]

# Batches up to this many rows take the sign-GEMV formulation.
SIGN_GEMV_MAX_ROWS = 8
# Output rows rebuilt at a time on the many-rows path.
ROW_TILE = 256


def check_bitstack(
    signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor, in_features: int
) -> tuple[int, int, int, int]:
    """Validate the stacked tensors; return ``(blocks, N, K, rank)``."""
    if signs.dtype != torch.uint8 or signs.dim() != 3:
        raise ValueError(
            f"bitstack: signs must be uint8 [B, N, ceil(K/8)], got {signs.dtype} "
            f"{tuple(signs.shape)}"
        )
    b, n, kb = signs.shape
    if kb != sign_bytes_per_row(in_features):
        raise ValueError(
            f"bitstack: signs have {kb} bytes per row, in_features {in_features} needs "
            f"{sign_bytes_per_row(in_features)}"
        )
    if u.dim() != 3 or u.shape[0] != b or u.shape[1] != n:
        raise ValueError(f"bitstack: u must be [{b}, {n}, r], got {tuple(u.shape)}")
    r = u.shape[2]
    if tuple(v.shape) != (b, r, in_features):
        raise ValueError(f"bitstack: v must be [{b}, {r}, {in_features}], got {tuple(v.shape)}")
    if not (u.dtype.is_floating_point and v.dtype.is_floating_point):
        raise ValueError(f"bitstack: u and v must be floating point, got {u.dtype}, {v.dtype}")
    if b < 1:
        raise ValueError("bitstack: at least one block is needed")
    return b, n, in_features, r


def _sign_matrix(signs_rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """±1 fp32 ``[rows, K]`` of packed sign rows (the signs only; no magnitudes)."""
    return unpack_signs(signs_rows, in_features).to(torch.float32) * 2.0 - 1.0


def bitstack_dequant(
    signs: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    in_features: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense ``[N, K]`` weight ``sum_b S_b ⊙ (u_b v_b)`` (fp32 sums, cast to ``out_dtype``)."""
    blocks, _, k, _ = check_bitstack(signs, u, v, in_features)
    w = torch.zeros(signs.shape[1], k, dtype=torch.float32, device=signs.device)
    for b in range(blocks):
        w += _sign_matrix(signs[b], k) * (u[b].float() @ v[b].float())
    return w.to(out_dtype)


def bitstack_mm(
    x: torch.Tensor, signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``x [M, K] @ Ŵ^T`` -> ``[M, N]`` in ``x.dtype`` (see the module docstring)."""
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(
            f"bitstack_mm: x must be a 2-D float [M, K], got {x.dtype} {tuple(x.shape)}"
        )
    blocks, n, k, r = check_bitstack(signs, u, v, x.shape[1])
    m = x.shape[0]
    xf = x.to(torch.float32)
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    if m == 0:
        return y.to(x.dtype)
    if m <= SIGN_GEMV_MAX_ROWS:
        for b in range(blocks):
            # X̃: row (r, m) is x[m] scaled by v[r] elementwise.
            xt = (v[b].float().unsqueeze(1) * xf.unsqueeze(0)).reshape(r * m, k)
            for n0 in range(0, n, ROW_TILE):
                rows = slice(n0, min(n0 + ROW_TILE, n))
                z = _sign_matrix(signs[b, rows], k) @ xt.t()  # [rows, r * m]
                z = z.view(-1, r, m)
                y[:, rows] += torch.einsum("nr,nrm->mn", u[b, rows].float(), z)
        return y.to(x.dtype)
    for n0 in range(0, n, ROW_TILE):
        rows = slice(n0, min(n0 + ROW_TILE, n))
        tile = torch.zeros(rows.stop - n0, k, dtype=torch.float32, device=x.device)
        for b in range(blocks):
            tile += _sign_matrix(signs[b, rows], k) * (u[b, rows].float() @ v[b].float())
        y[:, rows] = xf @ tile.t()
    return y.to(x.dtype)
