// The repack into the tensor-core ("mma") layout: each word of the repacked qweight, scales and
// zeros computed from the exported groupwise_int v1 tensors through mma_layout.h's index maps
// (the ones the kernel reads with), so the producer and the consumer of the layout cannot
// disagree. The CPU op (mma_repack_cpu.cpp) and the CUDA op (cuda_mma_repack.cu) loop over the
// same three functions; quantlab/formats/groupwise_int_mma_layout.py is their PyTorch reference.
// Torch-free; host and device.
#pragma once

#include <cstdint>

#include "groupwise_int/mma_layout.h"

namespace quantlab::groupwise_int::mma_repack {

// The exported tensors (docs/formats.md, groupwise_int v1): row n of `qweight` is the K codes of
// output n as one little-endian bitstream of `q_row_words` words (4- and 8-bit codes never
// straddle a word); `scales` [N, groups] holds 16-bit floats (fp16 or bf16, copied as bits);
// row n of `qzeros` is its `groups` zero-point codes as a bitstream of `z_row_words` words
// (nullptr: symmetric).
struct Source {
  const uint32_t* qweight;
  const uint16_t* scales;
  const uint32_t* qzeros;
  int64_t n;            // out_features
  int64_t k;            // in_features
  int64_t groups;       // exported groups per row (1 for per-channel)
  int64_t q_row_words;  // ceil(k * bits / 32)
  int64_t z_row_words;  // ceil(groups * bits / 32)
  int bits;             // 4 or 8
};

// The repacked tensors' extents (cuda_mma.cuh: Kp = K rounded up to 64, Np to 64; Gp groups of
// the kernel's group size over Kp).
struct Extents {
  int64_t k16;      // Kp / 16
  int64_t n_tiles;  // Np / 64
  int64_t groups;   // Gp
};

// Code of weight (n, k); 0 in the padding (n >= N or k >= K).
QUANTLAB_MMA_HD uint32_t exported_code(const Source& s, int64_t n, int64_t k) {
  if (n >= s.n || k >= s.k) return 0;
  const int64_t bit = k * s.bits;
  const uint32_t word = s.qweight[n * s.q_row_words + bit / 32];
  return (word >> (bit % 32)) & ((1u << s.bits) - 1u);
}

// [B-tiles] qweight word `word` of lane `lane` of tile (kk, nn), stored at
// mma_layout::b_word(kk, nn, n_tiles, lane, word, bits): its 32 / bits codes from the positions
// b_code_position names.
QUANTLAB_MMA_HD uint32_t b_word_value(const Source& s, int64_t kk, int64_t nn, int lane,
                                      int word) {
  uint32_t value = 0;
  for (int slot = 0; slot < 32 / s.bits; ++slot) {
    const mma_layout::TilePosition at = mma_layout::b_code_position(lane, word, slot, s.bits);
    const uint32_t code = exported_code(s, nn * mma_layout::kTileN + at.col,
                                        kk * mma_layout::kTileK + at.k);
    value |= code << (slot * s.bits);
  }
  return value;
}

// [scales] / [zeros] of lane group `g` of tile column block `nn`, kernel group `grp`: the eight
// scales (as 16-bit patterns) at mma_layout::scale_index(grp, nn, n_tiles, g, c), c = 0..7, and,
// when asymmetric, the zero codes' bits/4 words starting at zero_word(grp, nn, n_tiles, g, 0).
// Columns past N and groups past the exported ones are 0.
QUANTLAB_MMA_HD void group_entries(const Source& s, const Extents& e, int64_t grp, int64_t nn,
                                   int g, uint16_t* scales_out, uint32_t* zeros_out) {
  uint32_t zero_words[2] = {0, 0};  // bits / 4 <= 2
  const int64_t first_word = mma_layout::zero_word(grp, nn, e.n_tiles, g, 0, s.bits);
  for (int c = 0; c < 8; ++c) {
    const int64_t col = nn * mma_layout::kTileN + mma_layout::tile_column(c, g);
    const bool real = col < s.n && grp < s.groups;
    scales_out[mma_layout::scale_index(grp, nn, e.n_tiles, g, c)] =
        real ? s.scales[col * s.groups + grp] : uint16_t{0};
    if (s.qzeros == nullptr || !real) continue;
    const int64_t bit = grp * s.bits;
    const uint32_t code =
        (s.qzeros[col * s.z_row_words + bit / 32] >> (bit % 32)) & ((1u << s.bits) - 1u);
    const int64_t word = mma_layout::zero_word(grp, nn, e.n_tiles, g, c, s.bits) - first_word;
    zero_words[word] |= code << mma_layout::zero_bit(c, s.bits);
  }
  if (s.qzeros == nullptr) return;
  for (int w = 0; w < s.bits / 4; ++w) zeros_out[first_word + w] = zero_words[w];
}

// The whole repack on the CPU (OpenMP over k16 rows of tiles): qweight [k16, n_tiles, 32, bits]
// words, scales [groups, n_tiles, 8, 8] 16-bit patterns, zeros [groups, n_tiles, 8, bits / 4]
// words (ignored when symmetric). Every element is written, padding included.
void repack_cpu(const Source& s, const Extents& e, uint32_t* qweight, uint16_t* scales,
                uint32_t* zeros);

}  // namespace quantlab::groupwise_int::mma_repack
