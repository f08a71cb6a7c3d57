"""The tensor-core ("mma") kernel layout of groupwise-int weights: the one-time repack from the
exported bitstream layout, and its inverse.

This module derives the layout ``csrc/groupwise_int/cuda_mma.cuh`` reads and holds its PyTorch
reference: :func:`repack` and its exact inverse :func:`dequant_repacked`. The layout's index math
itself lives in ``csrc/groupwise_int/mma_layout.h``, which the kernel, the compiled repack ops
(``groupwise_int_mma_repack`` on the CPU and CUDA, ``csrc/groupwise_int/mma_repack.h``; what
:func:`quantlab.ops.groupwise_int.mma_repack` and :class:`quantlab.nn.QuantLinear` run) and the
tests call. The tests tie the three together without a GPU: :func:`repack` puts every value where
that header's maps say (tests/emulation/test_groupwise_int_mma_layout.py), the compiled repacks
write :func:`repack`'s tensors bit for bit (the CUDA one on the CPU emulation), and the kernel's
own source, run on the emulation, reads every weight back (test_groupwise_int_mma_emulation.py).
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
  A lane's ``bits`` words are one little-endian bitstream (:mod:`quantlab.formats.bitstream`)
  of its 32 codes, word by word in the slot order below.
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

Dequantization: ``w = (q - z) * s``, as the exported format's (the kernel's arithmetic for it, in
the activation dtype or in fp32, is described at the top of
``csrc/groupwise_int/cuda_mma_kernel.cuh``).

[split-K] The ``Kp / 64`` k tiles are cut into ``splits`` contiguous ranges of
``ceil(k_tiles / requested)`` tiles (:func:`split_plan`); with more than one range each CTA
writes fp32 partials and the last CTA of an output tile to finish sums them in range order
(deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlab.formats.bitstream import pack_bitstream, unpack_bitstream

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
    "fast_path_reason",
    "mma_layout",
    "repack",
    "split_plan",
]

TILE_K = 16  # k rows per mma step / per B tile (the k of mma.sync m16n8k16)
TILE_N = 64  # columns per B tile (one warp's slab: eight n8 subtiles)
STAGE_K = 64  # k per pipeline stage (csrc kMmaStageK; K is padded to a multiple of it)
CTA_N = 256  # columns per CTA (4 warps of TILE_N; csrc kMmaCtaN)
MAX_ROWS = 255  # batches the mma path takes; from 256 rows dequantize + cuBLAS
# Most K ranges one output tile is split into (csrc kMmaMaxSplits): bounds the fp32 partial-sum
# workspace and the split counts the kernel's heuristic tries.
MAX_SPLITS = 16
# Code widths whose B fragments fill whole words ([B-frag 4-bit], [B-frag 8-bit]): 4 or 8 words
# per lane per tile, one or two 16-byte loads.
SUPPORTED_BITS = (4, 8)
# The 16-bit float types of mma.sync's A and B operands the kernel is built for (f16, bf16).
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


def _unpack_whole_words(qweight: torch.Tensor, bits: int, n_values: int) -> torch.Tensor:
    """4/8-bit bitstream rows -> int32 codes (no value straddles a word), in int32 throughout so
    a large layer's temporaries stay at 4 bytes per weight.

    The same stream and the same codes as :func:`quantlab.formats.bitstream.unpack_bitstream`;
    kept apart for memory, not layout: that decoder works in int64 (it handles straddling
    widths), and this one runs on a whole layer at once on the GPU.
    """
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
    """Exported layout (docs/formats.md, ``groupwise_int`` v1) -> the mma kernel layout: the
    PyTorch reference of the ``groupwise_int_mma_repack`` op.

    Runs on the tensors' device in plain PyTorch.
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
    # One k16 row of tiles is nt * 32 lanes * 32 codes; 2**22 codes (~4M) keeps each chunk's
    # int64 grids and codes at tens of MB.
    rows = max(1, 2**22 // (nt * 32 * 32))
    for kk0 in range(0, kp // TILE_K, rows):
        kk = torch.arange(kk0, min(kp // TILE_K, kk0 + rows), device=dev)
        k_idx = kk[:, None, None, None, None] * TILE_K + k_off[None]
        codes = q[n_idx[None], k_idx]  # broadcast to [rows, nt, 32, words, slots]
        # Each lane's 32 codes, in (word, slot) order, are one bitstream of `bits` words.
        lane_codes = codes.reshape(*codes.shape[:-2], -1)
        packed_q[kk0 : kk0 + len(kk)] = pack_bitstream(lane_codes, bits).reshape(
            len(kk), nt, 32, bits
        )
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
        # The eight codes (c = 0..7) of each (grp, nn, g) as one stream: [Gp, nt, 8, bits/4].
        packed_z = pack_bitstream(z_pad.t()[:, cols], bits).contiguous()
    return RepackedWeight(packed_q, packed_s, packed_z, layout)


# ---------------------------------------------------------------------------------------------
# Inverse (the reference of the mma op)


def _unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Every code of whole ``bits``-bit words ``[..., w]``: int64 ``[..., w * 32 // bits]``."""
    return unpack_bitstream(words, bits, words.shape[-1] * (32 // bits)).to(torch.int64)


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
