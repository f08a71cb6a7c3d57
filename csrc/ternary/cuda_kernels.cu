// CUDA kernels for ternary weights: a fused batch-1..8 GEMV (2-bit decode + dp4a on BitNet's int8
// activations) and the helpers of the large-batch path. Torch-free; needs sm_80+ (dp4a exists
// from sm_61; the build targets sm_80/89/90a).
//
// Why decode + dp4a rather than a lookup table: at the bandwidth bound a 2-bit weight stream on
// an H100/H200 leaves about one integer instruction per weight (docs/methods/ternary.md). A
// shared-memory LUT spends a shared load per lookup (2-4 weights), which alone is at that budget;
// here one 128-bit load brings 64 trits, each 32-bit word of 16 trits becomes four int8x4 operands
// with one shift and one mask each (value j of the word lands in byte j / 4 of operand j % 4),
// and each operand feeds one dp4a (4 multiply-adds). The activations are stored in shared memory
// in the matching order (byte 4j + b of every 16-column block holds column 4b + j), so the i2
// layout on disk needs no interleaving at all. Codes are c = t + 1 >= 0: dp4a sums c * xq and
// the kernel subtracts the precomputed sums of xq (per 32 columns), which is exact.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "common/cuda_check.h"
#include "common/cuda_convert.cuh"
#include "ternary/cuda_kernels.cuh"
#include "common/cuda_launch.cuh"

namespace quantlab::ternary {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr float kActClampMin = 1e-5f;
constexpr uint32_t kCodeMask = 0x03030303u;

// BitNet's 127 / max(amax, 1e-5) as torch evaluates it: a rounded reciprocal, then times 127.
__device__ __forceinline__ float act_scale(float amax) {
  return __fmul_rn(__frcp_rn(fmaxf(amax, kActClampMin)), 127.0f);
}

__device__ __forceinline__ int quantize(float v, float inv) {
  return max(-128, min(127, __float2int_rn(__fmul_rn(v, inv))));
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ int warp_sum(int v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Max |x| over a row and whether it holds a NaN/Inf, reduced over the block.
template <typename T>
__device__ float block_absmax(const T* x, int64_t k, float* scratch, bool* bad) {
  float amax = 0.0f;
  int finite = 1;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const float v = to_float(x[i]);
    finite &= isfinite(v) ? 1 : 0;
    amax = fmaxf(amax, fabsf(v));
  }
  amax = warp_max(amax);
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) scratch[warp] = amax;
  *bad = __syncthreads_or(!finite) != 0;
  amax = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) amax = fmaxf(amax, scratch[w]);
  __syncthreads();  // scratch is reused by the next row
  return amax;
}

// Shared memory of the fused GEMV, for M rows of x and `chunks` 64-column chunks:
//   xs   int8  [M][4][chunks][16]: block q (16 columns) at [q % 4][q / 4] (so the 16-byte reads
//        of a warp's consecutive lanes are consecutive: no bank conflicts); inside a block, byte
//        4j + b holds column 16q + 4b + j;
//   xsum int32 [M][2 * chunks]: sums of xq over 32 columns;
//   xtot int32 [M], inv float [M], scratch float [kWarps].
struct SharedLayout {
  size_t xs, xsum, xtot, inv, scratch, total;
};

__host__ __device__ inline SharedLayout shared_layout(int64_t m, int64_t chunks) {
  SharedLayout l{};
  l.xs = 0;
  l.xsum = static_cast<size_t>(m * 64 * chunks);
  l.xtot = l.xsum + static_cast<size_t>(m * 2 * chunks) * 4;
  l.inv = l.xtot + static_cast<size_t>(m) * 4;
  l.scratch = l.inv + static_cast<size_t>(m) * 4;
  l.total = l.scratch + kWarps * 4;
  return l;
}

