// PVQ decode primitives shared by the CPU and CUDA kernels (torch-free, header-only).
//
// Layout (docs/formats.md "PVQ", quantlab/formats/pvq.py; decode: quantlab/ops/pvq_reference.py):
// vector j of a layer (row n, position v: j = n * (K / D) + v) has an F-bit code at stream bits
// [j * F, (j + 1) * F) of a little-endian bitstream of 32-bit words (common/bitstream.h,
// quantlab/formats/bitstream.py); code = level * N(D, P) + index, and index is the rank
// of the pyramid point y (sum |y| = P) in the order: first coordinate 0, +1, -1, +2, -2, ...,
// then recursively the rest. Decoding is
//   g = row_scale * levels[level];  r = g / sqrtf(sum y^2);  w'_i = y_i * r   (fp32, IEEE)
// which the kernels reproduce bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define QUANTLAB_PVQ_HD __host__ __device__ __forceinline__
#else
#define QUANTLAB_PVQ_HD inline
#endif

namespace quantlab::pvq {

constexpr int kMaxCodeBits = 63;
constexpr int kMaxDim = 64;
constexpr int kMaxPulses = 255;

// Entries of the count table N(n, k), 0 <= n <= dim, 0 <= k <= pulses (row-major by n).
QUANTLAB_PVQ_HD int count_entries(int dim, int pulses) { return (dim + 1) * (pulses + 1); }

// Fills counts[n * (pulses + 1) + k] = N(n, k) by N(n, k) = N(n-1, k) + N(n-1, k-1) + N(n, k-1).
// Returns false if N(dim, pulses) >= 2^63 (codes would not fit) or the arguments are out of range.
inline bool fill_counts(int dim, int pulses, uint64_t* counts) {
  if (dim < 1 || dim > kMaxDim || pulses < 1 || pulses > kMaxPulses) return false;
  const int stride = pulses + 1;
  constexpr uint64_t kLimit = uint64_t{1} << kMaxCodeBits;
  for (int k = 0; k <= pulses; ++k) counts[k] = k == 0 ? 1 : 0;  // N(0, k)
  for (int n = 1; n <= dim; ++n) {
    uint64_t* row = counts + n * stride;
    const uint64_t* prev = row - stride;
    row[0] = 1;
    for (int k = 1; k <= pulses; ++k) {
      // Saturate instead of wrapping: any entry at the limit makes the whole table invalid.
      const uint64_t v = prev[k] + prev[k - 1] + row[k - 1];
      row[k] = (v >= kLimit || v < prev[k]) ? kLimit : v;
    }
  }
  return counts[dim * stride + pulses] < kLimit;
}

// The `width`-bit field (1..63) at stream bit `bit` of `words` (n_words long). A field touches at
// most three words; words past the end are never read.
QUANTLAB_PVQ_HD uint64_t read_field(const uint32_t* words, int64_t n_words, int64_t bit, int width) {
  const int64_t w = bit >> 5;
  const int shift = static_cast<int>(bit & 31);
  uint64_t v = static_cast<uint64_t>(words[w]) >> shift;
  int have = 32 - shift;
  if (have < width && w + 1 < n_words) {
    v |= static_cast<uint64_t>(words[w + 1]) << have;
    have += 32;
  }
  // have <= 63 here whenever the third word is needed, so the shift is defined.
  if (have < width && w + 2 < n_words) v |= static_cast<uint64_t>(words[w + 2]) << have;
  return v & ((uint64_t{1} << width) - 1);
}

// The pyramid point of `index` (< N(dim, pulses)) into y[0..dim); returns sum y^2.
// `counts` is the table of fill_counts (any memory space the caller can read).
// Work: one step per coordinate plus one per pulse (magnitudes are scanned from 0 upwards).
QUANTLAB_PVQ_HD int unrank(uint64_t index, const uint64_t* counts, int dim, int pulses, int* y) {
  const int stride = pulses + 1;
  int k = pulses;
  int yy = 0;
  int j = 0;
  for (; j < dim && k > 0; ++j) {
    if (j == dim - 1) {
      // The last coordinate takes every remaining pulse; the index is just its sign.
      y[j] = index == 0 ? k : -k;
      yy += k * k;
      return yy;
    }
    const uint64_t* rest = counts + (dim - j - 1) * stride;  // N(n - 1, .) for n = dim - j
    uint64_t c = rest[k];
    if (index < c) {
      y[j] = 0;
      continue;
    }
    index -= c;
    int m = 1;
    // Each magnitude m holds 2 * N(n - 1, k - m) points (+m, then -m). A valid index always
    // stops at m <= k; the bound only keeps a corrupt one inside the table.
    for (c = rest[k - 1]; index >= 2 * c && m < k; c = rest[k - m]) {
      index -= 2 * c;
      ++m;
    }
    if (index < c) {
      y[j] = m;
    } else {
      y[j] = -m;
      index -= c;
    }
    k -= m;
    yy += m * m;
  }
  for (; j < dim; ++j) y[j] = 0;  // no pulses left: the rest is zero
  return yy;
}

// ---- Branchless variant (CPU): the first kThresholds cumulative counts per (n, k) ----------------
//
// T(n, k, t) = the number of points of P(n, k) whose first coordinate has magnitude < t:
// T(n, k, 1) = N(n-1, k), T(n, k, t+1) = T(n, k, t) + 2 N(n-1, k-t) for t <= k, and N(n, k) for
// t > k (never <= a valid index). A coordinate's magnitude is then the number of thresholds at
// or below the index: compare-and-add without branches, which matters because the magnitudes
// are data-dependent and a scan mispredicts about once per coordinate.

constexpr int kThresholds = 8;

// Entries of the threshold table: kThresholds per (n, k).
QUANTLAB_PVQ_HD int threshold_entries(int dim, int pulses) {
  return count_entries(dim, pulses) * kThresholds;
}

// thresholds[(n * (pulses + 1) + k) * kThresholds + t - 1] = T(n, k, t), t = 1 .. kThresholds
// (n >= 1; the n = 0 entries are unused and set to 0).
inline void fill_thresholds(int dim, int pulses, const uint64_t* counts, uint64_t* thresholds) {
  const int stride = pulses + 1;
  for (int k = 0; k <= pulses; ++k)
    for (int t = 0; t < kThresholds; ++t) thresholds[k * kThresholds + t] = 0;
  for (int n = 1; n <= dim; ++n) {
    const uint64_t* rest = counts + (n - 1) * stride;
    for (int k = 0; k <= pulses; ++k) {
      uint64_t* out = thresholds + (n * stride + k) * kThresholds;
      uint64_t acc = rest[k];
      for (int t = 1; t <= kThresholds; ++t) {
        out[t - 1] = t <= k + 1 ? acc : counts[n * stride + k];
        if (t <= k) acc += 2 * rest[k - t];
      }
    }
  }
}

// unrank() with the threshold table: same result, fewer mispredicted branches.
QUANTLAB_PVQ_HD int unrank_thresholds(uint64_t index, const uint64_t* counts,
                                      const uint64_t* thresholds, int dim, int pulses, int* y) {
  const int stride = pulses + 1;
  int k = pulses;
  int yy = 0;
  for (int j = 0; j < dim - 1; ++j) {
    const int n = dim - j;
    const uint64_t* rest = counts + (n - 1) * stride;
    const uint64_t* t = thresholds + (n * stride + k) * kThresholds;
    int m = 0;
    for (int i = 0; i < kThresholds; ++i) m += t[i] <= index ? 1 : 0;
    uint64_t below = m == 0 ? 0 : t[m - 1];
    if (m == kThresholds) {
      // Rare: a magnitude of kThresholds or more; continue the scan in the count table.
      while (m < k && index >= below + 2 * rest[k - m]) {
        below += 2 * rest[k - m];
        ++m;
      }
    }
    index -= below;
    const uint64_t c = rest[k - m];
    const bool neg = m > 0 && index >= c;
    index -= neg ? c : 0;
    y[j] = neg ? -m : m;
    k -= m;
    yy += m * m;
  }
  // The last coordinate takes every remaining pulse; the index is just its sign.
  y[dim - 1] = index == 0 ? k : -k;
  return yy + k * k;
}

}  // namespace quantlab::pvq
