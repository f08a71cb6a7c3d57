// The index math of the tensor-core ("mma") layout, in one place: which word of `qweight`, which
// entry of `scales` and `zeros`, which output element, which shared-memory slot of a pipeline
// stage, and which k ranges of split-K. The kernel (cuda_mma_kernel.cuh), its host launcher
// (cuda_mma.cu), the repack that produces the layout (mma_repack.h, run by the CPU and CUDA ops)
// and the tests (the emulation runner's `groupwise_int_mma_layout_map`, which the PyTorch
// reference repack of quantlab/formats/groupwise_int_mma_layout.py is checked against) all call
// these functions. Torch-free; host and device.
//
// Terms (quantlab/formats/groupwise_int_mma_layout.py has the derivation): tile (kk, nn) is the
// 16 x 64 (k x n) block k in [16 kk, 16 kk + 16), n in [64 nn, 64 nn + 64), made of eight n8
// subtiles c; lane l has g = l / 4 (PTX's groupID) and t = l % 4 (threadID_in_group) and owns
// column 8 c + g of every subtile and the k rows {2t, 2t + 1, 2t + 8, 2t + 9} of the tile: exactly
// its mma.m16n8k16 B fragments.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QUANTLAB_MMA_HD __host__ __device__ __forceinline__
#else
#define QUANTLAB_MMA_HD inline
#endif

