// CPU kernels for the BitStack format (torch-free; layout in docs/formats.md, section BitStack).
//
// Layout read: signs uint8 [B, N, KB] (KB = ceil(K / 8); row n of block b packs its K signs MSB
// first, bit 1 = +1, each row starting on a byte), u fp32 [B, N, r], v fp32 [B, r, K] (the binding
// widens the stored fp16 factors). The weight is W = sum_b S_b ⊙ (u_b v_b); nothing here forms it.
//
// Threading: output rows are split over an OpenMP parallel region; built against torch this is the
// libgomp torch uses, so torch.set_num_threads() governs these kernels too.
#pragma once

#include <cstdint>

namespace quantlab::bitstack {

struct CpuParams {
  const uint8_t* signs;  // [B, N, KB]
  const float* u;        // [B, N, r]
  const float* v;        // [B, r, K]
  int64_t blocks;
  int64_t n;     // output features
  int64_t k;     // input features
  int64_t rank;  // r >= 1
};

// Most rows of x the lookup-table kernel takes; larger batches are rebuilt tile by tile and
// multiplied by a GEMM (the binding decides).
constexpr int64_t kLutMaxRows = 4;

// y [M, N] = x [M, K] @ W^T for 1 <= M <= kLutMaxRows, fp32, x and y contiguous (y overwritten).
//
// Per block and row of x, for every 4 consecutive columns j..j+3 a 16-entry table holds, for each
// of the 16 sign patterns, the r-vector sum_i ±(x[j+i] v[:, j+i]). A row of S then needs one
// r-wide table lookup-and-add per 4 weights (per sign nibble) instead of r multiply-adds per
// weight; the r-vector it accumulates is dotted with u[n] at the end. Tables cover K in chunks that
// stay in L2 and are built per thread (their cost is ~16 / rows-per-thread of the lookups).
void gemv_cpu(const CpuParams& p, const float* x, int64_t m, float* y);

// out [row1 - row0, K] = rows [row0, row1) of W (fp32; each block's u v product accumulated in
// fp32 in r order, then its sign applied). The binding multiplies such tiles for large batches.
void dequant_rows_cpu(const CpuParams& p, int64_t row0, int64_t row1, float* out);

// Which path gemv_cpu takes for `rank` on this CPU: "lut-avx512", "lut-avx2" or "lut-scalar".
// QUANTLAB_CPU_ISA=scalar (read on first use) forces the scalar path, avx2 caps it at AVX2.
const char* gemv_cpu_path(int64_t rank);

}  // namespace quantlab::bitstack
