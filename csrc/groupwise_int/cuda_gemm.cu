// Groupwise-int tensor-core GEMM for mid-size batches (kGemvMaxRows < M <= kGemmMaxRows), with
// optional split-K. y [M, N] = x [M, K] @ W^T, x and y fp16 or bf16, fp32 accumulation.
//
// Design (deliberately simple; correctness first, then the obvious latency hiding):
// - One CTA of 4 warps (128 threads) owns a BM x 64 (M x N) output tile and walks K in 64-wide
//   tiles. BM is 16, 32 or 64, picked from M so small batches do not pay for a 64-row tile.
//   A 64-wide N tile and a 64-wide K tile keep the whole working set at <= 18 KB of static shared
//   memory (x tile BM x 64 + dequantized W tile 64 x 64, rows padded to 72 elements so 16-byte
//   stores and wmma's 32-byte alignment hold and consecutive rows shift banks), so several CTAs
//   fit on an SM and hide each other's latency.
// - Per K tile: the raw x vectors (16 B each) and the packed weight words of the next tile are
//   loaded into registers before the tensor-core work on the current tile is issued (register
//   double buffering; no cp.async), then stored to shared memory: x as is, W dequantized as
//   (q - z) * s in fp32 and rounded once to the activation dtype -- bit-identical to the
//   reference's dequant(W).to(dtype). The MMA is nvcuda::wmma 16x16x16 (fp16 or bf16 inputs, fp32
//   accumulators; sm_80+). B = W^T is read column-major straight from the [n][k] W tile.
// - Dequant works on chunks of 8 consecutive k of one row: 8 * bits contiguous stream bits, read
//   from at most two words (a funnel shift handles 3-bit chunks that straddle words). A chunk lies
//   in one group whenever group_size % 8 == 0 or the weight is per-channel, which gemm_supported
//   requires; the scale and the zero point are read once per chunk. All bit widths 2, 3, 4 and 8
//   take this path (nothing falls back by bit width).
// - Bounds: every global read is guarded; rows past M, columns past N and k past K (per-channel
//   K % 8 != 0) are zero in shared memory, so partial tiles cost work but never a wrong answer.
//   x is read with 16-byte vectors only when K % 8 == 0 and x is 16-byte aligned, otherwise with
//   guarded 2-byte loads.
// - Split-K: blockIdx.z takes a contiguous range of K tiles; with more than one split each CTA
//   writes fp32 partials to workspace [splits, M, N] and a second kernel sums the splits in a fixed
//   order and rounds to the output dtype (deterministic: no atomics). gemm_pick_splits splits only
//   when the output tiles cannot fill the GPU (tiles < SM count), aiming at about two CTAs per SM,
//   with at least two K tiles (128 columns) per split and at most kGemmMaxSplits splits.
// What stays elsewhere (decided by the torch adapter, csrc/bindings/groupwise_int_cuda.cpp):
// M <= kGemvMaxRows -> warp-per-row GEMV; M > kGemmMaxRows (compute-bound), fp32 activations,
// group sizes that are not a multiple of 8 (other than per-channel), and GPUs below sm_80 ->
// dequantize + cuBLAS.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "common/bitstream.h"
#include "common/cuda_check.h"
#include "common/cuda_convert.cuh"
#include "groupwise_int/cuda_kernels.cuh"
#include "common/cuda_launch.cuh"

