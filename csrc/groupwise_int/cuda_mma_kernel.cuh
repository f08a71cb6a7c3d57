// The mma kernel template (included by cuda_mma_f16.cu and cuda_mma_bf16.cu, one activation
// dtype per file so the two compile in parallel). Host logic: cuda_mma.cu. Every index -- global
// words, scales and zeros, shared-memory slots, ldmatrix rows, output elements, split ranges --
// comes from mma_layout.h, whose section names ([B-tiles], [B-frag 4-bit], [scales], [smem],
// [A-ldmatrix], [epilogue], [split-K]) the comments here use; the layout's derivation is in
// quantlab/formats/groupwise_int_mma_layout.py.
//
// Design:
// - CTA = 4 warps; warp w owns the 64-column slab n64 = 4 * blockIdx.x + w ([epilogue]) for the
//   CTA's m rows (MB m16 blocks, MB = 1, 2 or 4) and k range (blockIdx.z: [split-K]). Each weight
//   is read once per CTA row block and used by exactly one warp, so a warp's lanes copy their own
//   B fragments and no two warps share B data.
// - Pipeline: kStages-deep cp.async ring over 64-deep k tiles. Per stage: B (each lane its own
//   16-byte chunks, with an L2 evict_first policy: streamed once, they should not push the
//   activations out of L2), the BM x 64 activation tile (zero-filled past M and K; normal policy:
//   every CTA of the row block re-reads it), and the scale/zero rows of the <= 4 groups the tile
//   touches. One __syncthreads per stage: it publishes stage `it` and retires stage `it - 1`,
//   whose buffer the loads issued next overwrite.
// - Compute per 16-deep k step: ldmatrix.x4 per m16 block ([A-ldmatrix]); the lane's words
//   from shared memory; dequant to B fragments ([B-frag 4-bit] / [B-frag 8-bit]); 8 mma per m16
//   block. The group's scales/zero points are turned into per-column constants only when the
//   group changes (once per 128 k at g128).
// - Dequant: kHalfMath (scale dtype == activation dtype, except 8-bit bf16): one lop3/prmt puts
//   two codes under a magic exponent (magic + q, exact), HSUB2 of (magic + z) (exact), HMUL2 by
//   the scale (one rounding): bit-identical to rounding the reference's fp32 (q - z) * s.
//   Otherwise fp32: (2^23 + q) - (2^23 + z), times the fp32 scale (exact), one rounding to T.
// - fp32 accumulation; partial sums of a split go to an fp32 workspace and the last CTA of the
//   output tile (atomic counter) adds the splits in index order, so the result does not depend
//   on which CTA finishes last (deterministic).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cuda_check.h"
#include "common/cuda_convert.cuh"
#include "common/cuda_launch.cuh"
#include "common/ptx.cuh"
#include "groupwise_int/cuda_mma.cuh"
#include "groupwise_int/mma_layout.h"

