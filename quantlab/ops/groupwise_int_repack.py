"""The tensor-core ("mma") kernel layout of groupwise-int weights: the one-time repack from the
exported bitstream layout, its inverse, and a CPU emulator of the kernel's fragment reads.

This module is the specification of ``csrc/groupwise_int/cuda_mma.cuh`` (the layout the CUDA
kernel reads): the repack here is the only producer of that layout (it runs on any device, once
per layer, see :class:`quantlab.nn.QuantLinear`), and the emulator below reads the repacked
tensors the way the kernel's threads do -- which lane loads which 16-byte chunk, which nibble of
which word becomes which half of which ``mma.sync.m16n8k16`` B register, which scale and zero
point a thread applies, where ``ldmatrix`` puts the activations and where the epilogue writes
each accumulator -- and rebuilds the dense weight and the product from those reads alone. The
tests (``tests/ops/test_groupwise_int_repack.py``) check on the CPU that the emulation
reproduces the reference dequantization bit for bit, so a layout bug shows up without a GPU.
Section names in the comments ("[B-frag]", "[scales]", ...) are the ones the CUDA code uses.

Terms. ``mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}``: per warp, A is 16 x 16 (M x K), B is
16 x 8 (K x N), C is 16 x 8 fp32. Lane ``l`` has ``g = l // 4`` and ``t = l % 4`` (PTX's groupID
and threadID_in_group). PTX ISA fragment layouts, for reference:

* A: four 32-bit registers a0..a3 of two elements each; ``a_q`` holds rows ``g + 8 * (q % 2)``,
  columns ``2t + 8 * (q // 2) + {0, 1}``.
* B: two registers b0, b1; ``b_r`` holds rows (k) ``2t + 8r + {0, 1}`` of column (n) ``g``
  (the lower k in the low 16 bits).
* C: four fp32 ``c_i`` at row ``g + 8 * (i // 2)``, column ``2t + i % 2``.

Kernel layout (padded shapes: ``Np`` = N rounded up to 64, ``Kp`` = K rounded up to 64):

* [B-tiles] ``qweight``: int32, flat ``[Kp / 16, Np / 64, 32 lanes, bits words]``. Tile
  ``(kk, nn)`` is the 16 x 64 (k x n) block ``k in [16 kk, 16 kk + 16)``,
  ``n in [64 nn, 64 nn + 64)``; its 64 columns are eight n8 "subtiles" ``c = 0..7`` (columns
  ``64 nn + 8c + {0..7}``). Lane ``l`` owns column ``64 nn + 8c + g`` of every subtile and the
  k rows ``{2t, 2t+1, 2t+8, 2t+9}`` of the tile -- exactly its B fragments -- and its
  ``bits`` words are contiguous (16 bytes at 4 bits, 32 at 8), so one 16-byte load per 4-bit tile.
* [B-frag 4-bit] word ``j`` (0..3) of a lane covers subtiles ``2j`` ("A") and ``2j + 1`` ("B").
  Nibble ``p`` (bits ``4p .. 4p+3``) holds (k offset from ``2t``, subtile):
  ``p0 (0, A), p1 (8, A), p2 (0, B), p3 (8, B), p4 (1, A), p5 (9, A), p6 (1, B), p7 (9, B)``.
  So ``(w >> 4i) & 0x000F000F`` puts nibbles ``i`` and ``i + 4`` in the two 16-bit halves, and
  pair ``i`` is b0 of A (i=0), b1 of A (1), b0 of B (2), b1 of B (3): one ``lop3`` with the
  exponent of a magic number turns a pair into the two 16-bit floats ``magic + q``.
* [B-frag 8-bit] word ``j`` (0..7) is subtile ``j``; bytes 0..3 hold k offsets ``0, 1, 8, 9``:
  bytes 0-1 are b0, bytes 2-3 are b1 (``prmt`` with a magic exponent byte).
* [scales] ``scales``: the layer's scale dtype (fp16 or bf16), flat ``[Gp, Np / 64, 8, 8]``:
  entry ``(grp, nn, g, c)`` is the scale of group ``grp`` of column ``64 nn + 8c + g``, so the
  eight scales a lane needs in a tile (its columns of subtiles 0..7) are one 16-byte chunk
  shared by the four lanes of group ``g``.
* [zeros] ``zeros`` (asymmetric only): int32, flat ``[Gp, Np / 64, 8, bits / 4]``: the eight
  zero-point codes of the same columns, code ``c`` in stream bits ``[bits c, bits (c + 1))``
  (little-endian, as the exported format). Symmetric weights use ``2**(bits - 1)``.
* Groups: the kernel's group size is the layer's group size, or ``Kp`` for
  per-channel weights; a 16-deep k step lies in one group because the group size is a multiple
  of 16. ``Gp = ceil(Kp / group)``. Padding: codes, scales and zero points of padded rows,
  columns and groups are 0, so padded weights are exactly 0 (inside a real group a padded k has a
  finite weight ``-z s``, multiplied by an activation the kernel zero-fills).

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

[split-K] The ``Kp / 64`` k tiles are cut into ``splits`` contiguous ranges of
``ceil(k_tiles / requested)`` tiles (:func:`split_plan`); with more than one range each CTA
writes fp32 partials and the last CTA of an output tile to finish sums them in range order
(deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlab.ops.reference import unpack_bitstream

__all__ = [
    "CTA_N",
    "MAX_ROWS",
    "MAX_SPLITS",
    "STAGE_K",
    "SUPPORTED_BITS",
    "TILE_K",
    "TILE_N",
    "MmaLayout",
    "RepackedWeight",
    "dequant_repacked",
    "emulate_a_fragments",
    "emulate_b_fragments",
    "emulate_mm",
    "fast_path_reason",
    "mma_layout",
    "mma_mm_reference",
    "repack",
    "split_plan",
]

TILE_K = 16  # k rows per mma step / per B tile
TILE_N = 64  # columns per B tile (one warp's slab)
STAGE_K = 64  # k per pipeline stage
CTA_N = 256  # columns per CTA (4 warps)
MAX_ROWS = 255  # batches the mma path takes; from 256 rows dequantize + cuBLAS
MAX_SPLITS = 16
SUPPORTED_BITS = (4, 8)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# [B-frag 4-bit]: nibble p -> (k offset from 2t, subtile within the word's pair).
_NIBBLE_SLOTS = ((0, 0), (8, 0), (0, 1), (8, 1), (1, 0), (9, 0), (1, 1), (9, 1))
# [B-frag 8-bit]: byte b -> k offset from 2t.
_BYTE_SLOTS = (0, 1, 8, 9)


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class MmaLayout:
    """Shape of one repacked weight (see the module docstring)."""

    in_features: int  # K
    out_features: int  # N
    bits: int
    group_size: int  # the layer's (-1: per-channel)
    sym: bool

    @property
    def kernel_group(self) -> int:
        """The kernel's group size: the layer's, or ``k_pad`` (one group) for per-channel."""
        return self.k_pad if self.group_size == -1 else self.group_size

    @property
    def k_pad(self) -> int:
        return _round_up(self.in_features, STAGE_K)

    @property
    def n_pad(self) -> int:
        return _round_up(self.out_features, TILE_N)

    @property
    def n_groups(self) -> int:
        return -(-self.k_pad // self.kernel_group)

    @property
    def n_tiles(self) -> int:
        return self.n_pad // TILE_N

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the repacked tensors (``zeros`` only when asymmetric)."""
        out = {
            "qweight": (self.k_pad // TILE_K, self.n_tiles, 32, self.bits),
            "scales": (self.n_groups, self.n_tiles, 8, 8),
        }
        if not self.sym:
            out["zeros"] = (self.n_groups, self.n_tiles, 8, self.bits // 4)
        return out


@dataclass
class RepackedWeight:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    layout: MmaLayout


def fast_path_reason(
    bits: int, group_size: int, in_features: int, scale_dtype: torch.dtype
) -> str | None:
    """Why a weight cannot take the mma kernel (``None`` when it can).

    The kernel needs 4- or 8-bit codes, fp16/bf16 scales, ``K % 8 == 0`` (16-byte activation
    loads) and a group size that is a multiple of 16 (or per-channel). Everything else runs the
    other CUDA kernels (``groupwise_int_mm``), which take every shape the format allows.
    """
    if bits not in SUPPORTED_BITS:
        return f"{bits}-bit codes (the mma kernel takes {SUPPORTED_BITS})"
    if scale_dtype not in _KERNEL_DTYPES:
        return f"{scale_dtype} scales (the mma kernel takes fp16/bf16 scales)"
    if in_features % 8:
        return f"in_features {in_features} is not a multiple of 8"
    if group_size != -1 and group_size % TILE_K:
        return f"group_size {group_size} is not a multiple of {TILE_K}"
    return None


def mma_layout(
    bits: int, group_size: int, in_features: int, out_features: int, sym: bool
) -> MmaLayout:
    """The :class:`MmaLayout` of a weight of this encoding."""
    return MmaLayout(in_features, out_features, bits, group_size, sym)


def split_plan(k_tiles: int, requested: int) -> tuple[int, int]:
    """``(splits, k tiles per split)`` the kernel runs for ``requested`` splits: each range
    takes ``ceil(k_tiles / want)`` tiles, so no range is empty (mirrors ``split_plan`` in
    csrc/groupwise_int/cuda_mma.cu)."""
    want = max(1, min(requested, k_tiles, MAX_SPLITS))
    per = -(-k_tiles // want)
    return -(-k_tiles // per), per


# ---------------------------------------------------------------------------------------------
# Repack (the producer of the layout)


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[..., 32 // bits * words]`` codes (last dim in stream order) into int32 words."""
    per_word = 32 // bits
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_whole_words(qweight: torch.Tensor, bits: int, n_values: int) -> torch.Tensor:
    """4/8-bit bitstream rows -> int32 codes (no value straddles a word), in int32 throughout so
    a large layer's temporaries stay at 4 bytes per weight."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=qweight.device, dtype=torch.int32) * bits
    codes = (qweight[..., None] >> shifts) & ((1 << bits) - 1)  # the mask drops sign bits
    return codes.reshape(qweight.shape[0], -1)[:, :n_values]


def repack(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> RepackedWeight:
    """Exported layout (docs/formats.md, ``groupwise_int`` v1) -> the mma kernel layout.

    Runs on the tensors' device in plain PyTorch; done once per layer and device.
    Raises ``ValueError`` naming the reason when :func:`fast_path_reason` refuses the weight.
    """
    reason = fast_path_reason(bits, group_size, in_features, scales.dtype)
    if reason is not None:
        raise ValueError(f"the mma kernel layout does not take this weight: {reason}")
    n = qweight.shape[0]
    layout = mma_layout(bits, group_size, in_features, n, qzeros is None)
    dev = qweight.device
    kp, np_, nt = layout.k_pad, layout.n_pad, layout.n_tiles
    q = torch.zeros(np_, kp, dtype=torch.int32, device=dev)
    q[:n, :in_features] = _unpack_whole_words(qweight, bits, in_features)

    # [B-tiles]: index grids over (kk, nn, lane, word, slot) -> (k, n) of the weight.
    lane = torch.arange(32, device=dev)
    g, t = lane // 4, lane % 4
    if bits == 4:
        words = torch.arange(4, device=dev)
        dk = torch.tensor([s[0] for s in _NIBBLE_SLOTS], device=dev)
        sub = torch.tensor([s[1] for s in _NIBBLE_SLOTS], device=dev)
        # subtile of (word j, nibble p) = 2j + sub[p]
        col = 8 * (2 * words[:, None] + sub[None, :])  # [4, 8]
        krow = dk[None, :].expand(4, 8)
    else:
        words = torch.arange(8, device=dev)
        col = (8 * words[:, None]).expand(8, 4)  # [8, 4]
        krow = torch.tensor(_BYTE_SLOTS, device=dev)[None, :].expand(8, 4)
    nn = torch.arange(nt, device=dev)
    n_idx = (
        nn[:, None, None, None] * TILE_N + g[None, :, None, None] + col[None, None, :, :]
    )  # [nt, 32, words, slots]
    k_off = 2 * t[None, :, None, None] + krow[None, None, :, :]  # [1, 32, words, slots]
    packed_q = torch.empty(layout.shapes()["qweight"], dtype=torch.int32, device=dev)
    # A few k16 rows of tiles at a time: the index grids of a whole 70B layer would take GBs.
    rows = max(1, 2**22 // (nt * 32 * 32))
    for kk0 in range(0, kp // TILE_K, rows):
        kk = torch.arange(kk0, min(kp // TILE_K, kk0 + rows), device=dev)
        k_idx = kk[:, None, None, None, None] * TILE_K + k_off[None]
        codes = q[n_idx[None], k_idx]  # broadcast to [rows, nt, 32, words, slots]
        packed_q[kk0 : kk0 + len(kk)] = _pack_codes(codes, bits).reshape(len(kk), nt, 32, bits)
    del q

    # [scales] / [zeros]: (grp, nn, g, c) -> column 64 nn + 8 c + g.
    groups = scales.shape[1]
    n_groups = layout.n_groups
    s_pad = torch.zeros(np_, n_groups, dtype=scales.dtype, device=dev)
    s_pad[:n, :groups] = scales
    cols = nn[:, None, None] * TILE_N + 8 * torch.arange(8, device=dev)[None, None, :]
    cols = cols + torch.arange(8, device=dev)[None, :, None]  # [nt, g, c]
    packed_s = s_pad.t()[:, cols].contiguous()  # [Gp, nt, 8, 8]
    packed_z = None
    if qzeros is not None:
        z_pad = torch.zeros(np_, n_groups, dtype=torch.int32, device=dev)
        z_pad[:n, :groups] = unpack_bitstream(qzeros, bits, groups)
        packed_z = _pack_codes(z_pad.t()[:, cols], bits).contiguous()  # [Gp, nt, 8, bits/4]
    return RepackedWeight(packed_q, packed_s, packed_z, layout)


# ---------------------------------------------------------------------------------------------
# Inverse (the reference of the mma op)


def _unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = 32 // bits
    u = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    return ((u[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*words.shape[:-1], -1)


def _check_repacked(rep: RepackedWeight) -> None:
    shapes = rep.layout.shapes()
    got = {"qweight": rep.qweight, "scales": rep.scales}
    if rep.zeros is not None:
        got["zeros"] = rep.zeros
    if set(got) != set(shapes):
        raise ValueError(
            f"repacked tensors {sorted(got)} do not match the layout's {sorted(shapes)}"
        )
    for name, tensor in got.items():
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(
                f"repacked {name} must be {list(shapes[name])}, got {list(tensor.shape)}"
            )


def dequant_repacked(rep: RepackedWeight, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, K]`` weight of a repacked tensor set, by inverting :func:`repack`'s index
    maps (no kernel emulation: the exact inverse of the producer)."""
    _check_repacked(rep)
    lay = rep.layout
    n_t, kp = lay.n_tiles, lay.k_pad
    codes = _unpack_words(rep.qweight, lay.bits)  # [Kp/16, nt, 32, words*slots]
    dev = codes.device
    lane = torch.arange(32, device=dev)
    g, t = lane // 4, lane % 4
    if lay.bits == 4:
        j = torch.arange(4, device=dev)[:, None]
        dk = torch.tensor([s[0] for s in _NIBBLE_SLOTS], device=dev)[None, :]
        sub = torch.tensor([s[1] for s in _NIBBLE_SLOTS], device=dev)[None, :]
        col = (8 * (2 * j + sub)).reshape(-1)
        krow = dk.expand(4, 8).reshape(-1)
    else:
        col = (8 * torch.arange(8, device=dev)[:, None]).expand(8, 4).reshape(-1)
        krow = torch.tensor(_BYTE_SLOTS, device=dev)[None, :].expand(8, 4).reshape(-1)
    kk = torch.arange(kp // TILE_K, device=dev)[:, None, None, None]
    nn = torch.arange(n_t, device=dev)[None, :, None, None]
    k_idx = kk * TILE_K + 2 * t[None, None, :, None] + krow[None, None, None, :]
    n_idx = nn * TILE_N + g[None, None, :, None] + col[None, None, None, :]
    k_idx, n_idx = torch.broadcast_tensors(k_idx, n_idx)
    q = torch.zeros(lay.n_pad, kp, dtype=torch.int64, device=dev)
    q[n_idx.reshape(-1), k_idx.reshape(-1)] = codes.reshape(-1)
    s = rep.scales.to(torch.float32).permute(1, 3, 2, 0).reshape(lay.n_pad, lay.n_groups)
    if rep.zeros is None:
        z = torch.full_like(s, float(1 << (lay.bits - 1)))
    else:
        zc = _unpack_words(rep.zeros, lay.bits)  # [Gp, nt, 8 (g), 8 (c)]
        z = zc.permute(1, 3, 2, 0).reshape(lay.n_pad, lay.n_groups).to(torch.float32)
    grp = torch.arange(kp, device=dev) // lay.kernel_group
    w = (q.to(torch.float32) - z[:, grp]) * s[:, grp]
    return w[: lay.out_features, : lay.in_features].to(out_dtype)


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
    """16-bit exponent pattern whose mantissa takes a small code, and its value."""
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
        wpz = lay.bits // 4
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
    qf = (codes | 0x4B000000).to(torch.int32).view(torch.float32)
    zf = torch.tensor(8388608.0) + z.to(torch.float32)
    return ((qf - zf[..., None]) * s.to(torch.float32)[..., None]).to(dtype)


def emulate_b_fragments(rep: RepackedWeight, act_dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``act_dtype`` that the kernel's B fragments hold, built only
    from what each lane loads ([B-tiles], [scales], [zeros]), the kernel's dequant arithmetic and
    PTX's B fragment layout (``b_r`` = rows ``2t + 8r + {0, 1}`` of column ``g``)."""
    _check_repacked(rep)
    lay = rep.layout
    half_math = rep.scales.dtype == act_dtype and not (
        lay.bits == 8 and act_dtype == torch.bfloat16
    )
    nt, ksteps = lay.n_tiles, lay.k_pad // TILE_K
    flat_q = rep.qweight.reshape(-1).to(torch.int64) & 0xFFFFFFFF
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
    mb = -(-m // 16)
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
