// Little-endian bitstream helpers shared by host and device code (torch-free).
//
// A row of n unsigned `bits`-wide values is stored in int32 words: value j occupies stream bits
// [j*bits, (j+1)*bits), and stream bit t is bit (t % 32) of word t / 32. For bits in {2, 4, 8}
// no value crosses a word; for 3 bits, values 10 and 21 of every 32 straddle two words.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QUANTLAB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QUANTLAB_HOST_DEVICE inline
#endif

namespace quantlab {

// Number of int32 words holding n values of `bits` bits.
QUANTLAB_HOST_DEVICE int64_t packed_words(int64_t n, int bits) { return (n * bits + 31) / 32; }

// Value j of a row stream. `row` must have packed_words(n, bits) words; reading the word after a
// straddling value is safe because a straddling value always has a following word.
QUANTLAB_HOST_DEVICE uint32_t extract_value(const uint32_t* row, int64_t j, int bits) {
  const int64_t bit = j * bits;
  const int64_t word = bit >> 5;
  const int shift = static_cast<int>(bit & 31);
  uint32_t v = row[word] >> shift;
  if (shift + bits > 32) v |= row[word + 1] << (32 - shift);
  return v & ((1u << bits) - 1u);
}

}  // namespace quantlab