// y [M, N] = A8(x) @ W^T. LPR lanes cooperate on one output row (8 for short rows, else 32).
template <typename T, int M, int LPR>
__global__ void __launch_bounds__(kThreads) gemv_kernel(CudaWeight w, const T* __restrict__ x,
                                                        T* __restrict__ y) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t chunks = w.row_bytes / 16;
  const SharedLayout lay = shared_layout(M, chunks);
  int8_t* xs = reinterpret_cast<int8_t*>(smem + lay.xs);
  int* xsum = reinterpret_cast<int*>(smem + lay.xsum);
  int* xtot = reinterpret_cast<int*>(smem + lay.xtot);
  float* inv_s = reinterpret_cast<float*>(smem + lay.inv);
  float* scratch = reinterpret_cast<float*>(smem + lay.scratch);
  const int64_t kp = 64 * chunks;

  // Prologue: every block quantizes x itself (one launch; x is tiny next to the weights).
  for (int m = 0; m < M; ++m) {
    const T* xm = x + m * w.k;
    bool bad = false;
    const float amax = block_absmax(xm, w.k, scratch, &bad);
    const float inv = bad ? __int_as_float(0x7fc00000) : act_scale(amax);
    int total = 0;
    for (int64_t col = threadIdx.x; col < kp; col += kThreads) {
      const int q = (col < w.k && !bad) ? quantize(to_float(xm[col]), inv) : 0;
      const int64_t block = col >> 4;
      const int within = static_cast<int>(col & 15);
      const int64_t pos = ((m * 4 + (block & 3)) * chunks + (block >> 2)) * 16 +
                          4 * (within & 3) + (within >> 2);
      xs[pos] = static_cast<int8_t>(q);
      // kp is a multiple of 64 and kThreads of 32, so a warp covers 32 whole columns.
      const int s = warp_sum(q);
      if ((threadIdx.x & 31) == 0) {
        xsum[m * 2 * chunks + (col >> 5)] = s;
        total += s;
      }
    }
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = __int_as_float(total);
    __syncthreads();
    if (threadIdx.x == 0) {
      int sum = 0;
      for (int i = 0; i < kWarps; ++i) sum += __float_as_int(scratch[i]);
      xtot[m] = sum;
      inv_s[m] = inv;
    }
    __syncthreads();
  }

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int sub = lane / LPR;       // which row of the warp's pass
  const int sl = lane % LPR;        // lane within the row
  constexpr int kRowsPerWarp = 32 / LPR;
  const bool grouped = w.group_size > 0;
  const int64_t groups = grouped ? w.k / w.group_size : 1;

  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRowsPerWarp;
       base < w.n; base += static_cast<int64_t>(gridDim.x) * kWarps * kRowsPerWarp) {
    const int64_t row = base + sub;
    const bool active = row < w.n;
    int acc[M];
    float accf[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      acc[m] = 0;
      accf[m] = 0.0f;
    }
    if (active) {
      const uint4* wrow = reinterpret_cast<const uint4*>(w.qweight + row * w.row_bytes);
      const float* srow = w.scales + (w.group_size == kCudaPerTensor ? 0 : row * groups);
      for (int64_t c = sl; c < chunks; c += LPR) {
        const uint4 wv = __ldg(wrow + c);
        const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
        int part[M][2];
#pragma unroll
        for (int m = 0; m < M; ++m) part[m][0] = part[m][1] = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int b0 = static_cast<int>(words[i] & kCodeMask);
          const int b1 = static_cast<int>((words[i] >> 2) & kCodeMask);
          const int b2 = static_cast<int>((words[i] >> 4) & kCodeMask);
          const int b3 = static_cast<int>((words[i] >> 6) & kCodeMask);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            const int4 xv = *reinterpret_cast<const int4*>(xs + ((m * 4 + i) * chunks + c) * 16);
            int p = part[m][i >> 1];
            p = __dp4a(b0, xv.x, p);
            p = __dp4a(b1, xv.y, p);
            p = __dp4a(b2, xv.z, p);
            p = __dp4a(b3, xv.w, p);
            part[m][i >> 1] = p;
          }
        }
        if (!grouped) {
#pragma unroll
          for (int m = 0; m < M; ++m) acc[m] += part[m][0] + part[m][1];
        } else if (w.group_size == 32) {
#pragma unroll
          for (int m = 0; m < M; ++m) {
            const int* xsm = xsum + m * 2 * chunks;
            accf[m] = fmaf(static_cast<float>(part[m][0] - xsm[2 * c]), srow[2 * c], accf[m]);
            if (64 * c + 32 < w.k) {
              accf[m] = fmaf(static_cast<float>(part[m][1] - xsm[2 * c + 1]), srow[2 * c + 1],
                             accf[m]);
            }
          }
        } else {
          const float s = srow[(64 * c) / w.group_size];
#pragma unroll
          for (int m = 0; m < M; ++m) {
            const int* xsm = xsum + m * 2 * chunks;
            const int dot = part[m][0] + part[m][1] - xsm[2 * c] - xsm[2 * c + 1];
            accf[m] = fmaf(static_cast<float>(dot), s, accf[m]);
          }
        }
      }
    }
    // Reduce over the LPR lanes of the row (integers exactly; per-group sums in fp32).