namespace quantlab::groupwise_int {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBN = 64;                    // output columns (rows of W) per CTA
constexpr int kBK = 64;                    // K per main-loop step
constexpr int kChunk = 8;                  // consecutive k per dequant chunk / per 16-byte vector
constexpr int kChunksPerRow = kBK / kChunk;
constexpr int kLdAB = kBK + 8;             // smem pitch (elements) of the x and W tiles: 144 B
constexpr int kLdC = kBN + 4;              // fp32 pitch of the epilogue tile: 272 B
constexpr int kWChunks = kBN * kChunksPerRow / kThreads;  // W chunks per thread per K tile
constexpr int kMinKTilesPerSplit = 2;
constexpr int kMaxGridY = 65535;

static_assert(kBN * kChunksPerRow % kThreads == 0, "W tile must split evenly over the threads");
static_assert((kLdAB * 2) % 16 == 0, "16-byte smem stores need a 16-byte row pitch");
static_assert((16 * kLdAB * 2) % 32 == 0 && (16 * kLdC * 4) % 32 == 0,
              "wmma fragment pointers must stay 32-byte aligned");

template <int BM>
struct Tile {
  static constexpr int kWarpsM = BM >= 64 ? 2 : 1;
  static constexpr int kWarpsN = kWarps / kWarpsM;
  static constexpr int kFragM = BM / (16 * kWarpsM);   // 16x16 accumulators per warp along M
  static constexpr int kFragN = kBN / (16 * kWarpsN);  // ... along N
  static constexpr int kXVecs = BM * kChunksPerRow / kThreads;  // x 16-byte vectors per thread
  static constexpr int kABBytes = (BM + kBN) * kLdAB * 2;
  static constexpr int kCBytes = BM * kLdC * 4;
  static constexpr int kSmemBytes = kABBytes > kCBytes ? kABBytes : kCBytes;
  static_assert(kWarpsM * kWarpsN == kWarps, "warp grid");
  static_assert(kFragM >= 1 && kFragN >= 1, "tile too small for the warp grid");
  static_assert(kFragM * 16 * kWarpsM == BM && kFragN * 16 * kWarpsN == kBN, "tile shape");
  static_assert(kXVecs >= 1 && BM * kChunksPerRow % kThreads == 0, "x tile split");
  static_assert((BM * kLdAB * 2) % 32 == 0, "W tile base must stay 32-byte aligned");
};

struct GemmArgs {
  CudaWeight w;
  const void* x;     // [M, K], T
  void* y;           // [M, N], T (written when splits == 1)
  float* workspace;  // [splits, M, N] fp32 partials (splits > 1)
  int64_t m;
  int k_tiles;
  int k_tiles_per_split;
  int splits;
  int x_vec;  // 1: K % 8 == 0 and x 16-byte aligned, so x chunks are single uint4 loads
};

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // .x (low 16 bits) = lo
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Raw (not yet decoded) global data of one K tile, held in registers while the previous tile's
// MMAs run.
template <int BM>
struct Staging {
  uint4 x[Tile<BM>::kXVecs];
  uint32_t wlo[kWChunks];  // stream word holding the chunk's first bit
  uint32_t whi[kWChunks];  // next word (8-bit chunks; 3-bit chunks that straddle), else 0
  float scale[kWChunks];   // 0 for rows past N / chunks past K
  uint32_t zlo[kWChunks];  // zero-point stream word(s), or the symmetric zero in zlo
  uint32_t zhi[kWChunks];
  int zshift[kWChunks];
};

template <typename T, int BITS, int BM>
__device__ __forceinline__ void load_tile(const GemmArgs& a, int kt, int64_t m0, int64_t n0,
                                          Staging<BM>& st) {
  const int tid = threadIdx.x;
  const int64_t K = a.w.k;
  // x: BM rows x 8 chunks of 8 elements; consecutive threads take consecutive chunks of a row.
#pragma unroll
  for (int i = 0; i < Tile<BM>::kXVecs; ++i) {
    const int idx = tid + i * kThreads;
    const int row = idx / kChunksPerRow;
    const int64_t m = m0 + row;
    const int64_t k = static_cast<int64_t>(kt) * kBK + (idx % kChunksPerRow) * kChunk;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (m < a.m && k < K) {
      if (a.x_vec) {
        // K % 8 == 0, so k < K means the whole chunk is in the row; 16-byte aligned.
        v = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) + m * K + k));
      } else {
        const unsigned short* xr = static_cast<const unsigned short*>(a.x) + m * K;
        uint32_t p[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t lo = k + 2 * j < K ? static_cast<uint32_t>(xr[k + 2 * j]) : 0u;
          const uint32_t hi = k + 2 * j + 1 < K ? static_cast<uint32_t>(xr[k + 2 * j + 1]) : 0u;
          p[j] = lo | (hi << 16);
        }
        v = make_uint4(p[0], p[1], p[2], p[3]);
      }
    }
    st.x[i] = v;
  }
  // W: 64 rows x 8 chunks; consecutive threads take consecutive chunks (words) of a row.
  const int64_t words_k = packed_words(K, BITS);
  const int64_t groups = K / a.w.group_size;
  const int64_t words_g = packed_words(groups, BITS);
