// Groupwise-int CUDA kernels: dequantization and a warp-per-row GEMV for batches of 1-8.
//
// GEMV: one warp per output row, reusing each unpacked weight for all M <= 8 rows of x
// (cuda_gemv_row.cuh). This is the portable baseline every later kernel (tensor-core GEMM,
// split-K, the grouped GEMV over experts) is checked against.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common/bitstream.h"
#include "common/cuda_check.h"
#include "common/cuda_convert.cuh"
#include "groupwise_int/cuda_gemv_row.cuh"
#include "groupwise_int/cuda_kernels.cuh"
#include "common/cuda_launch.cuh"

namespace quantlab::groupwise_int {
namespace {

constexpr int kWarp = kGemvWarp;
constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float zero_point(const CudaWeight& w, int64_t row, int64_t g) {
  if (w.qzeros == nullptr) return static_cast<float>(1u << (w.bits - 1));
  const int64_t groups = w.k / w.group_size;
  return static_cast<float>(
      extract_value(w.qzeros + row * packed_words(groups, w.bits), g, w.bits));
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
  const GemvRow<float> r{w.qweight + row * packed_words(w.k, w.bits), w.scales + row * groups,
                         w.qzeros == nullptr
                             ? nullptr
                             : w.qzeros + row * packed_words(groups, w.bits),
                         w.k, w.group_size, w.bits};
  gemv_row<T, float, M>(r, x, y + row, w.n, lane);
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
