// CPU kernels for ternary weights (torch-free; layouts in docs/formats.md, "Ternary", and
// quantlab/formats/ternary_packing.py, which is their specification; the arithmetic's is
// quantlab/ops/ternary_reference.py).
//
// Computes y = A8(x) @ W^T with W = s * t, t in {-1, 0, +1}, where A8 is BitNet b1.58's per-token
// int8 absmax quantization of x: inv = 127 / max(max|x|, 1e-5) (evaluated as torch does, as
// fp32(1 / amax) * 127), xq = round_half_even(x * inv).
// The integer sums acc_g = sum_{k in group g} t[n, k] xq[m, k] are exact; then
// y[m, n] = (sum_g acc_g * s[n, g]) / inv[m] in fp32.
//
// Weight layout read (the "LUT layout", built once per layer from the stored i2/tq1 bytes):
// uint8 [ceil(N / 16), ceil(K / 8), 32]. Each trit is two sign planes, t = (b1 + b0) / 2 with
// b1 = +1 iff t >= 0 and b0 = +1 iff t > 0; a plane's 4-bit index over a quad of columns
// 4j .. 4j+3 has bit i set where the plane is +1 at column 4j + i. Byte b of the 32 bytes at
// [tile, pair] holds, for tile row b / 2 and plane b % 2 (0: b1, 1: b0), the index of quad 2*pair
// in its low nibble and of quad 2*pair + 1 in its high nibble.
//
// Threading: output rows are split over an OpenMP parallel region; built against torch this is
// torch's own libgomp, so torch.set_num_threads() governs these kernels too.
#pragma once

#include <cstdint>

namespace quantlab::ternary {

// Scale granularities (the ops' group_size argument).
constexpr int64_t kPerTensor = 0;
constexpr int64_t kPerRow = -1;
// Output rows per tile of the LUT layout.
constexpr int64_t kTileRows = 16;

// Scales are read in the LUT layout too (quantlab.formats.ternary_packing.lut_pack_scales): fp32
// [1] per tensor, else [tiles][G][16] (G = 1 per row): the 16 row scales of a tile and group are
// contiguous, so a tile's sweep along K reads them sequentially.
struct LutParams {
  const uint8_t* lut;   // [tiles, pairs, 32]
  const float* scales;  // [1] (per tensor) or [tiles, G, 16] (per row: G = 1)
  int64_t n;            // out_features
  int64_t k;            // in_features
  int64_t group_size;   // kPerTensor, kPerRow, or a divisor of k that is a multiple of 8
};

inline int64_t lut_tiles(int64_t n) { return (n + kTileRows - 1) / kTileRows; }
inline int64_t lut_pairs(int64_t k) { return (k + 7) / 8; }

// y [M, N] fp32 = A8(x [M, K] fp32) @ W^T, x and y contiguous, any M >= 1 (x rows are processed
// in chunks of up to 4 that share each weight load). Uses AVX2 when the running CPU has it
// (checked at run time); a portable scalar path with the same tables and the same fp32 epilogue
// otherwise (the two give identical results). Setting QUANTLAB_CPU_ISA=scalar before the first
// call forces the scalar path.
void lut_mm_cpu(const LutParams& p, const float* x, int64_t m, float* y);

// "avx2" or "scalar": the path lut_mm_cpu takes on this CPU.
const char* lut_mm_cpu_path();

// BitNet's per-token int8 quantization: xq [M, k_padded] (columns k .. k_padded zero),
// inv [M]. Bit-exact with the reference (fp32 multiply, round half to even).
void quantize_activations(const float* x, int64_t m, int64_t k, int64_t k_padded, int8_t* xq,
                          float* inv);

// The dense weight s * t as fp32 [N, K] (exact), from the LUT layout.
void lut_dequant_cpu(const LutParams& p, float* out);

// The LUT layout from stored bytes: packing 0 = i2 ([N, row_bytes] with row_bytes >=
// ceil(K / 4)), 1 = tq1 ([N, ceil(K / 5)]). Returns the number of invalid codes met (i2 code 3,
// a non-canonical tq1 byte); the output is complete only when that is 0.
int64_t lut_pack_cpu(const uint8_t* packed, int64_t row_bytes, int packing, int64_t n, int64_t k,
                     uint8_t* lut);

}  // namespace quantlab::ternary