#pragma unroll
  for (int i = 0; i < kWChunks; ++i) {
    const int idx = tid + i * kThreads;
    const int64_t n = n0 + idx / kChunksPerRow;
    const int64_t k0 = static_cast<int64_t>(kt) * kBK + (idx % kChunksPerRow) * kChunk;
    uint32_t lo = 0u, hi = 0u, zlo = 1u << (BITS - 1), zhi = 0u;
    int zshift = 0;
    float s = 0.0f;
    if (n < a.w.n && k0 < K) {
      const uint32_t* qrow = a.w.qweight + n * words_k;
      const int64_t bit = k0 * BITS;
      const int64_t word = bit >> 5;
      const int shift = static_cast<int>(bit & 31);
      lo = __ldg(qrow + word);
      // A second word only when the chunk reaches into it and it exists (a partial last chunk of
      // a per-channel row may end inside the last word).
      const bool need_hi = BITS == 8 || (BITS == 3 && shift + kChunk * BITS > 32);
      if (need_hi && word + 1 < words_k) hi = __ldg(qrow + word + 1);
      // The chunk lies in one group (gemm_supported); per-channel: group_size == K, g == 0.
      const int64_t g = k0 / a.w.group_size;
      s = __ldg(a.w.scales + n * groups + g);
      if (a.w.qzeros != nullptr) {
        const uint32_t* zrow = a.w.qzeros + n * words_g;
        const int64_t zbit = g * BITS;
        zshift = static_cast<int>(zbit & 31);
        zlo = __ldg(zrow + (zbit >> 5));
        // A straddling value always has a following word (common/bitstream.h).
        if (zshift + BITS > 32) zhi = __ldg(zrow + (zbit >> 5) + 1);
      }
    }
    st.wlo[i] = lo;
    st.whi[i] = hi;
    st.scale[i] = s;
    st.zlo[i] = zlo;
    st.zhi[i] = zhi;
    st.zshift[i] = zshift;
  }
}

template <typename T, int BITS, int BM>
__device__ __forceinline__ void store_tile(const GemmArgs& a, int kt, int64_t n0,
                                           const Staging<BM>& st, T* xs, T* ws) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < Tile<BM>::kXVecs; ++i) {
    const int idx = tid + i * kThreads;
    *reinterpret_cast<uint4*>(xs + (idx / kChunksPerRow) * kLdAB +
                              (idx % kChunksPerRow) * kChunk) = st.x[i];
  }
  constexpr uint32_t kMask = (1u << BITS) - 1u;
#pragma unroll
  for (int i = 0; i < kWChunks; ++i) {
    const int idx = tid + i * kThreads;
    const int row = idx / kChunksPerRow;
    const int c = idx % kChunksPerRow;
    const int64_t k0 = static_cast<int64_t>(kt) * kBK + c * kChunk;
    // Number of real weights in this chunk: 0 past N or K, < 8 only in a per-channel tail.
    const int64_t left = a.w.k - k0;
    const int valid = n0 + row < a.w.n ? static_cast<int>(left < 0 ? 0 : (left > 8 ? 8 : left)) : 0;
    float q[kChunk];
    if constexpr (BITS == 8) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        q[j] = static_cast<float>((st.wlo[i] >> (8 * j)) & 0xFFu);
        q[j + 4] = static_cast<float>((st.whi[i] >> (8 * j)) & 0xFFu);
      }
    } else {
      const int shift = static_cast<int>((k0 * BITS) & 31);
      const uint32_t chunk = BITS == 3 ? __funnelshift_r(st.wlo[i], st.whi[i], shift)
                                       : st.wlo[i] >> shift;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) q[j] = static_cast<float>((chunk >> (j * BITS)) & kMask);
    }
    const float z =
        static_cast<float>(__funnelshift_r(st.zlo[i], st.zhi[i], st.zshift[i]) & kMask);
    const float s = st.scale[i];
    uint32_t p[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // Same expression as the reference: (q - z) exact in fp32, one fp32 rounding, one rounding
      // to T.
      const float v0 = 2 * j < valid ? (q[2 * j] - z) * s : 0.0f;
      const float v1 = 2 * j + 1 < valid ? (q[2 * j + 1] - z) * s : 0.0f;
      p[j] = pack2<T>(v0, v1);
    }
    *reinterpret_cast<uint4*>(ws + row * kLdAB + c * kChunk) = make_uint4(p[0], p[1], p[2], p[3]);
  }
}

