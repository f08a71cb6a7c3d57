"""The reference of the tensor-core ("mma") op and a CPU emulator of the kernel's reads.

The layout the kernel reads (``[B-tiles]``, ``[B-frag 4-bit]``, ``[B-frag 8-bit]``, ``[scales]``,
``[zeros]``, ``[split-K]``, PTX's fragment layouts) is specified and produced by
:mod:`quantlab.formats.groupwise_int_mma_layout`. This module reads those tensors the way the
threads of ``csrc/groupwise_int/cuda_mma_kernel.cuh`` do -- which lane loads which 16-byte chunk,
which nibble of which word becomes which half of which ``mma.sync.m16n8k16`` B register, which
scale and zero point a thread applies, where ``ldmatrix`` puts the activations and where the
epilogue writes each accumulator -- and rebuilds the dense weight and the product from those
reads alone. The tests (``tests/ops/test_groupwise_int_repack.py``) check on the CPU that the
emulation reproduces the reference dequantization bit for bit, so a bug in the CUDA code's index
arithmetic shows up without a GPU. Section names in the comments are the ones the CUDA code uses.

Dequantization: ``w = (q - z) * s``. Where the scale dtype is the activation dtype the kernel
does it in that dtype -- ``(magic + q) - (magic + z)`` is exact, and the product is rounded once,
which equals rounding the exact fp32 product as the reference does; otherwise in fp32
(``(2**23 + q) - (2**23 + z)`` exact, the product exact, one rounding to the activation dtype).
Both give ``reference.groupwise_int_dequant(...).to(act_dtype)`` exactly.

[A-ldmatrix] The activation tile is ``BM x 64`` in shared memory (row pitch 72 elements). For the
m16 block ``mb`` and k step ``s`` of a stage, lane ``l`` passes ``ldmatrix.x4`` the address of
row ``16 mb + l % 16``, column ``16 s + 8 (l // 16)``; matrix ``q`` is built from the rows lanes
``8q .. 8q + 7`` address and lane ``l`` receives row ``l // 4``, columns ``2 (l % 4) + {0, 1}`` of
it into ``a_q``.

[epilogue] Warp ``w`` of the CTA owns columns ``256 n_cta + 64 w + [0, 64)``; accumulator
``c_i`` of subtile ``c`` of m16 block ``mb`` is output row ``m0 + 16 mb + g + 8 (i // 2)``,
column ``256 n_cta + 64 w + 8c + 2t + i % 2``.
"""

from __future__ import annotations

import torch

from quantlab.formats.groupwise_int_mma_layout import (
    _KERNEL_DTYPES,
    CTA_N,
    STAGE_K,
    TILE_K,
    TILE_N,
    RepackedWeight,
    _check_repacked,
    _unpack_words,
    dequant_repacked,
    mma_layout,
    split_plan,
)

__all__ = [
    "emulate_a_fragments",
    "emulate_b_fragments",
    "emulate_mm",
    "mma_mm_reference",
]

# 2**23 as an fp32 bit pattern: its 23-bit mantissa takes a code q exactly, giving 2**23 + q.
_F32_MAGIC_BITS = 0x4B000000
_F32_MAGIC = 8388608.0  # 2**23


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


# ---------------------------------------------------------------------------------------------
# Emulator of the kernel's reads (the check of the CUDA code's index arithmetic)


def _magic(dtype: torch.dtype) -> tuple[int, float]:
    """16-bit exponent pattern whose mantissa takes a small code, and its value: fp16 0x6400 is
    1024.0 (10 mantissa bits: codes < 1024), bf16 0x4300 is 128.0 (7 mantissa bits: codes < 128,
    so 8-bit codes take the fp32 path in bf16) -- the kernel's ``Vec2<T>::kMagic``."""
    return (0x6400, 1024.0) if dtype == torch.float16 else (0x4300, 128.0)