#pragma unroll
    for (int m = 0; m < M; ++m) {
      for (int o = LPR / 2; o > 0; o >>= 1) {
        // Every lane takes part (rows past N with zeros), so the full mask is exact.
        acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o, LPR);
        accf[m] += __shfl_xor_sync(0xffffffffu, accf[m], o, LPR);
      }
    }
    if (active && sl == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float v;
        if (grouped) {
          v = __fdiv_rn(accf[m], inv_s[m]);
        } else {
          const float s = w.scales[w.group_size == kCudaPerTensor ? 0 : row];
          v = __fdiv_rn(__fmul_rn(static_cast<float>(acc[m] - xtot[m]), s), inv_s[m]);
        }
        y[m * w.n + row] = from_float<T>(v);
      }
    }
  }
}

template <typename T>
__global__ void fake_quantize_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t k) {
  __shared__ float scratch[32];
  const T* xm = x + blockIdx.x * k;
  bool bad = false;
  const float amax = block_absmax(xm, k, scratch, &bad);
  const float inv = bad ? __int_as_float(0x7fc00000) : act_scale(amax);
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const float q = bad ? __int_as_float(0x7fc00000) : static_cast<float>(quantize(to_float(xm[i]), inv));
    out[blockIdx.x * k + i] = from_float<T>(__fdiv_rn(q, inv));
  }
}

__device__ __forceinline__ int code_at(const uint8_t* row, int packing, int64_t col) {
  if (packing == 0) return (row[col >> 2] >> (2 * (col & 3))) & 3;
  const int q = row[col / 5];
  int pow3 = 1;
  for (int i = 0; i < static_cast<int>(col % 5); ++i) pow3 *= 3;
  return (((q * pow3) & 0xFF) * 3) >> 8;
}

template <typename T>
__global__ void dequant_kernel(const uint8_t* __restrict__ qweight, int packing, int64_t row_bytes,
                               const float* __restrict__ scales, int64_t n, int64_t k,
                               int64_t group_size, T* __restrict__ out) {
  const int64_t groups = group_size > 0 ? k / group_size : 1;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n * k;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / k;
    const int64_t col = idx % k;
    const int t = code_at(qweight + row * row_bytes, packing, col) - 1;
    float s = scales[0];
    if (group_size == kCudaPerRow) s = scales[row];
    if (group_size > 0) s = scales[row * groups + col / group_size];
    out[idx] = from_float<T>(static_cast<float>(t) * s);
  }
}