namespace quantlab::groupwise_int::mma {

using mma_layout::kAPitch;
using mma_layout::kWarps;
constexpr int kThreads = kWarps * 32;
constexpr int kSteps = mma_layout::kStepsPerStage;  // k16 steps per stage
constexpr int kMaxStageGroups = 4;        // a 64-deep tile touches <= 4 groups of >= 16
constexpr int kSmemBudget = 96 * 1024;    // under sm_89's 99 KB per block

static_assert(kMmaCtaN == kWarps * kMmaTileN && kMmaTileN == mma_layout::kTileN &&
                  kMmaStageK == mma_layout::kStageK,
              "CTA width and stage depth");

template <int BITS, int MB>
struct Smem {
  static constexpr int kB = kWarps * kSteps * 32 * BITS * 4;  // B words of all warps
  static constexpr int kA = MB * 16 * kAPitch * 2;
  static constexpr int kS = kMaxStageGroups * kWarps * 8 * 16;        // [row][warp][g] 16 B
  static constexpr int kZ = kMaxStageGroups * kWarps * 8 * BITS;      // [row][warp][g] bits B
  static constexpr int kStage = kB + kA + kS + kZ;
  static constexpr int kStages = 4 * kStage <= kSmemBudget ? 4 : 3;
  static constexpr int kTotal = kStages * kStage;
  static_assert(kB % 16 == 0 && kA % 16 == 0 && kS % 16 == 0 && kZ % 16 == 0, "alignment");
  static_assert(kTotal <= kSmemBudget, "shared memory");
};

struct Args {
  MmaWeight w;
  const void* x;
  void* y;
  float* workspace;  // [splits, M, Np]
  int* counters;     // [m ctas * n ctas]
  int m;
  int n_pad;
  int k_tiles;
  int k_tiles_per_split;
  int splits;
};

template <typename T>
struct Vec2;
template <>
struct Vec2<__half> {
  using type = __half2;
  static constexpr uint32_t kMagic = 0x6400u;  // 1024.0: codes < 1024 land in the mantissa
};
template <>
struct Vec2<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x4300u;  // 128.0: codes < 128
};

// The PTX instructions, through csrc/common/ptx.cuh's wrappers (the emulation implements them).
__device__ __forceinline__ uint64_t evict_first_policy() { return ptx::evict_first_policy(); }

__device__ __forceinline__ void cp_async16_stream(void* dst, const void* src, uint64_t policy) {
  ptx::cp_async_cg16_hint(dst, src, policy);
}

// 16 bytes, zero-filled when !valid (src must still be a valid address).
__device__ __forceinline__ void cp_async16_zfill(void* dst, const void* src, bool valid) {
  ptx::cp_async_cg16_zfill(dst, src, valid ? 16 : 0);
}

template <int BYTES>
__device__ __forceinline__ void cp_async_small(void* dst, const void* src) {
  ptx::cp_async_ca<BYTES>(dst, src);
}

__device__ __forceinline__ void cp_async_commit() { ptx::cp_async_commit_group(); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ptx::cp_async_wait_group<N>();
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], const void* p) {
  ptx::ldmatrix_x4(a, p);
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    ptx::mma_m16n8k16_f16(c, a, b0, b1);
  } else {
    ptx::mma_m16n8k16_bf16(c, a, b0, b1);
  }
}

// (a & b) | c in one instruction: lop3 with the table of F = (A & B) | C, 0xF0 & 0xCC | 0xAA.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  return ptx::lop3<0xEA>(a, b, c);
}

template <typename V>
__device__ __forceinline__ V as_vec(uint32_t u) {
  V v;
  memcpy(&v, &u, 4);
  return v;
}
template <typename V>
__device__ __forceinline__ uint32_t as_u32(V v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

template <typename T>
__device__ __forceinline__ uint32_t pack_floats(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    return as_u32(__floats2half2_rn(lo, hi));  // .x (low 16 bits) = lo
  } else {
    return as_u32(__floats2bfloat162_rn(lo, hi));
  }
}

template <typename S>
__device__ __forceinline__ float scale_to_float(uint16_t bits16) {
  if constexpr (std::is_same_v<S, __half>) {
    return __half2float(__ushort_as_half(bits16));
  } else {
    return __bfloat162float(__ushort_as_bfloat16(bits16));
  }
}

// Per-column constants of the current group for the lane's 8 columns (subtiles c = 0..7).
template <bool kHalfMath>
struct GroupConsts;
template <>
struct GroupConsts<true> {
  uint32_t s2[8];   // the scale in both halves
  uint32_t zm2[8];  // magic + z in both halves
};
template <>
struct GroupConsts<false> {
  float s[8];
  float zm[8];  // 2^23 + z
};

