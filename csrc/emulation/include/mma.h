// The CPU emulation's <mma.h>: nvcuda::wmma for the 16x16x16 fp16/bf16 -> fp32 fragments the
// wmma GEMM uses, with the CUDA C++ Programming Guide's contract ("Warp Matrix Functions"):
// every call is a warp collective that all 32 lanes reach with the same arguments; mptr is
// 256-bit aligned and ldm a multiple of 16 bytes. A fragment's distribution over the lanes is
// unspecified by CUDA, so here every lane holds the whole tile; a store writes each element from
// exactly one lane (element e from lane e % 32), as the hardware writes each element once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation has the m16n16k16 shape only");
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = kRows * kCols;
  T x[kRows * kCols];  // row-major [kRows][kCols], whatever the memory layout
};

namespace detail {

struct CallArgs {
  const void* ptr;
  unsigned ldm;
  int layout;
};

QUANTLAB_EMU_NO_TSAN inline bool same_bytes(const unsigned char* a, const unsigned char* b,
                                             size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (a[i] != b[i]) return false;
  return true;
}

QUANTLAB_EMU_NO_TSAN inline void uniform_combine(const unsigned char (*in)[quantlab_emu::kSlotBytes],
                                                unsigned char (*)[quantlab_emu::kSlotBytes],
                                                unsigned, const void* context) {
  for (int lane = 1; lane < 32; ++lane) {
    if (!same_bytes(in[lane], in[0], sizeof(CallArgs))) {
      quantlab_emu::fail("warp collective", "%s: lane %d passed other arguments than lane 0",
                         static_cast<const char*>(context), lane);
    }
  }
}

// The rendezvous of one wmma call: every lane, same pointer, ldm and layout.
inline void rendezvous(const char* name, const void* ptr, unsigned ldm, int layout) {
  const CallArgs args{ptr, ldm, layout};
  char none = 0;
  quantlab_emu::warp_collective(name, 0xFFFFFFFFu, &args, sizeof args, &none, 0, uniform_combine,
                                name);
}

template <typename T>
void check_pointer(const char* name, const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    quantlab_emu::fail("misaligned", "%s: mptr %p is not 256-bit aligned", name,
                       static_cast<const void*>(p));
  }
  if ((ldm * sizeof(T)) % 16 != 0) {
    quantlab_emu::fail("misaligned", "%s: ldm %u is not a multiple of 16 bytes", name, ldm);
  }
}

}  // namespace detail

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulators take a layout argument");
  detail::check_pointer("wmma::load_matrix_sync", p, ldm);
  detail::rendezvous("wmma::load_matrix_sync", p, ldm, std::is_same_v<Layout, col_major>);
  using F = fragment<Use, 16, 16, 16, T, Layout>;
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.x[r * F::kCols + c] =
          std::is_same_v<Layout, col_major> ? p[c * ldm + r] : p[r * ldm + c];
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, T value) {
  for (T& v : f.x) v = value;
}

// D = A B + C per element: the 16 products exact, summed with C and rounded once to fp32.
template <typename T>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
              const fragment<matrix_b, 16, 16, 16, T, col_major>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  detail::rendezvous("wmma::mma_sync", nullptr, 0, 0);
  float out[256];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      double sum = c.x[r * 16 + n];
      for (int k = 0; k < 16; ++k)
        sum += static_cast<double>(static_cast<float>(a.x[r * 16 + k])) *
               static_cast<float>(b.x[k * 16 + n]);
      out[r * 16 + n] = static_cast<float>(sum);
    }
  std::memcpy(d.x, out, sizeof out);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  detail::check_pointer("wmma::store_matrix_sync", p, ldm);
  detail::rendezvous("wmma::store_matrix_sync", p, ldm, layout);
  const int lane = quantlab_emu::self().lane;
  for (int e = lane; e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[e];
  }
}

}  // namespace nvcuda::wmma
