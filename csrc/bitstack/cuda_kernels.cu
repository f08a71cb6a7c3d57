// BitStack CUDA kernels: tensor-core sign GEMV for small batches, and row rebuild.
//
// GEMV. Per block b: Z = S_b X̃_b^T with X̃_b[(r, m), j] = v_b[r, j] * x[m, j], then
// y[m, n] += sum_r u_b[n, r] * Z[n, (r, m)]. S_b is a ±1 matrix [N, K]; X̃_b has r * M "columns"
// (right-hand sides), so the product is a W1A16 GEMM with batch r * M even at M = 1 -- tensor-core
// work (kernels.md §2.11), not a GEMV. Mapping onto mma.sync.m16n8k16 (fp16 or bf16 in, fp32
// accumulate): A = 16 output rows x 16 k of S (decoded to ±1 in registers), B = 16 k x 8 columns of
// X̃, so one warp tile is 16 rows and all ceil(r M / 8) n8 tiles (rank * M <= 32).
//
// - K permutation: an mma's k order is free as long as A and B use the same one. Thread (g, t) of
//   a warp (g = lane / 4, t = lane % 4) holds logical k {2t, 2t+1, 2t+8, 2t+9} of A and B; here they
//   are physical columns {4t, 4t+1, 4t+2, 4t+3}, i.e. exactly one sign nibble of a row (no bit
//   gathering) and one 8-byte load of v and of x per B register pair.
// - Sign decode: a nibble's 4 bits become two 32-bit registers of two 16-bit ±1 values each:
//   OR the constant 1.0 pair (0x3C00 fp16, 0x3F80 bf16) with the inverted bits moved to bits 15
//   and 31 (bit 1 = +1 keeps the sign bit clear).
// - Work split: one CTA of 4 warps owns 16 output rows; the warps take interleaved 32-column
//   steps of K (one 32-bit sign word per row and step), run every block in turn (u differs per
//   block, so each block's Z is reduced with its u into per-row partial outputs in registers), and
//   the 4 partials are summed through shared memory at the end. The 4 lanes of a quad hold the 8
//   columns of a row between them and are combined with two shuffles.
// - Cost (D): per 16 x 16 sign tile a thread spends ~10 integer ops on decode and ~3 per n8 tile
//   on B, for 8 weights: about 2 ops per weight and block, above the ~0.8-1.6 per weight an H100/
//   H200 affords at the bandwidth bound of a ~1.1-bit block (kernels.md §3.6). So this kernel is
//   expected to be ALU-bound, a small multiple of the bandwidth floor; measured speed: none yet
//   (no GPU in the session that wrote it; docs/methods/bitstack.md).
//
// Rebuild. out[n, j] = sum_b S_b[n, j] * sum_r u_b[n, r] v_b[r, j], one thread per element, fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "bitstack/cuda_kernels.cuh"
#include "common/cuda_check.h"
#include "common/ptx.cuh"
#include "common/cuda_launch.cuh"

namespace quantlab::bitstack {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerCta = 16;
constexpr int kColsPerStep = 32;  // one 32-bit sign word per row
constexpr int kMaxNTiles = kGemvMaxColumns / 8;

template <typename T>
struct Traits;

template <>
struct Traits<__half> {
  static constexpr uint32_t kOnePair = 0x3C003C00u;
  __device__ static uint32_t mul_pair(uint32_t a, uint32_t b) {
    __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16_f16(c, a, b0, b1);
  }
  __device__ static float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  __device__ static uint16_t from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

template <>
struct Traits<__nv_bfloat16> {
  static constexpr uint32_t kOnePair = 0x3F803F80u;
  __device__ static uint32_t mul_pair(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                               *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    ptx::mma_m16n8k16_bf16(c, a, b0, b1);
  }
  __device__ static float to_float(uint16_t bits) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
  __device__ static uint16_t from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

// Two ±1 pairs from a nibble (bit 3 = first column): {col0, col1} and {col2, col3}.
template <typename T>
__device__ __forceinline__ void decode_nibble(uint32_t nib, uint32_t& lo_pair, uint32_t& hi_pair) {
  const uint32_t neg = ~nib;
  lo_pair = Traits<T>::kOnePair | ((neg & 8u) << 12) | ((neg & 4u) << 29);
  hi_pair = Traits<T>::kOnePair | ((neg & 2u) << 14) | ((neg & 1u) << 31);
}

// fp16 (the factors' storage type) to the activation type, as a pair.
template <typename T>
__device__ __forceinline__ uint32_t factor_pair(const uint16_t* v);

template <>
__device__ __forceinline__ uint32_t factor_pair<__half>(const uint16_t* v) {
  return *reinterpret_cast<const uint32_t*>(v);
}

template <>
__device__ __forceinline__ uint32_t factor_pair<__nv_bfloat16>(const uint16_t* v) {
  const __half2 h = *reinterpret_cast<const __half2*>(v);
  const float2 f = __half22float2(h);
  __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
  return *reinterpret_cast<uint32_t*>(&b);
}

template <typename T, int M, int NT>
__global__ void __launch_bounds__(kThreads) gemv_kernel(CudaWeight w, const uint16_t* __restrict__ x,
                                                        uint16_t* __restrict__ y) {
  __shared__ float partial[kWarps][kRowsPerCta][M];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerCta;
  const int64_t rows[2] = {row0 + g, row0 + g + 8};
  const bool valid[2] = {rows[0] < w.n, rows[1] < w.n};
  const int64_t kb = (w.k + 7) / 8;
  const int64_t steps = w.k / kColsPerStep;
  const int columns = static_cast<int>(w.rank) * M;

  float out[2][M];
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < M; ++m) out[h][m] = 0.0f;