template <typename T, int BITS, int BM>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // wmma on fp16/bf16 with these shapes needs sm_80; the adapter never routes here
#else
  using Cfg = Tile<BM>;
  __shared__ __align__(128) unsigned char smem[Cfg::kSmemBytes];
  T* xs = reinterpret_cast<T*>(smem);       // [BM][kLdAB]
  T* ws = xs + BM * kLdAB;                  // [kBN][kLdAB]: W rows, i.e. B = W^T column-major
  float* cs = reinterpret_cast<float*>(smem);  // [BM][kLdC], reused after the main loop

  const int warp = threadIdx.x / 32;
  const int warp_m = warp / Cfg::kWarpsN;
  const int warp_n = warp % Cfg::kWarpsN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int split = static_cast<int>(blockIdx.z);
  const int kt_begin = split * a.k_tiles_per_split;
  const int kt_end = min(a.k_tiles, kt_begin + a.k_tiles_per_split);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Cfg::kFragM][Cfg::kFragN];
#pragma unroll
  for (int i = 0; i < Cfg::kFragM; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kFragN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  Staging<BM> st;
  if (kt_begin < kt_end) load_tile<T, BITS, BM>(a, kt_begin, m0, n0, st);
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    __syncthreads();  // the previous step's MMAs are done reading xs / ws
    store_tile<T, BITS, BM>(a, kt, n0, st, xs, ws);
    __syncthreads();
    // Issue the next tile's global loads now; they complete while the MMAs below run.
    if (kt + 1 < kt_end) load_tile<T, BITS, BM>(a, kt + 1, m0, n0, st);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[Cfg::kFragM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[Cfg::kFragN];
#pragma unroll
      for (int i = 0; i < Cfg::kFragM; ++i)
        wmma::load_matrix_sync(fa[i], xs + ((warp_m * Cfg::kFragM + i) * 16) * kLdAB + kk, kLdAB);
#pragma unroll
      for (int j = 0; j < Cfg::kFragN; ++j)
        wmma::load_matrix_sync(fb[j], ws + ((warp_n * Cfg::kFragN + j) * 16) * kLdAB + kk, kLdAB);
#pragma unroll
      for (int i = 0; i < Cfg::kFragM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::kFragN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  // Epilogue: accumulators -> smem (aliases xs / ws) -> bounds-checked, coalesced global stores.
  __syncthreads();
#pragma unroll
  for (int i = 0; i < Cfg::kFragM; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kFragN; ++j)
      wmma::store_matrix_sync(
          cs + ((warp_m * Cfg::kFragM + i) * 16) * kLdC + (warp_n * Cfg::kFragN + j) * 16,
          acc[i][j], kLdC, wmma::mem_row_major);
  __syncthreads();
  const int64_t n_out = a.w.n;
  for (int idx = threadIdx.x; idx < BM * kBN; idx += kThreads) {
    const int r = idx / kBN;
    const int c = idx % kBN;
    const int64_t m = m0 + r;
    const int64_t n = n0 + c;
    if (m >= a.m || n >= n_out) continue;
    const float v = cs[r * kLdC + c];
    if (a.splits == 1) {
      static_cast<T*>(a.y)[m * n_out + n] = from_float<T>(v);
    } else {
      a.workspace[(static_cast<int64_t>(split) * a.m + m) * n_out + n] = v;
    }
  }
#endif
}

// y = sum over splits of the fp32 partials, in split order (deterministic), rounded once to T.
template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ workspace, T* __restrict__ y,
                                     int64_t mn, int splits) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < mn;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) acc += workspace[s * mn + i];
    y[i] = from_float<T>(acc);
  }
}