// [scales] / [zeros]: the lane's 16-byte scale chunk and its 8 zero codes -> constants.
template <typename T, typename S, int BITS, bool kHalfMath>
__device__ __forceinline__ void load_group(GroupConsts<kHalfMath>& gc, const uint4& sv,
                                           const uint32_t (&zw)[BITS / 4], bool has_zeros) {
  const uint32_t s_words[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const uint16_t sbits = static_cast<uint16_t>(s_words[c / 2] >> (16 * (c % 2)));
    uint32_t z = 1u << (BITS - 1);
    if (has_zeros) {
      constexpr int kPerWord = 32 / BITS;
      z = (zw[c / kPerWord] >> (BITS * (c % kPerWord))) & ((1u << BITS) - 1u);
    }
    if constexpr (kHalfMath) {
      gc.s2[c] = static_cast<uint32_t>(sbits) * 0x00010001u;
      const uint32_t zm = Vec2<T>::kMagic + z;  // exact: z < 2^mantissa bits of the magic
      gc.zm2[c] = zm * 0x00010001u;
    } else {
      gc.s[c] = scale_to_float<S>(sbits);
      gc.zm[c] = __uint_as_float(0x4B000000u | z);
    }
  }
}

// [B-frag 4-bit] word j -> b[2j][0..1], b[2j+1][0..1].
template <typename T, bool kHalfMath>
__device__ __forceinline__ void dequant4(uint32_t w, int j, const GroupConsts<kHalfMath>& gc,
                                         uint32_t (&b)[8][2]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = 2 * j + i / 2;
    const uint32_t shifted = w >> (4 * i);  // nibbles i and i + 4 at bits 0-3 and 16-19
    if constexpr (kHalfMath) {
      using V = typename Vec2<T>::type;
      const uint32_t q = lop3_and_or(shifted, 0x000F000Fu, Vec2<T>::kMagic * 0x00010001u);
      const V v = __hmul2(__hsub2(as_vec<V>(q), as_vec<V>(gc.zm2[c])), as_vec<V>(gc.s2[c]));
      b[c][i % 2] = as_u32(v);
    } else {
      const float lo = __uint_as_float((shifted & 0xFu) | 0x4B000000u);
      const float hi = __uint_as_float(((shifted >> 16) & 0xFu) | 0x4B000000u);
      b[c][i % 2] = pack_floats<T>(__fmul_rn(__fsub_rn(lo, gc.zm[c]), gc.s[c]),
                                   __fmul_rn(__fsub_rn(hi, gc.zm[c]), gc.s[c]));
    }
  }
}

// [B-frag 8-bit] word j -> b[j][0] (bytes 0-1), b[j][1] (bytes 2-3).
template <typename T, bool kHalfMath>
__device__ __forceinline__ void dequant8(uint32_t w, int j, const GroupConsts<kHalfMath>& gc,
                                         uint32_t (&b)[8][2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if constexpr (kHalfMath) {
      static_assert(std::is_same_v<T, __half>, "8-bit half math is fp16 only (bf16 magic < 256)");
      using V = typename Vec2<T>::type;
      // bytes 2r, 2r+1 under 0x64 high bytes: (1024 + q_lo, 1024 + q_hi).
      const uint32_t q = __byte_perm(w, 0x64646464u, r == 0 ? 0x5140u : 0x5342u);
      const V v = __hmul2(__hsub2(as_vec<V>(q), as_vec<V>(gc.zm2[j])), as_vec<V>(gc.s2[j]));
      b[j][r] = as_u32(v);
    } else {
      // byte b under 0x4B in the top byte: 2^23 + q.
      const float lo = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u | (2 * r)));
      const float hi = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u | (2 * r + 1)));
      b[j][r] = pack_floats<T>(__fmul_rn(__fsub_rn(lo, gc.zm[j]), gc.s[j]),
                               __fmul_rn(__fsub_rn(hi, gc.zm[j]), gc.s[j]));
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_pair(const Args& a, int row, int col, float v0, float v1) {
  T* y = static_cast<T*>(a.y);
  const int64_t n = a.w.n;
  const int64_t base = static_cast<int64_t>(row) * n + col;
  if (col + 1 < n && (n % 2) == 0) {
    // col is even and n even: a 4-byte aligned pair.
    *reinterpret_cast<typename Vec2<T>::type*>(y + base) =
        as_vec<typename Vec2<T>::type>(pack_floats<T>(v0, v1));
  } else {
    if (col < n) y[base] = from_float<T>(v0);
    if (col + 1 < n) y[base + 1] = from_float<T>(v1);
  }
}

