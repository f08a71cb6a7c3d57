// One output row of the warp-per-row GEMV, shared by the dense GEMV (cuda_kernels.cu) and the
// grouped one over a mixture's experts (cuda_grouped.cu).
//
// One warp owns one output row. Each lane walks the row in chunks of 8 consecutive weights
// (8 * bits contiguous stream bits: one word at 4 bits), so a warp reads one contiguous span of
// 32 * bits words per step and every weight is read exactly once for all M rows of x. A chunk
// never spans two groups when the group size is a multiple of 8, so the scale and zero are loaded
// once per chunk. Partial sums are reduced with warp shuffles. Correct for any K (a scalar tail
// handles K % 8) and any bit width, including 3-bit values that straddle words.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/bitstream.h"
#include "common/cuda_convert.cuh"

namespace quantlab::groupwise_int {

constexpr int kGemvWarp = 32;

// Codes of columns [k0, k0 + 8) (k0 a multiple of 8) as floats, from at most two aligned word
// reads. The 8 codes are 8 * bits contiguous stream bits starting at bit k0 * bits; for bits <= 4
// they fit in one 32-bit funnel shift of the (at most) two words they touch, and for 8 bits they
// are exactly two whole words. A second word is read only when the chunk reaches into it, so the
// read never passes the end of the row (3-bit chunks straddle words, 2/4-bit ones never do).
__device__ __forceinline__ void codes8(const uint32_t* __restrict__ row, int64_t k0, int bits,
                                       float (&q)[8]) {
  if (bits == 8) {
    const uint32_t lo = row[k0 >> 2];
    const uint32_t hi = row[(k0 >> 2) + 1];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      q[j] = static_cast<float>((lo >> (8 * j)) & 0xFFu);
      q[j + 4] = static_cast<float>((hi >> (8 * j)) & 0xFFu);
    }
    return;
  }
  const int64_t bit = k0 * bits;
  const int64_t word = bit >> 5;
  const int shift = static_cast<int>(bit & 31);
  const uint32_t lo = row[word];
  const uint32_t hi = shift + 8 * bits > 32 ? row[word + 1] : 0u;
  const uint32_t chunk = __funnelshift_r(lo, hi, shift);
  const uint32_t mask = (1u << bits) - 1u;
#pragma unroll
  for (int j = 0; j < 8; ++j) q[j] = static_cast<float>((chunk >> (j * bits)) & mask);
}

// One weight row: its codes, its G scales (in the scale dtype S) and its packed zero points
// (nullptr: symmetric, zero 2^(bits-1)).
template <typename S>
struct GemvRow {
  const uint32_t* __restrict__ codes;
  const S* __restrict__ scales;
  const uint32_t* __restrict__ zeros;
  int64_t k;
  int64_t group_size;
  int bits;

  __device__ __forceinline__ float zero(int64_t g) const {
    if (zeros == nullptr) return static_cast<float>(1u << (bits - 1));
    return static_cast<float>(extract_value(zeros, g, bits));
  }
  __device__ __forceinline__ float scale(int64_t g) const { return to_float<S>(scales[g]); }
};

// y[i * y_stride] = sum_k w[k] x[i * k_total + k] for the M rows of x (row-major [M, K]), fp32
// accumulation; lane 0 writes. Every lane of the warp must call it.
template <typename T, typename S, int M>
__device__ __forceinline__ void gemv_row(const GemvRow<S>& w, const T* __restrict__ x,
                                         T* __restrict__ y, int64_t y_stride, int lane) {
  float acc[M];
#pragma unroll
  for (int i = 0; i < M; ++i) acc[i] = 0.0f;

  const int64_t full = (w.k / 8) * 8;
  const bool chunk_in_one_group = (w.group_size % 8) == 0;
  for (int64_t k0 = static_cast<int64_t>(lane) * 8; k0 < full; k0 += kGemvWarp * 8) {
    float q[8];
    codes8(w.codes, k0, w.bits, q);
    if (chunk_in_one_group) {
      const int64_t g = k0 / w.group_size;
      const float s = w.scale(g);
      const float z = w.zero(g);
#pragma unroll
      for (int j = 0; j < 8; ++j) q[j] = (q[j] - z) * s;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t g = (k0 + j) / w.group_size;
        q[j] = (q[j] - w.zero(g)) * w.scale(g);
      }
    }
#pragma unroll
    for (int i = 0; i < M; ++i) {
      const T* xr = x + i * w.k + k0;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i] = fmaf(q[j], to_float<T>(xr[j]), acc[i]);
    }
  }
  // Tail: K not a multiple of 8 (only possible per-channel).
  for (int64_t kk = full + lane; kk < w.k; kk += kGemvWarp) {
    const int64_t g = kk / w.group_size;
    const float wv = (static_cast<float>(extract_value(w.codes, kk, w.bits)) - w.zero(g)) *
                     w.scale(g);
#pragma unroll
    for (int i = 0; i < M; ++i) acc[i] = fmaf(wv, to_float<T>(x[i * w.k + kk]), acc[i]);
  }
#pragma unroll
  for (int i = 0; i < M; ++i) {
    float v = acc[i];
#pragma unroll
    for (int offset = kGemvWarp / 2; offset > 0; offset /= 2) {
      v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    if (lane == 0) y[i * y_stride] = from_float<T>(v);
  }
}

}  // namespace quantlab::groupwise_int