int tile_m(int64_t m) { return m <= 16 ? 16 : (m <= 32 ? 32 : 64); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits that actually get K tiles: a request of s splits gives each ceil(k_tiles / s) tiles, so
// fewer splits may be needed to cover K; none is ever empty.
void split_plan(int64_t k, int requested, int* splits, int* tiles_per_split) {
  const int64_t k_tiles = ceil_div(k, kBK);
  const int64_t want =
      std::clamp<int64_t>(requested, 1, std::min<int64_t>(k_tiles, kGemmMaxSplits));
  const int64_t per = ceil_div(k_tiles, want);
  *tiles_per_split = static_cast<int>(per);
  *splits = static_cast<int>(ceil_div(k_tiles, per));
}

template <typename T, int BITS, int BM>
cudaError_t gemm_typed(const GemmArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(a.m, BM)),
                  static_cast<unsigned>(ceil_div(a.w.n, kBN)), static_cast<unsigned>(a.splits));
  QUANTLAB_LAUNCH(grid, kThreads, 0, stream, gemm_kernel<T, BITS, BM>)(a);
  QUANTLAB_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (a.splits > 1) {
    const int64_t mn = a.m * a.w.n;
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(mn, threads), 4096));
    QUANTLAB_LAUNCH(blocks, threads, 0, stream, splitk_reduce_kernel<T>)(a.workspace, static_cast<T*>(a.y),
                                                            mn, a.splits);
  }
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

template <typename T, int BITS>
cudaError_t gemm_bm(const GemmArgs& a, cudaStream_t stream) {
  switch (tile_m(a.m)) {
    case 16: return gemm_typed<T, BITS, 16>(a, stream);
    case 32: return gemm_typed<T, BITS, 32>(a, stream);
    default: return gemm_typed<T, BITS, 64>(a, stream);
  }
}

template <typename T>
cudaError_t gemm_bits(const GemmArgs& a, cudaStream_t stream) {
  switch (a.w.bits) {
    case 2: return gemm_bm<T, 2>(a, stream);
    case 3: return gemm_bm<T, 3>(a, stream);
    case 4: return gemm_bm<T, 4>(a, stream);
    case 8: return gemm_bm<T, 8>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool gemm_supported(const CudaWeight& w) {
  const bool bits_ok = w.bits == 2 || w.bits == 3 || w.bits == 4 || w.bits == 8;
  return bits_ok && w.n > 0 && w.k > 0 && w.group_size > 0 && w.k % w.group_size == 0 &&
         (w.group_size % kChunk == 0 || w.group_size == w.k) &&
         ceil_div(w.n, kBN) <= kMaxGridY && ceil_div(w.k, kBK) <= INT_MAX;
}

int gemm_pick_splits(int64_t m, int64_t n, int64_t k, int sm_count) {
  if (m < 1 || n < 1 || k < 1 || sm_count < 1) return 1;
  const int64_t tiles = ceil_div(m, tile_m(m)) * ceil_div(n, kBN);
  if (tiles >= sm_count) return 1;
  int64_t s = ceil_div(2 * static_cast<int64_t>(sm_count), tiles);  // about two CTAs per SM
  s = std::min<int64_t>(s, ceil_div(k, kBK) / kMinKTilesPerSplit);
  s = std::min<int64_t>(s, kGemmMaxSplits);
  return static_cast<int>(std::max<int64_t>(s, 1));
}

size_t gemm_workspace_bytes(int64_t m, int64_t n, int64_t k, int splits) {
  if (m < 1 || n < 1 || k < 1) return 0;
  int eff = 1, per = 1;
  split_plan(k, splits, &eff, &per);
  return eff > 1 ? static_cast<size_t>(eff) * static_cast<size_t>(m) * static_cast<size_t>(n) *
                       sizeof(float)
                 : 0;
}

cudaError_t launch_gemm(const CudaWeight& w, const void* x, void* y, int64_t m, DType dtype,
                        int splits, float* workspace, cudaStream_t stream) {
  if (m < 1 || splits < 1 || !gemm_supported(w)) return cudaErrorInvalidValue;
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  if (ceil_div(m, tile_m(m)) > INT_MAX) return cudaErrorInvalidValue;
  GemmArgs a{};
  a.w = w;
  a.x = x;
  a.y = y;
  a.workspace = workspace;
  a.m = m;
  a.k_tiles = static_cast<int>(ceil_div(w.k, kBK));
  split_plan(w.k, splits, &a.splits, &a.k_tiles_per_split);
  if (a.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  a.x_vec = (w.k % kChunk == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0) ? 1 : 0;
  return dtype == DType::kFloat16 ? gemm_bits<__half>(a, stream)
                                  : gemm_bits<__nv_bfloat16>(a, stream);
}

}  // namespace quantlab::groupwise_int