template <typename T, typename S, int BITS, int MB>
__global__ void __launch_bounds__(kThreads) mma_kernel(const Args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync m16n8k16 with bf16 and cp.async need sm_80; the adapter never routes here
#else
  constexpr bool kHalfMath =
      std::is_same_v<T, S> && !(BITS == 8 && std::is_same_v<T, __nv_bfloat16>);
  using L = Smem<BITS, MB>;
  constexpr int kStages = L::kStages;
  constexpr int kChunks = BITS / 4;  // 16-byte chunks per lane per B tile
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int n_tiles = a.n_pad / kMmaTileN;
  const int nn = blockIdx.x * kWarps + warp;  // this warp's n64 slab
  const bool warp_active = nn < n_tiles;
  const int m0 = blockIdx.y * MB * 16;
  const int kt_begin = blockIdx.z * a.k_tiles_per_split;
  const int kt_end = min(a.k_tiles, kt_begin + a.k_tiles_per_split);
  const int num_kt = kt_end - kt_begin;  // >= 1: split_plan makes no empty range
  const int64_t gsize = a.w.group_size;
  const bool has_zeros = a.w.zeros != nullptr;
  const uint64_t policy = evict_first_policy();
  const T* x = static_cast<const T*>(a.x);
  const S* scales = static_cast<const S*>(a.w.scales);

  auto b_smem = [&](int st) { return smem + st * L::kStage; };
  auto a_smem = [&](int st) { return smem + st * L::kStage + L::kB; };
  auto s_smem = [&](int st) { return smem + st * L::kStage + L::kB + L::kA; };
  auto z_smem = [&](int st) { return smem + st * L::kStage + L::kB + L::kA + L::kS; };

  auto load_stage = [&](int st, int kt) {
    // Activations: BM rows x 8 chunks of 8 elements; zero-filled past M and K.
#pragma unroll
    for (int i = 0; i < MB; ++i) {
      const int idx = tid + i * kThreads;
      const int row = mma_layout::a_chunk_row(idx);
      const int kc = mma_layout::a_chunk_k(idx);
      const int64_t m = m0 + row;
      const int64_t k = static_cast<int64_t>(kt) * kMmaStageK + kc;
      const bool valid = m < a.m && k < a.w.k;  // K % 8 == 0: a chunk is all in or all out
      const T* src = valid ? x + m * a.w.k + k : x;
      cp_async16_zfill(a_smem(st) + mma_layout::smem_a_element(row, kc) * 2, src, valid);
    }
    if (!warp_active) return;
    // [B-tiles]: the lane's words of tiles (4 kt + s, nn).
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const uint32_t* src =
          a.w.qweight + mma_layout::b_word(static_cast<int64_t>(kt) * kSteps + s, nn, n_tiles,
                                           lane, 0, BITS);
      unsigned char* dst = b_smem(st) + mma_layout::smem_b_word(warp, s, lane, BITS) * 4;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) cp_async16_stream(dst + 16 * c, src + 4 * c, policy);
    }
    // [scales] / [zeros] of the groups this tile touches: lane -> (row lane / 8, g' = lane % 8).
    const int64_t first = static_cast<int64_t>(kt) * kMmaStageK / gsize;
    const int64_t last = (static_cast<int64_t>(kt) * kMmaStageK + kMmaStageK - 1) / gsize;
    const int r = lane / 8;
    const int gg = lane % 8;
    if (r <= last - first) {
      const int slot = mma_layout::smem_group_slot(r, warp, gg);
      cp_async_small<16>(s_smem(st) + slot * 16,
                         scales + mma_layout::scale_index(first + r, nn, n_tiles, gg, 0));
      if (has_zeros) {
        cp_async_small<BITS>(z_smem(st) + slot * BITS,
                             a.w.zeros + mma_layout::zero_word(first + r, nn, n_tiles, gg, 0, BITS));
      }
    }
  };

  float acc[MB][8][4];
