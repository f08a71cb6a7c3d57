// Groupwise-int CUDA kernels: dequantization and a warp-per-row GEMV for batches of 1-8.
//
// GEMV: one warp owns one output row. Each lane walks the row in chunks of 8 consecutive weights
// (8 * bits contiguous stream bits: one word at 4 bits), so a warp reads one contiguous span of
// 32 * bits words per step and every weight is read exactly once for all M rows of x. A chunk never spans two groups when
// the group size is a multiple of 8 (all supported group sizes are), so the scale and zero are
// loaded once per chunk. Partial sums are reduced with warp shuffles.
//
// This is the portable baseline every later kernel (tensor-core GEMM, split-K) is checked against;
// it is correct for any K (a scalar tail handles K % 8) and any bit width, including 3-bit values
// that straddle words.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common/bitstream.h"
#include "common/cuda_check.h"
#include "common/cuda_convert.cuh"
#include "groupwise_int/cuda_kernels.cuh"
#include "common/cuda_launch.cuh"

namespace quantlab::groupwise_int {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float zero_point(const CudaWeight& w, int64_t row, int64_t g) {
  if (w.qzeros == nullptr) return static_cast<float>(1u << (w.bits - 1));
  const int64_t groups = w.k / w.group_size;
  return static_cast<float>(
      extract_value(w.qzeros + row * packed_words(groups, w.bits), g, w.bits));
}

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

template <typename T>
__global__ void dequant_kernel(CudaWeight w, T* __restrict__ out) {
  const int64_t total = w.n * w.k;
  const int64_t groups = w.k / w.group_size;
  const int64_t words = packed_words(w.k, w.bits);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / w.k;
    const int64_t col = idx - row * w.k;
    const int64_t g = col / w.group_size;
    const float q = static_cast<float>(extract_value(w.qweight + row * words, col, w.bits));
    out[idx] = from_float<T>((q - zero_point(w, row, g)) * w.scales[row * groups + g]);
  }
}

template <typename T, int M>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    gemv_kernel(CudaWeight w, const T* __restrict__ x, T* __restrict__ y) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= w.n) return;
  const int64_t groups = w.k / w.group_size;
  const uint32_t* qrow = w.qweight + row * packed_words(w.k, w.bits);
  const float* srow = w.scales + row * groups;
  float acc[M];
#pragma unroll
  for (int i = 0; i < M; ++i) acc[i] = 0.0f;

  const int64_t full = (w.k / 8) * 8;
  const bool chunk_in_one_group = (w.group_size % 8) == 0;
  for (int64_t k0 = static_cast<int64_t>(lane) * 8; k0 < full; k0 += kWarp * 8) {
    float q[8];
    codes8(qrow, k0, w.bits, q);
    if (chunk_in_one_group) {
      const int64_t g = k0 / w.group_size;
      const float s = srow[g];
      const float z = zero_point(w, row, g);
#pragma unroll
      for (int j = 0; j < 8; ++j) q[j] = (q[j] - z) * s;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t g = (k0 + j) / w.group_size;
        q[j] = (q[j] - zero_point(w, row, g)) * srow[g];
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
  for (int64_t kk = full + lane; kk < w.k; kk += kWarp) {
    const int64_t g = kk / w.group_size;
    const float wv = (static_cast<float>(extract_value(qrow, kk, w.bits)) - zero_point(w, row, g)) *
                     srow[g];
#pragma unroll
    for (int i = 0; i < M; ++i) acc[i] = fmaf(wv, to_float<T>(x[i * w.k + kk]), acc[i]);
  }
#pragma unroll
  for (int i = 0; i < M; ++i) {
    float v = acc[i];
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) y[i * w.n + row] = from_float<T>(v);
  }
}

template <typename T>
cudaError_t dequant_typed(const CudaWeight& w, void* out, cudaStream_t stream) {
  const int threads = 256;
  const int64_t total = w.n * w.k;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 65535));
  QUANTLAB_LAUNCH(blocks, threads, 0, stream, dequant_kernel<T>)(w, static_cast<T*>(out));
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

template <typename T, int M>
cudaError_t gemv_typed_m(const CudaWeight& w, const void* x, void* y, cudaStream_t stream) {
  const int blocks = static_cast<int>((w.n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  QUANTLAB_LAUNCH(blocks, kWarp * kWarpsPerBlock, 0, stream, gemv_kernel<T, M>)(w, static_cast<const T*>(x),
                                                                   static_cast<T*>(y));
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

template <typename T>
cudaError_t gemv_typed(const CudaWeight& w, const void* x, void* y, int64_t m,
                       cudaStream_t stream) {
  switch (m) {
    case 1: return gemv_typed_m<T, 1>(w, x, y, stream);
    case 2: return gemv_typed_m<T, 2>(w, x, y, stream);
    case 3: return gemv_typed_m<T, 3>(w, x, y, stream);
    case 4: return gemv_typed_m<T, 4>(w, x, y, stream);
    case 5: return gemv_typed_m<T, 5>(w, x, y, stream);
    case 6: return gemv_typed_m<T, 6>(w, x, y, stream);
    case 7: return gemv_typed_m<T, 7>(w, x, y, stream);
    case 8: return gemv_typed_m<T, 8>(w, x, y, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_dequant(const CudaWeight& w, void* out, DType out_dtype, cudaStream_t stream) {
  if (w.n <= 0 || w.k <= 0) return cudaSuccess;
  switch (out_dtype) {
    case DType::kFloat32: return dequant_typed<float>(w, out, stream);
    case DType::kFloat16: return dequant_typed<__half>(w, out, stream);
    case DType::kBFloat16: return dequant_typed<__nv_bfloat16>(w, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_gemv(const CudaWeight& w, const void* x, void* y, int64_t m, DType dtype,
                        cudaStream_t stream) {
  if (m < 1 || m > kGemvMaxRows) return cudaErrorInvalidValue;
  if (w.n <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return gemv_typed<float>(w, x, y, m, stream);
    case DType::kFloat16: return gemv_typed<__half>(w, x, y, m, stream);
    case DType::kBFloat16: return gemv_typed<__nv_bfloat16>(w, x, y, m, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace quantlab::groupwise_int
