// The mma-layout repack on the CPU: mma_repack.h's per-word functions over every word.
#include <cstdint>

#include "groupwise_int/mma_repack.h"

namespace quantlab::groupwise_int::mma_repack {

void repack_cpu(const Source& s, const Extents& e, uint32_t* qweight, uint16_t* scales,
                uint32_t* zeros) {
  // A k16 row of tiles is n_tiles * 32 * bits words: big enough per iteration to amortise the
  // scheduling, and there are Kp / 16 of them (512 for K = 8192) to share among threads.
#pragma omp parallel for schedule(static)
  for (int64_t kk = 0; kk < e.k16; ++kk) {
    for (int64_t nn = 0; nn < e.n_tiles; ++nn) {
      for (int lane = 0; lane < 32; ++lane) {
        for (int word = 0; word < s.bits; ++word) {
          qweight[mma_layout::b_word(kk, nn, e.n_tiles, lane, word, s.bits)] =
              b_word_value(s, kk, nn, lane, word);
        }
      }
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t grp = 0; grp < e.groups; ++grp) {
    for (int64_t nn = 0; nn < e.n_tiles; ++nn) {
      for (int g = 0; g < 8; ++g) group_entries(s, e, grp, nn, g, scales, zeros);
    }
  }
}

}  // namespace quantlab::groupwise_int::mma_repack