namespace quantlab::groupwise_int::mma_layout {

constexpr int kTileN = 64;   // columns per B tile / per warp slab
constexpr int kTileK = 16;   // k per B tile (one mma k step)
constexpr int kStageK = 64;  // k per pipeline stage
constexpr int kWarps = 4;    // warps per CTA, one 64-column slab each
constexpr int kStepsPerStage = kStageK / kTileK;
constexpr int kAPitch = kStageK + 8;  // activation row pitch in shared memory (elements): 144-byte
                                      // rows keep ldmatrix's eight row reads conflict-free

// Padded extents: K to whole pipeline stages, N to whole tiles; the kernel's groups over Kp.
QUANTLAB_MMA_HD int64_t k_pad(int64_t k) { return (k + kStageK - 1) / kStageK * kStageK; }
QUANTLAB_MMA_HD int64_t n_pad(int64_t n) { return (n + kTileN - 1) / kTileN * kTileN; }
QUANTLAB_MMA_HD int64_t kernel_groups(int64_t k, int64_t kernel_group) {
  return (k_pad(k) + kernel_group - 1) / kernel_group;
}

// Column within a tile of subtile `c`'s column `g` (lane group g owns it).
QUANTLAB_MMA_HD int tile_column(int c, int g) { return 8 * c + g; }

// [B-tiles] flat int32 index of word `word` of lane `lane` in tile (kk, nn): a lane's `bits`
// words are contiguous (one 16-byte cp.async per 4-bit tile).
QUANTLAB_MMA_HD int64_t b_word(int64_t kk, int64_t nn, int64_t n_tiles, int lane, int word,
                               int bits) {
  return ((kk * n_tiles + nn) * 32 + lane) * bits + word;
}

struct TilePosition {
  int k;    // 0..15 within the tile
  int col;  // 0..63 within the tile
};

// [B-frag 4-bit] / [B-frag 8-bit]: where code `slot` of word `word` of lane `lane` sits in its
// tile. 4-bit: word j covers subtiles 2j and 2j + 1; nibble p holds k offset
// {0, 8, 0, 8, 1, 9, 1, 9}[p] from 2t of subtile 2j + {0, 0, 1, 1, 0, 0, 1, 1}[p], so that
// (w >> 4i) & 0x000F000F puts nibbles i and i + 4 (the two halves of one B register) side by
// side. 8-bit: word j is subtile j, bytes 0..3 hold k offsets 0, 1, 8, 9 (b0 = bytes 0-1,
// b1 = bytes 2-3).
QUANTLAB_MMA_HD TilePosition b_code_position(int lane, int word, int slot, int bits) {
  const int g = lane / 4;
  const int t = lane % 4;
  if (bits == 4) {
    const int k_offset = (slot & 1) * 8 + (slot >> 2);  // p0 0, p1 8, p4 1, p5 9 ...
    const int subtile = 2 * word + ((slot >> 1) & 1);
    return {2 * t + k_offset, tile_column(subtile, g)};
  }
  const int k_offset = (slot & 1) + 8 * (slot >> 1);  // bytes: 0, 1, 8, 9
  return {2 * t + k_offset, tile_column(word, g)};
}

// [scales] flat element index of the scale of group `grp`, column 64 nn + 8 c + g: the eight
// scales of one g (c = 0..7) are one 16-byte chunk.
QUANTLAB_MMA_HD int64_t scale_index(int64_t grp, int64_t nn, int64_t n_tiles, int g, int c) {
  return ((grp * n_tiles + nn) * 8 + g) * 8 + c;
}

// [zeros] int32 word holding the zero-point code of group `grp`, column 64 nn + 8 c + g, and the
// code's first bit in it (codes c = 0..7 of one g are one little-endian bitstream of bits/4 words).
QUANTLAB_MMA_HD int64_t zero_word(int64_t grp, int64_t nn, int64_t n_tiles, int g, int c,
                                  int bits) {
  return ((grp * n_tiles + nn) * 8 + g) * (bits / 4) + (c * bits) / 32;
}
QUANTLAB_MMA_HD int zero_bit(int c, int bits) { return (c * bits) % 32; }

// [epilogue] the output element of accumulator i (0..3) of subtile c of m16 block mb, for a warp
// on slab nn of CTA row block m0 (PTX's C fragment: row g + 8 (i / 2), column 2t + i % 2).
QUANTLAB_MMA_HD int64_t out_row(int64_t m0, int mb, int lane, int i) {
  return m0 + 16 * mb + lane / 4 + 8 * (i / 2);
}
QUANTLAB_MMA_HD int64_t out_col(int64_t nn, int c, int lane, int i) {
  return nn * kTileN + 8 * c + 2 * (lane % 4) + i % 2;
}

// [smem] Offsets inside one pipeline stage's regions (B words, activations, scale and zero
// rows); each region starts 16-byte aligned.
// B: the `bits` words of lane `lane` for k16 step `step` of warp `warp`'s slab (in words): a
// lane's 16-byte chunks are its own, copied and read by that lane only.
QUANTLAB_MMA_HD int smem_b_word(int warp, int step, int lane, int bits) {
  return ((warp * kStepsPerStage + step) * 32 + lane) * bits;
}
// Activations: element (row, k) of the stage's MB*16 x 64 tile (row pitch kAPitch). The stage is
// copied as 16-byte chunks: chunk `idx` is row idx / 8, k 8 * (idx % 8).
QUANTLAB_MMA_HD int smem_a_element(int row, int k) { return row * kAPitch + k; }
QUANTLAB_MMA_HD int a_chunk_row(int idx) { return idx / 8; }
QUANTLAB_MMA_HD int a_chunk_k(int idx) { return 8 * (idx % 8); }
// [A-ldmatrix] The row and k of the 16-byte row lane `lane` points ldmatrix.x4 at for m16 block
// `mb` and k16 step `step`: lanes 0-15 rows 0-15 at k 0 (matrices a0, a1), lanes 16-31 the same
// rows at k 8 (a2, a3), PTX's A fragment order.
QUANTLAB_MMA_HD int ldmatrix_row(int mb, int lane) { return 16 * mb + lane % 16; }
QUANTLAB_MMA_HD int ldmatrix_k(int step, int lane) { return 16 * step + 8 * (lane / 16); }
// Scales / zeros: slot of group row `r` (0..3: the groups one stage touches, from its first),
// warp `warp`, lane group `g`: a 16-byte chunk of 8 scales at 16 * slot, `bits` bytes of 8 zero
// codes at bits * slot.
QUANTLAB_MMA_HD int smem_group_slot(int r, int warp, int g) { return (r * kWarps + warp) * 8 + g; }

// [split-K] `splits` ranges of `per` k tiles: each takes ceil(k_tiles / want) tiles, so fewer
// ranges may cover K and none is empty (want = requested clamped to [1, min(k_tiles, max)]).
QUANTLAB_MMA_HD void split_plan(int64_t k_tiles, int64_t requested, int64_t max_splits,
                                int* splits, int* per) {
  int64_t want = requested < 1 ? 1 : requested;
  const int64_t cap = k_tiles < max_splits ? k_tiles : max_splits;
  if (want > cap) want = cap;
  if (want < 1) want = 1;
  const int64_t tiles = (k_tiles + want - 1) / want;
  *per = static_cast<int>(tiles);
  *splits = static_cast<int>((k_tiles + tiles - 1) / tiles);
}

}  // namespace quantlab::groupwise_int::mma_layout