  for (int64_t b = 0; b < w.blocks; ++b) {
    const uint8_t* signs = w.signs + b * w.n * kb;
    const uint16_t* vb = w.v + b * w.rank * w.k;
    float acc[NT][4];
    for (int i = 0; i < NT; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (int64_t s = warp; s < steps; s += kWarps) {
      const int64_t k0 = s * kColsPerStep;
      uint32_t word[2];
      for (int h = 0; h < 2; ++h)
        word[h] = valid[h] ? *reinterpret_cast<const uint32_t*>(signs + rows[h] * kb + k0 / 8) : 0u;
#pragma unroll
      for (int tile = 0; tile < 2; ++tile) {
        const int64_t kt = k0 + 16 * tile;  // this k16 tile's first column
        // Byte (2 tile + t / 2) of the word; high nibble for even t (MSB-first columns).
        const int shift = 8 * (2 * tile + t / 2) + ((t & 1) ? 0 : 4);
        uint32_t a[4];
        decode_nibble<T>((word[0] >> shift) & 15u, a[0], a[2]);
        decode_nibble<T>((word[1] >> shift) & 15u, a[1], a[3]);
        const int64_t j = kt + 4 * t;  // physical columns j .. j + 3 of this thread
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int c = nt * 8 + g;  // right-hand side (r, m) = (c / M, c % M)
          uint32_t b0 = 0u, b1 = 0u;
          if (c < columns) {
            const int r = c / M;
            const int m = c % M;
            const uint16_t* vr = vb + r * w.k + j;
            const uint16_t* xm = x + m * w.k + j;
            b0 = Traits<T>::mul_pair(factor_pair<T>(vr), *reinterpret_cast<const uint32_t*>(xm));
            b1 = Traits<T>::mul_pair(factor_pair<T>(vr + 2),
                                     *reinterpret_cast<const uint32_t*>(xm + 2));
          }
          Traits<T>::mma(acc[nt], a, b0, b1);
        }
      }
    }
    // acc[nt][0..1]: row g, columns nt*8 + 2t + {0,1}; acc[nt][2..3]: row g + 8, same columns.
    const uint16_t* ub = w.u + b * w.n * w.rank;
    for (int h = 0; h < 2; ++h) {
      float sums[M];
      for (int m = 0; m < M; ++m) sums[m] = 0.0f;
      if (valid[h]) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          for (int e = 0; e < 2; ++e) {
            const int c = nt * 8 + 2 * t + e;
            if (c < columns) {
              const float uf = __half2float(__ushort_as_half(ub[rows[h] * w.rank + c / M]));
              sums[c % M] += uf * acc[nt][2 * h + e];
            }
          }
      }
      for (int m = 0; m < M; ++m) out[h][m] += sums[m];
    }
  }
  // Combine the quad (its lanes hold different columns of the same rows), then the warps.
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < M; ++m) {
      float v = out[h][m];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      out[h][m] = v;
    }
  if (t == 0)
    for (int h = 0; h < 2; ++h)
      for (int m = 0; m < M; ++m) partial[warp][g + 8 * h][m] = out[h][m];
  __syncthreads();
  for (int i = threadIdx.x; i < kRowsPerCta * M; i += kThreads) {
    const int row = i / M;
    const int m = i % M;
    if (row0 + row >= w.n) continue;
    float v = 0.0f;
    for (int q = 0; q < kWarps; ++q) v += partial[q][row][m];
    y[m * w.n + row0 + row] = Traits<T>::from_float(v);
  }
}