__global__ void to_aligned_i2_kernel(const uint8_t* __restrict__ qweight, int packing,
                                     int64_t row_bytes_in, int64_t n, int64_t k,
                                     uint8_t* __restrict__ out, int64_t row_bytes_out) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       idx < n * row_bytes_out; idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / row_bytes_out;
    const int64_t byte = idx % row_bytes_out;
    const uint8_t* src = qweight + row * row_bytes_in;
    int v = 0;
    for (int i = 0; i < 4; ++i) {
      const int64_t col = 4 * byte + i;
      const int code = col < k ? code_at(src, packing, col) : 1;
      v |= code << (2 * i);
    }
    out[idx] = static_cast<uint8_t>(v);
  }
}

int grid_for(int64_t work, int threads) {
  return static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, 65535));
}

template <typename T, int M, int LPR>
cudaError_t launch_gemv_typed(const CudaWeight& w, const T* x, T* y, int sm_count, size_t shared,
                              cudaStream_t stream) {
  auto kernel = gemv_kernel<T, M, LPR>;
  if (shared > 48 * 1024) {
    QUANTLAB_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  }
  const int64_t rows_per_block = kWarps * (32 / LPR);
  const int64_t blocks = (w.n + rows_per_block - 1) / rows_per_block;
  // Two blocks per SM are enough to keep the loads in flight; more would only repeat the
  // prologue (each block quantizes x) for rows another block could take.
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 2 * sm_count)));
  QUANTLAB_LAUNCH(grid, kThreads, shared, stream, kernel)(w, x, y);
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

template <typename T, int M>
cudaError_t launch_gemv_rows(const CudaWeight& w, const T* x, T* y, int sm_count, size_t shared,
                             cudaStream_t stream) {
  // Rows shorter than 32 chunks (K < 2048) leave most of a warp idle with 32 lanes per row.
  if (w.row_bytes / 16 < 32) return launch_gemv_typed<T, M, 8>(w, x, y, sm_count, shared, stream);
  return launch_gemv_typed<T, M, 32>(w, x, y, sm_count, shared, stream);
}

template <typename T>
cudaError_t launch_gemv_dtype(const CudaWeight& w, const void* xv, void* yv, int64_t m,
                              int sm_count, int max_shared, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  T* y = static_cast<T*>(yv);
  int64_t done = 0;
  while (done < m) {
    // As many rows per launch as fit in shared memory (all of them for usual shapes).
    int64_t rows = std::min<int64_t>(m - done, kCudaGemvMaxRows);
    while (rows > 1 && gemv_shared_bytes(w, rows) > static_cast<size_t>(max_shared)) --rows;
    const size_t shared = gemv_shared_bytes(w, rows);
    if (shared > static_cast<size_t>(max_shared)) return cudaErrorInvalidValue;
    const T* xs = x + done * w.k;
    T* ys = y + done * w.n;
    cudaError_t err = cudaSuccess;
    switch (rows) {
      case 1: err = launch_gemv_rows<T, 1>(w, xs, ys, sm_count, shared, stream); break;
      case 2: err = launch_gemv_rows<T, 2>(w, xs, ys, sm_count, shared, stream); break;
      case 3: err = launch_gemv_rows<T, 3>(w, xs, ys, sm_count, shared, stream); break;
      case 4: err = launch_gemv_rows<T, 4>(w, xs, ys, sm_count, shared, stream); break;
      case 5: err = launch_gemv_rows<T, 5>(w, xs, ys, sm_count, shared, stream); break;
      case 6: err = launch_gemv_rows<T, 6>(w, xs, ys, sm_count, shared, stream); break;
      case 7: err = launch_gemv_rows<T, 7>(w, xs, ys, sm_count, shared, stream); break;
      default: err = launch_gemv_rows<T, 8>(w, xs, ys, sm_count, shared, stream); break;
    }
    QUANTLAB_CUDA_RETURN_IF_ERROR(err);
    done += rows;
  }
  return cudaSuccess;
}

}  // namespace