#pragma unroll
  for (int mb = 0; mb < MB; ++mb)
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mb][c][i] = 0.0f;

  GroupConsts<kHalfMath> gc;
  int64_t cur_group = -1;

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < num_kt) load_stage(i, kt_begin + i);
    cp_async_commit();
  }

  for (int it = 0; it < num_kt; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    {
      const int next = it + kStages - 1;
      if (next < num_kt) load_stage(next % kStages, kt_begin + next);
      cp_async_commit();
    }
    if (!warp_active) continue;
    const int st = it % kStages;
    const int kt = kt_begin + it;
    const int64_t first = static_cast<int64_t>(kt) * kMmaStageK / gsize;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int64_t group = (static_cast<int64_t>(kt) * kMmaStageK + s * 16) / gsize;
      if (group != cur_group) {  // warp-uniform
        const int r = static_cast<int>(group - first);
        const int slot = mma_layout::smem_group_slot(r, warp, g);
        const uint4 sv = *reinterpret_cast<const uint4*>(s_smem(st) + slot * 16);
        uint32_t zw[BITS / 4] = {};
        if (has_zeros) {
#pragma unroll
          for (int q = 0; q < BITS / 4; ++q)
            zw[q] = reinterpret_cast<const uint32_t*>(z_smem(st) + slot * BITS)[q];
        }
        load_group<T, S, BITS, kHalfMath>(gc, sv, zw, has_zeros);
        cur_group = group;
      }
      // [A-ldmatrix]
      uint32_t afrag[MB][4];
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        ldmatrix_x4(afrag[mb], a_smem(st) + mma_layout::smem_a_element(
                                                mma_layout::ldmatrix_row(mb, lane),
                                                mma_layout::ldmatrix_k(s, lane)) * 2);
      }
      // B: the lane's own words, then dequant.
      const uint4* wsrc =
          reinterpret_cast<const uint4*>(b_smem(st) + mma_layout::smem_b_word(warp, s, lane, BITS) * 4);
      uint32_t bfrag[8][2];
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const uint4 v = wsrc[c];
        const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if constexpr (BITS == 4) {
            dequant4<T, kHalfMath>(words[j], j, gc, bfrag);
          } else {
            dequant8<T, kHalfMath>(words[j], 4 * c + j, gc, bfrag);
          }
        }
      }
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int c = 0; c < 8; ++c) mma16816<T>(acc[mb][c], afrag[mb], bfrag[c][0], bfrag[c][1]);
    }
  }
  cp_async_wait<0>();

  // [epilogue] c_i of subtile c, block mb: row m0 + 16 mb + g + 8 (i / 2), col 64 nn + 8 c + 2t
  // + i % 2.
  if (a.splits == 1) {
    if (warp_active) {
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = static_cast<int>(mma_layout::out_row(m0, mb, lane, 2 * h));
          if (row >= a.m) continue;
#pragma unroll
          for (int c = 0; c < 8; ++c)
            store_pair<T>(a, row, static_cast<int>(mma_layout::out_col(nn, c, lane, 0)),
                          acc[mb][c][2 * h], acc[mb][c][2 * h + 1]);
        }
    }
    return;
  }
  // [split-K] fp32 partials of this range, then the last CTA of the tile adds all ranges in order.
  const int64_t mn = static_cast<int64_t>(a.m) * a.n_pad;
  if (warp_active) {
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = static_cast<int>(mma_layout::out_row(m0, mb, lane, 2 * h));
        if (row >= a.m) continue;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const int col = static_cast<int>(mma_layout::out_col(nn, c, lane, 0));
          float* dst = a.workspace + blockIdx.z * mn + static_cast<int64_t>(row) * a.n_pad + col;
          *reinterpret_cast<float2*>(dst) = make_float2(acc[mb][c][2 * h], acc[mb][c][2 * h + 1]);
        }
      }
  }
  __threadfence();  // partials visible device-wide before the counter says so
  __syncthreads();
  __shared__ int is_last;
  const int counter = blockIdx.y * gridDim.x + blockIdx.x;
  if (tid == 0) is_last = atomicAdd(a.counters + counter, 1) == a.splits - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (warp_active) {
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = static_cast<int>(mma_layout::out_row(m0, mb, lane, 2 * h));
        if (row >= a.m) continue;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const int col = static_cast<int>(mma_layout::out_col(nn, c, lane, 0));
          const float* src = a.workspace + static_cast<int64_t>(row) * a.n_pad + col;
          float v0 = 0.0f, v1 = 0.0f;
          for (int z = 0; z < a.splits; ++z) {
            const float2 p = __ldcg(reinterpret_cast<const float2*>(src + z * mn));
            v0 += p.x;
            v1 += p.y;
          }
          store_pair<T>(a, row, col, v0, v1);
        }
      }
  }
  if (tid == 0) a.counters[counter] = 0;  // ready for the next launch that reuses the buffer