__global__ void dequant_rows_kernel(CudaWeight w, int64_t row0, int64_t rows, void* out,
                                    DType out_dtype) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * w.k) return;
  const int64_t i = idx / w.k;
  const int64_t j = idx % w.k;
  const int64_t n = row0 + i;
  const int64_t kb = (w.k + 7) / 8;
  float total = 0.0f;
  for (int64_t b = 0; b < w.blocks; ++b) {
    const uint16_t* un = w.u + (b * w.n + n) * w.rank;
    const uint16_t* vb = w.v + b * w.rank * w.k;
    float mag = 0.0f;
    for (int64_t r = 0; r < w.rank; ++r)
      mag += __half2float(__ushort_as_half(un[r])) * __half2float(__ushort_as_half(vb[r * w.k + j]));
    const bool positive = (w.signs[(b * w.n + n) * kb + (j >> 3)] >> (7 - (j & 7))) & 1;
    total += positive ? mag : -mag;
  }
  switch (out_dtype) {
    case DType::kFloat32: static_cast<float*>(out)[idx] = total; break;
    case DType::kFloat16: static_cast<__half*>(out)[idx] = __float2half_rn(total); break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(out)[idx] = __float2bfloat16_rn(total);
      break;
  }
}

template <typename T, int M>
cudaError_t launch_for_m(const CudaWeight& w, const void* x, void* y, cudaStream_t stream) {
  const int nt = (static_cast<int>(w.rank) * M + 7) / 8;
  const dim3 grid(static_cast<unsigned>((w.n + kRowsPerCta - 1) / kRowsPerCta));
  const auto* xs = static_cast<const uint16_t*>(x);
  auto* ys = static_cast<uint16_t*>(y);
  switch (nt) {
    case 1: QUANTLAB_LAUNCH(grid, kThreads, 0, stream, gemv_kernel<T, M, 1>)(w, xs, ys); break;
    case 2: QUANTLAB_LAUNCH(grid, kThreads, 0, stream, gemv_kernel<T, M, 2>)(w, xs, ys); break;
    case 3: QUANTLAB_LAUNCH(grid, kThreads, 0, stream, gemv_kernel<T, M, 3>)(w, xs, ys); break;
    default: QUANTLAB_LAUNCH(grid, kThreads, 0, stream, gemv_kernel<T, M, kMaxNTiles>)(w, xs, ys); break;
  }
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

template <typename T>
cudaError_t launch_typed(const CudaWeight& w, const void* x, void* y, int64_t m,
                         cudaStream_t stream) {
  switch (m) {
    case 1: return launch_for_m<T, 1>(w, x, y, stream);
    case 2: return launch_for_m<T, 2>(w, x, y, stream);
    case 3: return launch_for_m<T, 3>(w, x, y, stream);
    case 4: return launch_for_m<T, 4>(w, x, y, stream);
    case 5: return launch_for_m<T, 5>(w, x, y, stream);
    case 6: return launch_for_m<T, 6>(w, x, y, stream);
    case 7: return launch_for_m<T, 7>(w, x, y, stream);
    default: return launch_for_m<T, 8>(w, x, y, stream);
  }
}

}  // namespace

bool gemv_supported(const CudaWeight& w, int64_t m) {
  return m >= 1 && m <= kGemvMaxRows && w.rank >= 1 && w.rank * m <= kGemvMaxColumns &&
         w.k % kColsPerStep == 0 && w.n >= 1 && w.blocks >= 1 &&
         (w.n + kRowsPerCta - 1) / kRowsPerCta <= 0x7fffffff;
}

cudaError_t launch_gemv(const CudaWeight& w, const void* x, void* y, int64_t m, DType dtype,
                        cudaStream_t stream) {
  if (!gemv_supported(w, m) || dtype == DType::kFloat32) return cudaErrorInvalidValue;
  if (dtype == DType::kFloat16) return launch_typed<__half>(w, x, y, m, stream);
  return launch_typed<__nv_bfloat16>(w, x, y, m, stream);
}

cudaError_t launch_dequant_rows(const CudaWeight& w, int64_t row0, int64_t row1, void* out,
                                DType out_dtype, cudaStream_t stream) {
  if (row1 <= row0) return cudaSuccess;
  const int64_t total = (row1 - row0) * w.k;
  constexpr int kBlock = 256;
  const int64_t grid = (total + kBlock - 1) / kBlock;
  if (grid > 0x7fffffff) return cudaErrorInvalidValue;
  QUANTLAB_LAUNCH(static_cast<unsigned>(grid), kBlock, 0, stream, dequant_rows_kernel)(w, row0, row1 - row0,
                                                                        out, out_dtype);
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

}  // namespace quantlab::bitstack