bool gemv_supported(const CudaWeight& w) {
  const bool granularity = w.group_size == kCudaPerTensor || w.group_size == kCudaPerRow ||
                           ((w.group_size == 32 || w.group_size == 64 || w.group_size == 128) &&
                            w.k % w.group_size == 0);
  return granularity && w.n > 0 && w.k > 0 && w.row_bytes % kCudaRowAlign == 0 &&
         4 * w.row_bytes >= w.k;
}

size_t gemv_shared_bytes(const CudaWeight& w, int64_t m) {
  return shared_layout(m, w.row_bytes / 16).total;
}

cudaError_t launch_gemv(const CudaWeight& w, const void* x, void* y, int64_t m, DType dtype,
                        int sm_count, int max_shared, cudaStream_t stream) {
  if (!gemv_supported(w) || m < 1) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return launch_gemv_dtype<float>(w, x, y, m, sm_count, max_shared, stream);
    case DType::kFloat16: return launch_gemv_dtype<__half>(w, x, y, m, sm_count, max_shared, stream);
    case DType::kBFloat16:
      return launch_gemv_dtype<__nv_bfloat16>(w, x, y, m, sm_count, max_shared, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_fake_quantize_activations(const void* x, void* out, int64_t m, int64_t k,
                                             DType dtype, cudaStream_t stream) {
  if (m < 1 || m > 2147483647 || k < 1) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(m));
  switch (dtype) {
    case DType::kFloat32:
      QUANTLAB_LAUNCH(grid, kThreads, 0, stream, fake_quantize_kernel<float>)(static_cast<const float*>(x),
                                                                 static_cast<float*>(out), k);
      break;
    case DType::kFloat16:
      QUANTLAB_LAUNCH(grid, kThreads, 0, stream, fake_quantize_kernel<__half>)(static_cast<const __half*>(x),
                                                                  static_cast<__half*>(out), k);
      break;
    case DType::kBFloat16:
      QUANTLAB_LAUNCH(grid, kThreads, 0, stream, fake_quantize_kernel<__nv_bfloat16>)(
          static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(out), k);
      break;
  }
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

cudaError_t launch_dequant(const uint8_t* qweight, int packing, int64_t row_bytes,
                           const float* scales, int64_t n, int64_t k, int64_t group_size,
                           void* out, DType out_dtype, cudaStream_t stream) {
  const int grid = grid_for(n * k, kThreads);
  switch (out_dtype) {
    case DType::kFloat32:
      QUANTLAB_LAUNCH(grid, kThreads, 0, stream, dequant_kernel<float>)(qweight, packing, row_bytes, scales, n,
                                                           k, group_size, static_cast<float*>(out));
      break;
    case DType::kFloat16:
      QUANTLAB_LAUNCH(grid, kThreads, 0, stream, dequant_kernel<__half>)(
          qweight, packing, row_bytes, scales, n, k, group_size, static_cast<__half*>(out));
      break;
    case DType::kBFloat16:
      QUANTLAB_LAUNCH(grid, kThreads, 0, stream, dequant_kernel<__nv_bfloat16>)(
          qweight, packing, row_bytes, scales, n, k, group_size, static_cast<__nv_bfloat16*>(out));
      break;
  }
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

cudaError_t launch_to_aligned_i2(const uint8_t* qweight, int packing, int64_t row_bytes_in,
                                 int64_t n, int64_t k, uint8_t* out, int64_t row_bytes_out,
                                 cudaStream_t stream) {
  if (row_bytes_out % kCudaRowAlign != 0 || 4 * row_bytes_out < k) return cudaErrorInvalidValue;
  QUANTLAB_LAUNCH(grid_for(n * row_bytes_out, kThreads), kThreads, 0, stream, to_aligned_i2_kernel)(
      qweight, packing, row_bytes_in, n, k, out, row_bytes_out);
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

}  // namespace quantlab::ternary