#endif
}

template <typename T, typename S, int BITS, int MB>
cudaError_t launch_instance(const Args& a, dim3 grid, cudaStream_t stream) {
  using L = Smem<BITS, MB>;
  auto kernel = mma_kernel<T, S, BITS, MB>;
  // Per launch: the attribute is per device, and the call is cheap next to a launch.
  QUANTLAB_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kTotal));
  QUANTLAB_LAUNCH(grid, kThreads, L::kTotal, stream, kernel)(a);
  QUANTLAB_CUDA_RETURN_LAUNCH_ERROR();
}

template <typename T, typename S, int BITS, int MB>
int occupancy_instance() {
  using L = Smem<BITS, MB>;
  auto kernel = mma_kernel<T, S, BITS, MB>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kTotal) !=
      cudaSuccess) {
    return 1;
  }
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, L::kTotal) !=
      cudaSuccess) {
    return 1;
  }
  return blocks > 0 ? blocks : 1;
}

// One activation dtype's instances, dispatched on (scale dtype, bits, MB); defined in
// cuda_mma_f16.cu / cuda_mma_bf16.cu.
template <typename T>
cudaError_t launch_for_act(const Args& a, dim3 grid, int mb, cudaStream_t stream);
template <typename T>
int occupancy_for_act(DType scale_dtype, int bits, int mb);

#define QUANTLAB_MMA_DISPATCH(T, SCALE_DTYPE, BITS_, MB_, CALL)                 \
  do {                                                                         \
    const bool scale_half_ = (SCALE_DTYPE) == DType::kFloat16;                 \
    if ((BITS_) == 4) {                                                        \
      if ((MB_) == 1) return scale_half_ ? CALL(T, __half, 4, 1) : CALL(T, __nv_bfloat16, 4, 1); \
      if ((MB_) == 2) return scale_half_ ? CALL(T, __half, 4, 2) : CALL(T, __nv_bfloat16, 4, 2); \
      return scale_half_ ? CALL(T, __half, 4, 4) : CALL(T, __nv_bfloat16, 4, 4);                 \
    }                                                                          \
    if ((MB_) == 1) return scale_half_ ? CALL(T, __half, 8, 1) : CALL(T, __nv_bfloat16, 8, 1);   \
    if ((MB_) == 2) return scale_half_ ? CALL(T, __half, 8, 2) : CALL(T, __nv_bfloat16, 8, 2);   \
    return scale_half_ ? CALL(T, __half, 8, 4) : CALL(T, __nv_bfloat16, 8, 4);                   \
  } while (0)

}  // namespace quantlab::groupwise_int::mma
