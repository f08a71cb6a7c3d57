// PVQ CUDA kernels: decode to a dense weight, and a warp-per-row decode-GEMV for batches of 1-8.
//
// Decode: one thread per vector (grid-stride). The thread reads its code (at most three words),
// splits it with one 64-bit division into (level, index), walks the index through the count table
// in shared memory (one step per coordinate plus one per pulse) and writes its D weights.
//
// GEMV: one warp owns one output row; lane l decodes vectors l, l + 32, ... of the row and dots
// each with the M rows of x, then the warp reduces with shuffles. Every code is decoded once per
// call for all M rows of x, and a row's codes are a contiguous span of the stream, so a warp's
// reads are coalesced. The walk is data-dependent, so lanes diverge; the decode costs about
// (D + P) / D table steps per weight.
//
// Both kernels compute each weight exactly as the CPU kernel and the reference do
// (g = s * level; r = g / sqrtf(sum y^2); w = y * r, all IEEE fp32: no fast-math here).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common/cuda_check.h"
#include "common/cuda_convert.cuh"
#include "pvq/cuda_kernels.cuh"
#include "pvq/pvq_decode.h"
#include "common/cuda_launch.cuh"

namespace quantlab::pvq {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kDecodeThreads = 256;

// Copies the count table into shared memory (all threads of the block take part).
__device__ __forceinline__ void load_counts(const CudaWeight& w, uint64_t* table) {
  const int entries = count_entries(w.dim, w.pulses);
  for (int i = threadIdx.x; i < entries; i += blockDim.x) table[i] = w.counts[i];
  __syncthreads();
}

// Vector j's weights into wv[0..dim), exactly as the reference computes them.
__device__ __forceinline__ void decode_vector(const CudaWeight& w, const uint64_t* table,
                                              int64_t j, float* wv) {
  const int64_t per_row = w.k / w.dim;
  const int64_t row = j / per_row;
  const uint64_t code = read_field(w.codes, w.n_words, j * w.code_bits, w.code_bits);
  const uint64_t level = code / w.size;
  if (level >= static_cast<uint64_t>(w.n_levels)) {
    for (int i = 0; i < w.dim; ++i) wv[i] = 0.0f;
    return;
  }
  int y[kMaxDim];
  const int yy = unrank(code - level * w.size, table, w.dim, w.pulses, y);
  const float g = w.row_scales[row] * w.levels[level];
  const float r = __fdiv_rn(g, __fsqrt_rn(static_cast<float>(yy)));
  for (int i = 0; i < w.dim; ++i) wv[i] = __fmul_rn(static_cast<float>(y[i]), r);
}

template <typename T>
__global__ void decode_kernel(CudaWeight w, T* __restrict__ out) {
  extern __shared__ uint64_t table[];
  load_counts(w, table);
  const int64_t total = w.n * (w.k / w.dim);
  float wv[kMaxDim];
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < total;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    decode_vector(w, table, j, wv);
    T* dst = out + j * w.dim;  // vector j covers elements [j * D, (j + 1) * D) of row-major W'
    for (int i = 0; i < w.dim; ++i) dst[i] = from_float<T>(wv[i]);
  }
}

template <typename T, int M>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    gemv_kernel(CudaWeight w, const T* __restrict__ x, T* __restrict__ y) {
  extern __shared__ uint64_t table[];
  load_counts(w, table);
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= w.n) return;  // after the block-wide table load: no barrier follows
  const int64_t per_row = w.k / w.dim;
  float acc[M];
#pragma unroll
  for (int i = 0; i < M; ++i) acc[i] = 0.0f;
  float wv[kMaxDim];
  for (int64_t v = lane; v < per_row; v += kWarp) {
    decode_vector(w, table, row * per_row + v, wv);
    const int64_t col = v * w.dim;
#pragma unroll
    for (int i = 0; i < M; ++i) {
      const T* xr = x + i * w.k + col;
      float a = acc[i];
      for (int c = 0; c < w.dim; ++c) a = fmaf(wv[c], to_float<T>(xr[c]), a);
      acc[i] = a;
    }
  }
#pragma unroll
  for (int i = 0; i < M; ++i) {
    float a = acc[i];
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) a += __shfl_down_sync(0xffffffffu, a, off);
    if (lane == 0) y[i * w.n + row] = from_float<T>(a);
  }
}

size_t table_bytes(const CudaWeight& w) {
  return static_cast<size_t>(count_entries(w.dim, w.pulses)) * sizeof(uint64_t);
}

bool valid(const CudaWeight& w) {
  return w.dim >= 1 && w.dim <= kMaxDim && w.pulses >= 1 && w.pulses <= kMaxPulses &&
         w.code_bits >= 1 && w.code_bits <= kMaxCodeBits && w.k % w.dim == 0 && w.n >= 1 &&
         w.n_levels >= 1 && w.size >= 1 && w.counts != nullptr;
}

template <typename T>
cudaError_t decode_typed(const CudaWeight& w, T* out, cudaStream_t stream) {
  const int64_t total = w.n * (w.k / w.dim);
  const int64_t blocks = std::min<int64_t>((total + kDecodeThreads - 1) / kDecodeThreads, 65535);
  QUANTLAB_LAUNCH(static_cast<unsigned>(blocks), kDecodeThreads, table_bytes(w), stream, decode_kernel<T>)(w,
                                                                                             out);
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

template <typename T, int M>
cudaError_t gemv_m(const CudaWeight& w, const T* x, T* y, cudaStream_t stream) {
  const int64_t blocks = (w.n + kWarpsPerBlock - 1) / kWarpsPerBlock;
  QUANTLAB_LAUNCH(static_cast<unsigned>(blocks), kWarp * kWarpsPerBlock, table_bytes(w), stream, gemv_kernel<T, M>)(w, x, y);
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

template <typename T>
cudaError_t gemv_typed(const CudaWeight& w, const T* x, T* y, int64_t m, cudaStream_t stream) {
  switch (m) {
    case 1: return gemv_m<T, 1>(w, x, y, stream);
    case 2: return gemv_m<T, 2>(w, x, y, stream);
    case 3: return gemv_m<T, 3>(w, x, y, stream);
    case 4: return gemv_m<T, 4>(w, x, y, stream);
    case 5: return gemv_m<T, 5>(w, x, y, stream);
    case 6: return gemv_m<T, 6>(w, x, y, stream);
    case 7: return gemv_m<T, 7>(w, x, y, stream);
    case 8: return gemv_m<T, 8>(w, x, y, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_decode(const CudaWeight& w, void* out, DType out_dtype, cudaStream_t stream) {
  if (!valid(w)) return cudaErrorInvalidValue;
  switch (out_dtype) {
    case DType::kFloat32: return decode_typed(w, static_cast<float*>(out), stream);
    case DType::kFloat16: return decode_typed(w, static_cast<__half*>(out), stream);
    case DType::kBFloat16: return decode_typed(w, static_cast<__nv_bfloat16*>(out), stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_gemv(const CudaWeight& w, const void* x, void* y, int64_t m, DType dtype,
                        cudaStream_t stream) {
  if (!valid(w) || m < 1 || m > kGemvMaxRows) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return gemv_typed(w, static_cast<const float*>(x), static_cast<float*>(y), m, stream);
    case DType::kFloat16:
      return gemv_typed(w, static_cast<const __half*>(x), static_cast<__half*>(y), m, stream);
    case DType::kBFloat16:
      return gemv_typed(w, static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(y), m,
                        stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace quantlab::pvq