def _as_half(bits16: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return bits16.to(torch.int16).view(dtype)


def _lane_scales(rep: RepackedWeight, grp: torch.Tensor, nn: int) -> tuple:
    """[scales]/[zeros] as a lane reads them: for each k step's group ``grp`` [S] and lane,
    the eight scales (one 16-byte chunk at ``((grp * nt + nn) * 8 + g) * 8``) and zero codes."""
    lay = rep.layout
    flat_s = rep.scales.reshape(-1)
    g = torch.arange(32) // 4
    base = ((grp[:, None] * lay.n_tiles + nn) * 8 + g[None, :]) * 8  # [S, 32]
    s = flat_s[base[..., None] + torch.arange(8)]  # [S, 32, 8]
    if rep.zeros is None:
        z = torch.full(s.shape, 1 << (lay.bits - 1), dtype=torch.int64)
    else:
        wpz = lay.bits // 4  # words of zero codes per (group, tile, g): 8 codes of `bits` bits
        flat_z = rep.zeros.reshape(-1)
        zbase = ((grp[:, None] * lay.n_tiles + nn) * 8 + g[None, :]) * wpz
        zwords = flat_z[zbase[..., None] + torch.arange(wpz)]  # [S, 32, wpz]
        z = _unpack_words(zwords, lay.bits)  # [S, 32, 8]
    return s, z


def _dequant_pair(
    code_lo: torch.Tensor,
    code_hi: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    act: torch.Tensor,
    half_math: bool,
) -> torch.Tensor:
    """The kernel's arithmetic on one register pair: ``[..., 2]`` values in the act dtype."""
    dtype = act.dtype
    codes = torch.stack([code_lo, code_hi], -1)
    if half_math:
        magic_bits, magic = _magic(dtype)
        q = _as_half(codes | magic_bits, dtype)  # lop3 / prmt: magic + q, exact
        zm = (torch.tensor(magic, dtype=torch.float64) + z.double()).to(dtype)  # exact
        return (q - zm[..., None]) * s.to(dtype)[..., None]  # one rounding each, as HSUB2/HMUL2
    # fp32: (2^23 + q) - (2^23 + z) exact, product exact, one rounding to the act dtype.
    qf = (codes | _F32_MAGIC_BITS).to(torch.int32).view(torch.float32)
    zf = torch.tensor(_F32_MAGIC) + z.to(torch.float32)
    return ((qf - zf[..., None]) * s.to(torch.float32)[..., None]).to(dtype)


def emulate_b_fragments(rep: RepackedWeight, act_dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``act_dtype`` that the kernel's B fragments hold, built only
    from what each lane loads ([B-tiles], [scales], [zeros]), the kernel's dequant arithmetic and
    PTX's B fragment layout (``b_r`` = rows ``2t + 8r + {0, 1}`` of column ``g``)."""
    _check_repacked(rep)
    lay = rep.layout
    # Half math needs the code under the magic's mantissa: bf16's 7 bits cannot take 8-bit codes.
    half_math = rep.scales.dtype == act_dtype and not (
        lay.bits == 8 and act_dtype == torch.bfloat16
    )
    nt, ksteps = lay.n_tiles, lay.k_pad // TILE_K
    flat_q = rep.qweight.reshape(-1).to(torch.int64) & 0xFFFFFFFF  # the words as uint32
    out = torch.full((lay.n_pad, lay.k_pad), float("nan"), dtype=act_dtype)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    kk = torch.arange(ksteps)
    grp = kk * TILE_K // lay.kernel_group  # the group of each k step
    for nn in range(nt):
        s_all, z_all = _lane_scales(rep, grp, nn)  # [S, 32, 8]
        # The lane's words of tile (kk, nn): ((kk * nt + nn) * 32 + lane) * bits + j.
        base = ((kk[:, None] * nt + nn) * 32 + lane[None, :]) * lay.bits  # [S, 32]
        words = flat_q[base[..., None] + torch.arange(lay.bits)]  # [S, 32, bits]
        frags = torch.empty(ksteps, 32, 8, 2, 2, dtype=act_dtype)  # [S, lane, subtile, r, e]
        if lay.bits == 4:
            for j in range(4):
                w = words[..., j]
                for i in range(4):
                    # [B-frag 4-bit]: nibbles i and i + 4 into the low and high 16-bit halves.
                    pair = (w >> (4 * i)) & 0x000F000F
                    sub, reg = 2 * j + i // 2, i % 2
                    frags[:, :, sub, reg] = _dequant_pair(
                        pair & 0xFFFF,
                        pair >> 16,
                        s_all[..., sub],
                        z_all[..., sub],
                        out,
                        half_math,
                    )
        else:
            for j in range(8):
                w = words[..., j]
                for reg in range(2):
                    # [B-frag 8-bit]: bytes 2 reg and 2 reg + 1 are register b_reg's two codes.
                    lo = (w >> (16 * reg)) & 0xFF
                    hi = (w >> (16 * reg + 8)) & 0xFF
                    frags[:, :, j, reg] = _dequant_pair(
                        lo, hi, s_all[..., j], z_all[..., j], out, half_math
                    )
        # PTX B layout: b_r element e is row 2t + 8r + e of column g of subtile c.
        r = torch.arange(2)[None, None, :, None]
        e = torch.arange(2)[None, None, None, :]
        krow = 2 * t[:, None, None, None] + 8 * r + e  # [32, 1, 2, 2]
        for sub in range(8):
            ncol = nn * TILE_N + 8 * sub + g  # [32]
            k_idx = kk[:, None, None, None] * TILE_K + krow.squeeze(1)[None]  # [S, 32, 2, 2]
            n_idx = ncol[None, :, None, None].expand_as(k_idx)
            out[n_idx.reshape(-1), k_idx.reshape(-1)] = frags[:, :, sub].reshape(-1)
    return out[: lay.out_features, : lay.in_features]


def emulate_a_fragments(x: torch.Tensor, k_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[A-ldmatrix]: what ``ldmatrix.x4`` gives each lane for every m16 block and k step, and the
    A operand PTX's A layout reads out of those registers.

    Returns ``(frags [Mb, S, 32, 4, 2], a_seen [Mb * 16, k_pad])``: ``a_seen`` must equal ``x``
    zero-padded to ``[Mb * 16, k_pad]`` (the kernel zero-fills rows past M and k past K)."""
    m, k = x.shape
    mb = -(-m // 16)  # m16 blocks (the M of mma.sync m16n8k16)
    tile = torch.zeros(mb * 16, k_pad, dtype=x.dtype)
    tile[:m, :k] = x
    steps = k_pad // TILE_K
    lane = torch.arange(32)
    # Address each lane passes: row 16 mb + l % 16, column 16 s + 8 (l // 16).
    addr_row = lane % 16
    addr_col = 8 * (lane // 16)
    frags = torch.empty(mb, steps, 32, 4, 2, dtype=x.dtype)
    for q in range(4):
        src_lane = 8 * q + lane // 4  # the lane whose address is row l // 4 of matrix q
        rows = addr_row[src_lane]
        cols = addr_col[src_lane][:, None] + 2 * (lane % 4)[:, None] + torch.arange(2)[None, :]
        for b in range(mb):
            for s in range(steps):
                frags[b, s, :, q] = tile[16 * b + rows[:, None], 16 * s + cols]
    a_seen = torch.full_like(tile, float("nan"))
    g, t = lane // 4, lane % 4
    for q in range(4):
        rows = g + 8 * (q % 2)
        cols = 2 * t + 8 * (q // 2)
        for b in range(mb):
            for s in range(steps):
                for e in range(2):
                    a_seen[16 * b + rows, 16 * s + cols + e] = frags[b, s, :, q, e]
    return frags, a_seen


def emulate_mm(x: torch.Tensor, rep: RepackedWeight, splits: int = 1) -> torch.Tensor:
    """``y [M, N]`` as the kernel computes it, from emulated fragments: B from
    :func:`emulate_b_fragments`, A from :func:`emulate_a_fragments`, the per-warp mma products
    accumulated over each split's k range (fp64 here: the kernel's fp32 sums differ only in
    rounding), partial sums of the splits added in range order ([split-K]), and every
    accumulator written where [epilogue] says. Rows/columns never written stay NaN."""
    lay = rep.layout
    m = x.shape[0]
    w = torch.zeros(lay.n_pad, lay.k_pad, dtype=x.dtype)
    w[: lay.out_features, : lay.in_features] = emulate_b_fragments(rep, x.dtype)
    _, a_seen = emulate_a_fragments(x, lay.k_pad)
    k_tiles = lay.k_pad // STAGE_K
    n_splits, per = split_plan(k_tiles, splits)
    mb = a_seen.shape[0] // 16
    acc = torch.zeros(n_splits, mb * 16, lay.n_pad, dtype=torch.float64)
    for z in range(n_splits):
        k0, k1 = z * per * STAGE_K, min(k_tiles, (z + 1) * per) * STAGE_K
        acc[z] = a_seen[:, k0:k1].double() @ w[:, k0:k1].double().t()
    total = acc[0].clone()
    for z in range(1, n_splits):
        total += acc[z]
    y = torch.full((m, lay.out_features), float("nan"), dtype=torch.float64)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    n_ctas = -(-lay.n_pad // CTA_N)
    for n_cta in range(n_ctas):
        for warp in range(CTA_N // TILE_N):
            n_base = n_cta * CTA_N + warp * TILE_N
            if n_base >= lay.n_pad:
                continue  # an idle warp of the last CTA
            for b in range(mb):
                for sub in range(8):
                    for i in range(4):
                        rows = 16 * b + g + 8 * (i // 2)
                        cols = n_base + 8 * sub + 2 * t + i % 2
                        # The fragment register c_i of this lane holds C[g + 8(i//2), 2t + i%2].
                        keep = (rows < m) & (cols < lay.out_features)
                        y[rows[keep], cols[keep]] = total[rows[keep], cols[keep]]
    return y.to(x.dtype)
